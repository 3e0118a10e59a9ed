"""The engine's connection mixins (privifs/engine/coalesce.py), in-process: a small answer's head
and body go out in one socket write, in order (a large body after its head, not copied to join
them), and a 1xx head (a WebSocket upgrade's 101 may be
followed by silence) at once; one keep-alive timer per connection closes it as hypercorn's
per-request timer did (idle too long, or idle at shutdown; never during a request)."""

from __future__ import annotations

import types

import trio
from hypercorn.events import Closed, RawData, Updated

from privifs.engine.coalesce import CoalescingSend, SteadyIdleTimer


class Recorder:
    def __init__(self) -> None:
        self.events: list = []

    async def protocol_send(self, event) -> None:
        self.events.append(event.data if isinstance(event, RawData) else type(event).__name__)


class Server(CoalescingSend, Recorder):
    pass


HEAD = b"HTTP/1.1 202 \r\ncontent-length: 19\r\n\r\n"


async def test_a_small_answer_goes_out_in_one_write():
    s = Server()
    await s.protocol_send(Updated(idle=False))
    await s.protocol_send(RawData(HEAD))
    await s.protocol_send(RawData(b'{"commandId":"abc"}'))
    await s.protocol_send(RawData(b""))  # h11's end of a Content-Length body
    await s.protocol_send(Updated(idle=True))
    assert s.events == ["Updated", HEAD + b'{"commandId":"abc"}', "Updated"]


async def test_a_head_without_body_is_written_before_the_next_event():
    s = Server()
    await s.protocol_send(RawData(b"HTTP/1.1 204 \r\n\r\n"))
    await s.protocol_send(Closed())
    assert s.events == [b"HTTP/1.1 204 \r\n\r\n", "Closed"]
    s = Server()
    await s.protocol_send(RawData(b"HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n"))
    await s.protocol_send(RawData(b""))
    assert s.events == [b"HTTP/1.1 200 \r\ncontent-length: 0\r\n\r\n"]


async def test_a_large_body_is_written_after_its_head_as_it_is_not_joined_to_it():
    """A part's blob (4 MiB) on the downstream server: joining the held head to it copied every
    byte served; the head goes first and the body object is passed on as it is."""
    s = Server()
    body = bytes(4 * 1024 * 1024)
    head = b"HTTP/1.1 200 \r\ncontent-length: 4194304\r\n\r\n"
    await s.protocol_send(RawData(head))
    await s.protocol_send(RawData(body))
    await s.protocol_send(RawData(b""))
    assert s.events == [head, body] and s.events[1] is body


async def test_informational_heads_and_websocket_frames_are_written_at_once():
    s = Server()
    upgrade = b"HTTP/1.1 101 \r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    await s.protocol_send(RawData(upgrade))
    await s.protocol_send(RawData(b"HTTP/1.1 100 \r\n\r\n"))
    await s.protocol_send(RawData(b"\x81\x05hello"))
    assert s.events == [upgrade, b"HTTP/1.1 100 \r\n\r\n", b"\x81\x05hello"]


class Conn(SteadyIdleTimer, Recorder):
    """The timer over a stand-in for hypercorn's connection: its config, context and close."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(keep_alive_timeout=timeout)
        self.context = types.SimpleNamespace(terminated=trio.Event())
        self.closed_at: float | None = None

    async def _initiate_server_close(self) -> None:
        self.closed_at = trio.current_time()


async def test_one_idle_timer_closes_an_idle_connection_after_the_keep_alive_timeout(autojump_clock):
    c = Conn(75)
    async with trio.open_nursery() as n:
        n.start_soon(c._idle_timeout)
        await trio.sleep(50)
        await c.protocol_send(Updated(idle=False))  # a request: never closed while it runs
        await trio.sleep(200)
        assert c.closed_at is None
        await c.protocol_send(Updated(idle=True))  # answered at t=250
        await trio.sleep(74)
        assert c.closed_at is None
    assert c.closed_at == 325
    assert c.events == []  # the idle/busy updates are the timer's, not written anywhere


async def test_a_shutdown_closes_idle_connections_at_once_and_busy_ones_when_done(autojump_clock):
    c = Conn(75)
    async with trio.open_nursery() as n:
        n.start_soon(c._idle_timeout)
        await c.protocol_send(Updated(idle=False))
        await trio.sleep(1)
        c.context.terminated.set()
        await trio.sleep(10)
        assert c.closed_at is None
        await c.protocol_send(Updated(idle=True))
    assert c.closed_at == 11


async def test_a_shutdown_closes_an_idle_connection_at_once(autojump_clock):
    c = Conn(75)
    async with trio.open_nursery() as n:
        n.start_soon(c._idle_timeout)
        await c.protocol_send(Updated(idle=False))
        await trio.sleep(5)
        await c.protocol_send(Updated(idle=True))
        await trio.sleep(10)
        c.context.terminated.set()
    assert c.closed_at == 15
