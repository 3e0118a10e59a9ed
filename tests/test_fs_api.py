"""POSIX operations of the filesystem, driven in-process through its pyfuse3 handlers (no kernel,
no mount; tests/fskit.py) against the real engine: lookup, create/write/read, mkdir/rmdir,
rename in all its forms, unlink of an open file, setattr, symlinks, readdir offsets, statfs,
names; then what reaches the vault, and what a filesystem built from an empty local state shows.
What needs the kernel (permission checks, page cache, the mount's lifetime) stays in the mounted
tests (test_fs_posix.py and others)."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from privifs.fs.names import VAULT_PATH_MAX
from privifs.fs.sync import BIG_UPLOAD
from tests.fskit import CTX, ROOT_INO, fails_with, inprocess_fs


# -- lookup, create, write, read ------------------------------------------------------------------
async def test_a_created_file_is_found_by_lookup_with_its_mode_and_size_and_reads_back(kit):
    with fails_with(errno.ENOENT):
        await kit.lookup("notes.txt")
    await kit.write_file("notes.txt", b"hello world")
    attrs = await kit.lookup("notes.txt")
    assert stat.S_ISREG(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o644
    assert attrs.st_size == 11 and attrs.st_nlink == 1
    assert await kit.read_file("notes.txt") == b"hello world"
    with fails_with(errno.EEXIST):
        await kit.create_file("notes.txt", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL)


async def test_a_create_of_a_name_another_client_made_meanwhile_opens_it_unless_o_excl(kit):
    """The kernel sends CREATE for a name its look-up did not find; when another client made it
    in between (the listing brought it in), open(O_CREAT) without O_EXCL got EEXIST (helper hM3:
    22 of 300 such opens in a race of two mounts). It opens the file, truncating it for O_TRUNC,
    and refuses a mode that does not allow it."""
    await kit.remote.put("theirs.txt", b"made elsewhere")
    await kit.refresh()
    fh = await kit.create_file("theirs.txt", flags=os.O_RDONLY | os.O_CREAT)
    assert await kit.read(fh, 0, 100) == b"made elsewhere"
    await kit.close(fh)
    fh = await kit.create_file("theirs.txt", flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    await kit.write(fh, 0, b"mine now")
    await kit.close(fh)
    assert await kit.read_file("theirs.txt") == b"mine now"
    with fails_with(errno.EEXIST):
        await kit.create_file("theirs.txt", flags=os.O_RDWR | os.O_CREAT | os.O_EXCL)
    await kit.mkdir("adir")
    with fails_with(errno.EISDIR):
        await kit.create_file("adir", flags=os.O_RDWR | os.O_CREAT)
    await kit.setattr("theirs.txt", mode=stat.S_IFREG | 0o444)
    other = SimpleNamespace(uid=CTX.uid + 1000, gid=CTX.gid + 1000, pid=os.getpid(), umask=0o022)
    with fails_with(errno.EACCES):
        await kit.ops.create(ROOT_INO, b"theirs.txt", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT, other)


async def test_a_create_of_a_name_another_client_made_counts_the_callers_supplementary_groups(kit):
    """The mode check of that open (the kernel's default_permissions makes none for a name it
    believed missing) counted the caller's uid and primary group only: a caller in the file's
    group by a supplementary group got EACCES where the kernel would have let it write."""
    await kit.remote.put("shared.txt", b"made elsewhere")
    await kit.refresh()
    await kit.setattr("shared.txt", mode=stat.S_IFREG | 0o660, uid=4100, gid=4242)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

    @contextlib.asynccontextmanager
    async def caller(uid: int, groups: list[int]):
        # a real process: the check reads its groups from /proc/PID/status, as the FUSE
        # context gives only a caller's uid, gid and pid
        proc = await trio.lowlevel.open_process(["sleep", "30"], user=uid, group=uid, extra_groups=groups)
        try:
            yield SimpleNamespace(uid=uid, gid=uid, pid=proc.pid, umask=0o022)
        finally:
            proc.kill()
            await proc.wait()

    async with caller(4101, [4242]) as member:
        info, _ = await kit.ops.create(ROOT_INO, b"shared.txt", stat.S_IFREG | 0o644, flags, member)
        await kit.ops.release(info.fh)
    async with caller(4102, [4243]) as outsider:
        with fails_with(errno.EACCES):
            await kit.ops.create(ROOT_INO, b"shared.txt", stat.S_IFREG | 0o644, flags, outsider)


async def test_a_missing_name_is_a_negative_entry_dropped_when_another_client_makes_it(kit):
    """The kernel may remember that a name is missing (SQLite looks for its -wal at every commit,
    git for .gitignore everywhere); a file or directory another client makes under that name must
    then be invalidated in the kernel, or it would stay invisible until the entry times out."""
    for name in (b"later.txt", b"later"):
        attrs = await kit.ops.lookup(ROOT_INO, name, CTX)
        assert attrs.st_ino == 0 and attrs.entry_timeout > 0
    dropped: list[tuple[int, str]] = []
    kit.refresher._inval_entry = lambda parent, name, deleted=0: dropped.append((parent, name))
    await kit.remote.put("later.txt", b"a file")
    await kit.remote.put("later/inside.txt", b"a file in a directory made by the listing")
    await kit.refresh()
    assert {(ROOT_INO, "later.txt"), (ROOT_INO, "later")} <= set(dropped)
    assert await kit.read_file("later/inside.txt") == b"a file in a directory made by the listing"


async def test_a_node_looked_up_by_number_is_itself_of_any_kind_and_absent_once_removed(kit):
    """How the kernel finds a file handle's node again (open_by_handle_at, an NFS export): a
    lookup of "." in the node itself, for files too; a removed node (open or not) is absent,
    which the kernel answers with ESTALE."""
    await kit.mkdir("d")
    await kit.write_file("d/f.txt", b"content")
    for path in ("d", "d/f.txt"):
        ino = await kit.ino(path)
        assert (await kit.ops.lookup(ino, b".", CTX)).st_ino == ino
    d = await kit.ino("d")
    assert (await kit.ops.lookup(d, b"..", CTX)).st_ino == ROOT_INO
    ino = await kit.ino("d/f.txt")
    fh = await kit.open_file("d/f.txt")
    await kit.unlink("d/f.txt")
    assert (await kit.ops.lookup(ino, b".", CTX)).st_ino == 0  # open, but no longer in the tree
    await kit.close(fh)
    assert (await kit.ops.lookup(ino, b".", CTX)).st_ino == 0
    dh = await kit.opendir("d")
    await kit.rmdir("d")  # a removed directory, still open: no parent to find
    assert (await kit.ops.lookup(d, b".", CTX)).st_ino == 0
    assert (await kit.ops.lookup(d, b"..", CTX)).st_ino == 0
    await kit.releasedir(dh)


async def test_a_closed_file_waiting_for_its_upload_keeps_no_plaintext_in_memory(kit):
    # a partial write keeps its chunk's plaintext for the next one (SQLite's page writes); once
    # the writers closed the file it is dropped: an untar's thousands of staged files held it
    fh = await kit.create_file("waiting.txt")
    await kit.write(fh, 0, b"x" * 5000)
    node = kit.fs.handles[fh].node
    assert node.staged.sealed._plain is not None  # kept while the file is open for writing
    await kit.close(fh)
    assert node.staged is not None and node.staged.sealed._plain is None


async def test_closed_files_reach_the_vault_with_their_content_and_place(kit):
    await kit.mkdir("docs")
    await kit.write_file("docs/a.txt", b"alpha")
    await kit.write_file("top.bin", bytes(range(256)) * 100)
    await kit.settle()
    assert await kit.vault_tree() == {"docs": "dir", "docs/a.txt": b"alpha", "top.bin": bytes(range(256)) * 100}


async def test_fsync_returns_once_the_content_is_in_the_vault(kit):
    fh = await kit.create_file("db")
    await kit.write(fh, 0, b"page one")
    await kit.fsync(fh)
    assert await kit.vault_tree() == {"db": b"page one"}  # no settle: fsync waited for it
    await kit.close(fh)


async def test_fsync_returns_once_the_index_records_the_commit_on_disk(kit):
    """A power cut after fsync returned rolled the index back to before the commit (the index
    was flushed only by directory fsyncs and --fsync local): the next mount did not know the
    token it had made, nor the deletes it owed, and showed the version in flight at the cut as
    a conflict copy and a SQLite journal deleted before as the plain file (helper hN F2). Its
    WAL is flushed before fsync returns."""
    index = kit.fs.index
    fh = await kit.create_file("db")
    await kit.write(fh, 0, b"page one")
    before = index.flushed_writes
    await kit.ops.fsync(fh, True)
    assert kit.fs.handles[fh].node.token and not kit.fs.handles[fh].node.content_dirty
    # the WAL was flushed by the fsync, after its upload was recorded (the write-back may write
    # the row again afterwards: its risk meta, as fdatasync does not wait for that)
    assert index.flushed_writes > before
    await kit.close(fh)


def slow_deletes(kit) -> None:
    """The server takes a second for each delete from now on."""
    delete = kit.syncer.tokens.delete

    async def slowly(token: str) -> None:
        await trio.sleep(1)
        await delete(token)

    kit.syncer.tokens.delete = slowly


async def test_fsync_of_a_rewritten_file_returns_once_its_old_version_is_gone_from_the_vault(kit):
    """fsync returned between the new version's upload and the old one's delete: a crash then
    left both at the file's place, and a client without this one's index (a fresh machine, or
    this one with its index lost) showed the old content under the name and the fsynced one as
    a conflict copy, for good (helper hE). Here the server takes a second to delete."""
    await kit.write_file("db", b"old version", fsync=True)
    slow_deletes(kit)
    fh = await kit.open_file("db", os.O_RDWR)
    await kit.write(fh, 0, b"new version, fsynced")
    await kit.ops.fsync(fh, True)  # fdatasync, as SQLite's
    assert await kit.vault_tree() == {"db": b"new version, fsynced"}
    async with kit.fresh() as other:
        assert await other.tree() == {"db": b"new version, fsynced"}
    await kit.close(fh)


async def test_fsync_of_a_file_renamed_over_another_returns_once_the_replaced_one_is_gone(kit):
    """A save by rename (write f.tmp, fsync it, rename it over f, fsync f): f's fsync returned
    once the rename was in the vault, while f's old token waited for the background's delete; a
    crash then left both at f, and a client without this index showed the old content as f
    and the saved one as a conflict copy (helper hG). Here the server takes a second to delete."""
    await kit.write_file("f", b"old version", fsync=True)
    await kit.write_file("f.tmp", b"saved version", fsync=True)
    slow_deletes(kit)
    await kit.rename("f.tmp", "f")
    fh = await kit.open_file("f", os.O_RDONLY)
    await kit.fsync(fh)
    assert await kit.vault_tree() == {"f": b"saved version"}
    await kit.close(fh)


async def test_a_save_by_rename_is_in_the_vault_at_fsync_while_files_closed_before_wait_to_upload(
    module_account, eng, tmp_path
):
    """As above, beside a file closed before the rename and not uploaded yet (a busy mount, or
    here the write-back delay): the replaced token was held back for it, as a removal is, and
    f's fsync returned with both versions at f (helper hG's script with a busy writer)."""
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True, write_back_delay=3600) as k:
        await k.write_file("f", b"old version", fsync=True)
        await k.write_file("f.tmp", b"saved version", fsync=True)
        await k.write_file("other", b"closed, waiting for the write-back delay")
        await k.rename("f.tmp", "f")
        fh = await k.open_file("f", os.O_RDONLY)
        await k.fsync(fh)
        assert await k.vault_tree() == {"f": b"saved version"}
        await k.close(fh)


async def test_writing_into_an_uploaded_file_keeps_the_bytes_around_the_write(kit):
    await kit.write_file("f.txt", b"hello world")
    await kit.settle()
    fh = await kit.open_file("f.txt", os.O_WRONLY)
    await kit.write(fh, 2, b"XX")
    await kit.write(fh, 20, b"end")  # past the end: a hole of zeros
    await kit.close(fh)
    assert await kit.read_file("f.txt") == b"heXXo world" + bytes(9) + b"end"
    await kit.settle()
    assert await kit.vault_tree() == {"f.txt": b"heXXo world" + bytes(9) + b"end"}


async def test_o_trunc_and_o_append(kit):
    await kit.write_file("log", b"first\n")
    await kit.settle()
    fh = await kit.open_file("log", os.O_WRONLY | os.O_APPEND)
    await kit.write(fh, 0, b"second\n")  # O_APPEND: the offset is ignored
    await kit.close(fh)
    assert await kit.read_file("log") == b"first\nsecond\n"
    fh = await kit.open_file("log", os.O_WRONLY | os.O_TRUNC)
    assert (await kit.lookup("log")).st_size == 0
    await kit.close(fh)
    await kit.settle()
    assert await kit.vault_tree() == {"log": b""}


async def _vault_shows(kit, expected: dict[str, object], timeout: float = 10) -> None:
    """Until the vault holds ``expected``, by the write-back alone (no retry forced). A token
    the upload replaces between the listing and its download is looked at again."""
    from privifs.errors import NotFoundError

    with trio.fail_after(timeout):
        while True:
            try:
                if await kit.vault_tree() == expected:
                    return
            except NotFoundError:
                pass
            await trio.sleep(0.05)


async def test_a_file_made_or_truncated_by_an_open_for_reading_reaches_the_vault(kit):
    """open(O_RDONLY | O_CREAT) makes a file (flock(1), lock files) and open(O_RDONLY | O_TRUNC)
    truncates one on Linux; neither handle writes, and both files stayed pending until the
    unmount (helper hAL F1, F2)."""
    await kit.write_file("full.txt", b"1\n2\n3\n")
    await kit.settle()
    kit.syncer.last_activity = float("-inf")
    fh = await kit.create_file("by_flock.lock", flags=os.O_RDONLY | os.O_CREAT)
    await kit.close(fh)
    await _vault_shows(kit, {"full.txt": b"1\n2\n3\n", "by_flock.lock": b""})
    fh = await kit.open_file("full.txt", os.O_RDONLY | os.O_TRUNC)
    assert (await kit.lookup("full.txt")).st_size == 0
    assert await kit.read(fh, 0, 100) == b""
    await kit.close(fh)
    await _vault_shows(kit, {"full.txt": b"", "by_flock.lock": b""})


async def test_a_truncating_open_by_a_caller_other_than_root_clears_setuid_and_setgid(kit):
    """As ext4 (the kernel's truncate) does: privifs truncates inside open, and the kernel then
    sends no setattr that would clear them (helper hAD F3: a 6777 file stayed 6777 after
    ``: > file`` by its owner or another user). Root keeps them; setgid stays on a file that is
    not group-executable (mandatory locking's mark)."""
    user = SimpleNamespace(uid=4100, gid=4100, pid=0, umask=0o022)
    for mode, by, expected in (
        (0o6777, user, 0o0777),
        (0o6757, user, 0o0757),
        (0o4700, user, 0o0700),
        (0o2745, user, 0o2745),
        (0o6777, CTX, 0o6777) if CTX.uid == 0 else (0o0777, CTX, 0o0777),
    ):
        await kit.write_file("tool", b"#!/bin/sh\n")
        await kit.setattr("tool", mode=stat.S_IFREG | mode, uid=4100, gid=4100)
        info = await kit.ops.open(await kit.ino("tool"), os.O_WRONLY | os.O_TRUNC, by)
        await kit.ops.release(info.fh)
        assert stat.S_IMODE((await kit.lookup("tool")).st_mode) == expected, (oct(mode), by.uid)
    # the same through open(O_CREAT | O_TRUNC) of an existing name, the shell's ": > tool"
    await kit.setattr("tool", mode=stat.S_IFREG | 0o6777)
    info, attrs = await kit.ops.create(
        ROOT_INO, b"tool", stat.S_IFREG | 0o644, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, user
    )
    await kit.ops.release(info.fh)
    assert stat.S_IMODE((await kit.lookup("tool")).st_mode) == 0o0777
    await kit.settle()
    async with kit.fresh() as other:  # what the vault holds
        assert stat.S_IMODE((await other.lookup("tool")).st_mode) == 0o0777


async def test_a_read_only_handle_cannot_write(kit):
    await kit.write_file("r", b"data")
    fh = await kit.open_file("r", os.O_RDONLY)
    with fails_with(errno.EBADF):
        await kit.write(fh, 0, b"x")
    await kit.close(fh)


# -- directories --------------------------------------------------------------------------------
async def test_mkdir_and_rmdir_follow_posix(kit):
    await kit.mkdir("d", 0o750)
    attrs = await kit.lookup("d")
    assert stat.S_ISDIR(attrs.st_mode) and stat.S_IMODE(attrs.st_mode) == 0o750
    with fails_with(errno.EEXIST):
        await kit.mkdir("d")
    await kit.write_file("d/f", b"x")
    assert (await kit.lookup("")).st_nlink == 3  # the root: ., .. and d
    with fails_with(errno.ENOTEMPTY):
        await kit.rmdir("d")
    with fails_with(errno.ENOTDIR):
        await kit.rmdir("d/f")
    with fails_with(errno.EISDIR):
        await kit.unlink("d")
    with fails_with(errno.ENOENT):
        await kit.rmdir("nothing")
    with fails_with(errno.ENOENT):
        await kit.mkdir("nothing/sub")
    with fails_with(errno.ENOTDIR):
        await kit.mkdir("d/f/sub")
    await kit.unlink("d/f")
    await kit.rmdir("d")
    assert await kit.tree() == {}
    await kit.settle()
    assert await kit.vault_tree() == {}


async def test_an_emptied_directory_keeps_existing_in_the_vault(kit):
    await kit.mkdir("a")
    await kit.mkdir("a/b")
    await kit.write_file("a/b/f", b"x")
    await kit.settle()
    await kit.unlink("a/b/f")
    await kit.settle()
    assert await kit.vault_tree() == {"a": "dir", "a/b": "dir"}


# -- rename -------------------------------------------------------------------------------------
async def test_rename_of_a_file_moves_its_token_without_a_new_upload(kit):
    await kit.mkdir("to")
    await kit.write_file("a.txt", b"content")
    await kit.settle()
    before = {i.file_name: i.token for i in await kit.listing()}
    await kit.rename("a.txt", "to/b.md")
    assert await kit.tree() == {"to": "dir", "to/b.md": b"content"}
    await kit.settle()
    assert await kit.vault_tree() == {"to": "dir", "to/b.md": b"content"}
    after = {i.file_name: i for i in await kit.listing()}
    assert after["b.md"].token == before["a.txt"] and after["b.md"].extension == "md"


async def test_rename_of_a_directory_is_a_meta_update_of_every_token_below_it(kit):
    await kit.mkdir("proj")
    await kit.mkdir("proj/src")
    await kit.mkdir("proj/src/pkg")
    for i in range(3):
        await kit.write_file(f"proj/src/pkg/m{i}.py", f"x = {i}\n".encode())
    await kit.write_file("proj/README", b"readme")
    await kit.settle()
    before = {i.token for i in await kit.listing()}
    await kit.rename("proj", "renamed")
    expected = {
        "renamed": "dir",
        "renamed/src": "dir",
        "renamed/src/pkg": "dir",
        "renamed/README": b"readme",
        **{f"renamed/src/pkg/m{i}.py": f"x = {i}\n".encode() for i in range(3)},
    }
    assert await kit.tree() == expected
    await kit.settle()
    after = await kit.listing()
    assert {i.token for i in after} == before  # nothing uploaded again
    assert {i.context for i in after if i.file_name.endswith(".py")} == {"/renamed/src/pkg"}
    assert await kit.vault_tree() == expected
    async with kit.fresh() as other:
        assert await other.tree() == expected


async def test_renaming_over_the_only_entry_of_a_directory_leaves_no_marker_token(kit):
    await kit.remote.put("b/y", b"old")  # /b exists only through y
    await kit.refresh()
    await kit.write_file("x", b"new")
    await kit.settle()
    await kit.rename("x", "b/y")
    await kit.settle()
    # y's old token is deleted, and /b was never empty, so no marker token stands for it
    assert [(i.context, i.file_name) for i in await kit.listing()] == [("/b", "y")]
    assert await kit.tree() == {"b": "dir", "b/y": b"new"}


async def test_rename_over_an_existing_file_replaces_it(kit):
    await kit.write_file("old", b"old content")
    await kit.write_file("new", b"new content")
    await kit.settle()
    await kit.rename("new", "old")
    assert await kit.tree() == {"old": b"new content"}
    await kit.settle()
    assert await kit.vault_tree() == {"old": b"new content"}


async def test_versions_this_mount_replaced_or_removed_leave_the_cache(kit):
    """The version an upload replaced, and a removed file's, stayed in the cache until it was
    full: SQLite in WAL mode (a new WAL version uploaded at each commit) filled 550 MiB of the
    cache with deleted versions in 300 commits, pushing out files still in use."""
    await kit.write_file("f", b"v1" * 1000)
    await kit.write_file("other", b"o" * 1000)
    await kit.settle()
    first, other = kit.node("f").token, kit.node("other").token
    assert kit.fs.cache.holds(first) and kit.fs.cache.holds(other)
    await kit.write_file("f", b"v2" * 1000)
    await kit.settle()
    second = kit.node("f").token
    assert second != first and kit.fs.cache.holds(second) and not kit.fs.cache.holds(first)
    await kit.rename("other", "f")  # over f: its version is deleted
    await kit.settle()
    assert not kit.fs.cache.holds(second) and kit.fs.cache.holds(other)
    await kit.unlink("f")
    await kit.settle()
    assert not kit.fs.cache.holds(other)
    assert await kit.vault_tree() == {}


async def test_rename_exchange_swaps_two_files_and_the_vault_and_a_fresh_client_follow(kit):
    """renameat2(RENAME_EXCHANGE) was EINVAL: an atomic swap (util-linux's exch, flatpak's
    deployments) could not be made on the drive."""
    await kit.mkdir("d")
    await kit.write_file("a", b"content of a")
    await kit.write_file("d/b", b"content of b")
    await kit.settle()
    tokens = {i.file_name: i.token for i in await kit.listing()}
    a_ino, b_ino = await kit.ino("a"), await kit.ino("d/b")
    await kit.rename("a", "d/b", pyfuse3.RENAME_EXCHANGE)
    assert await kit.tree() == {"a": b"content of b", "d": "dir", "d/b": b"content of a"}
    assert (await kit.ino("a"), await kit.ino("d/b")) == (b_ino, a_ino)  # the inodes moved, not the bytes
    await kit.settle()
    listed = {(i.context, i.file_name): i.token for i in await kit.listing()}
    assert listed[("/", "a")] == tokens["b"] and listed[("/d", "b")] == tokens["a"]  # no upload: two renames
    async with kit.fresh() as other:
        assert await other.tree() == {"a": b"content of b", "d": "dir", "d/b": b"content of a"}


async def test_a_swap_seen_halfway_by_another_client_ends_under_the_plain_names(kit):
    """Another client's RENAME_EXCHANGE reaches the vault as two renames; a listing between them
    shows two tokens at one name (one as a conflict copy) and none at the other. The listing
    after the second shows both under their plain names, not the copy for good."""
    await kit.write_file("a", b"content of a")
    await kit.write_file("b", b"content of b")
    await kit.settle()
    a_token, b_token = kit.node("a").token, kit.node("b").token
    await kit.client.tokens.update(a_token, file_name="b", extension="", context="/")  # the first half
    await kit.refresh()
    halfway = await kit.tree()
    assert "a" not in halfway and sorted(halfway.values()) == [b"content of a", b"content of b"]
    await kit.client.tokens.update(b_token, file_name="a", extension="", context="/")  # the second half
    await kit.refresh()
    assert await kit.tree() == {"a": b"content of b", "b": b"content of a"}


async def test_rename_exchange_swaps_a_directory_with_a_file_and_moves_its_subtree(kit):
    await kit.mkdir("dir")
    await kit.mkdir("dir/sub")
    await kit.write_file("dir/sub/deep", b"deep")
    await kit.mkdir("other")
    await kit.write_file("other/file", b"file")
    await kit.settle()
    await kit.rename("dir", "other/file", pyfuse3.RENAME_EXCHANGE)
    expected = {
        "dir": b"file",
        "other": "dir",
        "other/file": "dir",
        "other/file/sub": "dir",
        "other/file/sub/deep": b"deep",
    }
    assert await kit.tree() == expected
    await kit.settle()
    assert await kit.vault_tree() == expected
    async with kit.fresh() as other:
        assert await other.tree() == expected


async def test_rename_refuses_what_posix_refuses(kit):
    await kit.mkdir("full")
    await kit.write_file("full/f", b"x")
    await kit.mkdir("empty")
    await kit.mkdir("d")
    await kit.write_file("file", b"y")
    with fails_with(errno.ENOTEMPTY):
        await kit.rename("d", "full")
    with fails_with(errno.EISDIR):
        await kit.rename("file", "empty")
    with fails_with(errno.ENOTDIR):
        await kit.rename("d", "file")
    with fails_with(errno.EINVAL):
        await kit.rename("full", "full/inside")
    with fails_with(errno.ENOENT):
        await kit.rename("missing", "x")
    with fails_with(errno.EEXIST):
        await kit.rename("file", "full/f", pyfuse3.RENAME_NOREPLACE)
    with fails_with(errno.EINVAL):
        await kit.rename("file", "full/f", pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE)
    with fails_with(errno.ENOENT):  # RENAME_EXCHANGE needs both
        await kit.rename("file", "missing", pyfuse3.RENAME_EXCHANGE)
    with fails_with(errno.EINVAL):  # a directory into its own subtree, either way round
        await kit.rename("full", "full/f", pyfuse3.RENAME_EXCHANGE)
    with fails_with(errno.EINVAL):
        await kit.rename("full/f", "full", pyfuse3.RENAME_EXCHANGE)
    with fails_with(errno.EINVAL):
        await kit.rename("file", "x", 4)  # RENAME_WHITEOUT
    await kit.rename("file", "file")  # onto itself: nothing happens
    await kit.rename("d", "empty")  # a directory over an empty one
    await kit.rename("file", "fresh", pyfuse3.RENAME_NOREPLACE)
    assert await kit.tree() == {"empty": "dir", "full": "dir", "full/f": b"x", "fresh": b"y"}


async def test_a_directory_link_count_follows_its_subdirectories_through_renames_and_a_restart(
    module_account, eng, tmp_path
):
    # 2 + the subdirectories, counted as entries come and go (it was recounted at every getattr)
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True) as kit:
        for d in ("a", "b", "a/x", "a/y", "b/z"):
            await kit.mkdir(d)
        await kit.write_file("a/f", b"file")
        links = {d: (await kit.lookup(d)).st_nlink for d in ("", "a", "b")}
        assert links == {"": 4, "a": 4, "b": 3}
        await kit.rename("a/x", "b/x")  # a directory moves to another parent
        await kit.rename("b/z", "a/y")  # over an empty directory, which goes
        await kit.rmdir("b/x")
        await kit.rename("a/f", "b/f")  # files do not count
        links = {d: (await kit.lookup(d)).st_nlink for d in ("", "a", "b")}
        assert links == {"": 4, "a": 3, "b": 2}
        key = kit.key
    async with inprocess_fs(tmp_path, *module_account, key=key) as again:  # built from the index
        assert {d: (await again.lookup(d)).st_nlink for d in ("", "a", "b")} == links


async def test_a_directory_keeps_the_times_its_entries_changes_gave_it_across_a_remount(module_account, eng, tmp_path):
    # creating, removing or renaming an entry sets the directory's mtime and ctime; they were
    # kept in memory only, so a remount showed the directory's older times
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True) as kit:
        for d in ("a", "b"):
            await kit.mkdir(d)
        await kit.write_file("a/f", b"file")
        await kit.write_file("b/g", b"file")
        before = {d: (await kit.lookup(d)) for d in ("a", "b")}
        await trio.sleep(0.01)
        await kit.write_file("a/new", b"x")  # a create
        await kit.rename("b/g", "a/g")  # both directories of a rename
        times = {}
        for d in ("a", "b"):
            e = await kit.lookup(d)
            assert e.st_mtime_ns > before[d].st_mtime_ns, d
            times[d] = (e.st_mtime_ns, e.st_ctime_ns)
        key = kit.key
    async with inprocess_fs(tmp_path, *module_account, key=key) as again:
        assert {d: ((e := await again.lookup(d)).st_mtime_ns, e.st_ctime_ns) for d in ("a", "b")} == times


