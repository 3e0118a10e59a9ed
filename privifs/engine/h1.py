"""A lean HTTP/1.1 server for the engine's API: h11 on a trio socket, the ASGI app run in the
connection's own task.

The API's requests are small and many (five per small file a mount stores), and hypercorn's
layers cost the engine more CPU per request than its handlers do: a task and a memory channel per
request, protocol, stream and event objects, a send lock and shielded cancel scopes per write, an
idle-timer update per request, and the trio scheduling between all of them. Here one task per
connection reads, parses with h11, runs the app and writes each answer's head and body with one
socket write. The WebSocket, upstream and downstream servers stay on hypercorn.

What it keeps of hypercorn's behaviour: HTTP/1.1 keep-alive and pipelining, ``Expect:
100-continue`` (the 100 goes out when the app first reads the body), a connection whose request
body was not read is closed after the answer (which says ``Connection: close``),
``http.disconnect`` when the client leaves mid-body, malformed requests answered 400 (431 for an
oversized head) and closed, an idle connection closed after ``keep_alive_timeout`` and at shutdown
(a busy one once its answer is out, or after ``graceful_timeout``), and one whose request body
stops arriving for ``body_timeout`` closed too (a client that sends a head and part of a body and
then nothing no longer holds a connection, and its descriptor, for good). A failure inside one
connection ends that connection only: one log line for a client's doing, an error with its cause
otherwise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from urllib.parse import unquote

import h11
import trio
from starlette.requests import ClientDisconnect

from privifs.ratelog import quiet_failed_accepts

log = logging.getLogger("privifs.engine")


quiet_failed_accepts()

MAX_RECV = 256 * 1024
MAX_HEAD = 16 * 1024  # hypercorn's h11_max_incomplete_size
CLIENT_FAULTS = (
    h11.ProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.BusyResourceError,
    ConnectionError,
    ClientDisconnect,
)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions an exception (group) is made of."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def log_dropped(name: str, exc: Exception, client_faults: tuple[type[BaseException], ...]) -> None:
    """A connection of the server ``name`` ended on ``exc``: one INFO line when every cause is
    the client's doing (it left, or broke the protocol), an error with its traceback otherwise."""
    causes = leaves(exc)
    what = "; ".join(f"{type(e).__name__}: {e}" for e in causes)
    if all(isinstance(e, client_faults) for e in causes):
        log.info("%s: dropped a connection on a protocol error: %s", name, what)
    else:
        log.error("%s: a connection failed and was dropped: %s", name, what, exc_info=exc)


def client_error(hint: int) -> int:
    """The status for a request h11 could not parse: its hint, except that a transfer coding
    other than chunked (``gzip, chunked``, ``chunked, chunked``), for which h11 hints 501, is a
    400 too: the request is the client's mistake, and the engine answers none with a 5xx."""
    return 400 if hint >= 500 else hint


# an answer goes out in pieces of this size, each of which must leave within the send timeout: a
# client that takes less than this in the timeout does not read (a slow one that reads goes on)
SEND_PIECE = 256 * 1024


async def send_within(stream: trio.abc.SendStream, data, timeout: float, name: str, *, shield: bool = False) -> bool:
    """Write ``data`` a :data:`SEND_PIECE` at a time, each within ``timeout`` seconds; False (and
    one log line naming the server ``name``) once the client took none of a piece that long: it
    does not read. ``shield``: nothing but that time limit interrupts a piece (hypercorn's writes)."""
    view = memoryview(data)
    for start in range(0, len(view), SEND_PIECE):
        with trio.CancelScope(shield=shield, deadline=trio.current_time() + timeout) as scope:
            await stream.send_all(view[start : start + SEND_PIECE])
        if scope.cancelled_caught:
            log.info("%s: the client read nothing of its answer for %gs; connection closed", name, timeout)
            return False
    return True


# set in a request's scope when its body turned out malformed (answered 400 by the server): the
# app's http.disconnect is no client that left (privifs.engine.http.guarded logs nothing more)
MALFORMED = "privifs.malformed"


class _Closed(Exception):
    """The client closed its side, or sent something h11 refused (answered already)."""


