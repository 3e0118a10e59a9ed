"""Small API calls over kept-alive plain-HTTP/1.1 connections, without httpx's per-request cost.

A small upload is five API calls (reserve, temporary token, exchange, configure-file-meta, risk
meta); through httpx each cost about 0.6 ms of the daemon's CPU (request building, cookies,
auth and redirect hooks, the connection pool's bookkeeping, h11) and two socket writes (headers,
then body), each waking the server. Here a request is formatted into one buffer, written with one
``send``, and its answer parsed directly (``Content-Length``, chunked, or until close); the
connection goes back to a pool (one per host and port) unless the server said ``close``.

Only what this can do exactly is sent this way (:meth:`LeanHTTP.handles`): plain ``http://``
URLs with no proxy configured for them, and bodies already in memory. HTTPS, proxies and streamed
bodies stay with httpx (``Transport.http``). The answer is an ``httpx.Response`` (status, headers,
content), so callers and the error mapping see no difference; failures are httpx's
``TransportError`` kinds (connect, read, write, timeout, protocol), handled as before.

A pooled connection the server closed while it was idle is found before reuse (readable without
a request) and dropped; a request whose reused connection breaks before any byte of an answer
arrived is sent once more on a fresh connection if it is idempotent (most likely the server
closed it while idle and never saw the request); any other call fails as a transport error, and
its caller restarts as it does after any lost connection.
"""
from __future__ import annotations

import urllib.request
from urllib.parse import urlsplit

import httpx
import trio

MAX_IDLE_PER_HOST = 32
MAX_HEAD = 64 * 1024
RECV = 64 * 1024


class _Conn:
    __slots__ = ("stream", "buf")

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = bytearray()

    async def fill(self) -> bool:
        data = await self.stream.receive_some(RECV)
        if not data:
            return False
        self.buf += data
        return True

    def alive(self) -> bool:
        """Idle and still open: nothing to read (readable here means closed, or stray bytes)."""
        try:
            return not self.stream.socket.is_readable()
        except OSError:
            return False


