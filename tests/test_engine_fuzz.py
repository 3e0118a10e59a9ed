"""No bytes a client can send end the engine: malformed HTTP, odd WebSocket handshakes (the
upgrade request with one extra byte behind it once stopped the whole engine), truncated and
oversized bodies, random bytes and half-sent requests, on each of its four ports. Afterwards the
engine still runs and answers normally, and no answer it gave was a 5xx.

Loopback only, a fixed seed, a bounded number of connections, each with a short timeout.
"""

from __future__ import annotations

import json
import random
import socket
import time

import httpx
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from tests.enginekit import EngineProcess

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
READ_TIMEOUT = 1.5


def handshake(**changes: bytes | None) -> bytes:
    headers = {
        b"Host": b"127.0.0.1",
        b"Upgrade": b"websocket",
        b"Connection": b"Upgrade",
        b"Sec-WebSocket-Key": KEY,
        b"Sec-WebSocket-Version": b"13",
    }
    method = changes.pop("method", b"GET")
    version = changes.pop("version", b"HTTP/1.1")
    for name, value in changes.items():
        name_b = name.replace("_", "-").encode()
        if value is None:
            headers.pop(name_b, None)
        else:
            headers[name_b] = value
    return method + b" / " + version + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in headers.items()) + b"\r\n"


