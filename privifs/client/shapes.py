"""Normalisers for every wire shape the reference records (its sections 2, 3, 5 and 9).

Each function takes what the server sent and returns one canonical Python value, or raises
:class:`~privifs.errors.ProtocolError` naming what was unexpected. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import httpx

from privifs.errors import MalformedAnswer, ProtocolError

PENDING_WORDS = {"started", "pending", "1", "queued", "processing"}
SUCCESS_WORDS = {"succeeded", "success", "2", "done", "completed"}


def json_or_text(resp: httpx.Response) -> Any:
    raw = resp.content.decode("utf-8", "replace").strip()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's limit: text
        return raw


# what stays as it is in a stream URL the server gave, and in an authorization put into one's query
URL_SAFE = ":/?#[]@!$&'()*+,;=-._~%"
AUTH_SAFE = "%=+/-._~!$'()*,;:@"

# what an id or token sent as bare text (the reference's shape 4) can be: one word, no spaces,
# quotes, brackets or braces; an HTML page or a JSON body cut short is none
_BARE = re.compile(r"""[^\s"'{}\[\]<>]+""")


def bare_text(body: str, what: str) -> str:
    """A token, id or status word the server sent as bare text (maybe still in quotes). Text that
    cannot be one, an HTML error page or a JSON body cut short (``{"token":"dtk-1a2b``), raises
    :class:`~privifs.errors.MalformedAnswer`, and so does a JSON string cut short
    (``"dtk-1a2b``, an opening quote without its closing one): taken for a token it made a stored
    file point at no token (the next step failed with "not found" and the mount dropped the file as deleted)."""
    t = body.strip()
    s = t.strip('"').strip()
    if t.startswith('"') != t.endswith('"') or t == '"' or not _BARE.fullmatch(s):  # '"dtk-1a2b': cut short
        raise MalformedAnswer(f"{what}: the server's answer cannot be read ({ascii(body[:60])})")
    return s


def command_id(resp: httpx.Response) -> str:
    """The command id of a 202: object, bare string, one-element array, raw text or header."""
    body = json_or_text(resp)
    if isinstance(body, str):
        try:
            return bare_text(body, "command id")
        except MalformedAnswer:
            header = resp.headers.get("x-dpt-cab-id")
            if header:
                return header
            raise
    elif isinstance(body, list):
        if body and isinstance(body[0], str) and body[0]:
            return body[0]
    elif isinstance(body, dict):
        for k in ("commandId", "command_id", "id"):
            v = body.get(k)
            if isinstance(v, str) and v:
                return v
    header = resp.headers.get("x-dpt-cab-id")
    if header:
        return header
    raise ProtocolError(f"the server accepted the command but sent no command id (HTTP {resp.status_code})")


def request_id(resp: httpx.Response) -> str:
    """The request id of request-data: the ``x-dpt-cab-request-id`` header, else a body field."""
    header = resp.headers.get("x-dpt-cab-request-id")
    if header:
        return header
    body = json_or_text(resp)
    if isinstance(body, dict) and isinstance(body.get("requestId"), str) and body["requestId"]:
        return body["requestId"]
    raise MalformedAnswer("request-data was accepted but no request id came back")


@dataclass
class CommandState:
    """``status`` is 1 (in flight), 2 (succeeded) or 3 (failed); ``reason`` is the body if any."""

    status: int
    reason: str | None = None

    @property
    def pending(self) -> bool:
        return self.status == 1


def status_value(value: Any, body: Any = None) -> CommandState:
    """Interpret a status number or word: pending, success, or any other terminal value = failure."""
    if isinstance(value, bool):
        value = int(value)
    word = str(value).strip().lower()
    reason = body if isinstance(body, str) else (json.dumps(body) if body is not None else None)
    if word in PENDING_WORDS:
        return CommandState(1)
    if word in SUCCESS_WORDS:
        return CommandState(2, reason)
    return CommandState(3, reason or word)


def poll_answer(body: Any) -> CommandState:
    """A status poll answer: ``"succeeded"``, ``["succeeded"]`` or ``{"command_status": 2, "body": …}``."""
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, str):
        return status_value(bare_text(body, "command status"))
    if isinstance(body, dict):
        for k in ("command_status", "commandStatus", "status"):
            if k in body:
                return status_value(body[k], body.get("body"))
    if body is None:
        raise MalformedAnswer("command status: the server's answer was empty")
    raise ProtocolError(f"unexpected command status answer: {str(body)[:100]}")


STATUS_KEYS = ("command_status", "commandStatus")


def ws_status(data: dict) -> CommandState:
    """A frame's status; one without a status key counts as a success (a download's frame, whose
    data is verified anyway). A command's wait asks the server instead (:func:`ws_says_status`)."""
    value = next((data[k] for k in STATUS_KEYS if k in data), 2)
    return status_value(value, data.get("body"))


def ws_says_status(data: dict) -> bool:
    """Whether an acknowledgement frame carries its command's status. One that does not (its key
    changed on its way: ``command_stxtus``) was taken for a success: a rejected delete or rename
    then counted as done, and the vault kept the token where the mount had moved or removed it."""
    return any(k in data for k in STATUS_KEYS)


