"""A lean HTTP/1.1 client for the API's small calls over plain ``http://``.

Every API call of a small-file store (reserve, temporary token, exchange, configure-file-meta,
risk meta) is a short request with a short answer. Through httpx each one ran the whole
httpx → httpcore → h11 stack (request and URL objects, header normalisation, the connection
pool's liveness check of *every* pooled connection, event objects per header block): about
0.6-0.8 ms of the daemon's CPU per call, most of the daemon's time when draining small files.
This module sends one such call as one socket write on a kept-alive connection and reads the
answer, with h11 (the HTTP/1.1 state machine under httpx and hypercorn) framing and checking both
directions (header syntax, ``Content-Length`` or chunked bodies, keep-alive) but without the layers
above it.

It serves only what :meth:`privifs.client.transport.Transport.call` needs: whole bodies in
memory, no redirects, no cookies, no compression (none is asked for); the streamed upstream
upload (:meth:`LeanHTTP.upload`), whose pieces go to the socket as they are (the vault encrypts
each into one reused buffer: no copy, no fresh memory per piece); and the downstream GET of a
retrieval (:meth:`LeanHTTP.download`): h11 reads the answer's head, then a ``Content-Length``
body is read straight from the socket into one reused 1 MiB buffer (through httpx a body went
through httpcore's and h11's buffers in 64 KiB pieces: most of a cold read's client CPU after the
crypto). ``https://`` stays on httpx.

Connections: idle ones are kept per origin (newest first) and reused; one idle for longer than
``KEEPALIVE`` or that the server closed (the socket reads as ready while idle) is dropped, and
one whose call was cancelled or failed is closed. At most ``max_connections`` are open at once.
Failures are :class:`HTTPFailure` with a short text (``ReadTimeout: no answer within 60 s``).
"""

from __future__ import annotations

import json as jsonlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import trio

from privifs.client.peers import ForeignServer, check_socket

KEEPALIVE = 5.0  # seconds an idle connection is kept (httpx's default)
MAX_HEAD = 64 * 1024
RECEIVE = 64 * 1024
BODY_PIECE = 1024 * 1024  # a downloaded body is read from the socket this much at a time
EARLY_ANSWER_WAIT = 5.0  # an upload the server stopped reading: how long its answer is waited for

Piece = bytes | memoryview


class HTTPFailure(Exception):
    """The call did not get an answer (connection, time-out or protocol failure)."""