# -- unlink -------------------------------------------------------------------------------------
async def test_an_unlinked_open_file_leaves_the_directory_and_then_the_vault(kit):
    await kit.write_file("open.txt", b"still here")
    await kit.settle()
    fh = await kit.open_file("open.txt", os.O_RDWR)
    await kit.unlink("open.txt")
    assert not await kit.exists("open.txt")
    assert (await kit.lookup("")).st_nlink == 2
    await kit.close(fh)
    await kit.settle()
    assert await kit.vault_tree() == {}
    assert await kit.tree() == {}


async def test_an_uploaded_file_unlinked_while_open_stays_readable_and_writable_through_its_handle(kit):
    await kit.write_file("open.txt", b"still here")
    await kit.settle()
    fh = await kit.open_file("open.txt", os.O_RDWR)
    assert await kit.read(fh, 0, 5) == b"still"
    await kit.unlink("open.txt")
    try:
        assert await kit.read(fh) == b"still here"
        await kit.write(fh, 0, b"STILL")
        assert await kit.read(fh) == b"STILL here"
    finally:
        await kit.close(fh)
    await kit.settle()
    assert await kit.vault_tree() == {}


async def test_a_file_unlinked_before_its_first_upload_never_reaches_the_vault(kit):
    fh = await kit.create_file("tmp")
    await kit.write(fh, 0, b"scratch")
    await kit.unlink("tmp")
    assert await kit.read(fh) == b"scratch"
    await kit.close(fh)
    await kit.settle()
    assert await kit.vault_tree() == {}


