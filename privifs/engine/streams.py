"""The upstream stream server (``POST /?auth=…`` with the raw payload) and the downstream
download server (``GET /?auth=…``). Both stream: nothing holds a whole payload in memory.

Stream authorizations are single-use: an upstream ``auth`` is consumed when its upload starts
(a failed upload restarts from reserve), a downstream ``auth`` when its download starts (a failed
download re-issues request-data). A half-received upload never becomes visible.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from urllib.parse import parse_qs

import trio
from starlette.requests import ClientDisconnect, Request

from privifs.engine.core import Engine
from privifs.engine.http import drain_body, overload

log = logging.getLogger("privifs.engine.streams")


async def _throttled(chunks, rate_now: Callable[[], float]):
    """Pass chunks through no faster than ``rate_now()`` bytes per second (0: as fast as they
    come). A change of the option applies within half a second to streams under way too: a test
    that slowed the streams down and then lifts the limit does not wait for the slow ones (a
    100 KB upload begun at 1,000 B/s went on at that rate for 100 s, and its unmount waited)."""
    start, sent, rate = trio.current_time(), 0, rate_now()
    async for chunk in chunks:
        if (now := rate_now()) != rate:
            start, sent, rate = trio.current_time(), 0, now
        sent += len(chunk)
        while rate > 0 and (ahead := sent / rate - (trio.current_time() - start)) > 0:
            await trio.sleep(min(ahead, 0.5))
            if (now := rate_now()) != rate:  # paced from here at the new rate
                start, sent, rate = trio.current_time(), len(chunk), now
        yield chunk


async def _refuse(receive, send, status: int, message: str) -> None:
    """An error answer given before the body was read."""
    await drain_body(receive)
    await _answer(send, status, {"status": status, "message": message})


async def _answer(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _auth(scope) -> str | None:
    try:
        values = parse_qs(scope.get("query_string", b"").decode("ascii"), errors="strict").get("auth")
    except (UnicodeDecodeError, ValueError):
        return None
    return values[-1] if values else None


async def _refuse_websocket(send) -> None:
    """A WebSocket handshake on a stream server: refused with 403 (returning without an answer
    would make hypercorn answer 500)."""
    await send({"type": "websocket.close", "code": 1008})


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _storage_guarded(what: str, app):
    """``app``, answering 507 (one log line) instead of failing when the engine's disk is full.
    An answer already begun cannot be replaced: that connection is closed.

    The rest of the body is read first unless all of it came already: hypercorn's next message
    after a complete body is the client leaving, so an upload refused once its whole body was in
    (one under the 1 MiB write buffer, written only at its end; or its commit) waited for that,
    and its client got no answer until it gave up (60 s for a mount)."""

    async def guarded(scope, receive, send) -> None:
        started = body_complete = False

        async def tracking(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def reading() -> dict:
            nonlocal body_complete
            message = await receive()
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        try:
            await app(scope, reading, tracking)
        except (OSError, sqlite3.Error) as exc:
            answer = overload(what, exc) if scope["type"] == "http" else None
            if answer is None:
                raise
            status, message = answer
            if not started:
                if body_complete:
                    await _answer(send, status, {"status": status, "message": message})
                else:
                    await _refuse(receive, send, status, message)

    return guarded


def upstream_app(engine: Engine):
    return _stall_guarded(engine, "upstream upload", _storage_guarded("upstream upload", _upstream_app(engine)))


def downstream_app(engine: Engine):
    return _stall_guarded(
        engine, "downstream download", _storage_guarded("downstream download", _downstream_app(engine))
    )


def _stall_guarded(engine: Engine, what: str, app):
    """``app``, whose request body reads end as a client disconnect once no more of the body
    arrived for the ``body_timeout`` option (nothing half-received is stored; the connection
    closes), as on the API's server (privifs/engine/h1.py): a client that sent a head and part of
    a body and then nothing held its connection (and, with a valid stream authorization, a 1 MiB
    buffer and a partial file) for good. Reads after the body is complete are not limited."""

    async def guarded(scope, receive, send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        complete = stalled = started = False

        async def tracking(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def timed() -> dict:
            nonlocal complete, stalled
            limit = engine.opts.body_timeout
            if complete or limit <= 0:  # (0: no limit)
                return await receive()
            with trio.move_on_after(limit) as waited:
                message = await receive()
            if waited.cancelled_caught:
                complete = stalled = True
                log.info("%s: the request body stopped arriving for %gs; connection closed", what, limit)
                return {"type": "http.disconnect"}
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await app(scope, timed, tracking)
        if stalled and not started:  # (an upload that broke off answers nothing itself)
            await _answer(send, 408, {"status": 408, "message": "the request body stopped arriving"})

    return guarded


class _InFlight:
    """How many uploads (or downloads) this engine's port is serving now."""

    count = 0


def _busy(what: str) -> dict:
    return {"status": 503, "message": f"Service Unavailable: too many {what} in flight; try again"}


