"""The local at-rest format: random writes, truncates and reads against an in-memory model;
tampering, swapping and truncation of chunks are detected; no plaintext reaches the disk."""

from __future__ import annotations

import os
import random

import pytest

from privifs.crypto.sealed import CHUNK, EDGE_SLOTS, HEADER, OVERHEAD, SLOT, SealedFile, local_key
from privifs.errors import IntegrityError, LocalStoreError
from privifs.zeros import all_zero
from tests.fskit import chunk_writes_refused

KEY = local_key(bytes(32))


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_match_a_model(tmp_path, seed):
    rng = random.Random(seed)
    f = SealedFile.create(tmp_path / "f", KEY)
    model = bytearray()
    for _ in range(150):
        op = rng.random()
        if op < 0.6:
            off = rng.randrange(0, 4 * CHUNK)
            data = rng.randbytes(rng.choice([1, 7, 100, CHUNK - 1, CHUNK, CHUNK + 3, 3 * CHUNK]))
            if rng.random() < 0.3:  # zeros: into holes they write nothing, over data they must
                data = bytes(len(data))
            f.write(off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        elif op < 0.8:
            size = rng.randrange(0, 5 * CHUNK)
            f.truncate(size)
            model = model[:size] + bytearray(max(0, size - len(model)))
        else:
            off = rng.randrange(0, 5 * CHUNK)
            n = rng.randrange(0, 2 * CHUNK)
            assert f.read(off, n) == bytes(model[off : off + n])
        assert f.size == len(model)
    f.sync_header()
    f.close()
    g = SealedFile.open(tmp_path / "f", KEY)
    assert g.size == len(model)
    assert b"".join(g.chunks()) == bytes(model)


def test_a_stamped_write_leaves_the_header_current_without_a_sync(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"x" * 1000, stamp=111)  # within chunk 0: header and chunk in one pwrite
    assert os.path.getsize(tmp_path / "f") == HEADER + 1000 + 32
    g = SealedFile.open(tmp_path / "f", KEY)
    assert (g.size, g.stamp, g.read(0, 2000)) == (1000, 111, b"x" * 1000)
    f.write(2 * CHUNK, b"far", stamp=222)  # past chunk 0: the header follows on its own
    f.truncate(2 * CHUNK + 2, stamp=333)
    f.write(10, b"y", stamp=444)  # overwrites keep the size and move the stamp
    g = SealedFile.open(tmp_path / "f", KEY)
    assert (g.size, g.stamp) == (2 * CHUNK + 2, 444)
    assert g.read(0, 3 * CHUNK) == b"x" * 10 + b"y" + b"x" * 989 + bytes(2 * CHUNK - 1000) + b"fa"
    f.write(0, b"z")  # no stamp (a cache entry being filled): the header waits for a sync
    assert SealedFile.open(tmp_path / "f", KEY).stamp == 444


def test_small_files_are_small_and_holes_read_as_zeros(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"tiny")
    assert os.path.getsize(tmp_path / "f") == HEADER + 4 + 32
    f.write(3 * CHUNK, b"far")
    assert f.read(0, 3 * CHUNK + 3) == b"tiny" + bytes(3 * CHUNK - 4) + b"far"


def test_plaintext_never_reaches_the_disk(tmp_path):
    canary = b"CANARY-" + os.urandom(8).hex().encode()
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, canary * 5000)
    f.write(123, canary)
    f.close()
    assert canary not in (tmp_path / "f").read_bytes()


def test_tampering_swapping_and_truncation_are_detected(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, os.urandom(3 * CHUNK))
    f.sync_header()
    f.close()
    raw = bytearray((tmp_path / "f").read_bytes())
    flipped = bytearray(raw)
    flipped[HEADER + 100] ^= 1
    (tmp_path / "g").write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError):
        SealedFile.open(tmp_path / "g", KEY).read(0, 10)
    swapped = (
        raw[:HEADER] + raw[HEADER + SLOT : HEADER + 2 * SLOT] + raw[HEADER : HEADER + SLOT] + raw[HEADER + 2 * SLOT :]
    )
    (tmp_path / "h").write_bytes(bytes(swapped))
    with pytest.raises(IntegrityError):
        SealedFile.open(tmp_path / "h", KEY).read(0, 10)
    (tmp_path / "i").write_bytes(bytes(raw[:-100]))
    with pytest.raises(IntegrityError):
        SealedFile.open(tmp_path / "i", KEY).read(2 * CHUNK, 10)
    with pytest.raises(IntegrityError):
        SealedFile.open(tmp_path / "f", local_key(b"\1" * 32)).read(0, 10)


