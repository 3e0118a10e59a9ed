"""The engine on a full disk: requests that need room are answered 507 (a log line at most every 10 s, no
traceback), nothing else stops, and everything works again once there is room. A full disk once
ended the whole engine: the command runner's failed commit escaped its task."""

from __future__ import annotations

import os
import sqlite3
import uuid
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.client.provision import new_identity, register_profile
from privifs.client.session import PasswordCredentials
from privifs.client.transport import ClientOptions, Endpoints
from privifs.engine.commands import SUCCEEDED, CommandRunner
from privifs.engine.db import Database
from privifs.engine.hub import Hub
from privifs.engine.options import EngineOptions
from privifs.errors import ServerError
from tests.enginekit import EngineProcess, Wire, command_id
from tests.test_fs_fulldisk import small_filesystem

KEY = os.urandom(32)


def disk_full_error() -> sqlite3.OperationalError:
    """A real "database or disk is full" (SQLITE_FULL), as a commit on a full disk raises it."""
    conn = sqlite3.connect(":memory:")
    conn.execute("PRAGMA max_page_count=1")
    try:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (randomblob(10000))")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("SQLite took more than a page")


async def test_a_command_whose_commit_fails_for_a_full_disk_stays_accepted_and_is_applied_later(tmp_path):
    db = Database(tmp_path / "engine.sqlite3")
    try:
        runner = CommandRunner(db, Hub(EngineOptions()), EngineOptions())
        applied = []
        runner.register("noop", lambda conn, params, profile_id, cid: applied.append(cid))
        failures = [disk_full_error(), disk_full_error()]
        real = runner._apply_batch

        async def full_twice(ids):
            if failures:
                raise failures.pop()
            await real(ids)

        runner._apply_batch = full_twice
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(runner.run)
                cid = await runner.submit("noop", None, {})
                while runner.status(cid)["status"] != SUCCEEDED:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert applied == [cid] and not failures
    finally:
        db.close()


def fill(path) -> None:
    """Take whatever room is left on ``path``'s filesystem."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(65536))
        except OSError:
            pass


async def test_the_janitor_goes_on_when_the_database_cannot_be_written(tmp_path):
    """The janitor's sweep failing for a full disk ended the janitor task, and the engine with it."""
    from privifs.engine.core import Engine

    engine = Engine(tmp_path / "engine", EngineOptions())
    try:
        sweeps = []
        real = engine.sweep

        async def sweep():
            sweeps.append(1)
            if len(sweeps) <= 2:
                raise disk_full_error()
            await real()

        engine.sweep = sweep
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.janitor, 0.01)
                while len(sweeps) < 4:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    finally:
        engine.db.close()


@pytest.fixture
def small_engine(tmp_path):
    with small_filesystem(tmp_path / "small", "24m") as small:
        engine = EngineProcess(small / "data", log_path=tmp_path / "engine.log").start()
        try:
            yield engine, small
        finally:
            engine.stop()
            engine.kill()


@asynccontextmanager
async def new_profile(engine):
    """A client of a new profile on ``engine`` that tries each store once (a 507 is raised)."""
    endpoints = Endpoints.from_dict(engine.urls)
    username = f"full-{uuid.uuid4().hex[:8]}@example.com"
    _, public = new_identity()
    await register_profile(endpoints, username, "correct-horse-battery", public)
    options = ClientOptions(store_attempts=1, retry_attempts=1)
    async with connect(endpoints, PasswordCredentials(username, "correct-horse-battery"), options) as client:
        yield client


async def filled(vault) -> tuple[list[str], ServerError]:
    """1 MiB tokens stored until the engine answers 507: their tokens and that error."""
    stored = []
    with pytest.raises(ServerError) as full:
        for i in range(40):
            stored.append(await vault.put_bytes(os.urandom(1 << 20), FileMeta(f"f{i}", "", "/", 0, f"/f{i}")))
    assert full.value.status == 507, full.value
    return stored, full.value


