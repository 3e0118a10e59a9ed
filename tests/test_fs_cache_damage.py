"""A cached whole file whose cache entry was damaged on the local disk reads as EIO (once: the
entry is dropped and downloaded again) or as its content, never as other bytes: a slot of
zeros or one past a cut-off end is a hole in the sealed format (read as zeros), and the size in
an entry's header is not authenticated."""

from __future__ import annotations

import errno
import os

import pyfuse3
import pytest

from privifs.crypto.sealed import CHUNK, HEADER, SLOT
from tests.fskit import inprocess_fs

KEY = bytes(range(32))


def damage_entry(path: str, damage: str) -> None:
    with open(path, "r+b") as f:
        if damage == "zeroed":
            f.seek(HEADER + SLOT)
            f.write(bytes(SLOT))  # chunk 1: a slot of zeros
        elif damage == "cut":
            f.truncate(HEADER + SLOT)  # chunks 1 on gone
        else:  # the size in its header, 1000 bytes short
            f.seek(32)
            size = int.from_bytes(f.read(8), "little")
            f.seek(32)
            f.write((size - 1000).to_bytes(8, "little"))


@pytest.mark.parametrize("damage", ["zeroed", "cut", "size"])
async def test_a_downloaded_files_damaged_cache_entry_reads_as_eio_or_its_content_never_other_bytes(
    account, tmp_path, damage
):
    data = os.urandom(5 * CHUNK + 123)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await t.write_file("/f.bin", data)
        await t.wait_idle()
        token = t.node("/f.bin").token
        t.fs.cache.evict(token)  # read as another machine would: downloaded into the cache
        assert await t.read_file("/f.bin") == data
        sealed = t.fs.cache.open(token)
        path = sealed.path
        sealed.close()
        damage_entry(path, damage)
        got = []
        for _ in range(2):
            try:
                got.append(await t.read_file("/f.bin"))
            except pyfuse3.FUSEError as exc:
                got.append(exc.errno)
        assert all(g in (data, errno.EIO) for g in got), [g if isinstance(g, int) else len(g) for g in got]
        assert got[-1] == data  # downloaded again
        assert t.node("/f.bin").size == len(data)


@pytest.mark.parametrize("first", ["truncate", "write"])
async def test_a_downloaded_file_given_holes_afterwards_reads_them_as_zeros_from_the_cache(account, tmp_path, first):
    """A download's entry says every chunk of it is written; a write to the file stages a copy
    of that entry as it is, and holes made in the copy (a file grown by a truncate, a write past
    the end) are the file's, read as zeros once it is uploaded and cached again."""
    data = os.urandom(5 * CHUNK + 123)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await t.write_file("/f.bin", data)
        await t.wait_idle()
        t.fs.cache.evict(t.node("/f.bin").token)
        assert await t.read_file("/f.bin") == data  # a download: its entry says it has no hole
        fh = await t.open_file("/f.bin", os.O_RDWR)
        if first == "truncate":
            await t.truncate(fh, 20 * CHUNK)
            await t.write(fh, 12 * CHUNK, b"x")
        else:
            await t.write(fh, 12 * CHUNK, b"x")
            await t.truncate(fh, 20 * CHUNK)
        await t.close(fh)
        await t.wait_idle()
        want = data + bytes(12 * CHUNK - len(data)) + b"x" + bytes(8 * CHUNK - 1)
        token = t.node("/f.bin").token
        assert t.fs.cache.holds(token)  # the staged file became its entry
        assert await t.read_file("/f.bin") == want
        sealed = t.fs.cache.open(token)
        assert not sealed.dense and sealed.read(0, 20 * CHUNK) == want
        sealed.close()


def test_verify_repair_takes_a_downloaded_entry_with_a_chunk_zeroed_for_damage_not_zeros(tmp_path):
    """`privifs verify --data --repair` stores a token again from this machine's cached copy,
    checked by its digest where the token states one (another application's token states none):
    a download's entry with a chunk zeroed must read as damage there too, never as zeros."""
    from privifs.cli.verify_cmd import cached_copy
    from privifs.crypto.sealed import SealedFile, local_key
    from privifs.errors import IntegrityError
    from privifs.fs.cache import ContentCache

    data = os.urandom(3 * CHUNK)
    cache = ContentCache(tmp_path / "cache", 1 << 30, local_key(KEY))
    try:
        f = SealedFile.create(tmp_path / "dl", local_key(KEY))
        for i in range(3):
            f.write_chunk(i, data[i * CHUNK : (i + 1) * CHUNK])
        f.size, f.dense = len(data), True  # as a download finishes (SealedSink.finish)
        f.write_header()
        f.close()
        assert cache.adopt("tok", str(tmp_path / "dl"))
        entry = cache.open("tok")
        path = entry.path
        entry.close()
    finally:
        cache.close()
    damage_entry(path, "zeroed")
    sealed = cached_copy(tmp_path / "cache", "tok", KEY)
    try:
        with pytest.raises(IntegrityError):
            list(sealed.chunks())
    finally:
        sealed.close()
