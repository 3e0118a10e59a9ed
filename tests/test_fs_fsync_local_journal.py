"""``--fsync local`` and a file that lives for one SQLite commit (its rollback journal: created,
written, fsynced, deleted): once deleted it leaves nothing behind, neither in the vault nor among
the changes waiting for upload, its staged file is deleted off the trio thread, and the
write-back does not keep a worker waiting for a quiet moment on its behalf. In-process
(tests/fskit.py) against the real engine."""

from __future__ import annotations

import os
import threading

import trio

from privifs.fs.namespace import Node


async def test_a_journal_fsynced_and_deleted_leaves_nothing_to_do(kit, monkeypatch):
    kit.fs.opts.fsync_mode = "local"
    removed_by: dict[str, str] = {}
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        removed_by[os.fspath(path)] = threading.current_thread().name
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    await kit.write_file("app.db", b"database")
    for _ in range(3):  # three commits
        fh = await kit.create_file("app.db-journal")
        await kit.write(fh, 0, b"old pages" * 100)
        await kit.fsync(fh)
        staged = kit.node("app.db-journal").staged.path
        await kit.close(fh)
        await kit.unlink("app.db-journal")
        assert kit.syncer.local_fsynced == set()  # no change of it waits for upload
        with trio.fail_after(10):
            while kit.fs.staging.remover.pending():  # a thread, not a task
                await trio.sleep(0.01)
        assert removed_by[staged] == "privifs-staged-removal"
    await kit.settle()
    assert await kit.vault_tree() == {"app.db": b"database"}
    assert kit.fs.staging.ids() == set()


async def test_write_back_does_not_wait_for_a_quiet_moment_for_a_deleted_file(kit):
    """While requests keep coming, write-back waits (up to 30 s) before it works on a change; for
    a file deleted meanwhile it stops waiting at once (each SQLite commit's journal kept a worker
    waiting for 30 s, so every worker was soon held by deleted journals)."""
    kit.fs.opts.fsync_mode = "local"
    fh = await kit.create_file("app.db-journal")
    await kit.write(fh, 0, b"old pages")
    await kit.fsync(fh)
    node: Node = kit.node("app.db-journal")
    await kit.close(fh)
    await kit.unlink("app.db-journal")
    async with trio.open_nursery() as nursery:

        async def busy() -> None:
            while True:
                kit.fs.note_activity()
                await trio.sleep(0.01)

        nursery.start_soon(busy)
        with trio.fail_after(10):
            await kit.syncer._yield_to_foreground(node.ino)
        nursery.cancel_scope.cancel()
