"""The engine's lean HTTP/1.1 server for its API (privifs/engine/h1.py), in-process over loopback:
keep-alive and pipelining, ``Expect: 100-continue``, an unread body closes the connection after
the answer, a client leaving mid-body is an ``http.disconnect``, malformed requests get a 4xx,
an app's failure ends its connection only, idle connections close after the keep-alive timeout
and at shutdown, a busy one once its answer is out."""

from __future__ import annotations

import logging
import time

import trio

from privifs.engine import h1


async def app(scope, receive, send) -> None:
    """/echo answers the body it read; /early answers without reading; /boom fails; /slow waits;
    /big answers 8 MiB."""
    path = scope["path"]
    if path == "/boom":
        raise RuntimeError("a bug")
    body = b""
    if path in ("/echo", "/disconnect"):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                app.disconnected = True
                if path == "/disconnect":
                    return
                break  # /echo answers anyway, as the engine's routes do (privifs.engine.http.guarded)
            body += message["body"]
            if not message["more_body"]:
                break
    if path == "/slow":
        await app.release.wait()
    answer = b"got " + body if path == "/echo" else bytes(8 << 20) if path == "/big" else path.encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(answer)).encode())]}
    )
    await send({"type": "http.response.body", "body": answer})


async def started(nursery, stop: trio.Event, **kw) -> tuple[h1.Server, int]:
    server = h1.Server(app, "api", **kw)
    urls = await nursery.start(server.serve, "127.0.0.1", 0, stop.wait)
    return server, int(urls[0].rsplit(":", 1)[1])


async def read_until_closed(stream) -> bytes:
    got = b""
    with trio.fail_after(10):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return got
            got += chunk


async def read_until(stream, end: bytes, got: bytes = b"") -> bytes:
    with trio.fail_after(10):
        while end not in got:
            chunk = await stream.receive_some(65536)
            assert chunk, got
            got += chunk
    return got


async def read_more(stream, got: bytes) -> bytes:
    with trio.fail_after(10):
        chunk = await stream.receive_some(65536)
    assert chunk, got
    return got + chunk


def post(path: str, body: bytes, *extra: bytes) -> bytes:
    head = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
    return head + b"".join(b"\r\n" + e for e in extra) + b"\r\n\r\n" + body


async def test_pipelined_requests_on_one_connection_are_answered_in_order():
    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/echo", b"one") + post("/echo", b"two") + b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await read_until(stream, b"/x")
        assert got.count(b"HTTP/1.1 200 ") == 3
        assert got.index(b"got one") < got.index(b"got two") < got.index(b"/x")
        await stream.send_all(post("/echo", b"three"))  # and the connection goes on
        assert b"got three" in await read_until(stream, b"got three")
        await stream.aclose()
        stop.set()


async def test_expect_100_continue_gets_its_100_when_the_body_is_read():
    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/echo", b"", b"Expect: 100-continue").replace(b"Length: 0", b"Length: 4"))
        got = await read_until(stream, b"HTTP/1.1 100 ")
        await stream.send_all(b"body")
        assert b"got body" in await read_until(stream, b"got body", got)
        await stream.aclose()
        stop.set()


async def test_an_answer_given_without_reading_the_body_closes_the_connection():
    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/early", b"x" * 100_000)[:-50_000])
        got = await read_until_closed(stream)
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"/early")
        stop.set()


async def test_a_client_leaving_mid_body_is_a_disconnect_and_the_server_goes_on():
    stop = trio.Event()
    app.disconnected = False
    async with trio.open_nursery() as n:
        _, port = await started(n, stop)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/disconnect", b"x" * 1000)[:-500])
        await stream.aclose()
        with trio.fail_after(10):
            while not app.disconnected:
                await trio.sleep(0.01)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/echo", b"ok", b"Connection: close"))
        assert b"got ok" in await read_until_closed(stream)
        stop.set()


async def test_malformed_requests_get_a_4xx_and_a_failing_app_ends_only_its_connection(caplog):
    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop)
        for data, status in (
            (b"GARBAGE\r\n\r\n", b"400"),
            (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000, b"431"),  # a head beyond 16 KiB
            (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),
        ):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(data)
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 " + status)
        with caplog.at_level(logging.INFO, "privifs.engine"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_until_closed(stream)).startswith(b"HTTP/1.1 500 ")
        assert "a connection failed and was dropped: RuntimeError: a bug" in caplog.text
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/echo", b"alive", b"Connection: close"))
        assert b"got alive" in await read_until_closed(stream)
        stop.set()


async def test_idle_connections_close_after_the_keep_alive_timeout():
    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop, keep_alive_timeout=0.2)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/echo", b"a"))
        got = await read_until_closed(stream)  # answered, then closed once idle
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"got a")
        stop.set()


async def test_a_shutdown_closes_idle_connections_at_once_and_busy_ones_once_answered():
    stop = trio.Event()
    app.release = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop, graceful_timeout=30)
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        busy = await trio.open_tcp_stream("127.0.0.1", port)
        await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.2)
        stop.set()
        assert await read_until_closed(idle) == b""
        app.release.set()
        got = await read_until_closed(busy)
        assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"/slow")