class Headers(dict):
    """Answer headers by lower-case name (``get`` takes any case)."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return dict.__getitem__(self, key.lower())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key.lower() if isinstance(key, str) else key)


class Answer:
    """What :class:`privifs.client.transport.Transport` and :mod:`privifs.client.shapes` read of a
    response: ``status_code``, ``headers``, ``content``, ``text``, ``json()``."""

    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: Headers, content: bytes):
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class _Origin:
    """A parsed base URL: where to connect and what to put before a path."""

    __slots__ = ("host", "port", "host_header", "prefix")

    def __init__(self, base: str):
        parts = urlsplit(base)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http URL: {base!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.host_header = parts.netloc.rsplit("@", 1)[-1]
        self.prefix = parts.path.rstrip("/")


class _Connection:
    """One kept-alive connection and its h11 state machine (h11 frames and checks every byte)."""

    __slots__ = ("stream", "h11", "idle_since", "uses", "raw", "buffer")

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        self.idle_since = 0.0
        self.uses = 0
        self.raw: bool | None = None  # a body was read past h11: whether the connection goes on
        self.buffer: bytearray | None = None  # what a downloaded body is read into (reused)

    def close(self) -> None:
        self.stream.socket.close()

    def reusable(self) -> bool:
        """Whether the last exchange ended cleanly with both sides willing to go on."""
        if self.raw is not None:
            return self.raw
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def raw_body_done(self, *, keep: bool) -> None:
        """The answer's body was read from the socket, not through h11 (:class:`Download`)."""
        self.raw = keep
        self.uses += 1

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h11.receive_data(await self.stream.receive_some(RECEIVE))  # b"": the server closed

    async def _send_request(
        self, request: h11.Request, body: bytes | None | AsyncIterator[Piece], step: float | None = None
    ) -> bool:
        """Send one request. A streamed ``body``'s pieces go to the socket as they are (h11 frames
        them without a copy), each before the next is asked for, each within ``step`` seconds if
        given. False if the server stopped reading the body (it may have answered early)."""
        if self.raw is not None:  # h11 saw only part of the last answer: a new state machine
            self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
            self.raw = None
        elif self.uses:
            self.h11.start_next_cycle()
        message = self.h11.send(request)
        if body is None or isinstance(body, bytes):
            if body:
                message += self.h11.send(h11.Data(data=body))
            message += self.h11.send(h11.EndOfMessage())
            await self.stream.send_all(message)
            return True
        await self.stream.send_all(message)
        async for piece in body:  # (the body's own failures propagate as they are)
            if piece and not await self._send(self.h11.send_with_data_passthrough(h11.Data(data=piece)), step):
                return False
        return await self._send([self.h11.send(h11.EndOfMessage())], step)

    async def _send(self, data: list[Piece], step: float | None) -> bool:
        """Send ``data``; False if the server stopped reading. A send that makes no way within
        ``step`` seconds (a server that neither reads nor closes) is an :class:`HTTPFailure`."""
        try:
            for out in data:
                with trio.move_on_after(step if step is not None else float("inf")) as scope:
                    await self.stream.send_all(out)
                if scope.cancelled_caught:
                    raise HTTPFailure(f"WriteTimeout: the server read nothing within {step:g} s")
        except (OSError, trio.BrokenResourceError):
            return False
        return True

    async def _read_head(self) -> tuple[int, Headers]:
        """Read an answer's status and headers."""
        event = await self._next_event()
        while isinstance(event, h11.InformationalResponse):  # an interim answer: the real one follows
            event = await self._next_event()
        if not isinstance(event, h11.Response):
            raise HTTPFailure("RemoteProtocolError: the server closed the connection without answering")
        headers = Headers()
        for name, value in event.headers:
            key, text = name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return event.status_code, headers

    async def _answer(self) -> Answer:
        """Read a whole answer."""
        status, headers = await self._read_head()
        body_in = bytearray()
        while not isinstance(event := await self._next_event(), h11.EndOfMessage):
            if not isinstance(event, h11.Data):
                raise HTTPFailure("RemoteProtocolError: the server closed the connection mid-answer")
            body_in += event.data
        self.uses += 1
        return Answer(status, headers, bytes(body_in))

    async def head(self, request: h11.Request, body: bytes | None) -> tuple[int, Headers]:
        """Send one request, read its answer's status and headers."""
        await self._send_request(request, body)
        return await self._read_head()

    async def exchange(
        self, request: h11.Request, body: bytes | None | AsyncIterator[Piece], step: float | None = None
    ) -> Answer:
        """Send one request, read its whole answer; with ``step``, each write of a streamed body
        and the wait for the answer are bounded by it (an upload as a whole is not)."""
        if not await self._send_request(request, body, step):
            return await self._early_answer()
        if step is None:
            return await self._answer()
        with trio.move_on_after(step):
            return await self._answer()
        raise HTTPFailure(f"ReadTimeout: no answer within {step:g} s")

    async def _early_answer(self) -> Answer:
        """The server stopped reading an upload: its answer (a refusal) if it gave one says more
        than the broken pipe. The connection is not reused (our side is not DONE)."""
        with trio.move_on_after(EARLY_ANSWER_WAIT):
            try:
                return await self._answer()
            except (h11.ProtocolError, OSError, trio.BrokenResourceError, HTTPFailure):
                pass
        raise HTTPFailure("WriteError: the server stopped reading the upload")