def frame(payload: bytes, opcode: int = 1, masked: bool = True, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    if masked:
        head += b"\x00\x00\x00\x00"  # the zero mask leaves the payload as it is
    return head + payload


def cases(rng: random.Random) -> list[tuple[str, bytes]]:
    out = [
        ("upgrade + one extra byte", UPGRADE + b"x"),
        ("upgrade + a frame before the 101", UPGRADE + frame(b'{"action":"joinChannel"}')),
        ("upgrade + 64 KiB of junk", UPGRADE + rng.randbytes(65536)),
        ("handshake without key", handshake(Sec_WebSocket_Key=None)),
        ("handshake with a short key", handshake(Sec_WebSocket_Key=b"abc")),
        ("handshake of version 99", handshake(Sec_WebSocket_Version=b"99")),
        ("handshake by POST", handshake(method=b"POST")),
        ("handshake over HTTP/1.0", handshake(version=b"HTTP/1.0")),
        ("handshake with a body", handshake(Content_Length=b"5") + b"hello"),
        ("upgrade to something else", handshake(Upgrade=b"h2c", HTTP2_Settings=b"AAMAAABkAAQAAP__")),
        ("handshake then random frames", handshake() + rng.randbytes(300)),
        ("handshake then an unmasked frame", handshake() + frame(b"hi", masked=False)),
        ("handshake then a 2^62-byte frame header", handshake() + frame(b"", length=2**62)),
        ("handshake then a close with a bad code", handshake() + frame(b"\x00\x01", opcode=8)),
        ("handshake then a 2 MiB text frame", handshake() + frame(b"a" * (2 * 1024 * 1024))),
        ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64)),
        ("a bare request line", b"GARBAGE\r\n\r\n"),
        ("HTTP/9.9", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n"),
        ("a header without colon", b"GET /health HTTP/1.1\r\nHost x\r\n\r\n"),
        ("a 100 KB target", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("a 100 KB header", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n"),
        ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\nhello"),
        ("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"),
        (
            "Content-Length and chunked",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("bad chunk size", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n"),
        (
            "a huge chunk, truncated",
            b"POST /?auth=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\nabc",
        ),
        (
            "a truncated body",
            b"POST /profile/authenticate?auth=x HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nusername=a",
        ),
        (
            "an oversized Content-Length",
            b"POST /data-token/exchange-data-for-token?auth=x HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000000\r\n\r\n" + b"d" * 1000,
        ),
        ("a NUL in the target", b"GET /\x00health HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("non-ASCII method", b"G\xc3\xa9T / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("pipelined good and bad", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nBAD\x00\x01\r\n\r\n"),
        (
            "Expect: 100-continue, then nothing",
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        ),
    ]
    out += [(f"random bytes #{i}", rng.randbytes(rng.randint(1, 4096))) for i in range(8)]
    return out


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` (then end our side), return whatever comes back before the timeout."""
    got = b""
    with trio.move_on_after(READ_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(data)
                await stream.send_eof()
                while len(got) < 1 << 20:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    got += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
    return got


def statuses(answer: bytes) -> list[int]:
    """Status codes of the HTTP responses at the start of lines in ``answer``."""
    codes = []
    for line in answer.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            codes.append(int(line[9:12]))
    return codes


async def slowloris(port: int, answers: list) -> None:
    """Hold half-sent requests open while a normal request goes through, then let them go."""
    partial = [
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"POST /?auth=x HTTP/1.1\r\nContent-Length: 100\r\n\r\nab",
        UPGRADE[:40],
        b"G",
    ]
    streams = []
    try:
        for i in range(12):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(s)
            await s.send_all(partial[i % len(partial)])
        await trio.sleep(0.3)
        answers.append(
            (
                "normal request beside half-sent ones",
                await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            )
        )
    finally:
        for s in streams:
            await s.aclose()


@pytest.fixture
def own_engine(tmp_path):
    engine = EngineProcess(tmp_path / "data").start()
    try:
        yield engine
    finally:
        engine.stop()
        engine.kill()


def test_the_extra_byte_after_an_upgrade_request_is_refused_and_the_engine_lives(own_engine):
    port = own_engine.ports["ws"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(UPGRADE + b"x")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert own_engine.proc.poll() is None
    assert httpx.get(own_engine.urls["api"] + "/health", timeout=5).status_code == 200


async def test_fuzzing_every_port_ends_no_server_and_gets_no_5xx(own_engine):
    rng = random.Random(1411)
    answers: list[tuple[str, str, bytes]] = []

    async def one(server: str, name: str, data: bytes) -> None:
        answers.append((server, name, await exchange(own_engine.ports[server], data)))

    async def loris(server: str) -> None:
        got: list = []
        await slowloris(own_engine.ports[server], got)
        answers.extend((server, name, answer) for name, answer in got)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for server in ("api", "ws", "upstream", "downstream"):
                for name, data in cases(rng):
                    nursery.start_soon(one, server, name, data)
                nursery.start_soon(loris, server)

    assert len(answers) == 4 * (len(cases(random.Random(0))) + 1)
    for server, name, answer in answers:
        assert all(code < 500 for code in statuses(answer)), (server, name, answer[:300])
    extra_byte = [a for server, name, a in answers if (server, name) == ("ws", "upgrade + one extra byte")]
    assert extra_byte[0].startswith(b"HTTP/1.1 400"), extra_byte
    assert own_engine.proc.poll() is None, own_engine.log()[-3000:]
    assert "Traceback" not in own_engine.log(), own_engine.log()[-3000:]

    # and everything still works normally on each port
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(own_engine.urls["api"] + "/health")).json() == {"status": "ok"}
        assert (await http.get(own_engine.urls["upstream"] + "/")).status_code == 405
        assert (await http.get(own_engine.urls["downstream"] + "/")).status_code == 401
    with trio.fail_after(10):
        async with open_websocket_url(own_engine.urls["ws"]) as ws:
            await ws.send_message(
                json.dumps({"action": "joinChannel", "correlationId": "c1", "data": {"authorizationToken": "T-nobody"}})
            )
            answer = json.loads(await ws.get_message())
    assert (answer["correlationId"], answer["status"]) == ("c1", 401)


async def test_a_websocket_frame_holding_nan_or_infinity_is_ignored_not_echoed(own_engine):
    """A correlationId of NaN or 1e999 was sent back as NaN or Infinity, which no strict JSON
    parser reads (found by helper hF): such a frame is junk, ignored like any other."""
    join = '{"action": "joinChannel", "correlationId": %s, "data": {"authorizationToken": "T-nobody"}}'
    with trio.fail_after(10):
        async with open_websocket_url(own_engine.urls["ws"]) as ws:
            for junk in ("NaN", "1e999", "-Infinity"):
                await ws.send_message(join % junk)
            await ws.send_message(join % '"c2"')
            answer = await ws.get_message()
    strict = json.loads(answer, parse_constant=lambda name: pytest.fail(f"{name} in {answer}"))
    assert (strict["correlationId"], strict["status"]) == ("c2", 401)


async def test_a_server_that_fails_as_a_whole_is_served_again_on_the_same_port(tmp_path, monkeypatch, caplog):
    """The second line of defence: were a connection's failure ever to escape (here hypercorn's
    unguarded handler is put back), the server is logged and started again on its port."""
    import hypercorn.trio.run
    import hypercorn.trio.tcp_server

    from privifs.engine.core import Engine
    from privifs.engine.options import EngineOptions
    from privifs.engine.server import _supervised
    from privifs.engine.wsproxy import websocket_app

    monkeypatch.setattr(hypercorn.trio.run, "TCPServer", hypercorn.trio.tcp_server.TCPServer)
    engine = Engine(tmp_path / "inproc", EngineOptions())
    stop = trio.Event()
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                url = await nursery.start(_supervised, "ws", websocket_app(engine), "127.0.0.1", 0, stop)
                port = int(url.rsplit(":", 1)[1])
                await exchange(port, UPGRADE + b"x")  # ends the unguarded server
                while "the ws server failed" not in caplog.text:
                    await trio.sleep(0.05)
                while True:  # served again, on the same port
                    try:
                        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                            await ws.send_message(
                                json.dumps({"action": "joinChannel", "data": {"authorizationToken": "T-x"}})
                            )
                            assert json.loads(await ws.get_message())["status"] == 401
                        break
                    except (OSError, HandshakeError):
                        await trio.sleep(0.1)
                stop.set()
    finally:
        engine.db.close()
    assert f"serving again on port {port}" in caplog.text


def test_a_websocket_client_that_leaves_without_a_close_frame_leaves_no_socket_behind(own_engine):
    """A WebSocket client that vanished without a close frame (killed, its network gone, or just a
    TCP close or reset) kept its connection's socket open in the engine for good (the keep-alive
    timer of an upgraded connection waited for ever, so the connection never ended): 1500 such
    clients left 1500 descriptors, on the way to the engine's limit. Closed ones end now too."""
    import os
    import struct
    import time

    fd_dir = f"/proc/{own_engine.proc.pid}/fd"
    before = len(os.listdir(fd_dir))
    for how in ("close", "rst", "unread", "close frame") * 10:
        s = socket.create_connection(("127.0.0.1", own_engine.ports["ws"]), timeout=5)
        s.sendall(handshake())
        if how != "unread":
            assert s.recv(4096).startswith(b"HTTP/1.1 101")
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if how == "close frame":
            s.sendall(frame(b"\x03\xe8", opcode=8))
            s.recv(4096)
        s.close()
    deadline = time.monotonic() + 10
    while len(os.listdir(fd_dir)) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(os.listdir(fd_dir)) <= before + 2, (before, len(os.listdir(fd_dir)))
    assert httpx.get(own_engine.urls["api"] + "/health", timeout=5).status_code == 200


async def test_an_upload_whose_body_stops_arriving_is_ended_and_stores_nothing(own_engine):
    """A client that sent an upload's head and part of its body and then nothing held its
    upstream connection for good (with a valid stream authorization, also a 1 MiB buffer and a
    partial file); so did a refused request whose body stalled, on either stream port. Such a
    request now ends after ``body_timeout``, its connection closed and nothing stored."""
    from tests.enginekit import Wire, command_id

    own_engine.set_options(body_timeout=1)
    wire = Wire(own_engine.urls)
    try:
        await wire.provision()
        async with wire.channel() as ch:
            r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
            reserve = command_id(r)
            await ch.wait_for("X-DPT-CAB-ID", reserve)
        stream = (await wire.get(f"/data-token/retrieve-temporary-data-token/{reserve}")).json()["stream"]
    finally:
        await wire.aclose()

    def stalled(server: str, target: str) -> bytes:
        """What the server sends, until it closes, to a request whose body stops after 1000 bytes."""
        with socket.create_connection(("127.0.0.1", own_engine.ports[server]), timeout=60) as s:
            s.sendall(f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n".encode() + bytes(1000))
            got = b""
            while piece := s.recv(65536):
                got += piece
            return got

    upload = await trio.to_thread.run_sync(stalled, "upstream", "/?" + stream)
    assert b" 408 " in upload.split(b"\r\n", 1)[0], upload  # Request Timeout, not a 5xx
    assert not list((own_engine.data_dir / "tmp").iterdir())  # the partial upload is gone
    assert b" 405 " in await trio.to_thread.run_sync(stalled, "downstream", "/?auth=x")
    assert b" 404 " in await trio.to_thread.run_sync(stalled, "upstream", "/?auth=nope")
    assert "stopped arriving" in own_engine.log()
    assert "Traceback" not in own_engine.log()
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(own_engine.urls["api"] + "/health")).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        b"Sec-WebSocket-Protocol: \xff",
        b"Sec-WebSocket-Extensions: \xe9",
        b"Connection: Upgrade, \xe9",
        b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=x",
        b"Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=",
    ],
)
def test_a_websocket_handshake_with_a_header_it_cannot_parse_gets_a_400(own_engine, header):
    """An upgrade request with a non-ASCII Sec-WebSocket-Protocol, Sec-WebSocket-Extensions or
    Connection value, or a permessage-deflate offer whose window bits are not a number (found by
    fuzzing, helper hE), got no answer at all on each of the three hypercorn ports: the
    connection was dropped with an ERROR and a traceback in the log (a UnicodeDecodeError in
    wsproto's header split; a ValueError in the accept, then an AttributeError in hypercorn's
    cleanup). Now a 400, and the port serves on."""
    request = handshake().replace(b"\r\n\r\n", b"\r\n" + header + b"\r\n\r\n")
    for server in ("ws", "upstream", "downstream"):
        with socket.create_connection(("127.0.0.1", own_engine.ports[server]), timeout=5) as s:
            s.sendall(request)
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400"), (server, answer)
    assert own_engine.proc.poll() is None
    assert "Traceback" not in own_engine.log(), own_engine.log()[-3000:]
    assert " ERROR " not in own_engine.log(), own_engine.log()[-3000:]


@pytest.mark.parametrize("key", [b"", b"!!!", b"a" * 5000, b"eHh4eHh4eHh4eHh4eHh4", b"eHh4eHh4eHh4eHh4eHh4eA"])
def test_a_websocket_handshake_whose_key_is_not_base64_of_16_bytes_gets_a_400(own_engine, key):
    """An upgrade request whose Sec-WebSocket-Key was empty, not base64, or base64 of other than
    16 bytes was accepted with a 101 on the WebSocket port (helper hM); RFC 6455 (4.2.1) asks for
    a 400, as the engine gives when the key is missing. The port serves on, and a good key still
    gets its 101."""
    for server in ("ws", "upstream", "downstream"):
        with socket.create_connection(("127.0.0.1", own_engine.ports[server]), timeout=5) as s:
            s.sendall(handshake(Sec_WebSocket_Key=key))
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400"), (server, answer)
    with socket.create_connection(("127.0.0.1", own_engine.ports["ws"]), timeout=5) as s:
        s.sendall(handshake())
        assert s.recv(4096).startswith(b"HTTP/1.1 101")
    assert "Traceback" not in own_engine.log(), own_engine.log()[-3000:]


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"chunked, chunked", b"identity", b"x"])
def test_a_transfer_coding_the_engine_does_not_take_is_a_400_on_every_port(own_engine, coding):
    """A request with ``Transfer-Encoding: gzip, chunked`` (or ``chunked, chunked``, or any
    coding but chunked) was answered 501 on every port (h11's hint, found by fuzzing, helper
    hE): a server error for a client's malformed request. A 400 now, like every other request
    the engine cannot parse."""
    request = b"POST /?auth=x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n"
    for server in ("api", "ws", "upstream", "downstream"):
        with socket.create_connection(("127.0.0.1", own_engine.ports[server]), timeout=5) as s:
            s.sendall(request)
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400"), (server, answer)
    assert httpx.get(own_engine.urls["api"] + "/health", timeout=5).status_code == 200


def test_a_plain_request_with_a_body_on_the_websocket_port_gets_its_426_and_the_connection_goes_on(own_engine):
    """The WebSocket port answered a plain HTTP request 426 without reading its body and then
    closed the connection without saying so: a keep-alive client's next request on it got no
    answer (found by fuzzing, helper hE). The body is read first, as on the stream ports."""
    with socket.create_connection(("127.0.0.1", own_engine.ports["ws"]), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        s.sendall(b"0123456789GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.count(b"HTTP/1.1 426 ") == 2, got


def test_http2_is_not_spoken_and_its_connections_leave_no_descriptor_behind(own_engine):
    """The ws, upstream and downstream ports (hypercorn) switched to HTTP/2 on a prior-knowledge
    preface or an ``Upgrade: h2c``, and every HTTP/2 connection a client closed kept its socket
    open in the engine for good (found by fuzzing, helper hE: 20 connections, 20 descriptors,
    on the way to the engine's limit). No Privicore client speaks HTTP/2: those requests are
    answered in HTTP/1.1 now (a 4xx, or the request served as HTTP/1.1 ignoring the upgrade)."""
    import os
    import time

    import h2.config
    import h2.connection

    fd_dir = f"/proc/{own_engine.proc.pid}/fd"
    before = len(os.listdir(fd_dir))
    for server in ("ws", "upstream", "downstream"):
        for _ in range(10):
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            headers = [(":method", "GET"), (":path", "/?auth=x"), (":scheme", "http"), (":authority", "x")]
            client.send_headers(1, headers, end_stream=True)
            with socket.create_connection(("127.0.0.1", own_engine.ports[server]), timeout=5) as s:
                s.sendall(client.data_to_send())
                answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 4"), (server, answer[:100])
        upgrade = b"GET /?auth=x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        with socket.create_connection(("127.0.0.1", own_engine.ports[server]), timeout=5) as s:
            s.sendall(upgrade + b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 4"), (server, answer[:100])
    deadline = time.monotonic() + 10
    while len(os.listdir(fd_dir)) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(os.listdir(fd_dir)) <= before + 2, (before, len(os.listdir(fd_dir)))
    assert "Traceback" not in own_engine.log(), own_engine.log()[-3000:]


def test_request_bodies_held_by_clients_that_never_finish_them_are_bounded(tmp_path):
    """Every API connection could hold a body of up to 1 MiB while its client sent all of it but
    the last byte (then a byte a minute): 400 such clients grew the engine by 380 MB (helper hM),
    a few thousand would have had it killed for memory. Past ``body_budget`` the body that goes
    over is answered 503 with Retry-After and let go; the others, and the engine, go on."""
    engine = EngineProcess(tmp_path / "data", settings={"body_budget": 2 * 1024 * 1024}).start()
    held: list[socket.socket] = []
    if True:
        try:
            size = 1024 * 1024
            head = (
                b"POST /profile/authenticate HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % size
            )
            answers = []
            for _ in range(4):
                s = socket.create_connection(("127.0.0.1", engine.ports["api"]), timeout=10)
                s.sendall(head + b"a=" + b"x" * (size - 3))  # all but the last byte
                held.append(s)
                s.settimeout(READ_TIMEOUT)
                try:
                    answers.append(s.recv(4096))
                except TimeoutError:
                    answers.append(b"")
            assert answers[:2] == [b"", b""], answers  # within the budget: still waiting for their end
            refused = [a for a in answers if a]
            assert refused and all(a.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in a.lower() for a in refused)
            held[0].sendall(b"x")  # a body within the budget ends and is answered as usual
            held[0].settimeout(10)
            assert held[0].recv(4096).startswith(b"HTTP/1.1 422")
            assert httpx.get(engine.urls["api"] + "/health", timeout=5).status_code == 200
            assert "Traceback" not in engine.log()
        finally:
            for s in held:
                s.close()
            engine.stop()
            engine.kill()


def test_a_websocket_message_far_past_what_the_proxy_reads_closes_its_connection(own_engine):
    """hypercorn held each WebSocket message's pieces until it ended, up to 1 MiB, and past
    that answered 1009 but kept the connection and went on adding every piece the client sent
    after it to the message: 300 clients sending 16 pieces of 60 KB grew the engine by 480 MB,
    and one that kept sending grew it without bound (helper hM). The proxy ignores frames past
    MAX_FRAME anyway: a message past twice that now gets its 1009 and the connection is closed
    (the client's further pieces go nowhere); a message within it is still answered."""
    with socket.create_connection(("127.0.0.1", own_engine.ports["ws"]), timeout=5) as s:
        s.sendall(handshake())
        assert s.recv(4096).startswith(b"HTTP/1.1 101")
        s.sendall(frame(b"a" * (200 * 1024)))
        answer = b""
        while True:
            piece = s.recv(4096)  # a connection left open times out here
            if not piece:
                break
            answer += piece
    assert answer[:1] == b"\x88" and answer[2:4] == (1009).to_bytes(2, "big"), answer[:20]
    join = '{"action": "joinChannel", "correlationId": "c1", "data": {"authorizationToken": "T-nobody"}}'
    with socket.create_connection(("127.0.0.1", own_engine.ports["ws"]), timeout=5) as s:
        s.sendall(handshake())
        assert s.recv(4096).startswith(b"HTTP/1.1 101")
        s.sendall(frame(b" " * 60_000 + join.encode()))
        assert b'"status": 401' in s.recv(4096)


async def refused_while_held(hold, port: int, request: bytes) -> None:
    """``request``, sent on a new connection to ``port`` while ``hold`` (given the list to put
    them in) keeps connections busy, is answered 503 with Retry-After 1; the held ones are closed
    afterwards. The sockets are driven on a worker thread."""

    def answer() -> bytes:
        held: list[socket.socket] = []
        try:
            hold(held)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(request)
                return s.recv(4096)
        finally:
            for s in held:
                s.close()

    refused = await trio.to_thread.run_sync(answer)
    assert refused.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in refused.lower(), refused


async def test_uploads_past_max_uploads_are_refused_before_their_authorization_is_used(own_engine):
    """Each upload holds a 1 MiB buffer and what its client sent: 200 clients with stream
    authorizations sending part of a body and then holding it grew the engine by 290 MB (helper
    hM), without bound as there were more. Past ``max_uploads`` an upload is answered 503 with
    Retry-After at once, its authorization unused: it goes through once there is room."""
    from tests.enginekit import Wire, command_id

    own_engine.set_options(max_uploads=2)
    wire = Wire(own_engine.urls)
    streams = []
    try:
        await wire.provision()
        async with wire.channel() as ch:
            for _ in range(3):
                r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
                await ch.wait_for("X-DPT-CAB-ID", command_id(r))
                streams.append(
                    (await wire.get(f"/data-token/retrieve-temporary-data-token/{command_id(r)}")).json()["stream"]
                )
    finally:
        await wire.aclose()

    def head(stream: str, length: int) -> bytes:
        return f"POST /?{stream} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()

    port = own_engine.ports["upstream"]

    def hold(held: list[socket.socket]) -> None:
        for stream in streams[:2]:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            held[-1].sendall(head(stream, 1 << 20) + bytes(1000))  # part of a body, then nothing
        time.sleep(0.5)  # both uploads begun

    await refused_while_held(hold, port, head(streams[2], 10))
    await trio.sleep(0.5)  # the held uploads broke off
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(own_engine.urls["upstream"] + "/?" + streams[2], content=b"0123456789")
    assert r.status_code == 200, r.text
    assert "Traceback" not in own_engine.log()


async def download_authorizations(engine, size: int, count: int) -> list[str]:
    """``count`` downstream authorizations for one stored blob of ``size`` random bytes."""
    import os

    from tests.enginekit import Wire

    wire = Wire(engine.urls)
    auths = []
    try:
        await wire.provision()
        async with wire.channel() as ch:
            token = await wire.store(ch, os.urandom(size), streamed=True)
            for _ in range(count):
                r = await wire.post("/data-token/request-data", {"token": token})
                result = await ch.wait_for("X-DPT-CAB-REQUEST-ID", r.headers["x-dpt-cab-request-id"])
                body = result["body"]
                auths.append(body["body"] if isinstance(body, dict) else body)
    finally:
        await wire.aclose()
    return auths


def unread_download(port: int, auth: str) -> socket.socket:
    """A connection that asked for a download and reads none of it (a small receive buffer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET /?auth={auth} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return s


async def test_downloads_past_max_downloads_are_refused_before_their_authorization_is_used(own_engine):
    """Each download holds the piece of its blob being sent (up to 4 MiB, and the 4 MiB buffer
    it was read into) until its client takes it: 200 clients that asked for an 8 MiB blob and read
    nothing grew the engine by 1.6 GB, without bound as there were more. Past ``max_downloads``
    a download is answered 503 with Retry-After at once, its authorization unused: it goes
    through once there is room."""
    own_engine.set_options(max_downloads=2)
    auths = await download_authorizations(own_engine, 8 << 20, 3)
    port = own_engine.ports["downstream"]

    def hold(held: list[socket.socket]) -> None:
        for auth in auths[:2]:
            held.append(unread_download(port, auth))
            assert held[-1].recv(64).startswith(b"HTTP/1.1 200")  # the download begun

    await refused_while_held(hold, port, f"GET /?auth={auths[2]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    async with httpx.AsyncClient(timeout=30) as http:
        with trio.fail_after(30):
            while (
                r := await http.get(own_engine.urls["downstream"] + "/", params={"auth": auths[2]})
            ).status_code == 503:
                await trio.sleep(0.2)  # the held downloads are being let go
    assert r.status_code == 200 and len(r.content) == 8 << 20, r.text[:200]
    assert "Traceback" not in own_engine.log()


async def test_a_download_whose_client_reads_nothing_is_closed_after_send_timeout(own_engine):
    """hypercorn writes an answer with no time limit: a client that asked for a big blob and then
    read nothing held its connection and the piece being sent for as long as it stayed
    connected. A write the client takes nothing of for ``send_timeout`` closes the connection."""
    own_engine.set_options(send_timeout=1)
    (auth,) = await download_authorizations(own_engine, 8 << 20, 1)

    def received_until_closed() -> int:
        with unread_download(own_engine.ports["downstream"], auth) as s:
            s.settimeout(10)
            time.sleep(3)  # reading nothing
            s.settimeout(60)  # then everything the engine sent, until it closed the connection
            got = 0
            try:
                while piece := s.recv(1 << 20):
                    got += len(piece)
            except ConnectionResetError:
                pass
            return got

    got = await trio.to_thread.run_sync(received_until_closed)
    assert got < 8 << 20  # cut off: the rest was never sent
    assert "read nothing of its answer for 1s; connection closed" in own_engine.log()
    assert "Traceback" not in own_engine.log()
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(own_engine.urls["api"] + "/health")).status_code == 200


@pytest.mark.slow
def test_a_refused_request_whose_body_trickles_is_answered_and_closed_within_the_drain_time(own_engine):
    """A refused upload (a bogus stream authorization) whose body came a byte at a time, never
    stalling long enough for ``body_timeout``, was read for as long as it came: each such
    connection held a descriptor and counted against no limit (helper hX). The refusal is sent
    after DRAIN_TIME seconds of reading at most, and the connection closed."""
    from privifs.engine.http import DRAIN_TIME

    with socket.create_connection(("127.0.0.1", own_engine.ports["upstream"]), timeout=60) as s:
        s.sendall(b"POST /?auth=nope HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        s.settimeout(0.5)
        start, got, closed = time.monotonic(), b"", False
        while not closed and time.monotonic() - start < DRAIN_TIME + 30:
            try:
                s.sendall(b"x")
                piece = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # (closed while a byte was on its way)
                closed = True
                break
            closed = not piece
            got += piece
    assert b" 404 " in got.split(b"\r\n", 1)[0] and closed, got
    assert time.monotonic() - start < DRAIN_TIME + 15
