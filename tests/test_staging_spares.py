"""New staged files are empty sealed files made ahead (a rename instead of a file creation on the
request path); spares hold no data, are never taken for staged files, and go at the next start.
A staged file removed "soon" is deleted on a thread of its own."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from privifs.crypto.sealed import SealedFile, local_key
from privifs.fs.staging import Staging

KEY = local_key(bytes(32))


def wait_for_spares(staging: Staging, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while staging.spares.ready() < staging.spares.SIZE:
        assert time.monotonic() < deadline, "the spare files were not made"
        time.sleep(0.01)


def test_a_new_staged_file_is_a_spare_moved_into_place(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging", KEY)
    staging.create().sealed.close()  # the first create starts the worker
    wait_for_spares(staging)
    spare_inodes = {p.stat().st_ino for p in (tmp_path / "staging" / ".spare").iterdir()}
    staged = staging.create()
    assert os.stat(staged.path).st_ino in spare_inodes
    assert Path(staged.path).parent == tmp_path / "staging"
    staged.write(0, b"hello", 1)
    staged.sealed.close()
    again = staging.open(staged.id)
    assert again.sealed.read(0, 100) == b"hello"
    assert os.stat(again.path).st_mode & 0o777 == 0o600


def test_spares_are_not_staged_files_and_a_restart_removes_them(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging", KEY)
    kept = staging.create()
    wait_for_spares(staging)
    assert staging.ids() == {kept.id}
    assert staging.usage() == os.stat(kept.path).st_blocks * 512
    restarted = Staging(tmp_path / "staging", KEY)
    assert list((tmp_path / "staging" / ".spare").iterdir()) == []
    assert restarted.ids() == {kept.id}


def test_many_creates_each_get_their_own_empty_file(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging", KEY)
    made = [staging.create() for _ in range(3 * staging.spares.SIZE)]
    assert len({s.id for s in made}) == len(made)
    assert len({os.stat(s.path).st_ino for s in made}) == len(made)
    for s in made:
        assert s.size == 0
        s.write(0, s.id.encode(), 1)
    for s in made:
        s.sealed.close()
        assert SealedFile.open(staging.path(s.id), KEY).read(0, 100) == s.id.encode()


def test_a_staged_file_removed_soon_goes_on_the_removers_thread_and_is_not_listed_meanwhile(
    tmp_path: Path, monkeypatch
) -> None:
    staging = Staging(tmp_path / "staging", KEY)
    kept, gone = staging.create(), staging.create()
    gone.write(0, b"journal", 1)
    may_go = threading.Event()
    removed_by: list[str] = []
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if str(path) == gone.path:
            assert may_go.wait(10)
            removed_by.append(threading.current_thread().name)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    staging.remove(gone, soon=True)  # returns at once: the thread waits for may_go
    assert os.path.exists(gone.path) and staging.ids() == {kept.id}
    may_go.set()
    deadline = time.monotonic() + 10
    while staging.remover.pending():
        assert time.monotonic() < deadline, "the staged file was never removed"
        time.sleep(0.01)
    assert not os.path.exists(gone.path) and removed_by == ["privifs-staged-removal"]
    assert staging.ids() == {kept.id}


def test_a_write_that_finds_no_room_waits_for_the_files_the_remover_is_deleting(tmp_path: Path, monkeypatch) -> None:
    """``rm big; write small`` on a full disk: the unlink hands the staged file to the remover's
    thread and returns; the write came before the thread deleted it and got ENOSPC (seen as a
    flaky full-disk test). Now a write that finds no room waits for those deletions first."""
    staging = Staging(tmp_path / "staging", KEY)
    big = staging.create()
    big.write(0, b"x" * 65536, 1)

    class Room:  # the disk is full but for a byte while the big staged file is there
        def above_floor(self) -> int:
            return 1 if os.path.exists(big.path) else 64 * 1024 * 1024

        def floor(self) -> int:
            return 1024 * 1024

    monkeypatch.setattr(staging, "space", Room())
    may_go = threading.Event()
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if str(path) == big.path:
            assert may_go.wait(10)
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    staging.remove(big, soon=True)  # on the thread (at the floor itself it is deleted at once)
    releaser = threading.Timer(0.2, may_go.set)
    releaser.start()
    try:
        staging.ensure_room(1024 * 1024)  # raised DiskFullError while the thread was still deleting
    finally:
        releaser.join()
    assert not os.path.exists(big.path)
