"""When the local index cannot commit (its disk full beyond the reserve, an I/O error), a change
the tree has already made and cannot take back (unlink, rmdir, rename) stands: the operation
succeeds, the index owes its statements and records them with its next commit, and a flush of
the index (``fsync`` of a directory) fails until it can. Before, the operation reported ENOSPC
while the tree showed it done, and a restart brought the index's older tree back.

Driven in-process against the real engine (tests/fskit.py); only SQLite's COMMIT is made to
fail, as it does on a full disk."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat

import trio

from tests.fskit import fails_with, inprocess_fs


class RefusedCommits:
    """The index's connection, with every commit failing as SQLite's does on a full disk while
    ``refusing`` (a COMMIT, and a change outside a transaction, which commits itself); everything
    else goes to the real connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.refusing = False

    def execute(self, sql: str, *args):
        verb = sql.strip().split(None, 1)[0].upper()
        if self.refusing and (
            verb == "COMMIT" or (verb in ("INSERT", "UPDATE", "DELETE") and not self.conn.in_transaction)
        ):
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def refuse_commits(kit) -> RefusedCommits:
    """From now on every commit of ``kit``'s index fails as on a full disk (until
    ``.refusing = False``)."""
    conn = RefusedCommits(kit.fs.index.conn)
    kit.fs.index.conn = conn
    conn.refusing = True
    return conn


def committed_names(kit) -> set[str]:
    """The names of the nodes the index file holds (what a restart would show)."""
    conn = sqlite3.connect(kit.fs.index.path)
    try:
        return {row[0] for row in conn.execute("SELECT name FROM nodes") if row[0]}
    finally:
        conn.close()


async def test_removals_and_renames_the_index_cannot_commit_stand_and_are_recorded_once_it_can(kit):
    await kit.write_file("gone.txt", b"gone")
    await kit.write_file("old.txt", b"moved")
    await kit.mkdir("empty")
    await kit.mkdir("d")
    await kit.write_file("d/in.txt", b"inside")
    await kit.settle()
    index = kit.fs.index
    conn = refuse_commits(kit)

    await kit.unlink("gone.txt")  # each reported ENOSPC before, and showed done all the same
    await kit.rename("old.txt", "new.txt")
    await kit.rmdir("empty")
    await kit.rename("d", "e")

    assert index.owed and "full" in index.owed_error
    assert await kit.tree() == {"new.txt": b"moved", "e": "dir", "e/in.txt": b"inside"}
    assert {"gone.txt", "old.txt", "empty", "d"} <= committed_names(kit)  # not recorded yet
    root = await kit.opendir("")
    with fails_with(errno.ENOSPC):  # the directory's changes are not durable: fsync says so
        await kit.ops.fsyncdir(root, False)

    conn.refusing = False
    await kit.ops.fsyncdir(root, False)
    await kit.releasedir(root)
    assert not index.owed and index.owed_error is None
    assert committed_names(kit) == {"new.txt", "e", "in.txt"}
    await kit.settle()
    files = {path: value for path, value in (await kit.vault_tree()).items() if value != "dir"}
    assert files == {"new.txt": b"moved", "e/in.txt": b"inside"}
    async with kit.fresh() as other:  # another machine of the vault shows the same tree
        assert await other.tree() == await kit.tree()


async def test_what_the_index_owes_is_committed_before_a_later_change_to_the_same_rows(kit):
    """The owed statements go first: a later rename of the same file is what stays."""
    await kit.write_file("a.txt", b"a")
    await kit.settle()
    index = kit.fs.index
    conn = refuse_commits(kit)
    await kit.rename("a.txt", "b.txt")
    assert index.owed
    conn.refusing = False
    await kit.rename("b.txt", "c.txt")  # commits the owed rename, then this one
    assert not index.owed
    assert committed_names(kit) == {"c.txt"}
    assert await kit.tree() == {"c.txt": b"a"}


async def test_a_new_entry_the_index_cannot_commit_is_still_refused_with_enospc(kit):
    """Making an entry can be taken back, so it still fails (and leaves nothing behind)."""
    await kit.settle()
    index = kit.fs.index
    conn = refuse_commits(kit)
    with fails_with(errno.ENOSPC):
        await kit.mkdir("new")
    assert not index.owed
    conn.refusing = False
    assert await kit.tree() == {}