async def test_a_file_replaced_by_rename_while_open_stays_readable_through_its_handle(kit):
    await kit.write_file("t", b"target")
    await kit.write_file("s", b"source")
    await kit.settle()
    fh = await kit.open_file("t", os.O_RDONLY)
    await kit.rename("s", "t")
    try:
        assert await kit.read(fh) == b"target"
    finally:
        await kit.close(fh)
    await kit.settle()
    assert await kit.vault_tree() == {"t": b"source"}


async def test_a_name_unlinked_and_created_again_is_a_new_file_beside_the_open_old_one(kit):
    await kit.write_file("f", b"old")
    fh = await kit.open_file("f", os.O_RDONLY)
    await kit.unlink("f")
    await kit.write_file("f", b"new")
    assert await kit.read(fh) == b"old"
    await kit.close(fh)
    await kit.settle()
    assert await kit.vault_tree() == {"f": b"new"}


async def test_a_file_written_while_its_directory_is_renamed_is_uploaded_at_the_new_place(kit):
    await kit.mkdir("d")
    fh = await kit.create_file("d/f")
    await kit.write(fh, 0, b"abc")
    await kit.rename("d", "e")
    await kit.write(fh, 3, b"def")
    await kit.close(fh)
    await kit.settle()
    assert await kit.vault_tree() == {"e": "dir", "e/f": b"abcdef"}


