"""``--fsync local`` flushes what the change needs and nothing else, in-process (real index,
staging and disk; no engine, no kernel): the staged file always, the staging directory while the
file's name may not be on disk yet, the index's WAL while the node's row has a write no flush
covered (for fdatasync: a write of more than its times); an fsync of a directory flushes the index
when it has writes no flush covered."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

from privifs.crypto.sealed import local_key
from privifs.fs import localsync
from privifs.fs.namespace import Index, Namespace
from privifs.fs.staging import Staging
from privifs.fs.tokenmeta import KIND_FILE


@pytest.fixture
def local(tmp_path, monkeypatch):
    """A namespace, staging and index as a mount has them, and the list of what each fsync
    flushed (paths, the staged file by its path)."""
    index = Index(tmp_path / "index.sqlite3")
    ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
    staging = Staging(tmp_path / "staging", local_key(secrets.token_bytes(32)))
    flushed: list[set[Path]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed[-1].add(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(localsync.os, "fsync", recording_fsync)
    fs = SimpleNamespace(index=index, staging=staging, sync=None)

    def fsync(node, datasync: bool = False) -> set[Path]:
        flushed.append(set())
        trio.run(localsync.fsync_locally, fs, node, datasync)
        return flushed[-1]

    def fsyncdir() -> set[Path]:
        flushed.append(set())
        trio.run(localsync.flush_index, index)
        return flushed[-1]

    def new_file(name: str):
        node = ns.new_node(ns.root, name, KIND_FILE, 0o644)
        ns.set_staged(node, staging.create())
        index.save(node)
        return node

    yield SimpleNamespace(ns=ns, index=index, staging=staging, fsync=fsync, fsyncdir=fsyncdir, new_file=new_file)
    index.close()


def _write(local, node, offset: int, data: bytes) -> None:
    now = time.time_ns()
    node.staged.write(offset, data, now)
    local.ns.set_attributes(node, size=node.staged.size, mtime_ns=now, ctime_ns=now)


def test_the_first_fsync_of_a_new_file_flushes_it_its_directory_and_the_index(local):
    node = local.new_file("journal")
    _write(local, node, 0, b"x" * 5000)
    assert local.fsync(node, datasync=True) == {
        Path(node.staged.path),
        Path(local.staging.dir),
        local.index.wal_path,
    }


def test_writes_after_the_first_fsync_need_no_index_write_nor_flush(local):
    """The size and times a write changes are in the staged file's header (flushed with it), and
    a restart takes them from there: neither fsync nor fdatasync commits them to the index."""
    node = local.new_file("db")
    _write(local, node, 0, b"a" * 5000)
    local.fsync(node)
    writes = local.index.writes
    _write(local, node, 100, b"b" * 100)  # the size stays; only the times change
    assert local.fsync(node, datasync=True) == {Path(node.staged.path)}
    _write(local, node, 200, b"c" * 100)
    assert local.fsync(node) == {Path(node.staged.path)}
    _write(local, node, 5000, b"d" * 5000)  # it grows
    assert local.fsync(node, datasync=True) == {Path(node.staged.path)}
    assert local.index.writes == writes
    assert node.staged.sealed.size == 10_000 and node.staged.sealed.stamp == node.mtime_ns  # in the header


def test_a_saved_change_of_more_than_size_and_times_is_flushed_by_fdatasync(local):
    node = local.new_file("db")
    _write(local, node, 0, b"a" * 5000)
    local.fsync(node)
    local.ns.set_attributes(node, size=7000)
    local.index.save(node)  # a size change alone (a close saves it): the header has it
    assert local.fsync(node, datasync=True) == {Path(node.staged.path)}
    assert local.index.wal_path in local.fsync(node)  # fsync covers every write of the row
    local.ns.set_attributes(node, mode=0o600)
    local.index.save(node)
    assert local.fsync(node, datasync=True) == {Path(node.staged.path), local.index.wal_path}


def test_another_files_unflushed_row_does_not_make_this_fsync_flush_the_index(local):
    a, b = local.new_file("a"), local.new_file("b")
    local.fsync(a)
    local.fsync(b)
    _write(local, b, 0, b"new")
    local.index.save(b)  # b's row changes (a close would do this), unflushed
    assert local.fsync(a) == {Path(a.staged.path)}
    assert local.index.wal_path in local.fsync(b)


def test_rows_written_before_the_first_local_fsync_count_as_unflushed(local):
    nodes = [local.new_file(f"f{i}") for i in range(3)]  # saved before anything tracked writes
    assert local.index.wal_path in local.fsync(nodes[0])
    assert local.fsync(nodes[1]) == {Path(nodes[1].staged.path), Path(local.staging.dir)}
    assert local.index.row_flushed(nodes[2].ino)


def test_a_staged_file_made_as_a_copy_has_its_directory_flushed(local):
    node = local.new_file("a")
    _write(local, node, 0, b"a" * 100)
    local.fsync(node)
    node.staged.freeze()
    copy = local.staging.clone(node.staged)
    local.ns.set_staged(node, copy)
    assert Path(local.staging.dir) in local.fsync(node)


def test_fsync_of_a_directory_flushes_the_index_after_a_change_and_only_then(local):
    node = local.new_file("tmp")
    local.fsync(node)
    assert local.fsyncdir() == set()
    local.ns.move(node, local.ns.root, "final")  # what a rename records
    local.index.save(node)
    assert local.fsyncdir() == {local.index.wal_path}
    assert local.fsyncdir() == set()