class LeanHTTP:
    def __init__(self, timeout: float, connect_timeout: float):
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._proxies = urllib.request.getproxies()

    def handles(self, url: str, content) -> bool:
        if not url.startswith("http://") or not (content is None or isinstance(content, bytes)):
            return False
        if not self._proxies:
            return True
        host = urlsplit(url).hostname or ""
        return ("http" not in self._proxies and "all" not in self._proxies) or urllib.request.proxy_bypass(host)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                await trio.aclose_forcefully(c.stream)

    async def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None, *,
                      resend: bool = False) -> httpx.Response:
        """One request; ``resend``: it may be sent again on a fresh connection when a reused one
        broke before any answer (idempotent calls; others fail as the connection did)."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}", "Accept: */*",
                 "Accept-Encoding: identity", "User-Agent: privifs"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(f"Content-Length: {len(body or b'')}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
        key = (host, port)
        while True:
            conn, reused = self._take(key), True
            if conn is None:
                conn, reused = await self._connect(host, port), False
            try:
                with trio.fail_after(self.timeout):
                    status, head, content, keep = await self._exchange(conn, data, method, reused)
            except _Stale:
                await trio.aclose_forcefully(conn.stream)
                if resend:
                    continue  # the server closed the idle connection, most likely before it read the request
                raise httpx.RemoteProtocolError("the server closed the connection without an answer") from None
            except trio.TooSlowError:
                await trio.aclose_forcefully(conn.stream)
                raise httpx.ReadTimeout(f"no answer within {self.timeout:.0f}s") from None
            except BaseException:
                await trio.aclose_forcefully(conn.stream)
                raise
            if keep and not conn.buf:
                self._put(key, conn)
            else:
                await trio.aclose_forcefully(conn.stream)
            return httpx.Response(status, headers=head, content=content)

    # -- connections ---------------------------------------------------------------------------
    def _take(self, key: tuple[str, int]) -> _Conn | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.alive():
                return conn
            conn.stream.socket.close()
        return None

    def _put(self, key: tuple[str, int], conn: _Conn) -> None:
        conns = self._idle.setdefault(key, [])
        if len(conns) < MAX_IDLE_PER_HOST:
            conns.append(conn)
        else:
            conn.stream.socket.close()

    async def _connect(self, host: str, port: int) -> _Conn:
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"{exc.strerror or exc}") from None
        return _Conn(stream)

    # -- one request -----------------------------------------------------------------------------
    async def _exchange(self, conn: _Conn, data: bytes, method: str, reused: bool):
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if reused:
                raise _Stale() from None
            raise httpx.WriteError(f"sending the request failed ({exc})") from None
        while True:
            status, head, headers = await self._head(conn, reused)
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue and the like: the answer follows
            break
        keep = head.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304):
            return status, headers, b"", keep
        if "chunked" in head.get("transfer-encoding", "").lower():
            return status, headers, await self._chunked(conn), keep
        length = head.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise httpx.RemoteProtocolError(f"bad Content-Length {length!r}")
            n = int(length)
            while len(conn.buf) < n:
                if not await self._fill(conn):
                    raise httpx.RemoteProtocolError("the server closed the connection inside the answer")
            content = bytes(conn.buf[:n])
            del conn.buf[:n]
            return status, headers, content, keep
        while await self._fill(conn):  # neither: the body ends with the connection
            pass
        content = bytes(conn.buf)
        conn.buf.clear()
        return status, headers, content, False

    async def _fill(self, conn: _Conn) -> bool:
        try:
            return await conn.fill()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(f"reading the answer failed ({exc})") from None

    async def _head(self, conn: _Conn, reused: bool):
        while True:
            end = conn.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(conn.buf) > MAX_HEAD:
                raise httpx.RemoteProtocolError("the answer's header is too large")
            try:
                more = await conn.fill()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                if reused and not conn.buf:
                    raise _Stale() from None
                raise httpx.ReadError(f"reading the answer failed ({exc})") from None
            if not more:
                if reused and not conn.buf:
                    raise _Stale()
                raise httpx.RemoteProtocolError("the server closed the connection without an answer")
        raw = bytes(conn.buf[:end]).decode("latin-1")
        del conn.buf[:end + 4]
        status_line, *header_lines = raw.split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1 answer: {status_line[:80]!r}")
        headers: list[tuple[str, str]] = []
        head: dict[str, str] = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if not sep:
                raise httpx.RemoteProtocolError(f"bad header line {line[:80]!r}")
            name, value = name.strip(), value.strip()
            headers.append((name, value))
            low = name.lower()
            head[low] = f"{head[low]}, {value}" if low in head else value
        if version == "HTTP/1.0" and "keep-alive" not in head.get("connection", "").lower():
            head["connection"] = "close"
        return int(code), head, headers

    async def _chunked(self, conn: _Conn) -> bytes:
        out = bytearray()
        while True:
            while (i := conn.buf.find(b"\r\n")) < 0:
                if not await self._fill(conn):
                    raise httpx.RemoteProtocolError("the server closed the connection inside a chunk")
            size_text = bytes(conn.buf[:i]).split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            del conn.buf[:i + 2]
            if size == 0:
                while (i := conn.buf.find(b"\r\n")) != 0:  # trailers, then the empty line
                    if i > 0:
                        del conn.buf[:i + 2]
                    elif not await self._fill(conn):
                        raise httpx.RemoteProtocolError("the server closed the connection inside the trailers")
                del conn.buf[:2]
                return bytes(out)
            while len(conn.buf) < size + 2:
                if not await self._fill(conn):
                    raise httpx.RemoteProtocolError("the server closed the connection inside a chunk")
            out += conn.buf[:size]
            del conn.buf[:size + 2]


class _Stale(Exception):
    """A reused connection turned out closed before the request reached the server."""
