"""HTTP to the four Privicore base URLs, with the retry policy and the error mapping.

* Idempotent calls (reads, status polls, request-data, and commands whose effect is the same
  when repeated) are retried on connection errors, 5xx and 429 with capped exponential backoff,
  honouring ``Retry-After``, but sent at most twice when the server took the call and did not
  answer within the read time-out (a stalled server). Other calls are sent once; callers decide (a lost 202 is never
  blindly repeated: either its status is polled or the whole chain restarts).
* A call is bounded as a whole, not only each read: an answer trickling in a byte at a time is
  no answer (the lean path: the read time-out; httpx: twice it and the connect time-out).
* A server known to be unreachable (a call to it failed so, after its retries, and none has been
  answered since, for at most :data:`DOWN_MEMORY` seconds) gets one try per call, not the
  retries: while it refuses connections each read of uncached data took 10-13 s to fail.
* A 401 on an authenticated call asks the session to renew once and replays the call.
* Every other failure becomes one exception of :mod:`privifs.errors` with a message a user can
  act on.

API calls and downstream retrievals to a plain ``http://`` server (the embedded engine) go
through the lean HTTP/1.1 client of :mod:`privifs.client.http11` (``ClientOptions.lean_http``),
``https://`` and the upstream transfers through httpx.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpcore
import httpx
import trio

from privifs.about import version
from privifs.client import shapes
from privifs.client.http11 import Answer, HTTPFailure, LeanHTTP, encode_json
from privifs.client.tls import shared_tls_context
from privifs.client.urls import complete
from privifs.errors import (
    AuthorizationError,
    ConfigError,
    ConflictError,
    ForbiddenError,
    MalformedHTTP,
    NotFoundError,
    RequestRejected,
    ServerError,
    ServerUnreachable,
    VaultFull,
)

log = logging.getLogger("privifs.client")

MAX_CONNECTIONS = 32
DOWN_MEMORY = 30.0  # how long a server a call found unreachable gets one try per call (see above)
PATH_SAFE = "/:@!$&'()*+,;=-._~%"  # what stays as it is in a call's path (RFC 3986 pchar, "/" and escapes)
# httpcore reads a response 64 KiB at a time by default; a download runs the whole httpx/httpcore/
# h11 stack of Python calls (and the decryption after it) once per read, so bigger reads of what
# the socket already holds cut the daemon's CPU per downloaded byte.
RECEIVE = 1024 * 1024
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = RECEIVE
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
_SAFE = "-._~"  # RFC 3986 unreserved characters besides letters and digits


def encode_form(data: dict[str, str]) -> bytes:
    """``application/x-www-form-urlencoded`` as httpx writes it (``%20`` for a space is accepted
    everywhere too), in a fraction of its time for a long base64 value: the characters base64
    uses that need escaping are only ``+``, ``/`` and ``=``."""
    return "&".join(f"{quote(str(k), safe=_SAFE)}={_quote_value(str(v))}" for k, v in data.items()).encode("ascii")


def _quote_value(v: str) -> str:
    if v.isascii() and v.replace("+", "").replace("/", "").replace("=", "").isalnum():
        return v.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    return quote(v, safe=_SAFE)


_TIMEOUTS = {
    httpx.ConnectTimeout: ("connect", "no connection"),
    httpx.ReadTimeout: ("read", "no answer"),
    httpx.WriteTimeout: ("write", "could not send"),
    httpx.PoolTimeout: ("pool", "no free connection"),
}


def failure_text(exc: httpx.TransportError) -> str:
    """``ReadTimeout: no answer within 60 s``: what went wrong on the wire, for a message (httpx's
    timeouts carry no text of their own)."""
    text = str(exc)
    if not text:
        key, what = _TIMEOUTS.get(type(exc), (None, "no detail"))
        try:
            limit = exc.request.extensions.get("timeout", {}).get(key) if key else None
        except RuntimeError:  # no request attached
            limit = None
        text = f"{what} within {limit:g} s" if limit is not None else what
    return f"{type(exc).__name__}: {text}"


@dataclass
class Endpoints:
    api: str
    ws: str | None = None
    upstream: str | None = None
    downstream: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Endpoints:
        """The configured URLs; those not configured derived from the API URL (``urls.complete``)."""
        full = complete(d)
        return cls(api=full["api"] or "", ws=full["ws"], upstream=full["upstream"], downstream=full["downstream"])

    def move_to(self, d: dict) -> None:
        """Take other URLs in place (the embedded engine started again on new ports): every
        client holding these endpoints reads them at its next call or connection. Safe to call
        from another thread (each field is one assignment)."""
        moved = Endpoints.from_dict(d)
        self.api, self.ws, self.upstream, self.downstream = moved.api, moved.ws, moved.upstream, moved.downstream


@dataclass
class ClientOptions:
    http_timeout: float = 60.0
    connect_timeout: float = 10.0
    retry_attempts: int = 6
    # a call the server took and did not answer within http_timeout is sent this many times at
    # most: retried like a refused connection, a stalled server (stopped, swapping, a dead
    # route) held every call, fsync and umount for six read time-outs (over 6 minutes)
    stall_attempts: int = 2
    retry_base: float = 0.2
    retry_max: float = 5.0
    ack_timeout: float = 90.0  # writes may be held by voting for up to a minute
    request_timeout: float = 8.0  # waiting for a request-data result before re-issuing it
    request_attempts: int = 4
    # a retrieval whose download breaks (the server answering its request-data each time) is
    # asked again for at least this long, not only request_attempts times: on a flaky link a
    # 4 MiB part's four downloads all broke now and then, and a cp died on EIO (helper hS F4)
    fetch_budget: float = 30.0
    join_timeout: float = 10.0
    # the event channel is pinged this often once joined, and given up (then opened again) when
    # the pong does not come within ping_timeout: a connection the server or a proxy stopped
    # answering (the reference: "use WebSocket ping frames and reconnect on close") otherwise
    # left the channel silent for good, and every read of uncached data waits on it
    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    # the server's first answer (the login): a server that accepts connections but never
    # answers is given up on after this, instead of after every retry of a 60 s read time-out
    login_timeout: float = 30.0
    stream_ready_wait: float = 3.0
    early_event_ttl: float = 120.0
    inline_limit: int = 48 * 1024  # ciphertext bytes sent inline; larger goes upstream
    store_attempts: int = 5
    renew_margin: float = 60.0
    reauthorize_ttl: int = 86400
    lean_http: bool = True  # plain-http API calls through http11.LeanHTTP instead of httpx
    # the user that must own the server's end of every loopback connection (the embedded engine
    # this process runs: after it died, another user's program on its ports was sent the token
    # and the password, helper hAD F1); None: not checked. Plain-http calls then always take
    # the lean path, which checks it (client/peers.py).
    server_uid: int | None = None


_NO_ANSWER = ("without answering", "without sending a response")  # (ours, httpx's): no answer came


def unreachable(base: str, why: str) -> ServerUnreachable:
    """A call that got no answer from the server at ``base`` (``why``: the failure, in short).
    An answer that is not HTTP (garbage, a length twice over) is told apart: "cannot reach"
    sent the user to check a server that did answer (helper hI)."""
    if why.startswith("RemoteProtocolError") and not any(s in why for s in _NO_ANSWER):
        return MalformedHTTP(
            f"the Privicore server at {base} answered, but not in valid HTTP or cut short ({why}); if this lasts,"
            " check what stands between it and this machine (a proxy, a load balancer)"
        )
    return ServerUnreachable(
        f"cannot reach the Privicore server at {base} ({why}); check the server URL and that the server is running"
    )


class AuthProvider(Protocol):
    def current_token(self) -> str | None: ...

    async def recover(self, failed_token: str | None) -> None: ...


class Transport:
    def __init__(self, endpoints: Endpoints, options: ClientOptions):
        self.endpoints = endpoints
        self.options = options
        self.auth: AuthProvider | None = None
        # base URL -> when a call to it last failed unreachable after its retries (monotonic);
        # removed by the next answer from it
        self._down: dict[str, float] = {}
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(options.http_timeout, connect=options.connect_timeout),
            # a small pool (httpcore checks every pooled connection on each request), but every
            # connection kept: with fewer kept than requests in flight, each request beyond them
            # opened and closed a TCP connection (measured: ~3 new connections per small upload
            # at 16 in flight, against none at 4)
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
            follow_redirects=False,
            verify=shared_tls_context(),
        )
        # plain-http API calls (the embedded engine; loopback) take the lean path (http11.py)
        self.lean: LeanHTTP | None = (
            LeanHTTP(
                timeout=options.http_timeout,
                connect_timeout=options.connect_timeout,
                max_connections=MAX_CONNECTIONS,
                user_agent=f"privifs/{version()}",
                server_uid=options.server_uid,
            )
            if options.lean_http or options.server_uid is not None
            else None
        )

    async def aclose(self) -> None:
        if self.lean is not None:
            await self.lean.aclose()
        await self.http.aclose()

    def backoff(self, attempt: int) -> float:
        delay = min(self.options.retry_max, self.options.retry_base * (2**attempt))
        return delay * (0.5 + random.random() / 2)

    async def call(
        self,
        method: str,
        path: str,
        *,
        base: str | None = None,
        data: Any = None,
        json: Any = None,
        params: Any = None,
        content: Any = None,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        idempotent: bool = False,
        expected: tuple[int, ...] = (200,),
        what: str | None = None,
    ) -> httpx.Response | Answer:
        """Send one API call; see the module docstring for retries and errors. The answer is an
        ``http11.Answer`` (the attributes of an httpx response callers read) for a plain-http
        server."""
        base = (base or self.endpoints.api).rstrip("/")
        # an id or token in the path is the server's text, maybe changed on its way: one with a
        # character a URL cannot hold (a '\ufffd') failed in the HTTP library, a bug's traceback
        path = quote(path, safe=PATH_SAFE)
        what = what or f"{method} {path}"
        lean = self.lean is not None and base.startswith("http://") and (data is None or isinstance(data, dict))
        if lean:
            try:
                self.lean.origin(base)
            except ValueError:
                lean = False  # let httpx name what is wrong with the URL
        if not lean and self.options.server_uid is not None and base.startswith("http://"):
            raise ConfigError(f"{what}: a call to {base} that cannot be checked to reach this user's engine")
        attempt = stalls = 0
        replayed = False
        down = self._down.get(base)
        known_down = down is not None and time.monotonic() - down < DOWN_MEMORY
        while True:
            token = self.auth.current_token() if (auth and self.auth) else None
            hdrs = dict(headers or {})
            body = content
            if isinstance(data, dict) and content is None:
                body = encode_form(data)
                hdrs.update(FORM)
            if token:
                hdrs["X-DPT-AUTHORIZATION"] = token
            try:
                if lean:
                    if json is not None:
                        body = encode_json(json)
                        hdrs["Content-Type"] = "application/json"
                    elif isinstance(body, str):
                        body = body.encode("utf-8")
                    resp = await self.lean.request(method, base, path, params=params, body=body, headers=hdrs)
                else:
                    # httpx's time-outs are per read: an answer trickling in a byte at a time held
                    # the call for good; the whole call is bounded (a wait for a pooled
                    # connection, the connect, an answer as slow as one read time-out allows)
                    limit = 2 * self.options.http_timeout + self.options.connect_timeout
                    resp = None
                    with trio.move_on_after(limit):
                        resp = await self.http.request(
                            method,
                            base + path,
                            data=None if body is not content else data,
                            json=json,
                            params=params,
                            content=body,
                            headers=hdrs,
                        )
                    if resp is None:
                        raise HTTPFailure(f"ReadTimeout: no answer within {limit:g} s")
            except HTTPFailure as exc:
                err: Exception = unreachable(base, str(exc))
                stalls += str(exc).startswith("ReadTimeout")
            except httpx.InvalidURL as exc:  # a configured URL that cannot be parsed: no retry helps
                raise ConfigError(
                    f"the server URL {base!r} is not valid ({exc}); correct it in the configuration"
                ) from None
            except httpx.TransportError as exc:
                err = unreachable(base, failure_text(exc))
                stalls += isinstance(exc, httpx.ReadTimeout)
            else:
                self._down.pop(base, None)  # it answers
                if resp.status_code in expected:
                    return resp
                if resp.status_code == 401 and auth and self.auth and not replayed:
                    replayed = True
                    await self.auth.recover(token)
                    continue
                err = self.error_for(resp, what)
            if (
                idempotent
                and getattr(err, "transient", False)
                and attempt + 1 < self.options.retry_attempts
                and stalls < self.options.stall_attempts
                and not (known_down and isinstance(err, ServerUnreachable))
            ):
                delay = self.backoff(attempt)
                retry_after = getattr(err, "retry_after", None)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, 60.0))
                log.debug("%s failed (%s); retrying in %.1fs", what, err, delay)
                attempt += 1
                await trio.sleep(delay)
                continue
            if isinstance(err, ServerUnreachable):
                self._down[base] = time.monotonic()
            raise err

    @staticmethod
    def error_for(resp: httpx.Response | Answer, what: str) -> Exception:
        status = resp.status_code
        detail = shapes.error_message(resp)
        # a 408 (a proxy or load balancer that timed the request out) is no more the server's
        # refusal than a 429 or a 5xx: the same request may well succeed on a later try
        if status >= 500 or status in (408, 429):
            if status == 507:  # Insufficient Storage: transient too, but an fsync says ENOSPC
                err = VaultFull(f"{what}: the vault has no room (HTTP 507: {detail})", status=status)
            else:
                err = ServerError(f"{what}: the server failed (HTTP {status}: {detail})", status=status)
            ra = resp.headers.get("retry-after")
            err.retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
            return err
        if status == 401:
            return AuthorizationError(f"{what}: the server refused the authorization ({detail})", status=401)
        if status == 403:
            return ForbiddenError(f"{what}: forbidden ({detail})", status=403)
        if status == 404:
            return NotFoundError(f"{what}: not found ({detail})", status=404)
        if status == 409:
            return ConflictError(f"{what}: {detail}", status=409)
        return RequestRejected(
            f"{what}: the server rejected the request (HTTP {status}: {detail})",
            status=status,
            fields=shapes.error_fields(resp),
            reason=detail,
        )
