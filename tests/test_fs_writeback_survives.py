"""Write-back and the other background tasks outlive anything: nodes that leave the tree while
their write-back waits, unexpected exceptions, a removed file written through an open handle.
Driven in-process (tests/fskit.py) against the real engine, so each interleaving is exact."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from privifs.errors import NodeGone
from privifs.fs.namespace import Index
from privifs.supervise import Supervisor
from tests.fskit import inprocess_fs


async def test_file_and_directory_removed_while_write_back_waits_leave_the_syncer_running(account, tmp_path):
    # the pjdfstest ftruncate/00.t pattern that killed the daemon: a write-back is waiting (the
    # mount is busy) when the file is unlinked, its directory removed, and the still-open file
    # truncated through its descriptor
    async with inprocess_fs(tmp_path, *account) as t:
        d = t.mkdir_node(1, "d")
        fh, f = t.create_node(d, "f")
        await t.fs.write(fh, 0, b"x" * 1000)
        t.fs.release(fh)  # schedules the upload
        fh2 = await t.open_node(f)  # still open for writing
        t.fs.note_activity()  # busy mount: the worker waits in _yield_to_foreground
        await trio.sleep(0.05)
        assert f.ino in t.syncer._busy  # the worker holds the node, waiting
        t.fs.unlink(d.ino, b"f")
        t.fs.rmdir(1, b"d")
        t.forget(d)
        await t.truncate(fh2, 10)  # ftruncate on the descriptor of the removed file
        await t.fs.write(fh2, 0, b"y" * 5)
        await trio.sleep(0.6)  # the worker wakes and finds the node gone
        t.fs.release(fh2)
        t.forget(f)
        await t.wait_idle()
        assert not t.supervisor.failing()
        assert f.ino not in t.fs.ns.nodes
        assert await t.vault_names() == {}
        # the syncer still works
        fh3, _ = t.create_node(1, "after")
        await t.fs.write(fh3, 0, b"still alive")
        t.fs.release(fh3)
        await t.wait_idle()
        assert await t.vault_names() == {"after": 11}


async def test_writing_a_removed_open_file_does_not_bring_it_back_after_a_restart(account, tmp_path):
    async with inprocess_fs(tmp_path, *account) as t:
        d = t.mkdir_node(1, "d")
        fh, f = t.create_node(d, "ghost")
        t.fs.unlink(d.ino, b"ghost")
        t.fs.rmdir(1, b"d")
        await t.fs.write(fh, 0, b"written after unlink")
        t.fs.release(fh)
        await t.wait_idle()
    index = Index(tmp_path / "index.sqlite3")
    try:
        names = {n.name for n in index.load()}
    finally:
        index.close()
    assert "ghost" not in names and "d" not in names


async def test_unexpected_exception_in_write_back_is_reported_and_retried(account, tmp_path, monkeypatch):
    async with inprocess_fs(tmp_path, *account) as t:
        real = t.syncer.vault.put_stream
        calls = 0

        async def buggy(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug in the upload path")
            return await real(*args, **kwargs)

        monkeypatch.setattr(t.syncer.vault, "put_stream", buggy)
        fh, f = t.create_node(1, "doc.txt")
        await t.fs.write(fh, 0, b"keep me")
        t.fs.release(fh)
        with trio.fail_after(10):
            while calls < 1 or f.attempts == 0:
                await trio.sleep(0.02)
        failing = {h.name: h for h in t.supervisor.failing()}
        assert "write-back" in failing and "a bug in the upload path" in failing["write-back"].last_error
        assert "unexpected failure" in f.last_error
        await t.wait_idle()
        assert calls == 2
        assert await t.vault_names() == {"doc.txt": 7}
        assert all(h.running for h in t.supervisor.tasks.values() if h.name.startswith("write-back worker"))


def test_a_removed_node_has_no_path_but_can_still_be_named(tmp_path):
    from privifs.fs.namespace import Namespace

    index = Index(tmp_path / "index.sqlite3")
    try:
        ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
        d = ns.new_node(ns.root, "d", "dir", 0o755)
        f = ns.new_node(d, "f", "file", 0o644)
        assert ns.path(f) == "/d/f" and ns.context(f) == "/d"
        ns.detach(d)
        ns.drop(d)
        with pytest.raises(NodeGone):
            ns.path(f)
        with pytest.raises(NodeGone):
            ns.context(f)
        assert ns.describe(f) == "(removed) f"
    finally:
        index.close()


# -- the supervisor ------------------------------------------------------------------------------
async def test_supervised_task_is_restarted_after_each_failure_with_backoff(autojump_clock):
    sup = Supervisor()
    runs = []

    async def flaky():
        runs.append(trio.current_time())
        if len(runs) <= 3:
            raise KeyError("boom")
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        sup.start_soon(n, "flaky", flaky)
        await trio.sleep(100)
        n.cancel_scope.cancel()
    health = sup.tasks["flaky"]
    assert len(runs) == 4 and health.failures == 3
    assert "KeyError" in health.last_error and "boom" in health.last_error
    gaps = [b - a for a, b in zip(runs, runs[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[0] >= 1.0  # backoff grows


async def test_supervised_start_up_failure_propagates_and_cancellation_ends_the_task():
    sup = Supervisor()

    async def broken(task_status=trio.TASK_STATUS_IGNORED):
        raise OSError(os.strerror(98))

    caught = False
    try:
        async with trio.open_nursery() as n:
            await sup.start(n, "control", broken)
    except* OSError:
        caught = True
    assert caught and not sup.tasks["control"].running

    async def serving(task_status=trio.TASK_STATUS_IGNORED):
        task_status.started("ready")
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        assert await sup.start(n, "serving", serving) == "ready"
        n.cancel_scope.cancel()
    assert sup.tasks["serving"].failures == 0


@asynccontextmanager
async def fsync_in_background(t, fh: int):
    """An fsync of ``fh`` runs while the block does; the block gets the list it appends "ok" to
    once it returned (the block's end waits for it)."""
    result: list[str] = []

    async def fsync() -> None:
        await t.fs.fsync(fh)
        result.append("ok")

    async with trio.open_nursery() as n:
        n.start_soon(fsync)
        yield result


async def test_fsync_waits_through_server_errors_instead_of_failing(eng, account, tmp_path):
    async with inprocess_fs(tmp_path, *account) as t:
        fh, f = t.create_node(1, "db.sqlite")
        await t.fs.write(fh, 0, b"page" * 1000)
        eng.set_options(fail_rate=1.0)  # every request answers 5xx for now
        async with fsync_in_background(t, fh) as result:
            with trio.fail_after(30):
                while f.attempts < 1:
                    await trio.sleep(0.05)
            assert result == []  # still waiting, not failed
            eng.set_options(fail_rate=0.0)
        assert result == ["ok"]
        assert not f.content_dirty and f.token
        t.fs.release(fh)


async def test_fsync_of_a_file_whose_write_back_is_deferring_to_a_busy_mount_does_not_wait_for_quiet(
    account, tmp_path, monkeypatch
):
    # SQLite's journal: created (its write-back starts and defers while the mount is busy), then
    # fsynced; the deferring worker must go on at the fsync, not at the end of its quiet period
    monkeypatch.setattr("privifs.fs.sync.QUIET", 60.0)
    async with inprocess_fs(tmp_path, *account) as t:
        fh, f = t.create_node(1, "db-journal")
        await t.fs.write(fh, 0, b"journal")
        t.fs.note_activity()
        t.syncer.schedule(f)
        await trio.sleep(0.05)
        assert f.ino in t.syncer._busy  # the worker holds the node, deferring
        with trio.fail_after(20):  # the quiet period is 60 s: only the fsync's wake-up ends it sooner
            await t.fs.fsync(fh)
        assert f.token is not None
        t.fs.release(fh)


async def test_an_fsync_does_not_wait_for_workers_deferring_other_files_to_a_busy_mount(account, tmp_path, monkeypatch):
    """Every worker held a file closed before, deferring it while the mount stayed busy (a
    program reading, a ``cp -r``): an fsync of another file waited in the urgent lane until one
    of them gave up deferring, MAX_DEFER (30 s; hT measured 25-29 s against 0.13 s quiet). A
    deferring worker now gives way to it and puts its own file back."""
    monkeypatch.setattr("privifs.fs.sync.QUIET", 60.0)
    monkeypatch.setattr("privifs.fs.sync.MAX_DEFER", 120.0)
    async with inprocess_fs(tmp_path, *account) as t:
        backlog = []
        for i in range(t.syncer.workers + 1):
            fh, f = t.create_node(1, f"closed-{i}")
            await t.fs.write(fh, 0, b"closed before")
            t.fs.release(fh)
            backlog.append(f)
        t.fs.note_activity()
        for f in backlog:
            t.syncer.ns.schedule_retry(f, 0.0)  # past the write-back delay
            t.syncer.schedule(f)
        with trio.fail_after(10):
            while len(t.syncer._busy) < t.syncer.workers:
                await trio.sleep(0.01)
        fh, f = t.create_node(1, "db")
        await t.fs.write(fh, 0, b"committed")
        with trio.fail_after(20):  # deferring lasts 60 s (QUIET) or 120 s (MAX_DEFER) here
            await t.fs.fsync(fh)
        assert f.token is not None
        assert all(b.token is None for b in backlog)  # still deferring: the mount is "busy"
        # the file given up is back in the queue, none is dropped
        assert all(b.ino in t.syncer._busy or b.ino in t.syncer._queue for b in backlog)
        t.fs.release(fh)


async def test_files_that_gave_way_to_fsyncs_still_go_within_max_defer_of_a_busy_mount(account, tmp_path, monkeypatch):
    """A worker that gives way to an fsync's node puts its file back; the file's deferral keeps
    counting from when it began, so a program fsyncing every moment (a database) on a busy mount
    does not hold the files closed before it back for good."""
    monkeypatch.setattr("privifs.fs.sync.QUIET", 60.0)
    monkeypatch.setattr("privifs.fs.sync.MAX_DEFER", 2.0)
    async with inprocess_fs(tmp_path, *account, workers=1) as t:
        fh, closed = t.create_node(1, "closed")
        await t.fs.write(fh, 0, b"closed before")
        t.fs.release(fh)
        t.fs.note_activity()
        t.syncer.ns.schedule_retry(closed, 0.0)
        t.syncer.schedule(closed)
        with trio.fail_after(10):
            while closed.ino not in t.syncer._busy:
                await trio.sleep(0.01)
        with trio.fail_after(20):
            i = 0
            while closed.token is None:  # an fsync every 0.2 s, each making the worker give way
                fh, f = t.create_node(1, f"db-{i}")
                await t.fs.write(fh, 0, b"commit")
                await t.fs.fsync(fh)
                t.fs.release(fh)
                t.fs.note_activity()
                i += 1
                await trio.sleep(0.2)
        assert i < 40  # about MAX_DEFER's 2 s of fsyncs, not until the mount is quiet


async def test_every_index_commit_names_only_staged_files_that_exist(kit):
    """An uploaded staged file was moved into the cache inside the transaction that recorded its
    token, before the commit: a kill -9 in between left an index naming a staged file that was
    gone. The next mount then showed the file with no content ('the staged content is
    unreadable', reads of 0 bytes) and its uploaded token beside it as a conflict copy. What the
    index has committed is what a crash leaves, so at every commit it must name only files that
    are still there."""
    import sqlite3

    staging = kit.fs.staging.dir
    committed = sqlite3.connect(kit.state / "index.sqlite3")
    missing: list[str] = []

    def at_commit(statement: str) -> None:
        if statement.strip().upper().startswith("COMMIT"):  # the state before it is what a crash leaves
            for (staged_id,) in committed.execute("SELECT staged_id FROM nodes WHERE staged_id IS NOT NULL"):
                if not (staging / staged_id).exists():
                    missing.append(staged_id)

    kit.ns.index.conn.set_trace_callback(at_commit)
    try:
        for i, size in enumerate((10, 70_000, 300_000)):
            await kit.write_file(f"f{i}.bin", os.urandom(size))
        await kit.write_file("f0.bin", os.urandom(5000))  # a rewrite: the replaced content's turn
        await kit.settle()
    finally:
        kit.ns.index.conn.set_trace_callback(None)
        committed.close()
    assert len({n for n in await kit.vault_names()}) == 3
    assert missing == []


async def test_a_directory_marker_made_before_a_crash_is_recorded_not_shown_as_a_file(kit):
    """A daemon killed after the server made a new directory's marker token (empty, its risk
    meta not written yet) but before the index recorded it: the next start made a second marker
    and showed the first beside the directory as an empty file 'newdir.conflict-…'. Here the
    next start is played in-process: the directory is still to be written back, its marker's
    upload marked as started, and the interrupted marker is in the vault."""
    resume = kit.hold_write_back()
    await kit.mkdir("newdir")
    node = kit.node("newdir")
    kit.ns.begin_upload(node, streaming=False)  # what _marker records before its store
    with kit.ns.index:
        kit.ns.index.save(node)
    orphan = await kit.remote.put("newdir", b"")  # configure-file-meta done, no risk meta yet
    await kit.refresh()
    assert [name for name, _ in await kit.readdir("")] == ["newdir"] and node.token == orphan
    resume()
    await kit.settle()
    listing = await kit.listing()
    assert [(i.token, i.risk.get("privifs.type")) for i in listing] == [(orphan, "dir")]
    assert [name for name, _ in await kit.readdir("")] == ["newdir"]


async def test_a_start_with_staged_files_gone_never_shows_zeros(account, tmp_path):
    """A start whose index named a staged file that was gone (see the commit-order test above)
    kept the node as a clean file with no token: it read as zeros of its size, and its uploaded
    token showed beside it as a conflict copy. Never uploaded, it is removed now; uploaded before,
    it shows its last uploaded content."""
    key = os.urandom(32)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        await t.write_file("kept.txt", b"uploaded version")
        await t.settle()
        t.hold_write_back()  # the stop comes first: nothing more is written back
        await t.write_file("kept.txt", b"staged edit, lost")
        await t.write_file("new.txt", b"never uploaded, lost")
        staged = [t.node(p).staged.path for p in ("kept.txt", "new.txt")]
    for path in staged:
        os.unlink(path)
    async with inprocess_fs(tmp_path, *account, key=key) as t:
        assert [name for name, _ in await t.readdir("")] == ["kept.txt"]
        assert await t.read_file("kept.txt") == b"uploaded version"


async def test_a_file_changed_again_and_again_while_its_write_back_waits_has_one_timer(account, tmp_path):
    # untar closes a file, then sets its owner, mode and times: each change scheduled the node
    # again, and each found it waiting and started one more sleeping task
    async with inprocess_fs(tmp_path, *account, write_back_delay=3600) as t:
        await t.write_file("f", b"data")
        for i in range(50):
            await t.setattr("f", mode=0o600 | (i & 0o44), mtime_ns=1_000_000_000 * (i + 1))
            await trio.testing.wait_all_tasks_blocked()  # the workers run between requests
        timers = [task for task in t.syncer._nursery.child_tasks if task.name.endswith("._later")]
        assert len(timers) == 1
        await t.settle()
        assert await t.vault_names() == {"f": 4}
        assert (await t.lookup("f")).st_mtime_ns == 50_000_000_000


async def test_a_token_tombstoned_while_deletes_run_is_deleted_by_the_next_round(account, tmp_path):
    # the deletion task's wake-up was replaced after each round: a tombstone recorded while a round
    # was deleting (a replaced version, an unlinked file) waited for the 30 s round, and so did a
    # flush or umount waiting for it
    async with inprocess_fs(tmp_path, *account) as t:
        await t.wait_idle()
        syncer = t.syncer
        real = syncer.tokens.delete
        started, release = trio.Event(), trio.Event()

        async def slow_delete(token):
            if token == "tok-first":
                started.set()
                await release.wait()
            return await real(token)

        syncer.tokens.delete = slow_delete
        with syncer.index:
            syncer.index.add_tombstone("tok-first")  # missing tokens: a delete counts as done
        syncer.wake_tombstones()
        with trio.fail_after(10):
            await started.wait()
        with syncer.index:
            syncer.index.add_tombstone("tok-second")
        syncer.wake_tombstones()
        release.set()
        with trio.fail_after(10):  # not the 30 s round
            while syncer.index.tombstone_count():
                await trio.sleep(0.05)


@pytest.mark.parametrize("still_open", [False, True])
async def test_big_file_removed_while_its_upload_waits_for_a_slot_is_not_sent(account, tmp_path, still_open):
    # fsstress on a mount (big writes, then unlink): a file above BIG_UPLOAD waited for one of
    # the big-upload slots, was removed meanwhile (and, closed and forgotten, its staged copy
    # freed), and the write-back then crashed on it (AttributeError: 'NoneType' object has no
    # attribute 'freeze'), logged with a traceback and shown as a failed task in 'privifs
    # status' (still open, it was skipped already: its place in the tree is gone)
    async with inprocess_fs(tmp_path, *account, big_uploads=1) as t:
        fh, f = t.create_node(1, "big")
        await t.fs.write(fh, 0, b"b" * (600 * 1024))
        slot = t.syncer._big
        await slot.acquire_on_behalf_of("test")  # every big-upload slot is taken
        try:
            t.fs.release(fh)  # schedules the upload, which waits for the slot
            for _ in range(200):
                if f.ino in t.syncer._busy:
                    break
                await trio.sleep(0.01)
            assert f.ino in t.syncer._busy
            fh2 = await t.open_node(f) if still_open else None
            t.fs.unlink(1, b"big")
            if not still_open:
                t.forget(f)
                assert f.staged is None  # freed while the upload waited
        finally:
            slot.release_on_behalf_of("test")
        await trio.sleep(0.2)
        if fh2 is not None:
            await t.fs.write(fh2, 0, b"z")
            t.fs.release(fh2)
            t.forget(f)
        await t.wait_idle()
        assert not t.supervisor.failing()
        assert t.syncer.last_error is None
        assert t.syncer.uploads == 0  # nothing of the removed file was sent
        assert f.ino not in t.fs.ns.nodes
        assert await t.vault_names() == {}


@pytest.mark.slow
async def test_fsync_waits_for_a_server_that_stops_answering_for_a_few_seconds(tmp_path):
    """A standalone engine (a server) restarted in a few seconds failed a waiting fsync with EIO
    after the client's own retries, about 4 s (helper hN: 13 of 28 SQLite workloads got 'disk
    I/O error'), while a server answering 5xx is waited for. A server that answered moments ago
    is waited for until SERVER_BACK_GRACE after its last answer."""
    import uuid

    from privifs.client.provision import new_identity, register_profile
    from privifs.client.session import PasswordCredentials
    from privifs.client.transport import Endpoints
    from tests.enginekit import EngineProcess

    engine = EngineProcess(tmp_path / "engine").start()
    try:
        endpoints = Endpoints.from_dict(engine.urls)
        username = f"restart-{uuid.uuid4().hex[:8]}@example.com"
        await register_profile(endpoints, username, "correct-horse-battery", new_identity()[1])
        (tmp_path / "fs").mkdir()
        async with inprocess_fs(
            tmp_path / "fs", endpoints, PasswordCredentials(username, "correct-horse-battery")
        ) as t:
            await t.write_file("before", b"uploaded while the server answered")
            await t.wait_idle()
            fh, f = t.create_node(1, "db")
            await t.fs.write(fh, 0, b"page" * 1000)
            await trio.to_thread.run_sync(engine.stop)
            async with fsync_in_background(t, fh) as result:
                await trio.sleep(7)  # longer than the client's own retries
                assert result == []  # still waiting, not failed
                await trio.to_thread.run_sync(engine.start)
            assert result == ["ok"] and not f.content_dirty
            t.fs.release(fh)
    finally:
        engine.stop()
