"""Sealed files past the page cache (O_DIRECT): a file a SequentialSealer writes front to back,
and the long writes and an upload's reads of any sealed file, give the bytes the page cache
would, on a filesystem that takes O_DIRECT and on one that refuses it (on open or on a write)."""

from __future__ import annotations

import errno
import os
import random

import pytest

from privifs.crypto import sealed_append
from privifs.crypto.sealed import CHUNK, DIRECT_CHUNKS, HEADER, SLOT, SealedFile, stored_size
from privifs.crypto.sealed_append import BLOCK_CHUNKS, SequentialSealer
from privifs.errors import DiskFullError, IntegrityError, LocalStoreError

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


def disk_full_from(monkeypatch, full_at: int) -> None:
    """``os.pwrite`` as a disk with no block left from file offset ``full_at`` on (an overwrite
    on a copy-on-write filesystem, a sparse file's holes): a write reaching it puts its bytes
    before it there (a short write), one starting there is refused (ENOSPC)."""
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if offset >= full_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, memoryview(data)[: full_at - offset], offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def chunk_states(f: SealedFile, old: bytes, new: bytes, off: int) -> list[str]:
    """What each chunk of ``f`` reads as, after a write of ``new`` at ``off`` over ``old``
    failed: 'old', 'new', 'zeros' (within the write's range) or what is wrong with it."""
    out = []
    after = bytearray(old)
    after[off : off + len(new)] = new
    for i in range(-(-len(old) // CHUNK)):
        lo, hi = i * CHUNK, min(len(old), (i + 1) * CHUNK)
        try:
            got = f.read(lo, hi - lo)
        except IntegrityError as exc:
            out.append(f"unreadable ({exc})")
            continue
        outside = [(a, b) for a, b in ((lo, min(hi, off)), (max(lo, off + len(new)), hi)) if a < b]
        if any(got[a - lo : b - lo] != old[a:b] for a, b in outside):
            out.append("lost bytes outside the write")
        elif got == old[lo:hi]:
            out.append("old")
        elif got == after[lo:hi]:
            out.append("new")
        elif all(got[a - lo : b - lo] == bytes(b - a) for a, b in [(max(lo, off), min(hi, off + len(new)))]):
            out.append("zeros")
        else:
            out.append("mixed")
    return out


@pytest.mark.parametrize("direct", [True, False])
def test_a_write_the_disk_fills_halfway_leaves_every_chunk_readable(tmp_path, monkeypatch, direct):
    # an overwrite on XFS at ENOSPC (the staged copy of a file whose upload was in flight shares
    # its blocks): the write that filled the disk left a chunk half new and half old, which
    # failed authentication: read(2) gave EIO there and the upload retried it for ever
    if not direct:
        refuse_direct_open(monkeypatch)
    elif not takes_o_direct(tmp_path):
        pytest.skip("this disk refuses O_DIRECT")
    old, new = os.urandom(20 * CHUNK), os.urandom(9 * CHUNK - 7)
    off = 3 * CHUNK + 7  # a partial chunk, then eight whole ones (a long run)
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, old, stamp=1)
    disk_full_from(monkeypatch, (HEADER + 6 * SLOT) // 4096 * 4096 + 4096)  # inside chunk 6
    with pytest.raises(DiskFullError):
        f.write(off, new, stamp=2)
    monkeypatch.undo()
    states = chunk_states(f, old, new, off)
    assert states[:3] == ["old"] * 3 and states[12:] == ["old"] * 8
    assert set(states[3:12]) <= {"old", "new", "zeros"}, states
    f.close()
    g = SealedFile.open(tmp_path / "f", KEY)
    assert g.size == len(old) and chunk_states(g, old, new, off) == states
    g.close()


def test_a_short_chunk_a_write_tore_at_enospc_keeps_its_bytes(tmp_path, monkeypatch):
    # the file's last chunk is short (100 bytes): a write lengthening it needs new blocks, and
    # the disk filled in the middle of its slot; the 50 bytes before the write are the file's
    old, new = os.urandom(10 * CHUNK + 100), os.urandom(3 * CHUNK)
    off = 10 * CHUNK + 50
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, old, stamp=1)
    disk_full_from(monkeypatch, (HEADER + 10 * SLOT) // 4096 * 4096 + 4096)
    with pytest.raises(DiskFullError):
        f.write(off, new, stamp=2)
    monkeypatch.undo()
    assert f.size == len(old) and f.read(0, len(old) + 10) == old
    f.write(len(old), b"more")  # (what the failed write left past the end never shows)
    assert f.read(0, 11 * CHUNK) == old + b"more"
    f.close()


def test_a_first_chunk_write_the_disk_fills_halfway_leaves_the_recorded_size(tmp_path, monkeypatch):
    # a write within chunk 0 rewrites the header (with its new size) in the same pwrite: when the
    # disk filled after the header, the file said it was that long at the next mount
    old = os.urandom(100)
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, old, stamp=1)
    disk_full_from(monkeypatch, 4096)
    with pytest.raises(DiskFullError):
        f.write(len(old), os.urandom(10000), stamp=2)
    monkeypatch.undo()
    assert f.size == len(old) and f.read(0, 20000) == old
    g = SealedFile.open(tmp_path / "f", KEY)  # (as the next mount finds it, the daemon killed)
    assert g.size == len(old) and g.read(0, 20000) == old
    g.close()
    f.close()


def killed_after_the_direct_write(path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` into the sealed file at ``path`` in a child process that dies
    (as the daemon under ``kill -9``) at its first write after its first O_DIRECT one."""
    pid = os.fork()
    if pid == 0:  # (the child never returns into pytest)
        try:
            g = SealedFile.open(path, KEY, writable=True)
            real_pwrite, direct = os.pwrite, []

            def dying(fd, buf, at):
                if fd == g._direct_fd:
                    direct.append(at)
                elif direct:
                    os._exit(0)
                return real_pwrite(fd, buf, at)

            os.pwrite = dying
            g.write(offset, data, stamp=2)
        finally:
            os._exit(3)  # it never wrote past the page cache, or lived on
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    "size, offset",
    [
        (40 * CHUNK, 3 * CHUNK),  # inside the file
        (19 * CHUNK, 3 * CHUNK),  # its last chunks (the run's last page runs past the file's end)
        (30 * CHUNK + 5, 3 * CHUNK + 7),  # a partial chunk at each end
    ],
)
def test_a_long_overwrite_cut_off_by_a_kill_leaves_no_chunk_half_written(tmp_path, size, offset):
    # the run's last chunk went to disk in two pwrites (whole pages past the page cache, then the
    # rest of it through it): a kill -9 of the daemon in between left it half new and half old,
    # EIO there at the next mount and its upload failing for ever (a 1 MiB overwrite loop killed
    # ten times: six of those mounts read EIO)
    if not takes_o_direct(tmp_path):
        pytest.skip("this disk refuses O_DIRECT")
    old, new = os.urandom(size), os.urandom(16 * CHUNK)
    f = SealedFile.create(tmp_path / "f", KEY)
    f.write(0, old, stamp=1)
    f.close()
    killed_after_the_direct_write(tmp_path / "f", offset, new)
    g = SealedFile.open(tmp_path / "f", KEY, writable=True)
    g.trim()  # (as the next mount does)
    assert g.size == size
    states = chunk_states(g, old, new, offset)
    assert set(states) <= {"old", "new"}, states
    g.close()


def test_a_long_write_into_a_sparse_end_leaves_the_file_as_long_as_its_chunks(tmp_path):
    f = SealedFile.create(tmp_path / "f", KEY)
    data = os.urandom(4 * CHUNK)
    f.write(0, os.urandom(CHUNK))
    f.truncate(40 * CHUNK)  # on disk the file still ends after chunk 0
    f.write(30 * CHUNK, data)
    assert os.path.getsize(tmp_path / "f") == stored_size(34 * CHUNK)
    assert f.read(29 * CHUNK, 6 * CHUNK) == bytes(CHUNK) + data + bytes(CHUNK)
    f.write(4 * CHUNK, data)  # a run that ends in the middle of the file's last page on disk
    assert os.path.getsize(tmp_path / "f") == stored_size(34 * CHUNK)
    f.close()
