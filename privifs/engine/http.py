"""HTTP plumbing shared by the engine's routes: error answers, form parsing, authentication,
command-accepted answers in every configured shape, and fault injection around each route.

Error bodies follow the reference's recommended convention (section 7):
``{"status": 422, "message": "Parameter Error", "errors": {"field": ["why"]}}``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from privifs.engine.options import EngineOptions
from privifs.ratelog import RateLimitedWarnings

log = logging.getLogger("privifs.engine")

FORM_LIMIT = 1024 * 1024


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        errors: dict[str, list[str]] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors
        self.headers = headers

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"status": self.status, "message": self.message}
        if self.errors:
            body["errors"] = self.errors
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def invalid(field: str, why: str) -> ApiError:
    return ApiError(422, "Parameter Error", {field: [why]})


SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode of "database or disk is full"


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the engine's disk (or quota) running full: a blob write, or SQLite's
    "database or disk is full". Not a bug: answered 507 (:func:`overload`), and the engine goes
    on (it works again once there is room)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL


overloads = RateLimitedWarnings(log)  # a full disk, no descriptor left


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether ``exc`` is the engine (or the system) out of file descriptors: a flood of
    connections. Not a bug either: answered 503 (helper hAM F4: an upload's blob file could not
    be opened, and the connection was dropped with a traceback)."""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


# status -> (kind of overload, what the log says, the answer's message)
_OVERLOADS = {
    507: ("disk", "the engine's disk is full", "Insufficient Storage: the server's disk is full; try again later"),
    503: (
        "descriptors",
        "the engine has no file descriptor left",
        "Service Unavailable: too many open files on the server; try again",
    ),
}