def _upstream_app(engine: Engine):
    db = engine.db
    uploads = _InFlight()

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return await _refuse_websocket(send)
        if scope["method"] not in ("POST", "PUT"):
            return await _refuse(receive, send, 405, "use POST /?auth=<stream token>")
        auth = _auth(scope)
        if not auth:
            return await _refuse(receive, send, 401, "missing stream authorization")
        row = db.read(lambda c: c.execute("SELECT * FROM reservations WHERE stream_auth = ?", (auth,)).fetchone())
        if row is None or row["expires_at"] <= time.time() or row["promoted_token"] is not None:
            return await _refuse(receive, send, 404, "Record Not Found")
        if row["stream_used"] or row["blob_id"] is not None:
            return await _refuse(receive, send, 403, "stream authorization already used")
        if 0 < engine.opts.max_uploads <= uploads.count:
            # each upload holds a 1 MiB buffer and what its client sent: 200 clients sending part of
            # a body and then holding it grew the engine by 290 MB. Answered at once, body unread
            # (the connection closes), the authorization still unused for the retry
            return await _answer(send, 503, _busy("uploads"), [(b"retry-after", b"1")])
        uploads.count += 1
        try:
            await _upload(engine, scope, receive, send, row, auth)
        finally:
            uploads.count -= 1

    return app


async def _upload(engine: Engine, scope, receive, send, row, auth: str) -> None:
    """Store one upload's body for the reservation ``row`` whose stream authorization is ``auth``."""
    db = engine.db

    def claim(conn) -> int:
        return conn.execute(
            "UPDATE reservations SET stream_used = 1 WHERE stream_auth = ? AND stream_used = 0", (auth,)
        ).rowcount

    if await db.write(claim) == 0:
        return await _refuse(receive, send, 403, "stream authorization already used")
    request = Request(scope, receive)
    try:
        blob_id, size, blob_dir = await engine.blobs.receive(
            _throttled(request.stream(), lambda: engine.opts.stream_bytes_per_second)
        )
    except ClientDisconnect:
        log.info("upload for %s broke off; nothing stored", row["temp_token"])
        return
    expected = request.headers.get("content-length")
    if expected is not None and expected.isdigit() and int(expected) != size:
        engine.blobs.delete(blob_id)
        return await _answer(send, 400, {"status": 400, "message": "body shorter than Content-Length"})

    def attach(conn) -> int:
        return conn.execute(
            "UPDATE reservations SET blob_id = ?, blob_size = ? WHERE command_id = ?"
            " AND blob_id IS NULL AND expires_at > ?",
            (blob_id, size, row["command_id"], time.time()),
        ).rowcount

    if await db.write(attach, fsync_dirs=(blob_dir,)) == 0:
        engine.blobs.delete(blob_id)
        return await _answer(send, 410, {"status": 410, "message": "the reservation expired during the upload"})
    await _answer(send, 200, {"token": row["temp_token"], "size": size})


def _downstream_app(engine: Engine):
    downloads = _InFlight()

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return await _refuse_websocket(send)
        if scope["method"] != "GET":
            return await _refuse(receive, send, 405, "use GET /?auth=<downstream token>")
        auth = _auth(scope)
        if not auth:
            return await _refuse(receive, send, 401, "missing downstream authorization")
        if 0 < engine.opts.max_downloads <= downloads.count:
            # each download holds a piece of its blob (up to 4 MiB) until its client takes it: 200
            # clients that asked for a big blob and did not read grew the engine by 1.6 GB. Answered
            # at once, the authorization still unused for the retry
            return await _answer(send, 503, _busy("downloads"), [(b"retry-after", b"1")])
        downloads.count += 1
        try:
            await _download(engine, send, auth)
        finally:
            downloads.count -= 1

    return app


async def _download(engine: Engine, send, auth: str) -> None:
    """Serve the blob whose downstream authorization is ``auth``."""
    db = engine.db

    def claim(conn):
        row = conn.execute(
            "SELECT d.token, d.expires_at, d.used, t.blob_id, t.blob_size FROM downstream d"
            " LEFT JOIN data_tokens t ON t.token = d.token AND t.profile_id = d.profile_id"
            " WHERE d.auth = ?",
            (auth,),
        ).fetchone()
        if row is None or row["used"] or row["expires_at"] <= time.time() or row["blob_id"] is None:
            return None
        conn.execute("UPDATE downstream SET used = 1 WHERE auth = ?", (auth,))
        return row

    row = await db.write(claim)
    if row is None:
        return await _answer(send, 404, {"status": 404, "message": "Record Not Found"})
    try:
        reader = await trio.to_thread.run_sync(engine.blobs.open_reader, row["blob_id"])
    except FileNotFoundError:
        return await _answer(send, 404, {"status": 404, "message": "Record Not Found"})
    try:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(reader.size).encode())],
            }
        )

        async def chunks():
            while True:
                chunk = await trio.to_thread.run_sync(reader.read)
                if not chunk:
                    return
                yield chunk

        async for chunk in _throttled(chunks(), lambda: engine.opts.stream_bytes_per_second):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        reader.close()