# -- attributes ---------------------------------------------------------------------------------
async def test_truncate_chmod_and_utimens_are_kept_in_the_vault(kit):
    await kit.write_file("f", b"0123456789")
    await kit.settle()
    await kit.setattr("f", size=4)
    assert await kit.read_file("f") == b"0123"
    await kit.setattr("f", size=6)
    assert await kit.read_file("f") == b"0123\0\0"
    await kit.setattr("f", mode=0o600)
    await kit.setattr("f", atime_ns=1_000_000_000_123, mtime_ns=2_000_000_000_456)
    await kit.setattr("f", atime_ns=1_000_000_000_118)  # mtime omitted: kept
    attrs = await kit.lookup("f")
    assert stat.S_IMODE(attrs.st_mode) == 0o600
    assert (attrs.st_atime_ns, attrs.st_mtime_ns) == (1_000_000_000_118, 2_000_000_000_456)
    await kit.read_file("f")  # reads leave atime alone
    assert (await kit.lookup("f")).st_atime_ns == 1_000_000_000_118
    await kit.settle()
    assert await kit.vault_tree() == {"f": b"0123\0\0"}
    risk = (await kit.remote.token("f")).risk
    assert (risk["privifs.mode"], risk["privifs.atime"], risk["privifs.mtime"]) == (
        "600",
        "1000000000118",
        "2000000000456",
    )
    async with kit.fresh() as other:  # from the token's meta alone
        attrs = await other.lookup("f")
        assert stat.S_IMODE(attrs.st_mode) == 0o600
        assert (attrs.st_atime_ns, attrs.st_mtime_ns) == (1_000_000_000_118, 2_000_000_000_456)
        assert await other.read_file("f") == b"0123\0\0"