class Download:
    """The answer to a :meth:`LeanHTTP.download`: ``status_code``, ``headers`` and the body, read
    by :meth:`body` (a ``Content-Length`` body straight from the socket, anything else through
    h11) or whole by :meth:`read` (an error's text)."""

    def __init__(self, conn: _Connection, status_code: int, headers: Headers, timeout: float):
        self._conn = conn
        self.status_code = status_code
        self.headers = headers
        self._timeout = timeout
        self.complete = False  # the whole body was read

    async def _receive_into(self, view: memoryview) -> int:
        with trio.move_on_after(self._timeout), _failures():
            return await self._conn.stream.socket.recv_into(view)
        raise HTTPFailure(f"ReadTimeout: no data within {self._timeout:g} s")

    async def body(self) -> AsyncIterator[bytes | memoryview]:
        """The body's pieces; a piece may be a view of a buffer reused for the next one."""
        conn = self._conn
        length = self.headers.get("content-length")
        if length is None or not length.isdigit() or conn.h11.their_state is not h11.SEND_BODY:
            async for piece in self._framed():
                yield piece
            return
        left = int(length)
        # what h11 received with the head is in its buffer: take it through h11 first
        while left:
            with _failures():
                event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Data):
                left -= len(event.data)
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                left = 0
            else:
                raise HTTPFailure("RemoteProtocolError: the server sent something else than the body")
        if conn.buffer is None:
            conn.buffer = bytearray(BODY_PIECE)
        view = memoryview(conn.buffer)
        while left:
            n = await self._receive_into(view[: min(left, BODY_PIECE)])
            if not n:
                raise HTTPFailure("RemoteProtocolError: the server closed the connection mid-answer")
            left -= n
            yield view[:n]
        self.complete = True
        # h11 did not see the bytes read past it: the next request starts a new state machine
        # on this connection (reused only if the server keeps it alive)
        conn.raw_body_done(keep=_keeps_alive(self.headers))

    async def _framed(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            event = None
            with trio.move_on_after(self._timeout), _failures():
                event = await conn._next_event()
            if event is None:
                raise HTTPFailure(f"ReadTimeout: no data within {self._timeout:g} s")
            if isinstance(event, h11.EndOfMessage):
                break
            if not isinstance(event, h11.Data):
                raise HTTPFailure("RemoteProtocolError: the server closed the connection mid-answer")
            yield event.data
        conn.uses += 1
        self.complete = True

    async def read(self) -> bytes:
        out = bytearray()
        async for piece in self.body():
            out += piece
        return bytes(out)


def _keeps_alive(headers: Headers) -> bool:
    return "close" not in headers.get("connection", "").lower()


class LeanHTTP:
    """Plain-http calls with whole bodies (see the module docstring)."""

    def __init__(
        self,
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        user_agent: str,
        server_uid: int | None = None,
    ):
        self.timeout = timeout
        self.server_uid = server_uid  # a loopback server's end must be this user's (peers.py)
        self.connect_timeout = connect_timeout
        self._slots = trio.Semaphore(max_connections)
        self._upload_slots = trio.Semaphore(max_connections)  # uploads: connections of their own
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._origins: dict[str, _Origin] = {}
        self._agent = (("User-Agent", user_agent), ("Accept", "*/*"))
        self.opened = 0  # connections opened (for tests and measurements)

    def origin(self, base: str) -> _Origin:
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = _Origin(base)
        return origin

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _take_idle(self, key: tuple[str, int]) -> _Connection | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            # a connection the server closed (or wrote to) while idle reads as ready: drop it
            if now - conn.idle_since > KEEPALIVE or conn.stream.socket.is_readable():
                conn.close()
                continue
            return conn
        return None

    def _build(
        self, method: str, base: str, path: str, params: dict[str, str] | None, body: bytes | None, headers
    ) -> tuple[tuple[str, int], h11.Request]:
        origin = self.origin(base)
        target = origin.prefix + path
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        fields = [("Host", origin.host_header), *self._agent]
        if headers:
            fields.extend(headers.items())
        if body is not None or method in ("POST", "PUT", "PATCH"):
            fields.append(("Content-Length", str(len(body or b""))))
        try:
            request = h11.Request(method=method, target=target, headers=fields)
        except h11.LocalProtocolError as exc:  # a header value h11 refuses (a line break, …)
            raise HTTPFailure(f"LocalProtocolError: {exc}") from None
        except UnicodeEncodeError as exc:  # a value the server sent, changed on its way (U+FFFD)
            raise HTTPFailure(f"a request cannot carry {exc.object[exc.start : exc.end]!r}") from None
        return (origin.host, origin.port), request

    async def request(
        self,
        method: str,
        base: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        key, request = self._build(method, base, path, params, body, headers)
        async with self._slots:
            with trio.move_on_after(self.timeout):
                return await self._exchange(key, request, body)
            raise HTTPFailure(f"ReadTimeout: no answer within {self.timeout:g} s")

    async def upload(self, url: str, body: AsyncIterator[Piece], headers: dict[str, str]) -> Answer:
        """POST a streamed ``body`` (``headers`` give its Content-Length) to a plain-http ``url``.
        Each piece goes to the socket as it is. The upload as a whole has no time limit (a slow
        link may take long), but each write and the wait for the answer do: the call timeout (an
        upstream that stopped reading or answering held the upload, and the file's write-back,
        for good)."""
        parts = urlsplit(url)
        origin = self.origin(f"{parts.scheme}://{parts.netloc}")
        target = origin.prefix + (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = [("Host", origin.host_header), *self._agent, *headers.items()]
        try:
            request = h11.Request(method="POST", target=target, headers=fields)
        except h11.LocalProtocolError as exc:
            raise HTTPFailure(f"LocalProtocolError: {exc}") from None
        async with self._upload_slots:
            return await self._exchange((origin.host, origin.port), request, body, step=self.timeout)

    @asynccontextmanager
    async def download(self, base: str, path: str, *, params: dict[str, str] | None = None) -> AsyncIterator[Download]:
        """A GET whose answer's body is read piece by piece (``Download.body``) inside the block;
        the connection is kept for the next call only if the whole body was read."""
        key, request = self._build("GET", base, path, params, None, None)
        async with self._slots:
            conn = await self._connect(key)
            answer: Download | None = None
            try:
                with trio.move_on_after(self.timeout):
                    with _failures():
                        status, headers = await conn.head(request, None)
                    answer = Download(conn, status, headers, self.timeout)
                if answer is None:
                    raise HTTPFailure(f"ReadTimeout: no answer within {self.timeout:g} s")
                yield answer
            finally:
                self._done(key, conn, answer is not None and answer.complete and conn.reusable())

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        conn = self._take_idle(key)
        if conn is not None:
            return conn
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(*key)
        except trio.TooSlowError:
            raise HTTPFailure(f"ConnectTimeout: no connection within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise HTTPFailure(f"ConnectError: {exc}") from None
        try:
            check_socket(stream.socket, self.server_uid)
        except (ForeignServer, OSError) as exc:
            await trio.aclose_forcefully(stream)
            raise HTTPFailure(f"ConnectError: {exc}") from None
        self.opened += 1
        return _Connection(stream)

    def _done(self, key: tuple[str, int], conn: _Connection, keep: bool) -> None:
        if keep:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()

    async def _exchange(
        self,
        key: tuple[str, int],
        request: h11.Request,
        body: bytes | None | AsyncIterator[Piece],
        step: float | None = None,
    ) -> Answer:
        conn = await self._connect(key)
        keep = False
        try:
            with _failures():
                answer = await conn.exchange(request, body, step)
            keep = conn.reusable()
            return answer
        finally:
            self._done(key, conn, keep)


@contextmanager
def _failures() -> Iterator[None]:
    """A connection's failures (the socket's, h11's) as :class:`HTTPFailure`."""
    try:
        yield
    except h11.ProtocolError as exc:
        raise HTTPFailure(f"{type(exc).__name__}: {exc}") from None
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HTTPFailure(f"{type(exc).__name__}: {exc or 'the connection broke'}") from None


def encode_json(value: Any) -> bytes:
    return jsonlib.dumps(value).encode("utf-8")
