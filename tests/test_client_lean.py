"""The lean HTTP/1.1 path for small API calls (privifs/client/lean.py) against a scripted server
on a real loopback socket: every answer framing is read exactly, connections are kept and
reused, and a kept connection the server closed is handled as the call's idempotency allows."""
from __future__ import annotations

import httpx
import pytest
import trio

from privifs.client.lean import LeanHTTP


class Scripted:
    """Answers each request (read up to the end of its head and body) with the next answer of
    ``answers``; ``close_after`` closes the connection after that answer."""

    def __init__(self, answers: list[bytes], close_after: set[int] = frozenset()):
        self.answers = list(answers)
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buf = b""
        async with stream:
            while self.answers:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                self.requests.append(head + b"\r\n\r\n" + buf[:length])
                buf = buf[length:]
                n = len(self.requests)
                await stream.send_all(self.answers.pop(0))
                if n in self.close_after:
                    return


async def serve(nursery, scripted: Scripted) -> str:
    listeners = await nursery.start(trio.serve_tcp, scripted.handle, 0)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_answers_of_every_framing_are_read_exactly_over_one_kept_connection():
    scripted = Scripted([
        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"commandId\":\"x\"}",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ])
    lean = LeanHTTP(10, 5)
    async with trio.open_nursery() as nursery:
        base = await serve(nursery, scripted)
        r1 = await lean.request("POST", base + "/a?x=1", {"X-DPT-AUTHORIZATION": "T-1"}, b"k=v")
        r2 = await lean.request("GET", base + "/b", {}, None)
        r3 = await lean.request("GET", base + "/c", {}, None)
        r4 = await lean.request("POST", base + "/d", {}, b"")
        nursery.cancel_scope.cancel()
    await lean.aclose()
    assert (r1.status_code, r1.json(), r1.headers["content-type"]) == (202, {"commandId": "x"}, "application/json")
    assert (r2.status_code, r2.content) == (200, b"hello world")
    assert (r3.status_code, r3.content) == (404, b"no")
    assert (r4.status_code, r4.content) == (204, b"")
    assert scripted.connections == 1
    first = scripted.requests[0]
    assert first.startswith(b"POST /a?x=1 HTTP/1.1\r\n") and first.endswith(b"\r\n\r\nk=v")
    assert b"X-DPT-AUTHORIZATION: T-1\r\n" in first and b"Content-Length: 3\r\n" in first
    assert b"Content-Length" not in scripted.requests[1]


async def test_a_body_that_ends_with_the_connection_is_read_whole_and_the_connection_not_kept():
    scripted = Scripted([b"HTTP/1.0 200 OK\r\n\r\nall of it", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
                        close_after={1})
    lean = LeanHTTP(10, 5)
    async with trio.open_nursery() as nursery:
        base = await serve(nursery, scripted)
        r1 = await lean.request("GET", base + "/", {}, None)
        scripted.answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        r2 = await lean.request("GET", base + "/", {}, None)
        nursery.cancel_scope.cancel()
    await lean.aclose()
    assert (r1.content, r2.content) == (b"all of it", b"ok")
    assert scripted.connections == 2


@pytest.mark.parametrize("resend", [True, False])
async def test_a_kept_connection_closed_by_the_server_mid_request_resends_only_idempotent_calls(resend):
    # the server reads the second request and closes without answering, as one that timed the
    # idle connection out at that moment would
    scripted = Scripted([b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1", b""], close_after={2})
    lean = LeanHTTP(10, 5)
    async with trio.open_nursery() as nursery:
        base = await serve(nursery, scripted)
        await lean.request("GET", base + "/", {}, None)
        scripted.answers.append(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
        if resend:
            r = await lean.request("GET", base + "/", {}, None, resend=True)
            assert r.content == b"2" and scripted.connections == 2
        else:
            with pytest.raises(httpx.TransportError):
                await lean.request("POST", base + "/", {}, b"once", resend=False)
            assert scripted.connections == 1
        nursery.cancel_scope.cancel()
    await lean.aclose()


async def test_an_unreachable_server_is_a_connect_error():
    lean = LeanHTTP(10, 5)
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(httpx.ConnectError):
            await lean.request("GET", f"http://127.0.0.1:{port}/", {}, None)


def test_only_plain_http_with_bodies_in_memory_takes_the_lean_path(monkeypatch):
    lean = LeanHTTP(10, 5)
    lean._proxies = {}
    assert lean.handles("http://127.0.0.1:9009/x", b"body")
    assert not lean.handles("https://host:9009/x", b"body")
    assert not lean.handles("http://127.0.0.1:9009/x", iter([b"stream"]))
    lean._proxies = {"http": "http://proxy:3128"}
    assert not lean.handles("http://example.com/x", None)