async def test_attributes_survive_a_restart_from_the_local_index(module_account, eng, tmp_path):
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True) as kit:
        await kit.write_file("t.txt", b"t")
        await kit.setattr("t.txt", mode=0o640, atime_ns=1_900_000_000_123_456_789, mtime_ns=1_950_000_000_987_654_321)
        key = kit.key
    async with inprocess_fs(tmp_path, *module_account, key=key) as again:  # same state directory
        attrs = await again.lookup("t.txt")
        assert stat.S_IMODE(attrs.st_mode) == 0o640
        assert (attrs.st_atime_ns, attrs.st_mtime_ns) == (1_900_000_000_123_456_789, 1_950_000_000_987_654_321)
        assert await again.read_file("t.txt") == b"t"
        await again.settle()  # what was not written back is, now
        assert await again.vault_tree() == {"t.txt": b"t"}


async def test_what_writes_returned_survives_a_crash_before_the_close_reaches_privifs(module_account, eng, tmp_path):
    # privifs answers no flush, so close(2) returns before the kernel's release reaches the
    # daemon: everything a write returned must come back from the staged file and the index
    small, big = b"s" * 1000 + b"t" * 10, os.urandom(200_000) + b"tail"
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True, write_back_delay=3600) as kit:
        fh = await kit.create_file("small")
        await kit.write(fh, 0, small[:1000])
        await kit.write(fh, 1000, small[1000:])
        fh2 = await kit.create_file("big")  # past the first chunk: the header is written apart
        await kit.write(fh2, 0, big[:200_000])
        await kit.write(fh2, 200_000, big[200_000:])
        fh3 = await kit.create_file("released")
        await kit.write(fh3, 0, small)
        await kit.close(fh3)  # its size and times wait for the index's next commit
        before = {name: (await kit.lookup(name)).st_mtime_ns for name in ("small", "big", "released")}
        key = kit.key
        # the daemon is killed here: no release of the first two, no commit after the third's
        kit.fs.index._soon.clear()
    async with inprocess_fs(tmp_path, *module_account, key=key, write_back_delay=3600) as again:
        for name, data in (("small", small), ("big", big), ("released", small)):
            attrs = await again.lookup(name)
            assert (attrs.st_size, attrs.st_mtime_ns) == (len(data), before[name])
            assert await again.read_file(name) == data
        await again.settle()
        assert await again.vault_tree() == {"small": small, "big": big, "released": small}


