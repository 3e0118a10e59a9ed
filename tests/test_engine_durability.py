"""Engine durability: acknowledged commands survive ``kill -9``, accepted commands resume, a
half-received upload never becomes visible, and secrets never reach the log."""

from __future__ import annotations

import os
import time

import httpx
import pytest
import trio
import trio.testing

from privifs.engine.options import EngineOptions
from tests.enginekit import EngineProcess, Wire, command_id


async def killed_and_started_again(eng: EngineProcess, wire: Wire, data_dir, creds: dict) -> tuple[EngineProcess, Wire]:
    """``kill -9`` of the engine, a new one on the same data, and a client logged in to it."""
    await wire.aclose()
    eng.kill()
    eng2 = EngineProcess(data_dir).start()
    try:
        wire = Wire(eng2.urls)
        r = await wire.post("/profile/authenticate", {"username": creds["username"], "password": creds["password"]})
        wire.token = r.json()["authorizationToken"]
    except BaseException:
        eng2.stop()
        raise
    return eng2, wire


async def test_acknowledged_state_survives_kill_9_and_accepted_commands_resume(tmp_path):
    eng = EngineProcess(tmp_path / "data").start()
    try:
        wire = Wire(eng.urls)
        creds = await wire.provision()
        small, big = os.urandom(500), os.urandom(2 * 1024 * 1024)
        async with wire.channel() as ch:
            t_small = await wire.store(ch, small, file_name="small.bin")
            t_big = await wire.store(ch, big, file_name="big.bin", streamed=True)
            r = await wire.post("/data-token/update-data-token", {"token": t_small, "fileName": "renamed.bin"})
            await ch.wait_for("X-DPT-CAB-ID", command_id(r))
            listing = (await wire.get("/data-token/list-data-tokens")).json()
            eng.set_options(apply_delay_ms=5000)
            r = await wire.post("/data-token/delete-data", {"token": t_big})
            assert r.status_code == 202
            pending = command_id(r)
        eng2, wire = await killed_and_started_again(eng, wire, tmp_path / "data", creds)
        try:
            assert await wire.poll(pending) == "succeeded"
            after = (await wire.get("/data-token/list-data-tokens")).json()
            assert [i["token"] for i in after["items"]] == [i["token"] for i in listing["items"] if i["token"] != t_big]
            assert after["items"][0]["fileName"] == "renamed.bin"
            async with wire.channel() as ch:
                assert await wire.retrieve(ch, t_small) == small
            assert (await wire.post("/data-token/request-data", {"token": t_big})).status_code == 404
            await wire.aclose()
        finally:
            eng2.stop()
    finally:
        eng.kill()


async def test_half_received_upload_is_never_visible(tmp_path):
    eng = EngineProcess(tmp_path / "data").start()
    try:
        wire = Wire(eng.urls)
        creds = await wire.provision()
        async with wire.channel() as ch:
            r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
            cid = command_id(r)
            await ch.wait_for("X-DPT-CAB-ID", cid)
            body = (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).json()
        sent = trio.Event()

        async def slow_body():
            yield os.urandom(1024 * 1024)
            sent.set()
            await trio.sleep(30)
            yield b"never"

        async def upload():
            async with httpx.AsyncClient(timeout=60) as c:
                try:
                    await c.post(
                        f"{eng.urls['upstream']}/?{body['stream']}",
                        content=slow_body(),
                        headers={"Content-Length": str(2 * 1024 * 1024)},
                    )
                except httpx.HTTPError:
                    pass

        async with trio.open_nursery() as n:
            n.start_soon(upload)
            await sent.wait()
            await trio.sleep(0.5)
            eng.kill()
            n.cancel_scope.cancel()
        await wire.aclose()

        eng2 = EngineProcess(tmp_path / "data").start()
        try:
            assert list((tmp_path / "data" / "tmp").iterdir()) == []
            assert [f for d in (tmp_path / "data" / "blobs").iterdir() for f in d.iterdir()] == []
            wire = Wire(eng2.urls)
            r = await wire.post("/profile/authenticate", {"username": creds["username"], "password": creds["password"]})
            wire.token = r.json()["authorizationToken"]
            r = await wire.post(
                "/data-token/configure-file-meta",
                {"token": body["token"], "fileName": "x", "context": "c", "size": "1"},
            )
            assert r.status_code == 422  # no data arrived
            async with httpx.AsyncClient() as c:
                r = await c.post(f"{eng2.urls['upstream']}/?{body['stream']}", content=b"retry")
            assert r.status_code == 403  # the stream authorization was consumed
            await wire.aclose()
        finally:
            eng2.stop()
    finally:
        eng.kill()


