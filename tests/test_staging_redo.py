"""The redo record: a daemon killed in the middle of rewriting a chunk of a staged file (the
kernel stops a page-cache write between two pages on SIGKILL) loses nothing; the next mount's
staging completes the rewrite from the record. Here the kill is a child process that writes
part of the in-place slot (some of its pages) and dies, as the daemon under ``kill -9``."""

from __future__ import annotations

import errno
import os

import pytest

from privifs.crypto.sealed import CHUNK, HEADER, SLOT, SealedFile, local_key
from privifs.errors import IntegrityError
from privifs.fs.staging import Staging

KEY = local_key(bytes(32))


def torn_in_child(directory, staged_id: str, offset: int, data: bytes, keep: int) -> None:
    """Write ``data`` at ``offset`` into the staged file in a child process whose in-place slot
    write puts only its first ``keep`` bytes on disk before the child dies (``keep`` None: it
    dies before the in-place write, after the record)."""
    pid = os.fork()
    if pid == 0:  # (the child never returns into pytest)
        try:
            staging = Staging(directory, KEY)
            f = staging.open(staged_id)
            real = os.pwrite

            def dying(fd, buf, at):
                if fd == f.sealed.fd and len(buf) > HEADER:  # a slot (with the header, at chunk 0)
                    if keep:
                        real(fd, memoryview(buf)[:keep], at)
                    os._exit(0)
                return real(fd, buf, at)

            os.pwrite = dying
            f.write(offset, data, 5)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child did not die in its in-place write"


def staged_with(directory, content: bytes) -> str:
    staging = Staging(directory, KEY)
    f = staging.create()
    f.write(0, content, 1)
    f.sealed.close()
    return f.id


@pytest.mark.parametrize("keep", [0, 4096, 8192, SLOT - 4096])
@pytest.mark.parametrize("offset, length", [(CHUNK + 100, 4096), (2 * CHUNK, CHUNK), (10, 3000)])
def test_a_rewrite_a_kill_cut_short_is_completed_by_the_next_staging(tmp_path, keep, offset, length):
    old = os.urandom(3 * CHUNK + 500)
    staged_id = staged_with(tmp_path, old)
    new = os.urandom(length)
    torn_in_child(tmp_path, staged_id, offset, new, keep)
    f = SealedFile.open(tmp_path / staged_id, KEY)
    index = offset // CHUNK
    if keep:
        with pytest.raises(IntegrityError):  # half new, half old: it no longer authenticates
            f.read_chunk(index)
    f.close()
    staging = Staging(tmp_path, KEY)  # the next mount
    f = staging.open(staged_id)
    want = bytearray(old)
    if keep:  # begun in place: completed whole; not begun (killed after the record): not done
        want[offset : offset + length] = new
    assert f.sealed.read(0, len(old)) == bytes(want)  # and every byte outside it is kept
    f.sealed.close()


def test_a_record_the_kill_cut_short_leaves_the_chunk_as_it_was(tmp_path):
    old = os.urandom(2 * CHUNK)
    staged_id = staged_with(tmp_path, old)
    torn_in_child(tmp_path, staged_id, CHUNK + 5, os.urandom(1000), 0)  # the record written, nothing in place
    record = tmp_path / ".redo" / "record"
    data = record.read_bytes()
    record.write_bytes(data[: len(data) // 2])  # as if the kill had cut the record itself
    f = Staging(tmp_path, KEY).open(staged_id)
    assert f.sealed.read(0, len(old)) == old
    f.sealed.close()


def test_a_stale_record_never_overwrites_a_readable_chunk(tmp_path):
    old = os.urandom(2 * CHUNK)
    staged_id = staged_with(tmp_path, old)
    staging = Staging(tmp_path, KEY)
    f = staging.open(staged_id)
    f.write(100, b"first", 2)  # recorded, then written whole
    f.write(100, b"again", 3)  # a later write of the same chunk
    f.sealed.close()
    g = Staging(tmp_path, KEY).open(staged_id)
    assert g.sealed.read(100, 5) == b"again"
    g.sealed.close()


def test_appends_and_new_files_write_no_record(tmp_path):
    staging = Staging(tmp_path, KEY)
    f = staging.create()
    f.write(0, b"x" * CHUNK, 1)  # a new file: its chunk held nothing
    f.write(CHUNK, b"y" * 1000, 2)  # appends past the recorded size, from a chunk's start
    f.write(CHUNK + 1000, b"y" * (2 * CHUNK), 2)  # (this one rewrites chunk 1 from its 1000th byte …)
    assert (tmp_path / ".redo" / "record").exists()  # (… which held data: recorded)
    recorded = (tmp_path / ".redo" / "record").read_bytes()
    f.write(5 * CHUNK, b"w" * CHUNK, 4)  # past the recorded size (a gap before it): nothing at stake
    assert (tmp_path / ".redo" / "record").read_bytes() == recorded
    f.write(10, b"z", 3)  # a rewrite of a chunk holding data
    assert (tmp_path / ".redo" / "record").read_bytes() != recorded
    assert staging.ids() == {f.id}  # the record is not a staged file
    f.sealed.close()


def test_a_long_rewrite_the_disk_refuses_as_o_direct_is_recorded_as_a_short_one(tmp_path, monkeypatch):
    # a device that takes O_DIRECT at open and refuses the write (EINVAL): the run goes through
    # the page cache, where a kill can cut a chunk between pages, so each rewrite is recorded
    old = os.urandom(8 * CHUNK)
    staged_id = staged_with(tmp_path, old)
    f = Staging(tmp_path, KEY).open(staged_id)
    f.sealed._direct()
    real = os.pwrite
    recorded: list[int] = []

    def picky(fd, buf, at):
        if fd == f.sealed._direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        if fd != f.sealed.fd and len(buf) > SLOT:  # the record: its head, then the slot
            recorded.append(at)
        return real(fd, buf, at)

    monkeypatch.setattr(os, "pwrite", picky)
    new = os.urandom(6 * CHUNK)
    f.write(CHUNK, new, 2)
    monkeypatch.setattr(os, "pwrite", real)
    assert len(recorded) == 6 and f.sealed._direct_fd < 0
    assert f.sealed.read(0, len(old)) == old[:CHUNK] + new + old[7 * CHUNK :]
    f.sealed.close()