def committed_row(kit, name: str) -> tuple[int, int]:
    """The mode and size the index file holds for the node called ``name``."""
    conn = sqlite3.connect(kit.fs.index.path)
    try:
        return conn.execute("SELECT mode, size FROM nodes WHERE name = ?", (name,)).fetchone()
    finally:
        conn.close()


async def test_a_chmod_truncate_or_o_trunc_the_index_cannot_commit_stands_and_is_recorded_later(kit):
    """The file was truncated (its staged copy is shorter): reporting ENOSPC, as before, told
    the program it was not, while the file showed it was."""
    await kit.write_file("f.txt", b"0123456789")
    await kit.write_file("g.txt", b"abcdef")
    await kit.settle()
    index = kit.fs.index
    conn = refuse_commits(kit)

    await kit.setattr("f.txt", mode=0o100600)
    await kit.setattr("f.txt", size=4)
    fh = await kit.open_file("g.txt", os.O_WRONLY | os.O_TRUNC)
    await kit.close(fh)

    assert index.owed
    attrs = await kit.lookup("f.txt")
    assert stat.S_IMODE(attrs.st_mode) == 0o600 and attrs.st_size == 4
    assert await kit.read_file("f.txt") == b"0123" and await kit.read_file("g.txt") == b""
    assert committed_row(kit, "f.txt") == (0o644, 10)

    conn.refusing = False
    index.settle()
    assert not index.owed
    assert committed_row(kit, "f.txt") == (0o600, 4) and committed_row(kit, "g.txt")[1] == 0
    await kit.settle()
    async with kit.fresh() as other:
        assert await other.tree() == {"f.txt": b"0123", "g.txt": b""}
        assert stat.S_IMODE((await other.lookup("f.txt")).st_mode) == 0o600


async def test_a_write_the_index_never_recorded_shows_and_is_uploaded_after_a_restart(module_account, eng, tmp_path):
    """The row says the file is clean (the staged copy a first write made was committed), the
    write's own commit never happened (the disk full, or a kill just before it): after a restart
    the staged file's header, written with the write, says it changed. Before, the file showed its
    old size over the new content and was never uploaded."""
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True) as kit:
        await kit.write_file("f.txt", b"old content")
        await kit.settle()
        resume = kit.hold_write_back()
        node = kit.node("f.txt")
        await kit.fs.writable_staged(node)  # committed: the row names the staged copy, clean
        refuse_commits(kit)
        fh = await kit.open_file("f.txt", os.O_WRONLY)
        with fails_with(errno.ENOSPC):  # (marking it changed is not a change that stands: see kept)
            await kit.write(fh, 11, b" and more")
        await kit.close(fh)
        key = kit.key
        resume()
    async with inprocess_fs(tmp_path, *module_account, key=key) as again:
        assert await again.read_file("f.txt") == b"old content and more"
        await again.settle()
        assert await again.vault_tree() == {"f.txt": b"old content and more"}


async def test_no_write_succeeds_while_the_index_owes_changes(kit):
    """A write that returns is on record (the staged copy it went to, the file marked changed):
    what the index owes may be that very record, so writes get ENOSPC until it is committed."""
    fh = await kit.create_file("f.txt")
    await kit.write(fh, 0, b"first ")  # the file is recorded as changed from here on
    conn = refuse_commits(kit)
    await kit.rename("f.txt", "g.txt")  # stands; owed
    with fails_with(errno.ENOSPC):
        await kit.write(fh, 6, b"second")
    conn.refusing = False
    await kit.write(fh, 6, b"second")
    await kit.close(fh)
    assert not kit.fs.index.owed
    assert await kit.read_file("g.txt") == b"first second"


async def test_an_upload_stands_when_a_step_after_its_commit_fails(kit, monkeypatch):
    """Once the vault acknowledged an upload and the index recorded it, the staged file moves
    into the read cache. That step raising (the cache's table could not be opened again after
    ``rm -rf ~/.cache``) was taken for a failed upload: the fsync waiting for it timed out
    after 300 s and the upload was retried. The commit stands; the step is only logged."""

    def broken(token: str, path: str) -> bool:
        raise RuntimeError("the cache is broken")

    monkeypatch.setattr(kit.fs.cache, "adopt", broken)
    fh = await kit.create_file("kept.txt")
    await kit.write(fh, 0, b"fsynced")
    with trio.fail_after(30):
        await kit.fsync(fh)
    await kit.close(fh)
    assert await kit.vault_tree() == {"kept.txt": b"fsynced"}
    assert committed_names(kit) == {"kept.txt"}