async def test_sigterm_stops_cleanly_and_secrets_stay_out_of_the_log(tmp_path):
    eng = EngineProcess(tmp_path / "data").start()
    wire = Wire(eng.urls)
    creds = await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"payload", streamed=True)
        await wire.retrieve(ch, token)
    await wire.aclose()
    assert eng.stop() == 0
    log = eng.log()
    assert "ready" in log
    for secret in (creds["password"], creds["token"]):
        assert secret not in log
    assert "Traceback" not in log


async def test_streamed_blobs_keep_every_byte_direct_or_buffered(tmp_path, monkeypatch):
    # blobs are written with O_DIRECT from an aligned buffer, the unaligned tail buffered; where
    # the filesystem refuses O_DIRECT (EINVAL) they are written buffered: the same bytes either way
    from privifs.engine.blobs import WRITE_BUFFER, BlobStore

    sizes = [0, 1, 4095, 4096, 4097, WRITE_BUFFER - 1, WRITE_BUFFER, WRITE_BUFFER + 1, 3 * WRITE_BUFFER + 4124]

    async def receive_all(store: BlobStore) -> None:
        for size in sizes:
            data = os.urandom(size)

            async def chunks(data: bytes = data):
                for at in range(0, len(data), 300_001):  # pieces that straddle the buffer's end
                    yield data[at : at + 300_001]

            blob_id, got, _ = await store.receive(chunks())
            assert got == size and store.path(blob_id).read_bytes() == data
        assert list((store.root / "tmp").iterdir()) == []

    direct = BlobStore(tmp_path / "direct")
    await receive_all(direct)
    assert direct.direct  # this filesystem takes O_DIRECT: the direct path was the one tested

    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    buffered = BlobStore(tmp_path / "buffered")
    await receive_all(buffered)
    assert not buffered.direct


def test_blobs_read_back_whole_direct_or_buffered(tmp_path, monkeypatch):
    # big blobs are read with O_DIRECT into a reused aligned buffer (short at the end), small ones
    # and those on a filesystem that refuses O_DIRECT through the page cache: the same bytes
    import fcntl

    from privifs.directio import SPARE_BUFFERS
    from privifs.engine.blobs import DIRECT_READ_MIN, READ_BUFFER, BlobStore

    sizes = [0, 1, DIRECT_READ_MIN - 1, DIRECT_READ_MIN, READ_BUFFER, READ_BUFFER + 28, 2 * READ_BUFFER + 4097]

    def read_all(store: BlobStore, expect_direct: bool) -> None:
        for size in sizes:
            data = os.urandom(size)
            blob_id = store.new_id()
            store.dir_of(blob_id).mkdir(exist_ok=True)
            store.path(blob_id).write_bytes(data)
            reader = store.open_reader(blob_id)
            assert reader.direct == (expect_direct and size >= DIRECT_READ_MIN)
            pieces = []
            while piece := reader.read():
                assert len(piece) <= READ_BUFFER
                pieces.append(piece)
            reader.close()
            assert b"".join(pieces) == data, size
        assert len(store.read_buffers.free) <= SPARE_BUFFERS

    store = BlobStore(tmp_path / "direct")
    read_all(store, True)
    assert store.read_buffers.free  # the direct path was the one tested, its buffer kept for the next
    with pytest.raises(FileNotFoundError):
        store.open_reader("0" * 32)

    real_fcntl = fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    with monkeypatch.context() as m:
        m.setattr(fcntl, "fcntl", no_direct)
        refused = BlobStore(tmp_path / "buffered")
        read_all(refused, False)
        assert not refused.direct  # the next readers do not try again

    real_preadv = os.preadv

    def larger_alignment(fd, buffers, offset):  # a device that takes O_DIRECT but not 4 KiB alignment
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", larger_alignment)
    fallback = BlobStore(tmp_path / "fallback")
    for size in (DIRECT_READ_MIN, READ_BUFFER + 28):
        data = os.urandom(size)
        blob_id = fallback.new_id()
        fallback.dir_of(blob_id).mkdir(exist_ok=True)
        fallback.path(blob_id).write_bytes(data)
        reader = fallback.open_reader(blob_id)
        assert reader.direct
        pieces = []
        while piece := reader.read():
            pieces.append(piece)
        assert not reader.direct
        reader.close()
        assert b"".join(pieces) == data