@dataclass
class TemporaryToken:
    token: str
    stream_auth: str | None  # the single-use upstream authorization
    stream_url: str | None  # a full URL, when the server gave one


def temporary_token(body: Any) -> TemporaryToken:
    """retrieve-temporary-data-token: API object, guide object, or a bare token string."""
    if isinstance(body, str) and body.strip():
        return TemporaryToken(bare_text(body, "temporary token"), None, None)
    if isinstance(body, dict) and isinstance(body.get("token"), str) and body["token"]:
        stream = body.get("stream")
        auth = url = None
        if isinstance(stream, str) and stream:
            if "://" in stream:
                url = stream
            else:
                auth = stream[5:] if stream.startswith("auth=") else stream.lstrip("?")
                if auth.startswith("auth="):
                    auth = auth[5:]
        return TemporaryToken(body["token"], auth, url)
    if body is None:
        raise MalformedAnswer("temporary token: the server's answer was empty")
    raise ProtocolError(f"unexpected temporary token answer: {str(body)[:100]}")


def upstream_url(tmp: TemporaryToken, upstream_base: str | None) -> str | None:
    """Where the upload goes: the server's text, escaped where a URL cannot hold it (an
    authorization changed on its way into a U+FFFD failed the upload inside h11)."""
    if tmp.stream_url:
        return quote(tmp.stream_url, safe=URL_SAFE)
    if tmp.stream_auth and upstream_base:
        return f"{upstream_base.rstrip('/')}/?auth={quote(tmp.stream_auth, safe=AUTH_SAFE)}"
    return None


def permanent_token(body: Any) -> str:
    """configure-file-meta: ``{"token": …}`` or a bare string."""
    if isinstance(body, str) and body.strip():
        return bare_text(body, "configure-file-meta")
    if body is None:
        raise MalformedAnswer("configure-file-meta: the server's answer was empty")
    if isinstance(body, dict):
        for k in ("token", "dataToken", "permanentToken"):
            if isinstance(body.get(k), str) and body[k]:
                return body[k]
    raise ProtocolError(f"unexpected configure-file-meta answer: {str(body)[:100]}")


