"""Mixins for hypercorn's per-connection handler (the WebSocket, upstream and downstream
servers): one socket write per small HTTP answer instead of two, one keep-alive timer per
connection that a request does not wake, and reads without a timeout scope each.

hypercorn writes an answer's head (status line and headers) and its body with separate
``send`` calls. On loopback each ``send`` runs the receiver's TCP path and wakes it, so a small
answer cost two wake-ups of the client and about 0.1 ms of the engine's CPU per extra write
(measured: 13 writes per small upload, the largest single item in a cProfile of the engine).
:class:`CoalescingSend` holds back a final answer's head (2xx-5xx; never a 1xx such as
``101 Switching Protocols``, after which the server may stay silent) and writes it together with
whatever the connection sends next: the body, the empty end of a body, or nothing before the
connection closes (a body larger than ``JOIN_LIMIT`` is written after it instead, not copied to
join them). Nothing else changes: every byte is written in the same order, and the write
that carries the head happens no later than the next event of the same answer.
"""

from __future__ import annotations

import math

import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.trio import tcp_server

from privifs.engine.h1 import send_within

_FINAL_HEAD = tuple(f"HTTP/1.1 {d}".encode() for d in "2345")
# a held head goes out with the next write up to this size; with a larger one (a part's 4 MiB blob
# on the downstream server) it is written first: joining them copied the whole body, a copy of
# every byte served (14 % of the engine's main thread in a cold read), for one write less
JOIN_LIMIT = 64 * 1024


class CoalescingSend:
    """Mixin for hypercorn's trio ``TCPServer`` (before it in the bases)."""

    _held: bytes | None = None

    async def protocol_send(self, event) -> None:
        if isinstance(event, RawData):
            data = event.data
            if self._held is not None and len(data) > JOIN_LIMIT:  # a large body: not copied to join
                held, self._held = self._held, None
                await super().protocol_send(RawData(data=held))
            elif self._held is not None:
                data, self._held = self._held + data, None
            elif data.startswith(_FINAL_HEAD) and data.endswith(b"\r\n\r\n"):
                self._held = data
                return
            if not data:
                return
            event = RawData(data=data)
        elif self._held is not None:  # Closed, Updated: the held head goes first
            held, self._held = self._held, None
            await super().protocol_send(RawData(data=held))
        await super().protocol_send(event)


class SteadyIdleTimer:
    """Mixin for hypercorn's trio ``TCPServer``: one keep-alive timer task per connection, which
    a request does not wake.

    hypercorn stops its idle task when a request arrives and starts a new one (a task spawn
    through a nursery, a lock, two cancel scopes) when the answer is done: about a tenth of the
    engine's CPU for small requests. Here one task lives as long as the connection, waiting for
    the server's shutdown under a cancel scope whose deadline a request moves (to never while it
    runs, to ``keep_alive_timeout`` after its answer): setting a deadline wakes no task, so a
    request costs the timer nothing. What it does is hypercorn's: close a connection idle for
    ``keep_alive_timeout``, or idle when the server shuts down (a busy one as soon as it is
    idle); never one with a request in progress."""

    _busy = False
    _reading_ended = False  # the client closed its side (or the socket broke): the timer has no job
    _idle_since = 0.0
    _idle_scope: trio.CancelScope | None = None
    _idle_again: trio.Event | None = None  # set when the connection is idle: shutting down

    def _timer_deadline(self) -> float:
        return math.inf if self._busy else self._idle_since + self.config.keep_alive_timeout

    async def protocol_send(self, event) -> None:
        if isinstance(event, Updated):
            self._busy = not event.idle
            if event.idle:
                self._idle_since = trio.current_time()
                if self._idle_again is not None:
                    self._idle_again.set()
            if self._idle_scope is not None:
                self._idle_scope.deadline = self._timer_deadline()
            return
        await super().protocol_send(event)

    async def _read_data(self) -> None:
        """Once reading ends, the timer ends too: the connection then ends with its request, as
        in hypercorn (whose timer is stopped while a request runs). An upgraded WebSocket
        connection stays busy to its end, so a client that left without a close frame kept its
        socket open in the engine for good, the timer waiting for a deadline that never came."""
        try:
            await super()._read_data()
        finally:
            self._reading_ended = True
            if self._idle_scope is not None:
                self._idle_scope.cancel()

    async def _idle_timeout(self) -> None:
        self._idle_since = trio.current_time()
        while True:
            if self._reading_ended:
                self._idle_scope = None
                return  # the connection's task closes the socket once its request is done
            with trio.CancelScope(deadline=self._timer_deadline()) as scope:
                self._idle_scope = scope
                await self.context.terminated.wait()
            self._idle_scope = None
            if self._reading_ended:
                return
            if self.context.terminated.is_set():
                while self._busy:  # shutting down: close it once its request is answered
                    self._idle_again = trio.Event()
                    await self._idle_again.wait()
                break
            if not self._busy and trio.current_time() >= self._idle_since + self.config.keep_alive_timeout:
                break  # idle for too long (a request that came as the deadline passed: wait on)
        self._idle_scope = None
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


class PlainReads:
    """Mixin for hypercorn's trio ``TCPServer``: read without a timeout scope per read when no
    ``read_timeout`` is configured (hypercorn enters ``fail_after(inf)``, a cancel scope, for
    every read). Otherwise hypercorn's own loop runs."""

    async def _read_data(self) -> None:
        if self.config.read_timeout:
            return await super()._read_data()
        while True:
            try:
                data = await self.stream.receive_some(tcp_server.MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(Closed())


class SendTimeout:
    """Mixin for hypercorn's trio ``TCPServer`` (just before it in the bases): a write the client
    takes no piece of (:data:`privifs.engine.h1.SEND_PIECE`) for ``config.privifs_send_timeout()`` seconds closes the
    connection (0: no limit).

    hypercorn writes with its cancellation shielded and no time limit: a client that sent a GET
    for a big blob and then did not read held its connection, and the piece of the blob being
    written (4 MiB, and the 4 MiB buffer it was read into), for as long as it stayed connected:
    200 such clients grew the engine by 1.6 GB. What the piece's shield is for stays: nothing but
    the time limit interrupts a write."""

    async def protocol_send(self, event) -> None:
        timeout = getattr(self.config, "privifs_send_timeout", lambda: 0)()
        if not isinstance(event, RawData) or timeout <= 0:
            return await super().protocol_send(event)
        name = getattr(self.config, "privifs_server", "a server")
        async with self.send_lock:
            try:
                if await send_within(self.stream, event.data, timeout, name, shield=True):
                    return
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await self.protocol.handle(Closed())
