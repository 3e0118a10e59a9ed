"""SequentialSealer: a sealed file written front to back past the page cache reads back exactly
as one written chunk by chunk, on a filesystem that takes O_DIRECT and on one that refuses it."""

from __future__ import annotations

import errno
import os

import pytest

from privifs.crypto import sealed_append
from privifs.crypto.sealed import CHUNK, SealedFile, stored_size
from privifs.crypto.sealed_append import BLOCK_CHUNKS, SequentialSealer

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
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
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
