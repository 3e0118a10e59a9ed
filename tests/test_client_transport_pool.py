"""The client's HTTP connections: calls in flight reuse kept-alive connections instead of opening
and closing one each (against a plain HTTP/1.1 server on loopback that counts connections)."""

from __future__ import annotations

from functools import partial

import trio

from privifs.client.transport import ClientOptions, Endpoints, Transport

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class CountingServer:
    """Answers every request with 200 and keeps each connection open; counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)  # requests here carry no body
                    self.requests += 1
                    await trio.sleep(0.01)  # keep calls overlapping
                    await stream.send_all(OK)


async def test_sixteen_calls_in_flight_keep_and_reuse_sixteen_connections():
    server = CountingServer()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        transport = Transport(Endpoints(api=f"http://127.0.0.1:{port}"), ClientOptions())
        try:
            for _ in range(4):
                async with trio.open_nursery() as calls:
                    for _ in range(16):
                        calls.start_soon(lambda: transport.call("GET", "/health", auth=False))
        finally:
            await transport.aclose()
        nursery.cancel_scope.cancel()
    assert server.requests == 64
    assert server.connections == 16  # with 8 kept of 16 (the former pool) each round opened 8 more
