"""A lean HTTP/1.1 client for the API's small calls over plain ``http://``.

Every API call of a small-file store (reserve, temporary token, exchange, configure-file-meta,
risk meta) is a short request with a short answer. Through httpx each one ran the whole
httpx → httpcore → h11 stack (request and URL objects, header normalisation, the connection
pool's liveness check of *every* pooled connection, event objects per header block): about
0.6-0.8 ms of the daemon's CPU per call, most of the daemon's time when draining small files.
This module sends one such call as one prepared byte string on a kept-alive connection and
parses the answer (status line, headers, a ``Content-Length`` or chunked body) directly.

It serves only what :meth:`privifs.client.transport.Transport.call` needs: whole bodies in
memory, no redirects, no cookies, no compression (none is asked for). ``https://`` and the
streamed upstream and downstream transfers stay on httpx.

Connections: idle ones are kept per origin (newest first) and reused; one idle for longer than
``KEEPALIVE`` or that the server closed (the socket reads as ready while idle) is dropped, and
one whose call was cancelled or failed is closed. At most ``max_connections`` are open at once.
Failures are :class:`HTTPFailure` with a short text (``ReadTimeout: no answer within 60 s``).
"""

from __future__ import annotations

import json as jsonlib
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import trio

KEEPALIVE = 5.0  # seconds an idle connection is kept (httpx's default)
MAX_HEAD = 64 * 1024
RECEIVE = 64 * 1024


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
    __slots__ = ("stream", "buf", "idle_since", "uses")

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()
        self.idle_since = 0.0
        self.uses = 0

    def close(self) -> None:
        self.stream.socket.close()

    async def _fill(self) -> None:
        data = await self.stream.receive_some(RECEIVE)
        if not data:
            raise HTTPFailure("RemoteProtocolError: the server closed the connection")
        self.buf += data

    async def read_head(self) -> bytes:
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise HTTPFailure("RemoteProtocolError: the answer's header is too long")
            start = max(0, len(self.buf) - 3)
            await self._fill()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > MAX_HEAD:
                raise HTTPFailure("RemoteProtocolError: a chunk header is too long")
            await self._fill()

    async def read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = await self.read_line()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise HTTPFailure("RemoteProtocolError: a malformed chunk size") from None
            if size == 0:
                while await self.read_line():  # trailers, up to the empty line
                    pass
                return bytes(out)
            out += await self.read_exactly(size)
            if await self.read_exactly(2) != b"\r\n":
                raise HTTPFailure("RemoteProtocolError: a chunk without its line end")

    async def read_to_end(self) -> bytes:
        while True:
            data = await self.stream.receive_some(RECEIVE)
            if not data:
                out = bytes(self.buf)
                self.buf.clear()
                return out
            self.buf += data


def _parse_head(head: bytes) -> tuple[int, bool, Headers]:
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or not status[0].startswith(b"HTTP/1.") or not status[1].isdigit():
        raise HTTPFailure(f"RemoteProtocolError: not an HTTP/1.x answer ({lines[0][:40]!r})")
    headers = Headers()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise HTTPFailure("RemoteProtocolError: a malformed header line")
        key = name.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return int(status[1]), status[0] == b"HTTP/1.1", headers


class LeanHTTP:
    """Plain-http calls with whole bodies (see the module docstring)."""

    def __init__(self, *, timeout: float, connect_timeout: float, max_connections: int, user_agent: str):
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._origins: dict[str, _Origin] = {}
        self._agent = f"User-Agent: {user_agent}\r\nAccept: */*\r\n".encode("latin-1")
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
            if now - conn.idle_since > KEEPALIVE or conn.buf or conn.stream.socket.is_readable():
                conn.close()
                continue
            return conn
        return None

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
        origin = self.origin(base)
        target = origin.prefix + path
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        head = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n".encode("latin-1"), self._agent]
        if headers:
            head.append("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1"))
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(b"Content-Length: %d\r\n" % len(body or b""))
        head.append(b"\r\n")
        if body:
            head.append(body)
        message = b"".join(head)
        key = (origin.host, origin.port)
        async with self._slots:
            with trio.move_on_after(self.timeout):
                return await self._exchange(key, method, message)
            raise HTTPFailure(f"ReadTimeout: no answer within {self.timeout:g} s")

    async def _exchange(self, key: tuple[str, int], method: str, message: bytes) -> Answer:
        conn = self._take_idle(key)
        if conn is None:
            try:
                with trio.fail_after(self.connect_timeout):
                    stream = await trio.open_tcp_stream(*key)
            except trio.TooSlowError:
                raise HTTPFailure(f"ConnectTimeout: no connection within {self.connect_timeout:g} s") from None
            except OSError as exc:
                raise HTTPFailure(f"ConnectError: {exc}") from None
            self.opened += 1
            conn = _Connection(stream)
        keep = False
        try:
            await conn.stream.send_all(message)
            status, http11, headers = _parse_head(await conn.read_head())
            while 100 <= status < 200:  # an interim answer: the real one follows
                status, http11, headers = _parse_head(await conn.read_head())
            if method == "HEAD" or status in (204, 304):
                content = b""
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                content = await conn.read_chunked()
            elif "content-length" in headers:
                try:
                    length = int(headers["content-length"])
                except ValueError:
                    raise HTTPFailure("RemoteProtocolError: a malformed Content-Length") from None
                content = await conn.read_exactly(length)
            else:
                content = await conn.read_to_end()
                http11 = False
            keep = http11 and "close" not in headers.get("connection", "").lower()
            conn.uses += 1
            return Answer(status, headers, content)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HTTPFailure(f"{type(exc).__name__}: {exc or 'the connection broke'}") from None
        finally:
            if keep:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(key, []).append(conn)
            else:
                conn.close()


def encode_json(value: Any) -> bytes:
    return jsonlib.dumps(value).encode("utf-8")
