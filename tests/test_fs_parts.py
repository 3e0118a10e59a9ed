"""Files stored as parts read through the filesystem, in-process (tests/fskit.py) against the real
engine: only touched parts are fetched, sequential reads fetch ahead, every part is verified before
a byte of it is served, a file bigger than the cache streams through it within its limit, and a
manifest stays a manifest through a rename."""

from __future__ import annotations

import errno
import hashlib
import logging
import os

import pyfuse3
import pytest
import trio

from privifs.client.datatokens import FileMeta
from privifs.parts import format as fmt
from privifs.parts.store import PartStore
from tests.fskit import DiskPeak, across_a_refresh, inprocess_fs

KEY = bytes(range(32))
PART = 64 * 1024


async def put_parts(
    t, data: bytes, name: str = "big.bin", context: str = "/media", *, part_size: int = PART
) -> tuple[str, fmt.Manifest]:
    store = PartStore(t.fs.vault, part_size=part_size)

    async def source():
        yield data

    token = await store.put(source, len(data), FileMeta(name, "bin", context, 0, f"{context}/{name}"))
    await t.refresher.refresh_once()
    return token, await store.manifest(token)


async def test_a_cold_read_in_the_middle_fetches_only_the_touched_parts(account, tmp_path):
    data = os.urandom(16 * PART + 77)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        token, m = await put_parts(t, data)
        node = t.node("/media/big.bin")
        assert node.size == len(data)
        fh = await t.open_node(node, os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        got = await t.fs.read(fh, 7 * PART + 1000, 2 * PART)
        assert got == data[7 * PART + 1000 : 9 * PART + 1000]
        held = [i for i, p in enumerate(m.parts) if t.fs.cache.holds(p.token)]
        assert held == [7, 8, 9] and t.fs.cache.downloads == 3
        assert await t.fs.read(fh, len(data) - 10, 100) == data[-10:]
        assert t.fs.cache.downloads == 4
        t.fs.release(fh)
        assert [n for n in (await t.vault_names())] == ["media/big.bin"]  # parts are not files


async def test_sequential_reads_fetch_the_next_parts_ahead(account, tmp_path):
    data = os.urandom(16 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        _, m = await put_parts(t, data)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        assert await t.fs.read(fh, 0, 4096) == data[:4096]
        await trio.sleep(0.1)
        assert not t.fs.cache.holds(m.parts[1].token)  # peeking at the first bytes fetches no more
        for off in range(4096, 512 * 1024 + 4096, 128 * 1024):
            assert await t.fs.read(fh, off, 128 * 1024) == data[off : off + 128 * 1024]
        with trio.fail_after(10):
            while not all(t.fs.cache.holds(p.token) for p in m.parts[9:12]):
                await trio.sleep(0.01)
        assert not t.fs.cache.holds(m.parts[12].token)
        t.fs.release(fh)


async def test_a_file_bigger_than_the_cache_streams_through_it_and_the_cache_directory_stays_within_its_limit(
    account, tmp_path
):
    data = os.urandom(48 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await put_parts(t, data)
        # the limit counts everything in the cache directory as the disk does: the entries, the
        # downloads in flight, diskcache's database and its WAL (about 1.1 MiB of this is held
        # back for the table), the 256 entry directories (1 MiB); the rest holds a few parts
        limit = t.fs.cache.size_limit = 1536 * 1024 + 256 * 4096
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        out = bytearray()
        with DiskPeak(tmp_path / "cache") as disk:
            for _ in range(2):  # twice: the second read evicts what the first one left
                out.clear()
                for off in range(0, len(data), 128 * 1024):
                    out += await t.fs.read(fh, off, 128 * 1024)
                    assert t.fs.cache.used + t.fs.cache.reserved <= limit - t.fs.cache.overhead()
                assert out == data
        assert disk.peak <= limit, f"the cache directory took {disk.peak} bytes ({disk.samples} samples)"
        m = await t.fs.parts.manifest(t.node("/media/big.bin").token)
        assert t.fs.cache.holds(m.parts[-1].token)  # parts are still cached within the limit
        t.fs.release(fh)


async def test_a_swapped_part_is_eio_for_the_reads_that_need_it_and_logged_with_the_path(account, tmp_path, caplog):
    data = os.urandom(4 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        token, m = await put_parts(t, data)
        store = PartStore(t.fs.vault, part_size=PART)
        bad = fmt.Manifest(m.part_size, m.total, (m.parts[0], m.parts[1], m.parts[1], m.parts[3]))
        node = t.node("/media/big.bin")
        forged = await store.put_manifest(bad, FileMeta("forged.bin", "bin", "/media", 0, "/media/forged.bin"))
        await t.refresher.refresh_once()
        fh = await t.open_node(t.node("/media/forged.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        assert await t.fs.read(fh, PART, 10) == data[PART : PART + 10]
        with caplog.at_level(logging.ERROR, logger="privifs.fs"), pytest.raises(pyfuse3.FUSEError) as err:
            await t.fs.read(fh, 2 * PART + 5, 10)
        assert err.value.errno == errno.EIO
        assert "/media/forged.bin" in caplog.text and "digest" in caplog.text
        assert await t.fs.read(fh, 3 * PART, 10) == data[3 * PART : 3 * PART + 10]
        await t.client.tokens.delete(m.parts[3].token)
        t.fs.cache.evict(m.parts[3].token)
        with pytest.raises(pyfuse3.FUSEError) as err:
            await t.fs.read(fh, 3 * PART, 10)
        assert err.value.errno == errno.EIO and "missing" in caplog.text
        t.fs.release(fh)
        assert forged != token and node.token == token


async def test_a_renamed_file_stored_as_parts_stays_readable(account, tmp_path):
    data = os.urandom(3 * PART + 5)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        token, _ = await put_parts(t, data)
        media = t.node("/media")
        t.fs.rename(media.ino, b"big.bin", 1, b"moved.bin", 0)
        await t.wait_idle()
        info = [i async for i in t.client.tokens.list(token=token) if i.token == token][0]
        assert (info.context, info.file_name, info.risk.get(fmt.MARK)) == ("/", "moved.bin", "1")
        await t.refresher.refresh_once()
        fh = await t.open_node(t.node("/moved.bin"), os.O_RDONLY)
        assert await t.fs.read(fh, 0, len(data) + 10) == data
        t.fs.release(fh)


async def test_writing_into_a_file_stored_as_parts_starts_from_its_whole_content(account, tmp_path):
    data = os.urandom(3 * PART + 5)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await put_parts(t, data)
        node = t.node("/media/big.bin")
        fh = await t.open_node(node, os.O_RDWR)
        await t.fs.write(fh, PART, b"changed")
        t.fs.release(fh)
        await t.wait_idle()
        want = data[:PART] + b"changed" + data[PART + 7 :]
        assert not node.remote_risk or fmt.MARK not in node.remote_risk  # stored again as one token
        fh = await t.open_node(node, os.O_RDONLY)
        assert await t.fs.read(fh, 0, len(data)) == want
        t.fs.release(fh)
        assert await t.fs.vault.get_bytes(node.token) == want


def cached_part_files(m) -> list[int]:
    """Sizes of the read cache's entry files over 1 MiB (parts of 4 MiB, sealed)."""
    return [f.stat().st_size for f in (m.root / "cache").rglob("*.val") if f.stat().st_size > 1024 * 1024]


def test_on_a_mount_a_cold_read_in_the_middle_of_a_big_file_downloads_only_its_part(engine, tmp_path):
    from privifs.parts.store import PART_SIZE
    from tests.mountkit import Mount

    data = os.urandom(10 * PART_SIZE + 123)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    with Mount(tmp_path / "user", engine.urls).mounted() as m:
        m.token("put", str(src), "--name", "big.bin", "--context", "/media")
        m.refresh()
        path = m.dir / "media" / "big.bin"
        assert path.stat().st_size == len(data)
        assert sorted(os.listdir(m.dir)) == ["media"] and os.listdir(m.dir / "media") == ["big.bin"]
        with open(path, "rb") as f:
            middle = 5 * PART_SIZE + 1000
            assert os.pread(f.fileno(), 65536, middle) == data[middle : middle + 65536]
            assert len(cached_part_files(m)) == 1  # one part of ten, nothing fetched ahead
            f.seek(0)
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        assert len(cached_part_files(m)) == 10  # the last part is under 1 MiB: 10 big parts + 1 small


async def read_across_a_listing(t, fh: int, offset: int, size: int) -> bytes | pyfuse3.FUSEError:
    """A read that finds the version it had open gone from the vault (so it waits for the
    listing to move the node on) while one refresh runs, as the nudged refresher does on a mount;
    what it read, or the error it answered."""
    return await across_a_refresh(lambda: t.fs.read(fh, offset, size), t.refresher.refresh_once)


async def open_big_file(t, data: bytes, read_before: bool) -> tuple[str, fmt.Manifest, int]:
    """``data`` stored as parts at /media/big.bin and open for reading here (no read-ahead),
    read once first if ``read_before``: its manifest token, the manifest and the handle."""
    token, m = await put_parts(t, data)
    fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
    t.fs.parts.read_ahead = 0
    if read_before:
        assert await t.fs.read(fh, 0, 100) == data[:100]
    return token, m, fh


@pytest.mark.parametrize("read_before", [True, False])
async def test_a_reader_of_a_file_another_client_replaced_follows_it_to_the_new_content(account, tmp_path, read_before):
    """Another client stores a new version of a big file and deletes the old manifest and its
    parts (what its write-back does) before this filesystem's refresher has seen the change: a
    read that needs a part (or the manifest) of the old version gets the new version once the
    listing is merged, not EIO (parts: missing) or ENOENT (manifest: missing)."""
    old, new = os.urandom(8 * PART + 3), os.urandom(8 * PART + 3)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        token, m, fh = await open_big_file(t, old, read_before)
        store = PartStore(t.fs.vault, part_size=PART)

        async def source():
            yield new

        await store.put(source, len(new), FileMeta("big.bin", "bin", "/media", 0, "/media/big.bin"))
        await store.delete(token, m)
        assert await read_across_a_listing(t, fh, 5 * PART + 10, 1000) == new[5 * PART + 10 : 5 * PART + 1010]
        t.fs.release(fh)


@pytest.mark.parametrize("read_before", [True, False])
async def test_a_reader_of_a_big_file_another_client_deleted_gets_enoent_not_a_failure(account, tmp_path, read_before):
    """Another client deletes a big file (its manifest and parts) while it is open here: the read
    that needs a part gets ENOENT, as for a small file, not EIO (part missing), and this mount
    reports no failed read of its own."""
    old = os.urandom(8 * PART + 3)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        token, m, fh = await open_big_file(t, old, read_before)
        await PartStore(t.fs.vault, part_size=PART).delete(token, m)
        got = await read_across_a_listing(t, fh, 5 * PART + 10, 1000)
        assert isinstance(got, pyfuse3.FUSEError) and got.errno == errno.ENOENT, got
        assert t.fs.last_read_error is None
        t.fs.release(fh)


async def test_an_unexpected_failure_of_a_read_ahead_is_logged_and_the_mount_goes_on(account, tmp_path, caplog):
    """Read-ahead runs as a background task of the mount's event loop: whatever it raises must not
    end the mount (a system task's exception aborts the whole loop), the read that needs the part
    fetches it itself."""
    data = os.urandom(16 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        _, m = await put_parts(t, data)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        real = t.fs.parts.part

        async def broken(manifest, index):
            if index >= 10:  # the reads below touch parts 0-9; the read-ahead fetches 10-12
                raise ValueError("a bug in the read-ahead")
            return await real(manifest, index)

        t.fs.parts.part = broken
        for off in range(0, 512 * 1024 + 4096, 128 * 1024):
            assert await t.fs.read(fh, off, 128 * 1024) == data[off : off + 128 * 1024]
        await trio.sleep(0.3)  # the read-ahead of parts 10-12 failed meanwhile
        t.fs.parts.part = real
        assert await t.fs.read(fh, 11 * PART, 100) == data[11 * PART : 11 * PART + 100]
        t.fs.release(fh)
        assert "read-ahead" in caplog.text


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


async def test_a_part_read_again_is_served_from_its_open_file_until_the_cache_drops_it(account, tmp_path, monkeypatch):
    data = os.urandom(4 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        _, m = await put_parts(t, data)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        assert await t.fs.read(fh, PART + 100, 4096) == data[PART + 100 : PART + 4196]
        opened = []
        real_open = t.fs.cache.open
        monkeypatch.setattr(t.fs.cache, "open", lambda token: opened.append(token) or real_open(token))
        for off in (PART + 9000, PART + 5, 2 * PART - 4096):  # random reads within the part
            assert await t.fs.read(fh, off, 4096) == data[off : off + 4096]
        assert opened == []  # no open(2), no header check: the part file stayed open
        kept = t.fs.parts._open[m.parts[1].token]
        t.fs.cache.evict(m.parts[1].token)  # as the cache's limit or a full disk would
        assert kept.fd == -1  # closed: the space comes back
        assert await t.fs.read(fh, PART + 7, 100) == data[PART + 7 : PART + 107]
        assert set(opened) == {m.parts[1].token} and t.fs.cache.downloads == 2  # fetched again
        t.fs.release(fh)


async def test_an_open_part_whose_cache_file_is_damaged_is_eio_once_then_fetched_again(account, tmp_path, caplog):
    data = os.urandom(4 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        _, m = await put_parts(t, data)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        assert await t.fs.read(fh, 2 * PART, 10) == data[2 * PART : 2 * PART + 10]
        assert await t.fs.read(fh, 3 * PART - 10, 10) == data[3 * PART - 10 : 3 * PART]  # read to its end:
        sealed = t.fs.parts._open[m.parts[2].token]  # from now on read from its cache file
        flip_byte(sealed.path, 200)  # in the cached ciphertext of the open part
        with caplog.at_level(logging.ERROR, logger="privifs.fs"), pytest.raises(pyfuse3.FUSEError) as err:
            await t.fs.read(fh, 2 * PART + 5, 10)
        assert err.value.errno == errno.EIO and "/media/big.bin" in caplog.text
        assert await t.fs.read(fh, 2 * PART + 5, 10) == data[2 * PART + 5 : 2 * PART + 15]  # downloaded again
        t.fs.release(fh)


@pytest.mark.parametrize("damage", ["zeroed", "cut"])
async def test_an_open_parts_cache_file_with_a_chunk_zeroed_or_cut_off_is_eio_not_zeros(
    account, tmp_path, caplog, damage
):
    """A part's cache file is a download's: every chunk of it is written. A slot of zeros (or
    one past a cut-off end) is a hole in the sealed format, read as zeros, so a part whose file
    had a chunk zeroed or its tail cut off after it was verified served zeros for it (a cached
    12 MiB file, 64 KiB of each part's file zeroed while mounted: zeros, no error)."""
    from privifs.crypto.sealed import CHUNK, HEADER, SLOT

    part = 4 * CHUNK
    data = os.urandom(4 * part)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        _, m = await put_parts(t, data, part_size=part)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        assert await t.fs.read(fh, 2 * part, part) == data[2 * part : 3 * part]  # read to its end:
        sealed = t.fs.parts._open[m.parts[2].token]  # from now on read from its cache file
        with open(sealed.path, "r+b") as f:  # noqa: ASYNC230
            if damage == "zeroed":
                f.seek(HEADER + SLOT)
                f.write(bytes(SLOT))  # chunk 1
            else:
                f.truncate(HEADER + SLOT)  # chunks 1-3 gone
        at = 2 * part + CHUNK + 5  # in chunk 1
        with caplog.at_level(logging.ERROR, logger="privifs.fs"), pytest.raises(pyfuse3.FUSEError) as err:
            await t.fs.read(fh, at, 10)
        assert err.value.errno == errno.EIO and "/media/big.bin" in caplog.text
        assert await t.fs.read(fh, at, 3 * CHUNK) == data[at : at + 3 * CHUNK]  # downloaded again
        t.fs.release(fh)


async def test_a_downloaded_part_is_verified_and_first_served_from_memory_without_reading_its_file_back(
    account, tmp_path, monkeypatch
):
    """The digest of a part this reader downloads is computed as it arrives: no read-back of the
    cache file to check it, and the reads of it up to its end come from the verified plaintext."""
    from privifs.crypto.sealed import SealedFile

    data = os.urandom(4 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await put_parts(t, data)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        reads, checks = [], []
        real_read, real_check = SealedFile.read, t.fs.parts._check
        monkeypatch.setattr(SealedFile, "read", lambda self, *a: reads.append(a) or real_read(self, *a))
        monkeypatch.setattr(t.fs.parts, "_check", lambda *a: checks.append(a) or real_check(*a))
        for off in range(PART, 2 * PART, 16 * 1024):
            got = await t.fs.read(fh, off, 16 * 1024)
            assert got == data[off : off + 16 * 1024]
            assert isinstance(got, memoryview)  # a view of the plaintext, handed to pyfuse3 uncopied
        assert t.fs.cache.downloads == 1 and checks == [] and reads == []
        assert await t.fs.read(fh, PART + 5, 10) == data[PART + 5 : PART + 15]  # read again: from its file
        assert len(reads) == 1 and checks == []
        t.fs.release(fh)


async def test_a_downloaded_parts_cache_file_is_written_past_the_page_cache_and_reads_back(
    account, tmp_path, monkeypatch
):
    """Its reads are served from memory first, so its cache file is written with O_DIRECT (where
    the disk takes it): fresh page-cache pages cost a cold read more than anything else."""
    data = os.urandom(3 * PART + 12345)
    direct = []
    real_open = os.open

    def spy(path, flags, *args):
        if flags & os.O_DIRECT:
            direct.append(os.fspath(path))
        return real_open(path, flags, *args)

    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await put_parts(t, data)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        monkeypatch.setattr(os, "open", spy)
        for off in range(0, len(data), 1 << 20):
            assert await t.fs.read(fh, off, 1 << 20) == data[off : off + (1 << 20)]
        monkeypatch.setattr(os, "open", real_open)
        assert len(direct) == 4 and t.fs.cache.downloads == 4  # one O_DIRECT descriptor per part's file
        for off in (5, PART + 77, 3 * PART + 100):  # read again: from the cache files
            assert await t.fs.read(fh, off, 4096) == data[off : off + 4096]
        assert t.fs.cache.downloads == 4
        t.fs.release(fh)


async def test_parts_downloaded_at_once_that_the_cache_disk_cannot_hold_together_are_read_through_memory(
    account, tmp_path
):
    """Two parts downloaded at the same time (two readers, or a read and the read-ahead) each
    found room above the floor when it started, but the disk held only one: the second write
    hit ENOSPC halfway and the read failed with ENOSPC (a cold read of 12 MiB files with the
    cache on a 6 MiB tmpfs: `sha256sum: No space left on device`). It is read through memory,
    as a part the disk has no room for from the start is."""
    from privifs.fs.cache import download_footprint
    from privifs.fs.space import Space
    from tests.test_fs_fulldisk import small_filesystem

    part = 2 * 1024 * 1024  # larger than the floor (1 MiB here): two need more than the disk has
    data = os.urandom(2 * part)
    with small_filesystem(tmp_path / "small", "24m") as small:
        async with inprocess_fs(small, *account, key=KEY) as t:
            token, _ = await put_parts(t, data, part_size=part)
            await t.fs.parts.manifest(token)  # known: both reads go straight to their parts' room
            fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
            t.fs.parts.read_ahead = 0
            need = download_footprint(part)
            # room above the floor for one part and a bit
            (small / "filler").write_bytes(bytes(Space(small).above_floor() - need - 256 * 1024))
            got = {}

            async def read(index: int) -> None:
                got[index] = await t.fs.read(fh, index * part, part)

            async with trio.open_nursery() as nursery:
                for index in range(2):
                    nursery.start_soon(read, index)
            assert got == {0: data[:part], 1: data[part:]}
            assert await t.fs.read(fh, 0, 2 * part) == data  # and again (a cache file, or memory)
            t.fs.release(fh)


async def test_parts_the_cache_cannot_keep_hold_few_unlinked_files_open(account, tmp_path):
    """A part the cache cannot keep (larger than --cache-size, or evicted at once to keep the
    staging reserve) is its reader's private, unlinked copy; the reader kept up to 64 of them
    open, and their disk space counted nowhere: a cold read of a 1 GiB file with --cache-size 2M
    left the daemon holding 64 deleted 4 MiB files, 237 MiB of a 272 MiB cache disk used while
    `privifs status` said 0.0 MiB of 2 MiB. Few are kept now, as for parts read through memory."""
    from privifs.fs.parts import IN_MEMORY_PARTS

    def unlinked_in_cache() -> int:
        held = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            held += target.startswith(str(tmp_path / "cache")) and target.endswith(" (deleted)")
        return held

    data = os.urandom(12 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        await put_parts(t, data)
        t.fs.cache.size_limit = t.fs.cache.overhead() + PART // 2  # no part's file fits
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        for off in range(0, len(data), PART // 2):
            assert await t.fs.read(fh, off, PART // 2) == data[off : off + PART // 2]
        assert t.fs.cache.volume() < PART and t.fs.cache.downloads >= 12  # (its manifest is kept)
        assert unlinked_in_cache() <= IN_MEMORY_PARTS
        assert await t.fs.read(fh, 3 * PART + 5, 100) == data[3 * PART + 5 : 3 * PART + 105]  # fetched again
        t.fs.release(fh)


async def test_a_part_downloaded_for_the_wrong_place_is_eio_before_a_byte_of_it_is_served(account, tmp_path, caplog):
    data = os.urandom(4 * PART)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        _, m = await put_parts(t, data)
        store = PartStore(t.fs.vault, part_size=PART)
        bad = fmt.Manifest(m.part_size, m.total, (m.parts[0], m.parts[2], m.parts[2], m.parts[3]))
        await store.put_manifest(bad, FileMeta("forged.bin", "bin", "/media", 0, "/media/forged.bin"))
        await t.refresher.refresh_once()
        fh = await t.open_node(t.node("/media/forged.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        with caplog.at_level(logging.ERROR, logger="privifs.fs"), pytest.raises(pyfuse3.FUSEError) as err:
            await t.fs.read(fh, PART + 5, 10)  # part 2's content at place 1, never fetched before
        assert err.value.errno == errno.EIO and "digest" in caplog.text
        assert not t.fs.cache.holds(m.parts[2].token)  # dropped: fetched and checked again next time
        assert await t.fs.read(fh, 2 * PART + 5, 10) == data[2 * PART + 5 : 2 * PART + 15]
        t.fs.release(fh)


async def test_a_reader_of_a_big_file_replaced_while_its_new_version_showed_as_a_conflict_copy_follows_it(
    account, tmp_path
):
    """A listing taken between the other client's new manifest and its deletion of the old one
    showed the new version as a conflict copy; the old manifest and parts then went: a read of
    the file opened before must give the new version (a three-mount race saw ENOENT)."""
    old, new = os.urandom(8 * PART + 3), os.urandom(8 * PART + 3)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        token, m = await put_parts(t, old)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDONLY)
        t.fs.parts.read_ahead = 0
        assert await t.fs.read(fh, 0, 100) == old[:100]
        store = PartStore(t.fs.vault, part_size=PART)

        async def source():
            yield new

        await store.put(source, len(new), FileMeta("big.bin", "bin", "/media", 0, "/media/big.bin"))
        await t.refresher.refresh_once()
        assert len(t.node("/media").children) == 2
        await store.delete(token, m)
        assert await read_across_a_listing(t, fh, 5 * PART + 10, 1000) == new[5 * PART + 10 : 5 * PART + 1010]
        t.fs.release(fh)
        assert sorted(t.node("/media").children) == ["big.bin"]


async def test_a_write_to_a_big_file_another_client_replaced_follows_it_to_the_new_content(account, tmp_path):
    """A write to a file stored as parts stages it whole first; when another client had replaced
    it (new manifest, old manifest and parts deleted) before this mount's listing showed that, the
    write failed with ENOENT (three mounts writing one big file: 'r+b' open, then 'No such file
    or directory'). It follows the node to the new content, as a read does, also though the file
    is open for writing (the listing leaves alone a node open for writing otherwise)."""
    old, new = os.urandom(8 * PART + 3), os.urandom(8 * PART + 3)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        token, m = await put_parts(t, old)
        fh = await t.open_node(t.node("/media/big.bin"), os.O_RDWR)
        store = PartStore(t.fs.vault, part_size=PART)

        async def source():
            yield new

        await store.put(source, len(new), FileMeta("big.bin", "bin", "/media", 0, "/media/big.bin"))
        await store.delete(token, m)
        got = await across_a_refresh(lambda: t.fs.write(fh, 5 * PART, b"WRITTEN"), t.refresher.refresh_once)
        assert got == 7, got
        assert await t.fs.read(fh, 0, len(new)) == new[: 5 * PART] + b"WRITTEN" + new[5 * PART + 7 :]
        t.fs.release(fh)


async def test_a_manifest_whose_meta_states_another_size_shows_the_size_the_manifest_proves(account, tmp_path, caplog):
    """docs/format.md: a manifest token's file meta ``size`` is the whole file's. An application
    that stated another (found writing one from the docs alone: configure-file-meta with the
    manifest's own 223 bytes) made the mount show and serve 223 bytes of an 8 MiB file, with no
    error, while 'token get' wrote all of it. The manifest, whose total is authenticated (GCM and
    its digest), wins at the first read, as a whole token's verified content does."""
    from privifs.crypto import digest

    data = os.urandom(4 * PART + 5)
    async with inprocess_fs(tmp_path, *account, key=KEY) as t:
        _, m = await put_parts(t, data)
        encoded = fmt.encode(m)
        token = await t.fs.vault.put_bytes(encoded, FileMeta("short.bin", "bin", "/media", 0, "/media/short.bin"))
        risk = {fmt.MARK: str(m.version), **digest.stated(t.fs.vault.derive(digest.content_key), encoded)}
        await t.client.tokens.set_risk(token, risk)
        await t.refresher.refresh_once()
        node = t.node("/media/short.bin")
        assert node.size == len(encoded) != len(data)  # what its meta states
        fh = await t.open_node(node, os.O_RDONLY)
        with caplog.at_level(logging.INFO, logger="privifs.fs"):
            assert await t.fs.read(fh, 0, len(data) + 100) == data
        assert node.size == len(data) and "showing" in caplog.text
        await t.refresher.refresh_once()
        assert node.size == len(data)  # a listing does not take it back
        t.fs.release(fh)