def test_partial_writes_of_one_chunk_start_from_the_plaintext_the_last_one_made(tmp_path, monkeypatch):
    """SQLite writes 4 KiB pages into 64 KiB chunks and appends a few bytes at a time to its
    journal: a partial write of the chunk the last partial write made reads nothing back."""
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"a" * 100_000, stamp=1)  # chunk 0 whole, chunk 1 partly: the last partial write
    reads: list[int] = []
    real_read_chunk = SealedFile.read_chunk

    def read_chunk(self, index):
        reads.append(index)
        return real_read_chunk(self, index)

    monkeypatch.setattr(SealedFile, "read_chunk", read_chunk)
    f.write(70_000, b"b" * 4096, stamp=2)  # chunk 1: from memory
    f.write(80_000, b"c" * 4096, stamp=3)
    f.write(100_000, b"d" * 4, stamp=4)  # appended to chunk 1
    f.write(10, b"e" * 10, stamp=5)  # chunk 0: read once
    f.write(20, b"f" * 10, stamp=6)
    assert reads == [0]
    f.truncate(75_000)
    f.write(74_000, b"g" * 10)  # the truncate read the chunk it cut, and the write reads it again
    assert reads == [0, 1, 1]
    expected = bytearray(b"a" * 100_000)
    expected[70_000:74_096] = b"b" * 4096
    expected[80_000:84_096] = b"c" * 4096
    expected += b"d" * 4
    expected[10:20] = b"e" * 10
    expected[20:30] = b"f" * 10
    expected = expected[:75_000]
    expected[74_000:74_010] = b"g" * 10
    f.close()
    again = SealedFile.open(tmp_path / "f", KEY)
    assert again.read(0, 200_000) == bytes(expected)