def parse_time(value: Any) -> float | None:
    """ISO-8601 (``Z`` or offset) to a POSIX timestamp."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class Authorization:
    token: str
    expires_at: float | None
    refresh_token: str | None = None
    refresh_expires_at: float | None = None


def authorization(body: Any) -> Authorization:
    """authenticate / reauthorize answers."""
    if isinstance(body, dict):
        token = body.get("authorizationToken") or body.get("token")
        if isinstance(token, str) and token:
            return Authorization(token, parse_time(body.get("expiresAt")))
    raise ProtocolError("the server's authentication answer carries no authorization token")


def oauth_tokens(body: Any) -> Authorization:
    """OAuth token answers in the API shape (token/expiresAt/…) or the guide shape (accessToken/expiresIn)."""
    if not isinstance(body, dict):
        raise ProtocolError("unexpected OAuth token answer")
    access = body.get("token") or body.get("accessToken") or body.get("access_token")
    refresh = body.get("refreshToken") or body.get("refresh_token")
    if not isinstance(access, str) or not access:
        raise ProtocolError("the OAuth token answer carries no access token")
    expires = parse_time(body.get("expiresAt"))
    if expires is None and isinstance(body.get("expiresIn", body.get("expires_in")), (int, float)):
        expires = time.time() + float(body.get("expiresIn", body.get("expires_in")))
    return Authorization(
        access, expires, refresh if isinstance(refresh, str) else None, parse_time(body.get("refreshTokenExpiresAt"))
    )


SIZE_MAX = 2**63 - 1  # the largest file size (off_t); a listed size beyond it is no size
SHARED_MAX = 24  # risk-meta strings up to this long are kept once (sys.intern): names and common values


def _shared(text: str) -> str:
    return sys.intern(text) if len(text) <= SHARED_MAX else text


@dataclass(slots=True)
class TokenInfo:
    """One data token as listed: file meta (flat or nested under ``meta.file``) and risk meta.

    A mount keeps the last listing's (one per token of the vault), so they are small: slots; the
    short risk values most tokens share (``confidential``, ``644``, ``file``) are one string each
    (:func:`_shared`), and so is a directory's context. 1,348 -> 955 bytes a token (tracemalloc
    of 30,000 tokens as privifs writes them, in listing pages of 1,000).
    """

    token: str
    context: str
    file_name: str
    extension: str
    size: int | None
    path: str | None
    created_at: float | None
    risk: dict[str, str] = field(default_factory=dict)
    data_type: str | None = None

    @classmethod
    def from_item(cls, item: dict) -> TokenInfo:
        if not isinstance(item, dict) or not isinstance(item.get("token"), str):
            raise ProtocolError("a listing item carries no token")
        meta = item.get("meta") if isinstance(item.get("meta"), dict) else {}
        fmeta = meta.get("file") if isinstance(meta.get("file"), dict) else {}

        def pick(*names: str) -> Any:
            for src in (item, fmeta):
                for n in names:
                    if src.get(n) is not None:
                        return src[n]
            return None

        size = pick("size")
        try:
            size = int(size) if size is not None else None
        except (TypeError, ValueError, OverflowError):
            size = None
        if size is not None and not 0 <= size <= SIZE_MAX:
            size = None  # negative or past what a file can be: as if the server gave none
        risk = None
        for src in (
            meta.get("information_security_risk"),
            meta.get("informationSecurityRisk"),
            meta.get("risk"),
            item.get("riskMeta"),
            item.get("risk"),
        ):
            if isinstance(src, dict):
                risk = src
                break
        data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
        return cls(
            token=item["token"],
            context=sys.intern(str(pick("context") or "")),  # (one per directory)
            file_name=str(pick("fileName", "file_name", "name") or ""),
            extension=_shared(str(pick("extension") or "")),
            size=size,
            path=pick("path") if isinstance(pick("path"), str) else None,
            created_at=parse_time(pick("createdAt")),
            risk={_shared(str(k)): _shared(str(v)) for k, v in (risk or {}).items()},
            data_type=data.get("type") if isinstance(data.get("type"), str) else None,
        )


def listing(body: Any) -> tuple[list[dict], int | None]:
    """A listing page: (items, total count if the server said so)."""
    items, count, _ = listing_page(body)
    return items, count


def listing_page(body: Any) -> tuple[list[dict], int | None, int | None]:
    """A listing page: (items, its meta's count, its meta's perPage), each None when not stated.
    The count may be the total or the page's items (undocumented which). An answer that is not
    a listing (no list of items, an item without a token: a gateway's ``200 {"status": 500}``)
    is :class:`~privifs.errors.MalformedAnswer`, never an empty page: read as one, it ended the
    listing early, and the part collector deleted the parts of files whose manifests were on
    the pages after it (helper hI)."""
    if isinstance(body, list):
        items, meta = body, {}
    elif isinstance(body, dict):
        items = body["items"] if "items" in body else body.get("data")
        meta = body.get("meta") if isinstance(body.get("meta"), dict) else {}
    elif body is None or isinstance(body, str):  # empty, cut short, an HTML page: not JSON at all
        raise MalformedAnswer(f"list data tokens: the server's answer cannot be read ({ascii(str(body)[:60])})")
    else:
        raise MalformedAnswer(f"list data tokens: the server's answer is not a listing ({str(body)[:60]!r})")
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("token"), str) for i in items):
        raise MalformedAnswer(f"list data tokens: the server's answer is not a listing ({str(body)[:80]!r})")
    count = meta.get("count", meta.get("total"))
    per_page = meta.get("perPage")
    return (
        items,
        (count if isinstance(count, int) and not isinstance(count, bool) else None),
        (per_page if isinstance(per_page, int) and not isinstance(per_page, bool) and per_page > 0 else None),
    )


@dataclass
class RequestResult:
    """An ``X-DPT-CAB-REQUEST-ID`` event: inline bytes (output 0) or a downstream token (output 1)."""

    status: CommandState
    output_type: int | None
    body: Any
    stream_url: str | None = None
    request_id: str | None = None


def request_result(data: dict) -> RequestResult:
    status = ws_status(data)
    body = data.get("body")
    otype = data.get("output_type", data.get("outputType"))
    if isinstance(body, dict):
        if otype is None:
            otype = body.get("output_type", body.get("outputType"))
        body = body.get("body", body.get("data"))
    try:
        otype = int(otype) if otype is not None else None
    except (TypeError, ValueError):
        otype = None
    return RequestResult(status, otype, body, data.get("streamUrl"))


def lenient_b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, with or without padding or line breaks."""
    s = "".join(text.split())
    s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("the inline payload is not valid base64") from None


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def plain_text(text: str) -> str:
    """A text answer as one line: an HTML error page (a proxy's, a load balancer's) by its title,
    else its text without tags; line breaks and runs of spaces as one space. An nginx page
    printed its markup over several lines into a command's one-line error and the log."""
    if "<" in text and ">" in text:
        title = _TITLE.search(text)
        text = title.group(1) if title else _TAG.sub(" ", text)
    return " ".join(text.split())


def error_message(resp: httpx.Response) -> str:
    """The most useful text of an error answer: message / error / errors / violations / detail."""
    body = json_or_text(resp)
    if isinstance(body, str):
        return plain_text(body)[:300]
    parts: list[str] = []
    if isinstance(body, dict):
        for k in ("message", "error", "detail"):
            if isinstance(body.get(k), str):
                parts.append(body[k])
        errs = body.get("errors") or body.get("violations")
        if isinstance(errs, dict):
            for f, msgs in errs.items():
                msgs = msgs if isinstance(msgs, list) else [msgs]
                parts.append(f"{f}: {'; '.join(str(m) for m in msgs)}")
        elif isinstance(errs, list):
            parts.extend(str(e) for e in errs)
    return " — ".join(parts)[:300] or f"HTTP {resp.status_code}"


def error_fields(resp: httpx.Response) -> dict:
    body = json_or_text(resp)
    if isinstance(body, dict) and isinstance(body.get("errors"), dict):
        return body["errors"]
    return {}
