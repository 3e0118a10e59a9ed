"""The engine helpers the tests import by this name; they live in :mod:`privifs.devkit.engine`
(shared with the scripts)."""

import socket
import threading
from contextlib import asynccontextmanager
from functools import partial

import trio

from privifs.devkit.engine import Channel, EngineProcess, Wire, command_id

__all__ = [
    "Channel",
    "CuttingProxy",
    "EngineProcess",
    "StallingProxy",
    "Wire",
    "api_proxy",
    "command_id",
    "proxied_api",
]


@asynccontextmanager
async def api_proxy(api: str, mangle, answer=None, rewrite=None):
    """A plain HTTP proxy in front of the engine's API, one request per connection, whose
    ``mangle(path, status, body)`` may change what the client gets back: a server behind a
    broken proxy, or one whose answer is cut short. ``answer(path)``, when it returns
    ``(status, body)``, answers the request itself without passing it on (a middlebox that
    answers for a server it did not reach). ``rewrite(path)`` changes the path it passes on (a
    server that ignores a query parameter)."""
    import httpx

    async def serve(stream) -> None:
        with trio.move_on_after(30):
            request = b""
            while b"\r\n\r\n" not in request:
                piece = await stream.receive_some(65536)
                if not piece:
                    return
                request += piece
            head, _, body = request.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
            while len(body) < length:
                body += await stream.receive_some(65536)
            keep = {k: v for k, v in headers.items() if k.lower() not in ("host", "content-length", "connection")}
            own = answer(path) if answer is not None else None
            if own is not None:
                status, reply = own
                resp = httpx.Response(status)
            else:
                async with httpx.AsyncClient(timeout=30) as http:
                    sent = rewrite(path) if rewrite is not None else path
                    resp = await http.request(method, api + sent, content=body, headers=keep)
                status, reply = mangle(path, resp.status_code, resp.content)
            out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(reply)}", "Connection: close"]
            out += [f"{k}: {v}" for k, v in resp.headers.items() if k.lower().startswith("x-dpt")]
            await stream.send_all("\r\n".join(out).encode() + b"\r\n\r\n" + reply)
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def proxied_api(endpoints, mangle=None, answer=None, rewrite=None):
    """``endpoints`` with the API behind :func:`api_proxy` (the other servers as they are)."""
    import dataclasses

    async with api_proxy(endpoints.api, mangle or (lambda path, status, body: (status, body)), answer, rewrite) as url:
        yield dataclasses.replace(endpoints, api=url)


class StallingProxy:
    """A TCP proxy in front of one of the engine's ports (threads; a context manager) that
    forwards everything until :meth:`stall_after` is called; from then on, once ``budget`` more
    bytes of answers went through (over all connections), nothing more: the server seems to stall
    mid-answer, its connections held open."""

    def __init__(self, port: int):
        self._target = port
        self._lock = threading.Lock()
        self._budget: int | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def stall_after(self, budget: int) -> None:
        with self._lock:
            self._budget = budget

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self._target))
            except OSError:
                return
            self._socks += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src, dst, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers:
                    with self._lock:
                        if self._budget is not None:
                            data = data[: self._budget]
                            self._budget -= len(data)
                if data:
                    dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def __enter__(self) -> "StallingProxy":
        return self

    def __exit__(self, *exc) -> None:
        for s in self._socks:
            s.close()


class EndlessProxy(StallingProxy):
    """A TCP proxy in front of the engine's downstream port whose answers claim a body of
    ``claimed`` bytes and, after the real one, go on with junk for as long as the client reads
    (``limit`` bytes at most): a Content-Length that lies, a server that does not stop. ``extra``
    counts the junk bytes the client took."""

    def __init__(self, port: int, claimed: int = 10**10, limit: int = 256 << 20):
        self.claimed, self.limit, self.extra = claimed, limit, 0
        super().__init__(port)

    def _pipe(self, src, dst, answers: bool) -> None:
        if not answers:
            return super()._pipe(src, dst, answers)
        head = b""
        try:
            while b"\r\n\r\n" not in head and (data := src.recv(65536)):
                head += data
            head, _, body = head.partition(b"\r\n\r\n")
            lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"content-length:")]
            dst.sendall(b"\r\n".join([*lines, b"Content-Length: %d" % self.claimed]) + b"\r\n\r\n" + body)
            src.settimeout(0.5)
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except TimeoutError:
                pass
            junk = b"\xa5" * 65536
            while self.extra < self.limit:
                dst.sendall(junk)
                with self._lock:
                    self.extra += len(junk)
        except OSError:
            pass


class CuttingProxy(StallingProxy):
    """A TCP proxy in front of one of the engine's ports whose first ``cuts`` connections carry
    only ``keep`` bytes of the answer, then are closed: a download broken mid-answer."""

    def __init__(self, port: int, cuts: int, keep: int = 1000):
        self.left, self.keep = cuts, keep
        self.cut = 0
        super().__init__(port)

    def _pipe(self, src, dst, answers: bool) -> None:
        if not answers:
            return super()._pipe(src, dst, answers)
        with self._lock:
            cutting = self.left > 0
            self.left -= cutting
        if not cutting:
            return super()._pipe(src, dst, answers)
        sent = 0
        try:
            while sent < self.keep and (data := src.recv(self.keep - sent)):
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        with self._lock:
            self.cut += 1
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