async def test_the_time_of_an_open_with_o_trunc_of_an_empty_file_survives_a_crash(module_account, eng, tmp_path):
    # an empty file not yet uploaded, opened with O_TRUNC and closed: its new mtime was kept only
    # in memory (the empty staged file's header was not rewritten, and the release leaves the
    # index's commit for later), so a kill -9 brought the creation time back
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True, write_back_delay=3600) as kit:
        await kit.close(await kit.create_file("empty"))
        created = (await kit.lookup("empty")).st_mtime_ns
        await trio.sleep(0.01)
        await kit.close(await kit.open_file("empty", os.O_WRONLY | os.O_TRUNC))
        truncated = (await kit.lookup("empty")).st_mtime_ns
        assert truncated > created
        key = kit.key
        kit.fs.index._soon.clear()  # the daemon is killed here: no commit after the release
    async with inprocess_fs(tmp_path, *module_account, key=key, write_back_delay=3600) as again:
        attrs = await again.lookup("empty")
        assert (attrs.st_size, attrs.st_mtime_ns) == (0, truncated)


async def test_ftruncate_through_a_handle_and_truncate_of_a_directory(kit):
    fh = await kit.create_file("g")
    await kit.write(fh, 0, b"abcdef")
    await kit.setattr(fh=fh, size=2)
    assert await kit.read(fh) == b"ab"
    await kit.close(fh)
    await kit.mkdir("d")
    with fails_with(errno.EISDIR):
        await kit.setattr("d", size=0)


# -- symlinks, special names --------------------------------------------------------------------
async def test_symlink_and_readlink(kit):
    await kit.symlink("link", "../some/where")
    attrs = await kit.lookup("link")
    assert stat.S_ISLNK(attrs.st_mode) and attrs.st_size == len("../some/where")
    assert await kit.readlink("link") == b"../some/where"
    with fails_with(errno.EINVAL):
        await kit.symlink("bad", b"\xff\xfe")
    with fails_with(errno.ENAMETOOLONG):
        await kit.symlink("long", "x" * 4096)
    await kit.write_file("plain", b"")
    with fails_with(errno.EINVAL):
        await kit.readlink("plain")
    await kit.settle()
    assert await kit.vault_tree() == {"link": ("->", "../some/where"), "plain": b""}


async def test_names_must_be_utf8_short_and_not_reserved(kit):
    with fails_with(errno.EINVAL):
        await kit.ops.mkdir(1, b"\xff", stat.S_IFDIR | 0o755, CTX)
    with fails_with(errno.ENAMETOOLONG):
        await kit.create_file("n" * 256)
    await kit.create_file("n" * 255)
    with fails_with(errno.EPERM):
        await kit.mkdir(".privifs")
    with fails_with(errno.EPERM):
        await kit.ops.link(1, 1, b"hard", CTX)


async def test_whitespace_only_names_are_einval_since_the_vault_refuses_them(kit):
    # a file named " " (an editor test's odd name) was made, then every upload of it was refused
    # (HTTP 422, "fileName: must not be empty") and retried for good: never in the vault
    for name in (" ", "\t", "\n", "  \u3000"):
        with fails_with(errno.EINVAL):
            await kit.create_file(name)
        with fails_with(errno.EINVAL):
            await kit.mkdir(name)
        with fails_with(errno.EINVAL):
            await kit.symlink(name, "target")
        with fails_with(errno.EINVAL):
            await kit.mknod(name, stat.S_IFIFO | 0o644)
    await kit.write_file("f", b"x")
    with fails_with(errno.EINVAL):
        await kit.rename("f", " ")
    await kit.write_file(" lead", b"1")
    await kit.write_file("trail ", b"2")
    await kit.mkdir(" d ")
    await kit.settle()
    assert await kit.vault_tree() == {"f": b"x", " lead": b"1", "trail ": b"2", " d ": "dir"}