async def test_more_streamed_uploads_at_once_than_spare_buffers_all_succeed(tmp_path):
    # each upload takes an aligned buffer and gives it back when it ends; beyond the spares kept
    # the buffer is closed, which must not turn a received blob into a failed upload
    from privifs.directio import SPARE_BUFFERS
    from privifs.engine.blobs import BlobStore

    store = BlobStore(tmp_path / "blobs")
    release = trio.Event()
    got: list[tuple[str, bytes]] = []

    async def one(n: int) -> None:
        data = os.urandom(5000 + n)

        async def chunks():
            yield data[:100]
            await release.wait()  # every upload holds its buffer at the same time
            yield data[100:]

        blob_id, size, _ = await store.receive(chunks())
        got.append((blob_id, data))

    async with trio.open_nursery() as nursery:
        for n in range(SPARE_BUFFERS + 3):
            nursery.start_soon(one, n)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert len(got) == SPARE_BUFFERS + 3
    assert all(store.path(blob_id).read_bytes() == data for blob_id, data in got)


async def test_an_inline_exchange_accepted_before_kill_9_keeps_its_payload(tmp_path):
    # the exchange's payload is on disk before its 202, but only the command's parameters name
    # it until the command is applied: the start-up sweep of unreferenced blobs must not take it
    import base64

    eng = EngineProcess(tmp_path / "data").start()
    try:
        wire = Wire(eng.urls)
        creds = await wire.provision()
        payload = os.urandom(433)
        async with wire.channel() as ch:
            r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
            reserve = command_id(r)
            assert (await ch.wait_for("X-DPT-CAB-ID", reserve))["command_status"] == 2
            temp = (await wire.get(f"/data-token/retrieve-temporary-data-token/{reserve}")).json()["token"]
        eng.set_options(apply_delay_ms=5000)
        r = await wire.post(
            "/data-token/exchange-data-for-token",
            {"temporaryTokenSpace": temp, "data": base64.b64encode(payload).decode()},
        )
        assert r.status_code == 202
        pending = command_id(r)
        eng2, wire = await killed_and_started_again(eng, wire, tmp_path / "data", creds)
        try:
            assert await wire.poll(pending) == "succeeded"
            r = await wire.post(
                "/data-token/configure-file-meta",
                {"token": temp, "fileName": "x.bin", "context": "c", "size": str(len(payload))},
            )
            assert r.status_code == 200, r.text
            async with wire.channel() as ch:
                assert await wire.retrieve(ch, r.json()["token"]) == payload
            await wire.aclose()
        finally:
            eng2.stop()
    finally:
        eng.kill()


async def test_the_janitor_forgets_finished_commands_after_a_week_and_keeps_pending_ones(tmp_path):
    """Every stored file left three command rows for good (90,000 after 30,000 files, half of a
    63 MB database); and the janitor's sweep, every 5 s, read the whole reservations table (no
    index on its expiry: 20-57 ms a sweep with 30,000 rows, holding the writer)."""
    from privifs.engine.core import COMMAND_KEEP, Engine

    engine = Engine(tmp_path / "engine", EngineOptions())
    try:
        now = time.time()
        rows = [("old", 2, now - COMMAND_KEEP - 60), ("recent", 2, now - 60), ("held", 1, None)]

        def add(conn):
            for cid, status, finished in rows:
                conn.execute(
                    "INSERT INTO commands (id, kind, params, status, created_at, finished_at)"
                    " VALUES (?, 'delete-data-token', '{}', ?, ?, ?)",
                    (cid, status, now - 2 * COMMAND_KEEP, finished),
                )

        await engine.db.write(add)
        await engine.sweep()
        assert engine.runner.status("old") is None
        assert engine.runner.status("recent")["status"] == 2 and engine.runner.status("held")["status"] == 1

        def plans(conn):
            ask = "EXPLAIN QUERY PLAN "
            yield from conn.execute(ask + "SELECT rowid FROM commands WHERE finished_at <= ? LIMIT 10", (now,))
            yield from conn.execute(ask + "SELECT * FROM reservations WHERE expires_at <= ?", (now,))

        used = " ".join(str(tuple(r)) for r in engine.db.read(lambda c: list(plans(c))))
        assert "commands_finished" in used and "reservations_expiry" in used, used
    finally:
        engine.db.close()