class Server:
    """Serves one ASGI app on one port until :meth:`serve`'s ``shutdown`` event."""

    def __init__(
        self,
        app,
        name: str,
        *,
        keep_alive_timeout: float = 75,
        graceful_timeout: float = 3,
        body_timeout: float = 60,
        send_timeout: Callable[[], float] = lambda: 60.0,
    ):
        self.app = app
        self.name = name
        self.keep_alive_timeout = keep_alive_timeout
        self.body_timeout = body_timeout
        self.send_timeout = send_timeout  # (the engine's option as it is now)
        self.graceful_timeout = graceful_timeout
        self._conns: set[_Connection] = set()
        self._stopping = False

    async def serve(
        self, host: str, port: int, shutdown: Callable, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` (0: any free port); ``task_status`` gets the bound URLs, as
        hypercorn's ``serve`` gives them; return once ``await shutdown()`` returned and the
        connections are closed."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        async with trio.open_nursery() as conns:
            async with trio.open_nursery() as accept:
                for listener in listeners:
                    accept.start_soon(partial(trio.serve_listeners, self._handle, [listener], handler_nursery=conns))
                task_status.started([f"http://{shown}:{bound[1]}"])
                await shutdown()
                accept.cancel_scope.cancel()
            for listener in listeners:
                await listener.aclose()
            self._stopping = True
            for conn in list(self._conns):
                conn.close_if_idle()
            conns.cancel_scope.deadline = trio.current_time() + self.graceful_timeout

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = _Connection(self, stream)
        self._conns.add(conn)
        try:
            await conn.run()
        except Exception as exc:  # noqa: BLE001 - logged with its cause; it ends this connection only
            log_dropped(self.name, exc, CLIENT_FAULTS)
        finally:
            self._conns.discard(conn)
            with trio.CancelScope(shield=True):
                try:
                    await stream.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError, OSError):
                    pass
                await stream.aclose()


class _Connection:
    def __init__(self, server: Server, stream: trio.SocketStream):
        self.server = server
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._idle_scope: trio.CancelScope | None = None
        self._eof = False
        self._idle_deadline = math.inf
        self.refused = False  # a request h11 could not parse was answered (4xx) by the server itself
        self.malformed = False  # … and it was malformed (not a client that left mid-request)
        try:
            self._client = tuple(stream.socket.getpeername()[:2])
            self._server = tuple(stream.socket.getsockname()[:2])
        except OSError:
            self._client = self._server = None

    def close_if_idle(self) -> None:
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    # -- reading ------------------------------------------------------------------------------
    async def _next_event(self, waiting_for_request: bool = False):
        """h11's next event, reading as needed; :class:`_Closed` when there is none to come.
        While waiting for a request the keep-alive timeout and the shutdown apply."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                status = client_error(exc.error_status_hint)
                if not self._eof:  # (at the end of the stream: a client that left mid-request)
                    # (not h11's message: it quotes the client's bytes, which may be a header's token)
                    part = "head" if waiting_for_request else "body (a bad chunk or framing)"
                    name = self.server.name
                    log.info("%s: a malformed request %s; answered %d, connection closed", name, part, status)
                    self.malformed = True
                self.refused = True
                await self._refuse(status)
                raise _Closed() from None
            if event is not h11.NEED_DATA:
                if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    raise _Closed()
                return event
            if self._eof:
                raise _Closed()
            if waiting_for_request:
                if self.server._stopping:
                    raise _Closed()
                with trio.move_on_at(self._idle_deadline) as scope:
                    self._idle_scope = scope
                    data = await self._receive()
                self._idle_scope = None
                if scope.cancelled_caught:
                    raise _Closed()
            else:  # the rest of a request: a body that stops arriving closes the connection
                with trio.move_on_after(self.server.body_timeout) as scope:
                    data = await self._receive()
                if scope.cancelled_caught:
                    log.info(
                        "%s: a request body stopped arriving for %gs; connection closed",
                        self.server.name,
                        self.server.body_timeout,
                    )
                    raise _Closed()
            self.h11.receive_data(data)
            if not data:
                self._eof = True

    async def send(self, data: bytes) -> None:
        """Write ``data``; a client that takes no :data:`SEND_PIECE` of it for the send timeout
        (it does not read: pipelined requests whose answers it never takes, each up to a listing
        page) has its connection closed (:class:`_Closed`) instead of holding the answer for good."""
        timeout = self.server.send_timeout()
        if timeout <= 0:
            return await self.stream.send_all(data)
        if not await send_within(self.stream, data, timeout, self.server.name):
            raise _Closed()

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive_some(MAX_RECV)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return b""

    async def _refuse(self, status: int) -> None:
        """Answer a request h11 could not parse, if an answer can still be given."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        try:
            data = self.h11.send(
                h11.Response(status_code=status, headers=[("content-length", "0"), ("connection", "close")])
            )
            await self.stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    # -- the request loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            self._idle_deadline = trio.current_time() + self.server.keep_alive_timeout
            try:
                event = await self._next_event(waiting_for_request=True)
            except _Closed:
                return
            if not isinstance(event, h11.Request):
                return  # h11 gives nothing else in this state
            if not await _Exchange(self, event).run():
                return
            if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                self.h11.start_next_cycle()
            else:
                return  # the answer asked to close, or the request body was not read


class _Exchange:
    """One request and its answer."""

    def __init__(self, conn: _Connection, request: h11.Request):
        self.conn = conn
        self.request = request
        self.head: dict | None = None
        self.started = False  # the head is written
        self.answered = False  # and the whole answer
        self.body_done = False
        self.head_request = request.method == b"HEAD"
        self._scope: dict | None = None

    def scope(self) -> dict | None:
        target = self.request.target
        raw_path, _, query = target.partition(b"?")
        try:
            path = unquote(raw_path.decode("ascii"))
        except UnicodeDecodeError:
            return None
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.request.http_version.decode("ascii"),
            "method": self.request.method.decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": [(name, value) for name, value in self.request.headers],
            "client": self.conn._client,
            "server": self.conn._server,
        }

    async def run(self) -> bool:
        """Serve the request; whether the connection may carry another one."""
        scope = self._scope = self.scope()
        if scope is None:
            await self.conn._refuse(400)
            return False
        try:
            await self.conn.server.app(scope, self.receive, self.send)
        except _Closed:
            return False
        except Exception:
            await self._failed()
            raise
        h = self.conn.h11
        while h.their_state is h11.SEND_BODY:  # what is left of the body, if it is here already
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break  # not read and not here: the connection closes after the answer
        if not self.answered:  # begun and not ended, or never begun: the connection cannot go on
            await self._failed()
            return False
        return True

    async def _failed(self) -> None:
        """The app ended without an answer: a 500 if the answer can still be given."""
        if self.started or self.conn.h11.our_state is not h11.SEND_RESPONSE:
            return
        try:
            await self._write(500, [(b"content-length", b"0"), (b"connection", b"close")], b"", False)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def receive(self) -> dict:
        conn = self.conn
        if self.body_done:
            return {"type": "http.disconnect"}
        if conn.h11.client_is_waiting_for_100_continue:
            await conn.stream.send_all(conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        try:
            event = await conn._next_event()
        except _Closed:
            self.body_done = True
            if conn.refused:  # answered 400 already (a malformed body logged in one line): the app's
                # own answer to the disconnect would be a second one (h11's LocalProtocolError)
                self.answered = True
                if conn.malformed and self._scope is not None:
                    self._scope[MALFORMED] = True
            return {"type": "http.disconnect"}
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        body = bytes(event.data)
        # the end of a small body is usually in the buffer already: hand both over at once
        try:
            after = conn.h11.next_event()
        except h11.RemoteProtocolError:
            after = None  # reported by the next receive
        if isinstance(after, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": body, "more_body": False}
        if after is not None and after is not h11.NEED_DATA:
            # another piece of the body already buffered: give it back to h11's order
            if isinstance(after, h11.Data):
                body += bytes(after.data)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.started or self.head is not None:
                raise RuntimeError("a second response start")
            self.head = message
            return
        if kind != "http.response.body" or self.answered:
            return
        if self.head is None and not self.started:
            raise RuntimeError("a response body before its start")
        more = message.get("more_body", False)
        head, self.head = self.head, None
        status, headers = (head["status"], head.get("headers", [])) if head is not None else (0, [])
        await self._write(status, headers, message.get("body", b""), more)
        if not more:
            self.answered = True

    def _body_read(self) -> bool:
        """Whether the request's body is all read, taking what of it is here already. An answer
        begun before the rest arrived (a 404 or 405 from the router, which reads no body) is the
        connection's last, and says so: without ``Connection: close`` a keep-alive client sent
        its next request on it and got "Server disconnected without sending a response"."""
        h = self.conn.h11
        while h.their_state is h11.SEND_BODY:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return False
        return True

    async def _write(self, status: int, headers, body: bytes, more: bool) -> None:
        """The head (unless written already), ``body``, and the end unless ``more``, in one write."""
        h = self.conn.h11
        out = []
        if not self.started:
            self.started = True
            headers = list(headers)
            if not self._body_read():
                headers.append((b"connection", b"close"))
            out.append(h.send(h11.Response(status_code=status, headers=headers)))
        if body and not self.head_request:
            out.append(h.send(h11.Data(data=body)))
        if not more:
            out.append(h.send(h11.EndOfMessage()))
        await self.conn.send(b"".join(out))