async def test_fifos_sockets_and_device_nodes_are_entries_another_mount_sees_with_their_device(kit):
    await kit.mknod("pipe", stat.S_IFIFO | 0o640)
    await kit.mknod("sock", stat.S_IFSOCK | 0o600)
    await kit.mknod("null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    await kit.mknod("disk", stat.S_IFBLK | 0o600, os.makedev(259, 65536))
    kinds = {"pipe": "p", "sock": "s", "null": "c", "disk": "b"}
    assert await kit.tree() == kinds
    assert stat.S_IMODE((await kit.lookup("pipe")).st_mode) == 0o640
    assert (await kit.lookup("null")).st_rdev == os.makedev(1, 3)
    await kit.settle()
    async with kit.fresh() as other:
        assert await other.tree() == kinds
        assert (await other.lookup("null")).st_rdev == os.makedev(1, 3)
        disk = await other.lookup("disk")
        assert disk.st_rdev == os.makedev(259, 65536) and disk.st_mode == stat.S_IFBLK | 0o600
        assert (await other.lookup("pipe")).st_rdev == 0


async def test_extended_attributes_are_not_supported(kit):
    # ENOSYS: the kernel answers EOPNOTSUPP and stops asking (docs/semantics.md)
    await kit.write_file("f", b"")
    ino = await kit.ino("f")
    for call in (
        kit.ops.getxattr(ino, b"user.x", CTX),
        kit.ops.setxattr(ino, b"user.x", b"v", CTX),
        kit.ops.listxattr(ino, CTX),
        kit.ops.removexattr(ino, b"user.x", CTX),
    ):
        with fails_with(errno.ENOSYS):
            await call


# -- readdir, statfs ----------------------------------------------------------------------------
async def test_readdir_resumes_at_its_offset_while_entries_come_and_go(kit):
    await kit.mkdir("d")
    for name in "abcde":
        await kit.write_file(f"d/{name}", name.encode())
    assert [n for n, _ in await kit.readdir("d")] == list("abcde")
    fh = await kit.opendir("d")
    first = await kit.readdir_handle(fh, 0, limit=2)
    assert [n for n, _ in first] == ["a", "b"]
    await kit.unlink("d/c")  # removed while listed: not shown
    await kit.write_file("d/f", b"f")  # added while listed
    await kit.rename("d/a", "d/z")
    rest = await kit.readdir_handle(fh, first[-1][1])
    await kit.releasedir(fh)
    assert [n for n, _ in rest] == ["d", "e"]  # nothing repeated, nothing skipped
    assert sorted(n for n, _ in await kit.readdir("d")) == ["b", "d", "e", "f", "z"]


async def test_readdir_lists_dot_and_dotdot_first_as_a_local_filesystem_does(kit):
    """``ls -a`` on the mount showed neither ``.`` nor ``..`` (nor did the shell's ``.*``); a
    resumed listing does not repeat them, and they take no lookup count."""
    await kit.mkdir("p")
    await kit.mkdir("p/d")
    for name in "ab":
        await kit.write_file(f"p/d/{name}", name.encode())
    listed = await kit.readdir("p/d", dots=True)
    assert [n for n, _ in listed] == [".", "..", "a", "b"]
    fh = await kit.opendir("p/d")
    got = []
    start = 0
    while more := await kit.readdir_handle(fh, start, limit=1, dots=True):
        got += more
        start = more[-1][1]
    await kit.releasedir(fh)
    assert got == listed  # one at a time, resumed at each offset: nothing repeated or skipped
    root = await kit.readdir("", dots=True)
    assert [n for n, _ in root][:2] == [".", ".."]
    assert [n for n, _ in await kit.readdir("p/d")] == ["a", "b"]


async def test_a_directory_handle_takes_its_entries_at_the_first_readdir_not_at_opendir(kit):
    """SQLite opens its database's directory at each commit only to fsync it: opendir lists
    nothing (sorting a large directory's entries per commit cost O(n log n))."""
    await kit.mkdir("d")
    await kit.write_file("d/a", b"a")
    fh = await kit.opendir("d")
    await kit.write_file("d/b", b"b")  # after opendir, before the first readdir
    assert [n for n, _ in await kit.readdir_handle(fh)] == ["a", "b"]
    await kit.releasedir(fh)


async def test_statfs_reports_free_space_and_the_name_limit(kit):
    s = await kit.statfs()
    assert s.f_namemax == 255
    assert 0 < s.f_bavail <= s.f_blocks and s.f_bsize > 0


async def test_statfs_counts_the_files_sizes_as_used_summed_at_most_once_a_second(kit, monkeypatch):
    """The sum over every node ran at each statfs (O(nodes): 100,000 and more in a big vault)."""
    monkeypatch.setattr("privifs.fs.filesystem.USED_EVERY", 0.0)
    before = await kit.statfs()
    await kit.write_file("counted.bin", b"x" * (1 << 20))
    after = await kit.statfs()
    used = ((after.f_blocks - after.f_bfree) - (before.f_blocks - before.f_bfree)) * after.f_frsize
    assert used == 1 << 20
    monkeypatch.setattr("privifs.fs.filesystem.USED_EVERY", 3600.0)
    await kit.write_file("later.bin", b"x" * (1 << 20))
    again = await kit.statfs()
    assert again.f_blocks - again.f_bfree == after.f_blocks - after.f_bfree  # (not summed again within the hour)


async def test_statfs_of_an_empty_mount_on_a_full_disk_still_has_a_size(kit, monkeypatch):
    """No files and no room: a total of 0 blocks made df print '-' instead of 100 % used."""
    monkeypatch.setattr(kit.fs.staging, "writable", lambda: 0)
    s = await kit.statfs()
    assert s.f_blocks >= 1 and s.f_bavail == 0


# -- status ---------------------------------------------------------------------------------------
async def test_a_status_counts_every_pending_change_and_names_the_closed_ones_first(module_account, eng, tmp_path):
    """A status named every pending change: with 27,682 files waiting after an untar it took 3.1 s
    to answer (2.6 MB), and ``privifs status`` gave up on the busy daemon as 'not answering'. It
    counts them all, and names a few: one waiting for its upload before those still open."""
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True, write_back_delay=3600) as kit:
        handles = []
        for i in range(60):
            fh = await kit.create_file(f"f{i}")
            await kit.write(fh, 0, b"x" * i)
            handles.append(fh)
        await kit.close(handles[40])
        report = kit.syncer.pending(shown=5)
        assert (report.count, report.size, len(report.shown)) == (60, sum(range(60)), 5)
        assert report.shown[0] == {"path": "/f40", "size": 40, "kind": "content", "state": "queued", "attempts": 0}
        assert {p["state"] for p in report.shown[1:]} == {"waiting for close"}
        for fh in handles:
            if fh != handles[40]:
                await kit.close(fh)


# -- a fresh filesystem -------------------------------------------------------------------------
async def test_a_filesystem_built_from_an_empty_local_state_shows_the_same_tree(kit):
    await kit.mkdir("docs")
    await kit.mkdir("docs/deep")
    await kit.mkdir("empty")
    await kit.write_file("docs/a.txt", b"alpha\n")
    await kit.write_file("docs/deep/b.bin", os.urandom(200_000))
    await kit.write_file("docs/deep/c", b"")
    await kit.symlink("docs/link", "a.txt")
    await kit.write_file("exec.sh", b"#!/bin/sh\n")
    await kit.setattr("exec.sh", mode=0o755)
    await kit.rename("docs/a.txt", "docs/a2.txt")
    await kit.settle()
    tree = await kit.tree()
    async with kit.fresh() as other:
        assert await other.tree() == tree
        for path in tree:
            mine, theirs = await kit.lookup(path), await other.lookup(path)
            assert (theirs.st_mode, theirs.st_size, theirs.st_mtime_ns) == (
                mine.st_mode,
                mine.st_size,
                mine.st_mtime_ns,
            ), path


@pytest.mark.slow
async def test_an_fsync_goes_ahead_of_a_backlog_of_closed_files(module_account, eng, tmp_path):
    """After a `git clone` onto the mount thousands of closed files wait for upload; an fsync
    must not wait behind them (it took 48 s before it got a lane of its own)."""
    async with inprocess_fs(tmp_path, *module_account, workers=1, empty_vault=True) as kit:
        resume = kit.hold_write_back()
        for i in range(150):
            await kit.write_file(f"backlog-{i:03}", b"x" * 100)
        fh = await kit.create_file("pack")
        await kit.write(fh, 0, b"the one that matters")
        resume()
        await kit.fsync(fh)
        await kit.close(fh)
        in_vault = await kit.vault_names()
        assert "pack" in in_vault
        assert sum(name.startswith("backlog-") for name in in_vault) < 50, "the fsync waited for the backlog"
        await kit.settle(timeout=120)


async def test_big_files_upload_a_few_at_a_time_while_small_files_pass_beside_them(module_account, eng, tmp_path):
    """Write-back runs many uploads at once so small files hide each other's round trips, but
    files over BIG_UPLOAD take turns for a few slots (memory and bandwidth), and a big file
    waiting for a slot holds up no small one."""
    big = BIG_UPLOAD + 1
    async with inprocess_fs(tmp_path, *module_account, workers=6, big_uploads=1, empty_vault=True) as kit:
        resume = kit.hold_write_back()
        for i in range(3):
            await kit.write_file(f"big-{i}", os.urandom(big))
        for i in range(20):
            await kit.write_file(f"small-{i:02}", b"s" * 100)
        most_big, small_beside_big = 0, 0

        async def watch() -> None:
            nonlocal most_big, small_beside_big
            while True:
                uploading = [n for n in kit.ns.nodes.values() if n.uploading]
                bigs = sum(n.size == big for n in uploading)
                most_big = max(most_big, bigs)
                if bigs:
                    small_beside_big += sum(n.size == 100 for n in uploading)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            resume()
            await kit.settle(timeout=120)
            nursery.cancel_scope.cancel()
        assert most_big == 1, f"{most_big} big files uploaded at once with one slot"
        assert small_beside_big > 0, "small files waited behind the big ones"
        names = await kit.vault_names()
        assert {f"big-{i}" for i in range(3)} | {f"small-{i:02}" for i in range(20)} <= set(names)


