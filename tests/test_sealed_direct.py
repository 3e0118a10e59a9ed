"""Sealed files past the page cache (O_DIRECT): a file a SequentialSealer writes front to back,
and the long writes and an upload's reads of any sealed file, give the bytes the page cache
would, on a filesystem that takes O_DIRECT and on one that refuses it (on open or on a write)."""

from __future__ import annotations

import errno
import os
import random

import pytest

from privifs.crypto import sealed_append
from privifs.crypto.sealed import CHUNK, DIRECT_CHUNKS, SealedFile, stored_size
from privifs.crypto.sealed_append import BLOCK_CHUNKS, SequentialSealer
from privifs.errors import DiskFullError, LocalStoreError

KEY = bytes(range(32))
SIZES = [
    0,
    1,
    CHUNK - 1,
    CHUNK,
    CHUNK + 1,
    BLOCK_CHUNKS * CHUNK,
    BLOCK_CHUNKS * CHUNK + 7,
    3 * BLOCK_CHUNKS * CHUNK - 5,
]


def takes_o_direct(directory) -> bool:
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False
    finally:
        (directory / "probe").unlink(missing_ok=True)


def refuse_direct_open(monkeypatch) -> None:
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)


def seal(path, data: bytes) -> SequentialSealer:
    """Seal ``data`` into a new file at ``path`` in blocks, as a download does."""
    sealed = SealedFile.create(path, KEY)
    sealer = SequentialSealer(sealed)
    block = BLOCK_CHUNKS * CHUNK
    for off in range(0, len(data), block):
        sealer.add(off // CHUNK, memoryview(data)[off : off + block])
    sealer.finish()
    sealed.size = len(data)
    sealed.write_header()
    sealed.close()
    return sealer


@pytest.mark.parametrize("size", SIZES)
def test_a_file_sealed_in_order_reads_back_whole(tmp_path, size):
    data = os.urandom(size)
    sealer = seal(tmp_path / "f", data)
    assert sealer._direct == takes_o_direct(tmp_path)  # where it can, the blocks went past the page cache
    f = SealedFile.open(tmp_path / "f", KEY)
    assert f.size == size and f.read(0, size + 1) == data
    assert os.path.getsize(tmp_path / "f") == stored_size(size)  # the layout of a chunk-by-chunk write
    f.close()


def test_a_disk_that_refuses_o_direct_gets_the_same_bytes_through_the_page_cache(tmp_path, monkeypatch):
    refuse_direct_open(monkeypatch)
    data = os.urandom(2 * BLOCK_CHUNKS * CHUNK + 1234)
    sealer = seal(tmp_path / "f", data)
    assert not sealer._direct
    f = SealedFile.open(tmp_path / "f", KEY)
    assert f.read(0, len(data)) == data
    f.close()


def test_a_write_refused_halfway_is_made_again_through_the_page_cache(tmp_path, monkeypatch):
    # a device wanting a larger alignment refuses the O_DIRECT write itself (EINVAL)
    real_pwrite = os.pwrite
    direct_fds = set()
    real_open = os.open

    def tracking_open(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def picky(fd, data, offset):
        if fd in direct_fds and offset > 0:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "pwrite", picky)
    data = os.urandom(3 * BLOCK_CHUNKS * CHUNK)
    sealer = seal(tmp_path / "f", data)
    assert direct_fds and not sealer._direct
    f = SealedFile.open(tmp_path / "f", KEY)
    assert f.read(0, len(data)) == data
    f.close()


def test_a_restarted_download_leaves_only_the_second_content(tmp_path):
    first, second = os.urandom(2 * BLOCK_CHUNKS * CHUNK), os.urandom(BLOCK_CHUNKS * CHUNK + 99)
    sealed = SealedFile.create(tmp_path / "f", KEY)
    sealer = SequentialSealer(sealed)
    sealer.add(0, memoryview(first)[: BLOCK_CHUNKS * CHUNK])
    sealed.truncate(0)
    sealer.restart()
    for off in range(0, len(second), BLOCK_CHUNKS * CHUNK):
        sealer.add(off // CHUNK, memoryview(second)[off : off + BLOCK_CHUNKS * CHUNK])
    sealer.finish()
    sealed.size = len(second)
    sealed.write_header()
    sealed.close()
    f = SealedFile.open(tmp_path / "f", KEY)
    assert f.size == len(second) and f.read(0, len(first)) == second
    f.close()


def test_chunks_out_of_order_or_after_the_short_last_one_are_refused(tmp_path):
    sealed = SealedFile.create(tmp_path / "f", KEY)
    sealer = SequentialSealer(sealed)
    with pytest.raises(ValueError, match="out of order"):
        sealer.add(1, memoryview(bytes(CHUNK)))
    sealer.add(0, memoryview(bytes(CHUNK + 5)))  # a short last chunk: nothing may follow it
    with pytest.raises(ValueError, match="out of order"):
        sealer.add(2, memoryview(bytes(CHUNK)))
    sealer.close()
    sealed.close()


def test_the_aligned_buffers_are_reused_not_leaked(tmp_path):
    for i in range(3 * sealed_append._buffers.keep):
        seal(tmp_path / f"f{i}", os.urandom(CHUNK + i))
    assert 1 <= len(sealed_append._buffers.free) <= sealed_append._buffers.keep


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("refused", [False, True])
def test_long_writes_and_direct_reads_match_a_model(tmp_path, monkeypatch, seed, refused):
    if refused:
        refuse_direct_open(monkeypatch)
    rng = random.Random(seed)
    f = SealedFile.create(tmp_path / "f", KEY)
    model = bytearray()
    for _ in range(60):
        op = rng.random()
        if op < 0.55:
            off = rng.choice([0, rng.randrange(0, 24 * CHUNK), rng.randrange(0, 24) * CHUNK, len(model)])
            n = rng.choice([100, CHUNK + 3, DIRECT_CHUNKS * CHUNK, 9 * CHUNK + 5, 16 * CHUNK, 21 * CHUNK + 77])
            data = bytes(n) if rng.random() < 0.2 else rng.randbytes(n)  # zeros: holes stay holes
            f.write(off, data, stamp=rng.choice([None, 5]))
            model.extend(bytes(max(0, off - len(model))))
            model[off : off + n] = data
        elif op < 0.7:
            size = rng.randrange(0, 30 * CHUNK)
            f.truncate(size)
            model = model[:size] + bytearray(max(0, size - len(model)))
        else:
            off, n = rng.randrange(0, 30 * CHUNK), rng.choice([10, 3 * CHUNK, 6 * CHUNK + 9, 16 * CHUNK])
            want = bytes(model[off : off + n])
            assert bytes(f.read_view(off, n, direct=True)) == want and f.read(off, n) == want
        assert f.size == len(model)
    assert (f._direct_fd >= 0) == (not refused and takes_o_direct(tmp_path)) or len(model) < DIRECT_CHUNKS * CHUNK
    f.sync_header()
    f.close()
    g = SealedFile.open(tmp_path / "f", KEY)
    assert g.size == len(model) and b"".join(g.chunks()) == bytes(model)
    g.close()


def test_a_long_write_the_disk_refuses_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    if not takes_o_direct(tmp_path):
        pytest.skip("this disk refuses O_DIRECT")
    old = os.urandom(3 * CHUNK + 10)
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, old)
    real_pwrite = os.pwrite

    def full(fd, data, offset):
        if fd == f._direct_fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    f._direct()
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(DiskFullError):
        f.write(2 * CHUNK, os.urandom(8 * CHUNK))  # a partial chunk, then a long run past the end
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert f.size == len(old) and f.read(0, 20 * CHUNK)[: 2 * CHUNK] == old[: 2 * CHUNK]
    assert f.wrote_chunks  # (some of it may be on disk: the mount must treat the file as changed)
    f.close()


def test_a_long_write_refused_as_o_direct_goes_through_the_page_cache(tmp_path, monkeypatch):
    f = SealedFile.create(tmp_path / "f", KEY)
    real_pwrite = os.pwrite

    def picky(fd, data, offset):
        if fd == f._direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")  # a device wanting a larger alignment
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", picky)
    data = os.urandom(10 * CHUNK)
    f.write(7, data)
    f.write(7 + len(data), data)
    assert f._direct_fd < 0 and f.read(0, 30 * CHUNK) == bytes(7) + data + data
    f.close()


def test_what_a_long_write_put_on_disk_another_descriptor_reads_at_once(tmp_path):
    # written past the page cache or through it, it is in the file when write() returns: a
    # daemon killed right after loses nothing a program wrote
    data = os.urandom(11 * CHUNK + 5)
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, data, stamp=1)
    g = SealedFile.open(tmp_path / "f", KEY)
    assert g.size == len(data) and g.read(0, len(data)) == data
    assert os.path.getsize(tmp_path / "f") == stored_size(len(data))
    g.close()
    f.close()


def test_a_failed_read_is_a_local_store_error(tmp_path, monkeypatch):
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, os.urandom(8 * CHUNK))
    real = os.preadv

    def eio(fd, buffers, offset, *flags):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(LocalStoreError):
        f.read_view(0, 8 * CHUNK, direct=True)
    monkeypatch.setattr(os, "preadv", real)
    f.close()