async def test_an_engine_whose_disk_fills_answers_507_stays_up_and_recovers(small_engine):
    engine, small = small_engine
    room = small / "room"
    room.write_bytes(bytes(8 << 20))  # taken back at the end
    async with new_profile(engine) as client:
        vault = client.vault(KEY)
        stored, full = await filled(vault)
        assert "disk is full" in str(full), full
        await trio.to_thread.run_sync(fill, small / "filler")  # another program takes the last byte
        with pytest.raises(ServerError) as refused:
            await vault.put_bytes(b"small", FileMeta("s", "", "/", 0, "/s"))
        assert refused.value.status == 507, refused.value
        # reads and deletes are commands too: the database's reserve lets them through (a
        # download and a delete were answered 507 as well: nothing read, nothing freed)
        assert len(await vault.get_bytes(stored[0])) == 1 << 20
        await client.tokens.delete(stored[1])
        assert [t.token async for t in client.tokens.list()]
        assert "used its 4 MiB reserve" in engine.log()
        room.unlink()
        token = await vault.put_bytes(b"after", FileMeta("after", "", "/", 0, "/after"))
        assert await vault.get_bytes(token) == b"after"
        assert await vault.get_bytes(stored[0])
    assert engine.proc.poll() is None
    log = engine.log()
    assert "Traceback" not in log and "answered 507" in log, log[-3000:]
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(engine.urls["api"] + "/health")).status_code == 200


async def test_the_engines_own_blobs_leave_room_for_the_deletes_that_give_it_back(small_engine):
    """Uploads retried without pause (a mount's write-back) once filled the engine's disk to the
    last byte, and then every delete was answered 507 as well: nothing could free space. Blobs
    now stop at a floor of free space (4 MiB here) that deletes and the database keep."""
    engine, small = small_engine
    async with new_profile(engine) as client:
        vault = client.vault(KEY)
        stored, _ = await filled(vault)
        assert len(stored) >= 10, len(stored)
        st = os.statvfs(small)
        assert st.f_bavail * st.f_frsize >= 3 << 20  # the floor, less the database's growth since
        for token in stored[:3]:
            await client.tokens.delete(token)  # answered: no 507
        after = await vault.put_bytes(os.urandom(1 << 20), FileMeta("after", "", "/", 0, "/after"))
        assert len(await vault.get_bytes(after)) == 1 << 20
    assert "Traceback" not in engine.log()


async def test_the_database_gives_back_its_reserve_on_a_full_disk_and_makes_it_again_later(tmp_path, monkeypatch):
    import privifs.engine.db as engine_db

    monkeypatch.setattr(engine_db, "RESERVE_CHECK", 0.0)
    with small_filesystem(tmp_path / "small", "24m") as small:
        db = Database(small / "engine.sqlite3")
        try:
            reserve = small / engine_db.RESERVE_NAME
            assert reserve.stat().st_size == 4 << 20
            await trio.to_thread.run_sync(fill, small / "filler")
            await db.write(lambda conn: conn.execute("INSERT INTO kv VALUES ('a', randomblob(100000))"))
            assert not reserve.exists()  # given back: the write had room
            (small / "filler").unlink()
            await db.write(lambda conn: conn.execute("INSERT INTO kv VALUES ('b', 'x')"))
            assert reserve.stat().st_size == 4 << 20  # made again once the disk had room
        finally:
            db.close()


async def test_an_upload_refused_at_the_floor_after_its_whole_body_came_is_answered_at_once(small_engine):
    """A body under the engine's 1 MiB write buffer is written only once all of it has arrived;
    refused then at the blob floor (or the disk full), the 507 waited for the rest of a body that
    had ended: hypercorn's next message after a complete body comes only when the client leaves.
    A mount's uploads in flight as its home disk filled got no answer for 60 s (found by helper hK)."""
    engine, small = small_engine
    wire = Wire(engine.urls)
    try:
        await wire.provision()
        async with wire.channel() as ch:
            r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
            cid = command_id(r)
            await ch.wait_for("X-DPT-CAB-ID", cid)
            stream = (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).json()["stream"]
        await trio.to_thread.run_sync(fill, small / "filler")  # another program takes the last byte
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=5)) as http:
            with trio.fail_after(8):
                answer = await http.post(f"{engine.urls['upstream']}/?{stream}", content=os.urandom(65536))
        assert answer.status_code == 507, answer.text
    finally:
        await wire.aclose()