def test_written_chunks_are_found_without_reading_the_holes(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    assert f.written_chunks() == []
    f.truncate(1 << 34)  # 16 GiB, all hole
    assert f.written_chunks() == []
    f.write(5, b"a")
    f.write(1000 * CHUNK + CHUNK - 1, b"bc")  # the end of chunk 1000 and the start of 1001
    f.write(200_000 * CHUNK, b"z")
    assert f.written_chunks() == [(0, 1), (1000, 1002), (200_000, 200_001)]
    # a slot written with zero bytes on disk (a copy that did not keep holes) is still no data
    os.pwrite(f.fd, bytes(SLOT), HEADER + 5000 * SLOT)
    assert f.written_chunks() == [(0, 1), (1000, 1002), (200_000, 200_001)]
    assert f.read(200_000 * CHUNK - 1, 3) == b"\0z\0"


def test_a_read_of_a_gap_on_disk_is_answered_without_reading_it(tmp_path, monkeypatch):
    """A sparse file's gap reads as zeros from one lseek, not by reading zeros into the page
    cache; the data on each side of it, and a range across its edge, read as written. Where the
    filesystem's holes are not trusted, the gap is read (and still reads as zeros)."""
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"head")
    f.write(300 * CHUNK + 7, b"tail")
    reads = []
    real_preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: reads.append(at) or real_preadv(fd, bufs, at))
    assert f.read(10 * CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
    assert f.read(298 * CHUNK + 5, 3) == bytes(3)
    assert reads == []  # (the slot before the data's shares a disk block with it: that one is read)
    assert f.read(0, 6) == b"head\0\0"
    assert f.read(300 * CHUNK - 2, 13) == bytes(9) + b"tail"
    assert len(reads) == 2
    f.sync_header()
    g = SealedFile.open(tmp_path / "f", KEY)
    monkeypatch.setattr("privifs.crypto.sealed._seek_data_reliable", lambda dev: False)
    assert g.read(10 * CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
    assert len(reads) == 3


def test_all_zero_tells_zeros_from_data_anywhere_in_any_length():
    assert all_zero(b"") and all_zero(bytes(1)) and all_zero(bytearray(5 * 65536 + 3))
    for n in (1, 65536, 65537, 4 * 1024 * 1024):
        for at in {0, n // 2, n - 1}:
            data = bytearray(n)
            data[at] = 1
            assert not all_zero(data) and not all_zero(memoryview(data))
    assert all_zero(memoryview(bytes(200_000))[3:150_000])


def test_zeros_written_into_holes_leave_them_holes_and_zeros_over_data_are_written(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, bytes(3 * CHUNK + 5), stamp=7)  # dd if=/dev/zero: nothing but the header on disk
    assert f.size == 3 * CHUNK + 5 and f.written_chunks() == [] and os.path.getsize(tmp_path / "f") == HEADER
    assert SealedFile.open(tmp_path / "f", KEY).size == 3 * CHUNK + 5  # the header has the size and stamp
    f.truncate(10 * CHUNK)
    f.write(6 * CHUNK + 100, b"\0")  # posix_fallocate's fallback: a zero byte into a hole inside the file
    f.write(8 * CHUNK, bytes(CHUNK))
    assert f.written_chunks() == []
    f.write(CHUNK + 10, b"data")
    f.write(CHUNK, bytes(CHUNK))  # zeros over data are data
    f.write(2 * CHUNK + 10, b"xy")
    f.write(2 * CHUNK + 10, b"\0\0")
    assert f.read(CHUNK, 2 * CHUNK) == bytes(2 * CHUNK)
    assert f.written_chunks() == [(1, 3)]


def test_what_a_crash_left_past_the_recorded_size_is_trimmed_and_never_shows_again(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"a" * (CHUNK + 10), stamp=1)
    f.write(CHUNK + 10, b"LOST" * 100)  # no stamp: the header still says CHUNK + 10, as after a crash
    f.write(5 * CHUNK, b"GONE")
    f.close()
    g = SealedFile.open(tmp_path / "f", KEY, writable=True)
    assert g.size == CHUNK + 10
    g.trim()
    assert os.path.getsize(tmp_path / "f") == HEADER + SLOT + OVERHEAD + 10
    g.truncate(6 * CHUNK)
    g.write(5 * CHUNK, bytes(8))  # zeros into what is a hole again
    assert g.read(0, 6 * CHUNK) == b"a" * (CHUNK + 10) + bytes(5 * CHUNK - 10)


def test_a_write_that_fails_halfway_leaves_nothing_past_the_end(tmp_path, monkeypatch):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"a" * 10, stamp=1)
    with chunk_writes_refused(monkeypatch, 3), pytest.raises(LocalStoreError):
        f.write(CHUNK, b"B" * (4 * CHUNK), stamp=2)  # chunks 1 and 2 written, 3 fails
    assert f.size == 10 and os.path.getsize(tmp_path / "f") <= HEADER + OVERHEAD + 10
    f.write(CHUNK, bytes(CHUNK))  # zeros into what must be a hole again
    f.truncate(4 * CHUNK)
    assert f.read(0, 4 * CHUNK) == b"a" * 10 + bytes(4 * CHUNK - 10)


def test_on_a_filesystem_whose_holes_are_not_trusted_everything_is_data(tmp_path, monkeypatch):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(100 * CHUNK, b"x")
    assert f.written_chunks() == [(100, 101)]
    monkeypatch.setattr("privifs.crypto.sealed._seek_data_reliable", lambda dev: False)
    # the whole file is one extent: only EDGE_SLOTS never-written slots are looked for at its start
    assert f.written_chunks() == [(EDGE_SLOTS, 101)]


@pytest.mark.parametrize("then", ["write past the end in the same chunk", "truncate up"])
def test_a_failed_write_whose_cut_also_failed_never_shows_its_bytes(tmp_path, monkeypatch, then):
    # on a copy-on-write filesystem at ENOSPC (or on EIO) the cut that follows a failed write may
    # itself fail to rewrite the last chunk shorter: what the failed write left past the end must
    # still never read as the file's (review helper h-zs)
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"a" * 100, stamp=1)
    # chunks 0 and 1 written, then nothing more: chunk 2 and the cut's rewrite are refused
    with chunk_writes_refused(monkeypatch, 3, later_too=True), pytest.raises(LocalStoreError):
        f.write(50, b"B" * (3 * CHUNK), stamp=2)
    assert f.size == 100
    if then == "truncate up":
        f.truncate(3 * CHUNK, stamp=3)
        expected = b"a" * 50 + b"B" * 50 + bytes(3 * CHUNK - 100)
    else:
        f.write(300, b"c", stamp=3)
        expected = b"a" * 50 + b"B" * 50 + bytes(200) + b"c"
    assert f.read(0, 3 * CHUNK) == expected


def test_a_write_of_nothing_past_the_end_makes_the_file_no_longer(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, b"abc")
    assert f.write(100, b"") == 0 and f.size == 3


def test_a_header_whose_size_or_time_changed_on_disk_does_not_authenticate(tmp_path):
    """The size in a staged file's header was not authenticated: one edited on the disk was
    served and uploaded, cut short or with zeros added (helper hX). A header that does not
    authenticate is refused; a staged file's (``recover``) takes its size from its last chunk.
    A header written before the MAC (16 zero bytes) still opens."""
    f = SealedFile.create(tmp_path / "f", KEY)
    data = os.urandom(3 * CHUNK + 100)
    f.write(0, data, stamp=5)
    f.close()
    raw = (tmp_path / "f").read_bytes()
    for offset, value in ((32, 100_000), (32, len(data) + 1), (40, 6)):  # the size, twice; the stamp
        edited = bytearray(raw)
        edited[offset : offset + 8] = value.to_bytes(8, "little")
        (tmp_path / "f").write_bytes(bytes(edited))
        with pytest.raises(IntegrityError):
            SealedFile.open(tmp_path / "f", KEY)
        g = SealedFile.open(tmp_path / "f", KEY, writable=True, recover=True)
        assert g.size == len(data) and g.read(0, len(data) + 10) == data
        g.close()
        assert SealedFile.open(tmp_path / "f", KEY).size == len(data)  # its header was written again
    legacy = bytearray(raw)
    legacy[48:64] = bytes(16)
    (tmp_path / "f").write_bytes(bytes(legacy))
    assert SealedFile.open(tmp_path / "f", KEY).read(0, len(data)) == data


def test_a_sealed_file_copied_or_moved_to_another_place_is_refused_there(tmp_path):
    """A staged file copied over another's name, or a cache entry's file swapped with another's,
    was served and uploaded as that file's (helper hX). Each file is bound to its place (its
    name, or the place given, such as a cache entry's token), and refused elsewhere, even with
    ``recover``; moved on purpose (``move_to``), it is bound to its new place."""
    a = SealedFile.create(tmp_path / "a", KEY)
    a.write(0, b"content of a", stamp=1)
    a.close()
    b = SealedFile.create(tmp_path / "b", KEY, place="token-b")
    b.write(0, b"content of b", stamp=1)
    b.close()
    assert SealedFile.open(tmp_path / "b", KEY, place="token-b").read(0, 100) == b"content of b"
    (tmp_path / "c").write_bytes((tmp_path / "a").read_bytes())
    with pytest.raises(IntegrityError):
        SealedFile.open(tmp_path / "c", KEY, writable=True, recover=True)
    with pytest.raises(IntegrityError):
        SealedFile.open(tmp_path / "b", KEY, place="token-a")
    os.rename(tmp_path / "a", tmp_path / "d")
    d = SealedFile.open(tmp_path / "d", KEY, writable=True, place="a")
    d.move_to(tmp_path / "d")
    d.close()
    assert SealedFile.open(tmp_path / "d", KEY).read(0, 100) == b"content of a"
