"""A staged copy of a sealed file (a cache entry about to be written, a frozen staged file) is
taken from the open file, so a cache entry evicted while it was open still gives its content."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from privifs.crypto.sealed import CHUNK, SLOT, SealedFile, local_key
from privifs.errors import DiskFullError, PrivifsError
from privifs.fs.staging import Staging

KEY = local_key(bytes(32))


def sealed_with(path: Path, data: bytes) -> SealedFile:
    sealed = SealedFile.create(path, KEY)
    sealed.write(0, data)
    sealed.sync_header()
    return sealed


def test_a_cache_entry_evicted_while_open_is_still_copied_whole(tmp_path: Path) -> None:
    data = os.urandom(3 * CHUNK + 123)
    sealed_with(tmp_path / "entry", data).close()
    entry = SealedFile.open(tmp_path / "entry", KEY)
    os.unlink(tmp_path / "entry")  # the cache evicts the entry while the filesystem holds it open
    staging = Staging(tmp_path / "staging", KEY)
    try:
        copy = staging.from_sealed(entry)
    finally:
        entry.close()
    assert copy.sealed.read(0, len(data) + 10) == data
    assert os.stat(copy.path).st_mode & 0o777 == 0o600


def test_a_clone_of_a_staged_file_has_its_content_and_leaves_it_alone(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging", KEY)
    staged = staging.create()
    staged.write(0, b"first version", 1)
    clone = staging.clone(staged)
    clone.write(0, b"FIRST", 2)
    assert clone.sealed.read(0, 100) == b"FIRST version"
    assert staged.sealed.read(0, 100) == b"first version"


def test_a_clone_of_a_sparse_file_keeps_its_holes(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging", KEY)
    staged = staging.create()
    staged.write(0, b"start", 1)
    staged.write(10 << 30, b"end", 1)  # 10 GiB on: no room is reserved for the gap
    clone = staging.clone(staged)
    assert os.stat(clone.path).st_blocks * 512 < 1 << 20  # the copy did not fill the hole
    assert clone.sealed.written_chunks() == staged.sealed.written_chunks()
    assert clone.sealed.read(0, 6) == b"start\0" and clone.sealed.read((10 << 30) - 1, 10) == b"\0end"


def test_filling_the_holes_of_a_sparse_staged_file_keeps_the_floor_free(tmp_path: Path, monkeypatch) -> None:
    staging = Staging(tmp_path / "staging", KEY)
    staged = staging.create()
    staged.write(200 << 20, b"x", 1)  # a 200 MiB file taking one slot
    monkeypatch.setattr(type(staging.space), "above_floor", lambda self: 10 * SLOT)  # (frozen: patched on its class)
    with pytest.raises(DiskFullError, match="no space left for staging"):
        staged.write(0, os.urandom(1 << 20), 2)  # 16 new slots inside the file: refused before any is written
    assert staged.sealed.written_chunks() == [((200 << 20) // CHUNK, (200 << 20) // CHUNK + 1)]


def test_a_copy_that_cannot_be_made_is_a_clear_error_and_leaves_no_file(tmp_path: Path) -> None:
    sealed_with(tmp_path / "entry", b"x" * 1000).close()
    entry = SealedFile.open(tmp_path / "entry", KEY)
    entry.close()  # its descriptor is gone: the copy cannot read it
    staging = Staging(tmp_path / "staging", KEY)
    with pytest.raises(PrivifsError, match="staging a file for writing"):
        staging.from_sealed(entry)
    assert staging.ids() == set()


class _AtTheFloor:
    """A disk with ``room`` bytes left above the floor."""

    def __init__(self, room: int) -> None:
        self.room = room

    def above_floor(self) -> int:
        return self.room

    def floor(self) -> int:
        return 4 << 20


@pytest.mark.parametrize("how", ["write far past the end", "truncate"])
def test_a_write_into_a_hole_is_held_to_the_floor_like_an_append(tmp_path: Path, how: str) -> None:
    # filling a sparse file's gap takes new disk as an append does: unchecked, it filled the disk
    # to its last byte (the floor left no room for the index: unlink and mkdir failed, ENOSPC)
    staging = Staging(tmp_path / "staging", KEY)
    staged = staging.create()
    head, block = os.urandom(CHUNK), os.urandom(CHUNK)
    staged.write(0, head, 1)
    if how == "truncate":
        staged.sealed.truncate(1 << 30, stamp=1)
    else:
        staged.write(1 << 30, b"tail", 1)
    staging.space = _AtTheFloor(1 << 20)  # 1 MiB left
    with pytest.raises(DiskFullError):
        staged.write(staged.size, bytes(4 << 20), 2)  # an append of 4 MiB: refused
    with pytest.raises(DiskFullError):
        staged.write(100 << 20, bytes(4 << 20), 2)  # 4 MiB into the hole: refused too
    staged.write(200 << 20, block, 2)  # what fits goes in
    staging.space = _AtTheFloor(100 << 10)  # less than a chunk
    with pytest.raises(DiskFullError):
        staged.write((200 << 20) + CHUNK, block, 3)  # the chunk after it, still a hole
    with pytest.raises(DiskFullError):
        staged.write(CHUNK, block, 3)  # the chunk after the first
    staging.space = _AtTheFloor(0)  # at the floor: rewriting what is on disk takes no room
    staged.write(10, b"HEAD", 3)
    staged.write(200 << 20, block[::-1], 3)
    assert staged.sealed.read(0, CHUNK) == head[:10] + b"HEAD" + head[14:]
    assert staged.sealed.read(200 << 20, CHUNK) == block[::-1]
    assert staged.sealed.read((200 << 20) + CHUNK, CHUNK) == bytes(CHUNK)


def test_a_write_that_lengthens_a_short_chunk_inside_a_sparse_file_is_held_to_the_floor(tmp_path: Path) -> None:
    # a sparse image written 4 KiB at a time: the first write into each chunk leaves it short (its
    # slot's data ends after 4 KiB, the rest of the slot a hole); the next writes lengthen it and
    # take new blocks, as a write into a never-written slot does (review helper h-zs)
    staging = Staging(tmp_path / "staging", KEY)
    staged = staging.create()
    staged.sealed.truncate(100 * CHUNK, stamp=1)
    for k in range(0, 100, 10):
        staged.write(k * CHUNK, os.urandom(4096), 1)  # short chunks inside the file
    staging.space = _AtTheFloor(0)  # at the floor
    for k in range(0, 100, 10):
        with pytest.raises(DiskFullError):
            staged.write(k * CHUNK + 4096, os.urandom(CHUNK - 4096), 2)  # 60 KiB more of slot k on disk
    staged.write(10 * CHUNK + 100, b"rewrite", 2)  # within what is on disk: no room needed
    staged.write(20 * CHUNK + 4096, b"x" * 100, 2)  # lengthens the chunk within its last block on disk
    assert staged.sealed.read(10 * CHUNK + 100, 7) == b"rewrite"
