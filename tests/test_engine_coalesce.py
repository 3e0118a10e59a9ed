"""The engine writes a small answer's head and body with one socket write
(privifs/engine/coalesce.py), in order, and never holds back a 1xx head (a WebSocket upgrade's
101 may be followed by silence). In-process: the mixin's writes are recorded below it."""
from __future__ import annotations

from hypercorn.events import Closed, RawData, Updated

from privifs.engine.coalesce import CoalescingSend


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


async def test_informational_heads_and_websocket_frames_are_written_at_once():
    s = Server()
    upgrade = b"HTTP/1.1 101 \r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    await s.protocol_send(RawData(upgrade))
    await s.protocol_send(RawData(b"HTTP/1.1 100 \r\n\r\n"))
    await s.protocol_send(RawData(b"\x81\x05hello"))
    assert s.events == [upgrade, b"HTTP/1.1 100 \r\n\r\n", b"\x81\x05hello"]