def overload(what: str, exc: BaseException) -> tuple[int, str] | None:
    """The answer (status, message) to a request ``what`` that failed with ``exc`` for an
    overload: 507 for a full disk (:func:`disk_full`), 503 for no file descriptor left
    (:func:`out_of_descriptors`), warned of through :data:`overloads`; None for anything else."""
    status = 507 if disk_full(exc) else 503 if out_of_descriptors(exc) else None
    if status is None:
        return None
    kind, said, message = _OVERLOADS[status]
    overloads.warn(kind, "%s: %s (%s); answered %d", what, said, exc, status)
    return status, message


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: infinity
        raise ValueError(f"{text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str | bytes) -> Any:
    """``text`` parsed as JSON proper: ``NaN``, ``Infinity`` and numbers past a float's range
    are a ValueError (Python's parser takes them, and what holds them is echoed back as JSON a
    strict parser refuses)."""
    return json.loads(text, parse_float=_finite, parse_constant=_no_constant)


def client_json(text: str | bytes, field: str, what: str = "is not valid JSON") -> Any:
    """JSON a client sent, or a 422 naming ``field``: malformed, not UTF-8, nested too deep
    for the parser (``[[[…]]]``: a RecursionError, which answered 500 with a traceback), or
    holding a number JSON cannot carry (``NaN``, ``Infinity``, ``1e400``: stored, they made
    every later answer that shows them a 500)."""
    try:
        return strict_json(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise invalid(field, what) from None


def not_found() -> ApiError:
    return ApiError(404, "Record Not Found")


def owned_row(db, table: str, column: str, value: str, profile_id: str):
    """The profile's row of ``table`` whose ``column`` is ``value``, or 404: another profile's
    records do not exist for it (never 403, never 200). ``table`` and ``column`` are literals."""
    row = db.read(
        lambda c: c.execute(
            f"SELECT * FROM {table} WHERE {column} = ? AND profile_id = ?", (value, profile_id)
        ).fetchone()
    )
    if row is None:
        raise not_found()
    return row


def unauthorized(message: str = "invalid token") -> ApiError:
    return ApiError(401, message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, message)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


SQLITE_INT_MAX = 2**63 - 1  # the largest integer a column holds: every integer field is capped here


class Form:
    """A parsed form (or JSON object) body with validating accessors."""

    def __init__(self, fields: dict[str, list[str]], raw_json: Any = None):
        self.fields = fields
        self.json = raw_json

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[-1] if values else default

    def getlist(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))

    def required(self, name: str, *, max_len: int = 4096, allow_empty: bool = False) -> str:
        value = self.get(name)
        if value is None:
            raise invalid(name, "this field is required")
        return self._check(name, value, max_len, allow_empty)

    def optional(self, name: str, *, max_len: int = 4096, allow_empty: bool = True) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        return self._check(name, value, max_len, allow_empty)

    def integer(
        self, name: str, *, default: int | None = None, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        raw = self.get(name)
        if raw is None or raw == "":
            if default is None:
                raise invalid(name, "this field is required")
            return default
        try:
            value = int(raw.strip())
        except ValueError:
            raise invalid(name, "must be an integer") from None
        if minimum is not None and value < minimum:
            raise invalid(name, f"must be at least {minimum}")
        limit = SQLITE_INT_MAX if maximum is None else maximum
        if value > limit:
            raise invalid(name, f"must be at most {limit}")
        return value

    @staticmethod
    def _check(name: str, value: str, max_len: int, allow_empty: bool) -> str:
        if not allow_empty and not value.strip():
            raise invalid(name, "must not be empty")
        if len(value) > max_len:
            raise invalid(name, f"must be at most {max_len} characters")
        if "\x00" in value:
            raise invalid(name, "must not contain NUL characters")
        return value


DRAIN_LIMIT = 16 * 1024 * 1024
DRAIN_TIME = 10.0  # seconds an unread body is read for at most


async def drain_body(receive) -> None:
    """Read and discard what is left of a request body, so an early answer reaches a client
    that is still sending and the connection can be reused; past :data:`DRAIN_LIMIT` bytes or
    :data:`DRAIN_TIME` seconds the connection is closed after the answer instead. A body
    trickled a byte at a time (with a bogus upload authorization) was read for as long as it
    came, each holding a connection no limit counted (helper hX)."""
    total = 0
    with trio.move_on_after(DRAIN_TIME):
        while total <= DRAIN_LIMIT:
            message = await receive()
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


async def drain(request: Request, *, partly_read: bool = False) -> None:
    """:func:`drain_body` of an API request's body, once, unless it has none."""
    if not partly_read and (getattr(request.state, "body_started", False) or request.method in ("GET", "HEAD")):
        return
    request.state.body_started = True
    await drain_body(request.receive)


class BodiesHeld:
    """Bytes of API request bodies read and held (not yet whole) across all connections. Each
    connection may hold up to ``FORM_LIMIT`` (1 MiB): 400 clients each sending all of a 1 MiB
    body but its last byte, then a byte a minute, grew the engine by 380 MB, and a few thousand
    would have had it killed for memory. Past the option ``body_budget`` a body is refused (503,
    Retry-After: 1; clients retry a 503) at once, without reading its rest (its connection
    closes after the answer), and its bytes let go."""

    held = 0


def busy() -> ApiError:
    return ApiError(
        503, "Service Unavailable: too many request bodies in flight; try again", headers={"Retry-After": "1"}
    )


async def read_body(request: Request, limit: int, field: str = "body") -> bytes:
    chunks: list[bytes] = []
    total = 0
    budget = getattr(request.state, "body_budget", 0)
    request.state.body_started = True
    try:
        async for chunk in request.stream():
            total += len(chunk)
            BodiesHeld.held += len(chunk)
            too_large = total > limit
            if too_large or (budget and BodiesHeld.held > budget):
                BodiesHeld.held -= total
                chunks.clear()
                total = 0
                if not too_large:  # answered at once, the rest unread: the connection closes after it
                    raise busy()
                await drain(request, partly_read=True)
                raise ApiError(
                    413 if field == "body" else 422,
                    "Payload Too Large" if field == "body" else "Parameter Error",
                    None
                    if field == "body"
                    else {
                        field: [f"payload exceeds the inline limit of {limit} bytes; use the upstream stream server"]
                    },
                )
            chunks.append(chunk)
    finally:
        BodiesHeld.held -= total
    return b"".join(chunks)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(name: str) -> str:
    return name.encode("utf-8", "replace").decode("utf-8")


def parse_fields(body: bytes, content_type: str) -> Form:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json":
        if not body.strip():
            return Form({}, {})
        data = client_json(body, "body")
        fields: dict[str, list[str]] = {}
        if isinstance(data, dict):
            for k, v in data.items():
                if isinstance(v, list):
                    values = [x if isinstance(x, str) else json.dumps(x) for x in v]
                elif isinstance(v, str):
                    values = [v]
                elif v is not None:
                    values = [json.dumps(v)]
                else:
                    continue
                for text in (k, *values):
                    if not _encodable(text):  # "\ud800": SQLite could not store it (500, traceback)
                        raise invalid(_printable(k), "must not contain lone surrogates (\\ud800-\\udfff)")
                if values:  # an empty list is no value ([][-1] answered 500)
                    fields[k] = values
        return Form(fields, data)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("body", "is not valid UTF-8") from None
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, errors="strict", max_num_fields=10000)
    except (ValueError, UnicodeDecodeError):
        raise invalid("body", "is not a valid form body") from None
    fields = {}
    for k, v in pairs:
        fields.setdefault(k, []).append(v)
    return Form(fields)


async def read_form(request: Request, limit: int = FORM_LIMIT, field: str = "body") -> Form:
    body = await read_body(request, limit, field)
    return parse_fields(body, request.headers.get("content-type", ""))


def query_form(request: Request) -> Form:
    fields: dict[str, list[str]] = {}
    for k, v in request.query_params.multi_items():
        fields.setdefault(k, []).append(v)
    return Form(fields)


@dataclass
class Principal:
    """Who is calling: the profile behind a profile or OAuth access token."""

    profile_id: str
    token_hash: str
    kind: str
    has_key: bool


def command_accepted(
    opts: EngineOptions, kind: str, command_id: str, extra_headers: dict[str, str] | None = None, *, empty: bool = False
) -> Response:
    headers = {"x-dpt-cab-id": command_id}
    if extra_headers:
        headers.update(extra_headers)
    if empty:
        return Response(status_code=202, headers=headers)
    shape = opts.shape_for(kind)
    body: Any
    if shape == "string":
        body = command_id
    elif shape == "array":
        body = [command_id]
    else:
        body = {"commandId": command_id}
    return JSONResponse(body, status_code=202, headers=headers)


Handler = Callable[[Request], Awaitable[Response]]


def guarded(opts: EngineOptions, handler: Handler) -> Handler:
    """Wrap a route with latency and 5xx injection and turn :class:`ApiError` into answers."""

    async def run(request: Request) -> Response:
        request.state.body_budget = opts.body_budget
        if opts.latency_ms:
            await trio.sleep(opts.latency_ms / 1000)
        if opts.chance(opts.fail_rate):
            await drain(request)
            return JSONResponse({"status": 503, "message": "injected failure"}, status_code=503)
        try:
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except ClientDisconnect:
            # the client left while sending its request: nobody will read an answer (or its body
            # was malformed: the server answered 400 and logged it, see privifs.engine.h1)
            if not request.scope.get("privifs.malformed"):
                log.info(
                    "%s %s: the client disconnected before its request was complete", request.method, request.url.path
                )
            return Response(status_code=400)
        except (OSError, sqlite3.Error) as exc:
            answer = overload(f"{request.method} {request.url.path}", exc)
            if answer is None:
                raise
            status, message = answer
            response = JSONResponse(
                {"status": status, "message": message},
                status_code=status,
                headers={"Retry-After": "1"} if status == 503 else None,
            )
        # hypercorn closes a connection whose request body was not read before the answer, and a
        # client reusing it then sees "disconnected without a response": always read it
        await drain(request)
        if opts.chance(opts.fail_after_rate):
            return JSONResponse({"status": 502, "message": "injected failure after processing"}, status_code=502)
        return response

    run.guarded = True  # type: ignore[attr-defined]  # see privifs.engine.server.ExactRoutes
    return run


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ts))