def test_failed_accepts_are_one_line_a_minute_not_a_traceback_each(caplog, monkeypatch):
    """Out of file descriptors (a flood of connections), trio's listener logs each failed accept
    with its traceback, ten times a second: the engine's log grew 800 KB a minute."""
    import errno
    import logging

    import privifs.engine.h1  # noqa: F401 - puts the filter in place
    from privifs.ratelog import AcceptFailuresOncePerMinute

    accepts = logging.getLogger("trio.serve_listeners")
    assert any(isinstance(f, AcceptFailuresOncePerMinute) for f in accepts.filters)  # the engine's, in place
    fresh = AcceptFailuresOncePerMinute()  # (one whose minute starts with this test)
    monkeypatch.setattr(accepts, "filters", [fresh])
    clock = [1000.0]
    monkeypatch.setattr("privifs.ratelog.time.monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="trio.serve_listeners")
    emfile = OSError(errno.EMFILE, "Too many open files")
    for i in range(601):  # a minute of trio's retries, ten a second
        clock[0] = 1000.0 + i / 10
        try:
            raise emfile
        except OSError:
            accepts.error(
                "accept returned %s (%s); retrying in %s seconds", "EMFILE", "Too many open files", 0.1, exc_info=True
            )
    lines = [r for r in caplog.records if r.name == "trio.serve_listeners"]
    assert len(lines) == 2  # the first, and one after a minute
    assert all(r.exc_info is None and r.levelname == "WARNING" for r in lines)
    assert "Too many open files" in lines[1].getMessage() and "599 more" in lines[1].getMessage()


async def test_a_body_that_stops_arriving_closes_the_connection_and_the_server_goes_on():
    stop = trio.Event()
    app.disconnected = False
    async with trio.open_nursery() as n:
        _, port = await started(n, stop, body_timeout=0.3)
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        await stalled.send_all(post("/disconnect", b"x" * 1000)[:-500])  # and then nothing
        await read_until_closed(stalled)  # closed (after a 500: the app got no body to answer)
        assert app.disconnected
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/echo", b"ok", b"Connection: close"))
        assert b"got ok" in await read_until_closed(stream)
        stop.set()


async def test_an_answer_before_the_body_arrived_says_the_connection_closes():
    """A request answered before its body arrived (a 404 or 405 from the router, which reads no
    body) closed the connection after the answer without saying so: a keep-alive client (httpx)
    sent its next request on that connection and got "Server disconnected without sending a
    response" (found by fuzzing, helper hE). The answer now carries ``Connection: close``; an
    answer to a request whose body is all here (or that has none) keeps the connection."""
    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/early", b"x" * 10)[:-10])  # the head; the body is yet to come
        got = await read_until_closed(stream)
        head = got.partition(b"\r\n\r\n")[0].lower()
        assert got.startswith(b"HTTP/1.1 200 ") and b"connection: close" in head, got
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n" + post("/early", b"abc"))
        got = b""
        while got.count(b"/early") < 2:
            got = await read_until(stream, b"/early", got) if b"/early" not in got else await read_more(stream, got)
        assert got.count(b"HTTP/1.1 200 ") == 2 and b"connection: close" not in got.lower(), got
        await stream.aclose()
        stop.set()


async def test_a_malformed_chunk_is_answered_400_once_and_logged_in_one_line(caplog):
    """A request body with a malformed chunk was logged as a client that disconnected, then as a
    dropped connection with h11's LocalProtocolError (the app's own answer to the disconnect came
    after the server's 400): now one line, saying what it was, and only the server's 400."""
    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop)
        with caplog.at_level(logging.INFO, "privifs.engine"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n")
            got = await read_until_closed(stream)
        assert got == b"HTTP/1.1 400 \r\ncontent-length: 0\r\nconnection: close\r\n\r\n", got
        lines = [r.getMessage() for r in caplog.records if r.name == "privifs.engine"]
        assert lines == ["api: a malformed request body (a bad chunk or framing); answered 400, connection closed"], (
            lines
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(post("/echo", b"alive", b"Connection: close"))
        assert b"got alive" in await read_until_closed(stream)
        stop.set()


async def test_a_client_that_reads_nothing_of_its_answer_is_closed_after_the_send_timeout(caplog):
    """The answer was written with no time limit: a client that sent requests (pipelined, each
    answered with up to a listing page) and read nothing held each answer for as long as it
    stayed connected. An answer the client takes no piece of for the send timeout closes it."""
    import socket

    stop = trio.Event()
    async with trio.open_nursery() as n:
        _, port = await started(n, stop, send_timeout=lambda: 0.5)

        def received_until_closed() -> int:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(2)  # reading nothing
                got = 0
                try:
                    while piece := s.recv(1 << 20):  # then all that was sent, until the server closed
                        got += len(piece)
                except ConnectionResetError:
                    pass
                return got

        with caplog.at_level(logging.INFO, "privifs.engine"):
            got = await trio.to_thread.run_sync(received_until_closed)
        assert got < 8 << 20
        assert "api: the client read nothing of its answer for 0.5s; connection closed" in caplog.text
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert len(await read_until_closed(stream)) > 8 << 20  # a client that reads gets it all
        stop.set()