async def test_an_entry_whose_vault_path_would_be_too_long_is_refused_not_staged_for_good(kit):
    """The vault records a path of at most VAULT_PATH_MAX characters; deeper entries were made here
    and then rejected by every upload (HTTP 422), staying staged and missing from every other
    mount. A path of PATH_MAX from a working directory inside the drive still works (pjdfstest's
    */03.t make one: the first limit, 4096, refused them)."""
    comp = "d" * 250
    await kit.mkdir("w" * 100)
    under = ["w" * 100] + ["p" * 254] * 15 + ["q" * 254]  # 4095 bytes below the 100-character "cwd"
    for i in range(2, len(under)):
        await kit.mkdir("/".join(under[:i]))
    await kit.write_file("/".join(under), b"at PATH_MAX")
    parts = []
    while len("/" + "/".join([*parts, comp])) <= VAULT_PATH_MAX:
        parts.append(comp)
        await kit.mkdir("/".join(parts))
    deep = "/".join(parts)
    room = VAULT_PATH_MAX - len("/" + deep) - 1  # the longest name that still fits under it
    await kit.write_file(f"{deep}/{'f' * room}", b"fits")
    for make in (
        lambda: kit.mkdir(f"{deep}/{comp}"),
        lambda: kit.create_file(f"{deep}/{'g' * (room + 1)}"),
        lambda: kit.symlink(f"{deep}/{'s' * (room + 1)}", "t"),
        lambda: kit.mknod(f"{deep}/{'p' * (room + 1)}", stat.S_IFIFO | 0o644),
    ):
        with fails_with(errno.ENAMETOOLONG):
            await make()
    # a rename is checked for the deepest entry it moves: "top" holds a path 100 characters long
    await kit.mkdir("top")
    await kit.mkdir("top/" + "x" * 95)
    with fails_with(errno.ENAMETOOLONG):
        await kit.rename("top", f"{deep}/top")
    await kit.rename("top/" + "x" * 95, "top/x")
    await kit.rename("top", f"{deep}/top")  # now its deepest path fits
    await kit.settle()
    tree = await kit.vault_tree()
    assert tree[f"{deep}/{'f' * room}"] == b"fits" and f"{deep}/top/x" in tree
    assert tree["/".join(under)] == b"at PATH_MAX"


async def test_tokens_of_other_applications_with_out_of_range_meta_show_and_read(kit):
    """Another application's token with a 40-digit ``privifs.mtime`` (or an atime, uid or gid no
    kernel holds) made every listing fail and its directory give EIO to ``ls``; a symlink target
    longer than PATH_MAX made readlink EIO (the kernel refused the reply). Now such a field reads
    as absent, and readlink says ENAMETOOLONG."""
    await kit.remote.put("odd/time.txt", b"t", mtime="9" * 40, atime=str(2**64))
    await kit.remote.put("odd/owner.txt", b"o", uid="-5", gid=str(2**40))
    await kit.remote.put("odd/link", b"", type="symlink", target="x" * 8000)
    await kit.refresh()
    assert sorted(n for n, _ in await kit.readdir("odd")) == ["link", "owner.txt", "time.txt"]
    for name in ("time.txt", "owner.txt"):
        attrs = await kit.lookup(f"odd/{name}")
        assert 0 < attrs.st_mtime_ns < 2**63 and attrs.st_uid == os.getuid()
    with fails_with(errno.ENAMETOOLONG):
        await kit.readlink("odd/link")
    assert await kit.read_file("odd/time.txt") == b"t"


async def test_the_roots_attributes_stay_on_this_machine_and_leave_nothing_to_write_back(kit):
    """The mount's root has no token: a chmod or touch of it (xfstests generic/634 touches the
    mount) was written back as a marker with an empty name, which the server refuses for good."""
    await kit.setattr("", mode=0o700, atime_ns=1_000_000_000_000, mtime_ns=2_000_000_000_000)
    attrs = await kit.ops.getattr(ROOT_INO, CTX)
    assert stat.S_IMODE(attrs.st_mode) == 0o700 and attrs.st_mtime_ns == 2_000_000_000_000
    assert not kit.fs.pending()
    await kit.settle()
    assert await kit.vault_tree() == {} and not kit.syncer.refused
    with contextlib.closing(sqlite3.connect(kit.ns.index.path)) as db:  # what the next mount reads
        row = db.execute("SELECT mode, mtime_ns, meta_dirty FROM nodes WHERE ino = ?", (ROOT_INO,)).fetchone()
    assert row == (0o700, 2_000_000_000_000, 0)


async def test_utimens_beyond_what_64_bit_nanoseconds_hold_is_clamped(kit):
    """``touch -d 2500-01-01 f`` (or 1000-01-01) failed with EIO (the index could not hold the
    time), left the time in memory, and the file's write-back then failed for ever. Now the time
    is clamped to the range, as ext4 clamps to its own."""
    from types import SimpleNamespace

    from tests.fskit import CTX, setattr_fields

    await kit.write_file("t.txt", b"data")
    ino = await kit.ino("t.txt")
    fields = setattr_fields(update_atime=True, update_mtime=True)
    year_2500, year_1000 = 16_725_225_600 * 10**9, -30_610_224_000 * 10**9
    attrs = await kit.ops.setattr(ino, SimpleNamespace(st_atime_ns=year_1000, st_mtime_ns=year_2500), fields, None, CTX)
    assert (attrs.st_atime_ns, attrs.st_mtime_ns) == (-(2**63), 2**63 - 1)
    await kit.settle()
    token = await kit.remote.token("t.txt")
    assert (token.risk["privifs.mtime"], token.risk["privifs.atime"]) == (str(2**63 - 1), str(-(2**63)))
    assert await kit.read_file("t.txt") == b"data"


async def test_two_long_names_that_differ_past_255_bytes_both_show(kit):
    """Another application's tokens 'n'*300 + 'a.txt' and 'n'*300 + 'b.txt' both show as the
    name cut to 255 bytes; the second one's conflict name was cut back to that same name, and it
    never showed (on any mount)."""
    await kit.remote.put("long/" + "n" * 300 + "a.txt", b"AAA")
    await kit.remote.put("long/" + "n" * 300 + "b.txt", b"BBB")
    await kit.refresh()
    shown = [n for n, _ in await kit.readdir("long")]
    assert len(shown) == 2 and all(len(n.encode()) <= 255 for n in shown), shown
    assert sorted([await kit.read_file(f"long/{n}") for n in shown]) == [b"AAA", b"BBB"]
