"""Sparse files, in-process (tests/fskit.py) against the real engine, with the real part size: a
write far past the end or a truncate that extends a file reserves no disk for the gap and
uploads nothing for it (its parts are holes in the manifest, docs/format.md), the file reads
back whole on another client, a write into a hole uploads that part alone, and a file past the
size limit is EFBIG as on ext4."""

from __future__ import annotations

import errno
import os

from privifs.fs.filesystem import MAX_FILE_SIZE
from privifs.parts import format as fmt
from privifs.parts.store import PART_SIZE, PartStore, is_part
from tests.fskit import fails_with, inprocess_fs

KEY = bytes(range(32))
GiB = 1 << 30


async def parts_in_vault(t) -> list:
    return [i async for i in t.client.tokens.list() if is_part(i)]


async def manifest_of(t, path: str) -> fmt.Manifest:
    return await PartStore(t.fs.vault).manifest(t.node(path).token)


async def read_at(t, path: str, offset: int, size: int) -> bytes:
    fh = await t.open_file(path, os.O_RDONLY)
    try:
        return await t.read(fh, offset, size)
    finally:
        await t.close(fh)


async def test_a_write_far_past_the_end_uploads_only_the_part_it_wrote(account, tmp_path):
    far = 100 * GiB
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh = await t.create_file("disk.img")
        assert await t.write(fh, 0, b"head") == 4
        assert await t.write(fh, far, b"tail") == 4  # no room is reserved for the 100 GiB between
        await t.fsync(fh)
        await t.close(fh)
        await t.settle()
        # the staged file took a few blocks, not 100 GiB, and the cache (64 MiB) keeps it as that
        assert t.fs.staging.usage() < 16 * 1024 * 1024
        assert t.fs.cache.holds(t.node("disk.img").token) and t.fs.cache.used < 16 * 1024 * 1024
        m = await manifest_of(t, "disk.img")
        assert m.total == far + 4 and m.version == 2
        data_parts = [i for i, p in enumerate(m.parts) if not p.is_hole]
        assert data_parts == [0, far // PART_SIZE]
        assert len(await parts_in_vault(t)) == 2 and t.syncer.parts.parts_uploaded == 2
        async with t.fresh() as other:  # another client, nothing cached: reads what was written
            assert await read_at(other, "disk.img", 0, 8) == b"head" + bytes(4)
            assert await read_at(other, "disk.img", 50 * GiB, 1 << 20) == bytes(1 << 20)
            assert await read_at(other, "disk.img", far - 4, 100) == bytes(4) + b"tail"
            assert other.fs.cache.downloads == 2  # the two parts it read; none for the holes


async def test_a_file_extended_by_truncate_is_stored_as_holes_alone(account, tmp_path):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh = await t.create_file("vm.raw")
        await t.setattr(fh=fh, size=20 * GiB)
        await t.fsync(fh)
        await t.close(fh)
        await t.settle()
        m = await manifest_of(t, "vm.raw")
        assert m.total == 20 * GiB and all(p.is_hole for p in m.parts) and m.tokens() == []
        assert await parts_in_vault(t) == [] and t.syncer.parts.parts_uploaded == 0
        assert (await t.lookup("vm.raw")).st_size == 20 * GiB
        assert await read_at(t, "vm.raw", 7 * GiB, 4096) == bytes(4096)


async def test_writing_into_a_hole_of_a_stored_sparse_file_uploads_that_part_alone(account, tmp_path):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh = await t.create_file("sparse")
        await t.write(fh, 0, b"a" * 1000)
        await t.setattr(fh=fh, size=10 * GiB)
        await t.close(fh)
        await t.settle()
        first = await manifest_of(t, "sparse")
        async with t.fresh() as other:  # a client that must build the file from its parts
            fh = await other.open_file("sparse", os.O_RDWR)
            await other.write(fh, 3 * GiB + 5, b"middle")
            await other.close(fh)
            await other.settle()
            assert other.syncer.parts.parts_uploaded == 1 and other.syncer.parts.parts_kept == 1
            m = await manifest_of(other, "sparse")
            assert [i for i, p in enumerate(m.parts) if not p.is_hole] == [0, 3 * GiB // PART_SIZE]
            assert m.parts[0] == first.parts[0]  # kept, not uploaded again
            assert await read_at(other, "sparse", 3 * GiB, 16) == bytes(5) + b"middle" + bytes(5)
            assert await read_at(other, "sparse", 0, 1001) == b"a" * 1000 + b"\0"
        # the replaced manifest's data part stays (named again); the new one is in the vault
        await t.refresh()
        assert await read_at(t, "sparse", 3 * GiB + 5, 6) == b"middle"


async def test_a_file_of_zeros_written_in_full_uploads_no_part(account, tmp_path):
    """``dd if=/dev/zero of=disk.img bs=1M count=64``, the usual way to make an image file, and
    ``posix_fallocate``'s fallback (a zero byte per block past the end) write zeros into holes:
    they stay holes, and the data written after them is stored as usual."""
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh = await t.create_file("zeros.img")
        for i in range(64):
            await t.write(fh, i << 20, bytes(1 << 20))
        for i in range(64, 96):
            await t.write(fh, (i << 20) + (1 << 20) - 1, b"\0")
        await t.write(fh, 40 << 20, b"payload")
        await t.close(fh)
        await t.settle()
        m = await manifest_of(t, "zeros.img")
        assert m.total == 96 << 20 and [i for i, p in enumerate(m.parts) if not p.is_hole] == [10]
        assert t.syncer.parts.parts_uploaded == 1
        assert await read_at(t, "zeros.img", (40 << 20) - 1, 9) == b"\0payload\0"


async def test_a_file_cannot_grow_past_the_size_limit(account, tmp_path):
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        fh = await t.create_file("huge")
        with fails_with(errno.EFBIG):
            await t.write(fh, MAX_FILE_SIZE, b"x")
        with fails_with(errno.EFBIG):
            await t.setattr(fh=fh, size=MAX_FILE_SIZE + 1)
        assert await t.write(fh, MAX_FILE_SIZE - 2, b"xyz") == 2  # what fits is written
        assert (await t.lookup("huge")).st_size == MAX_FILE_SIZE
        await t.setattr(fh=fh, size=0)  # (not stored: a manifest of a million holes is no test)
        await t.close(fh)
