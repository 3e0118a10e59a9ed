"""Blob files: one file per stored payload, kept byte for byte as received.

A blob is written to ``tmp/`` first, fsynced, then renamed to ``blobs/<xx>/<id>``; the caller
commits the database row that references it with the blob's directory in ``fsync_dirs`` so the
rename is durable before anything points at it. A half-received upload stays in ``tmp/`` and is
removed; leftovers there are swept at start.

Blobs never take the disk's last :func:`room_floor` bytes: a blob write that would is refused as a
full disk (ENOSPC, answered 507), so the commands that give room back (a delete: a database
commit, then the blob removed) still have room to commit. The engine's own blobs once filled its
disk to the last byte, and then every delete was answered 507 too: no client could free space.

A streamed blob is written with ``O_DIRECT`` (where the filesystem takes it) from reused aligned
buffers: it is fsynced before it counts anyway, and going through the page cache cost the engine
more CPU than everything else in an upload (each fresh page-cache page is dear on a VM: 1 GiB
written and fsynced took 1.2-2.5 s of system time buffered, 0.1-0.2 s direct).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from privifs.directio import DIRECT_ALIGN, BufferPool, set_direct
from privifs.disk import free_bytes

WRITE_BUFFER = 1024 * 1024
# a part's blob (4 MiB + 28 bytes) in two reads: each read and send is a thread hop and a pass
# through hypercorn (measured: 0.73-0.82 s of the engine's CPU per GiB served, 0.88-1.03 with 1 MiB)
READ_BUFFER = 4 * 1024 * 1024
DIRECT_READ_MIN = 1024 * 1024  # smaller blobs are read through the page cache
MiB = 1024 * 1024
FLOOR_MIN, FLOOR_MAX = 4 * MiB, 64 * MiB  # room_floor's bounds


def room_floor(path: Path) -> int:
    """The free space blobs leave on ``path``'s filesystem: 5 % of it, from 4 to 64 MiB."""
    st = os.statvfs(path)
    return min(FLOOR_MAX, max(FLOOR_MIN, st.f_blocks * st.f_frsize // 20))


class BlobTooLarge(Exception):
    pass


class BlobStore:
    def __init__(self, root: Path):
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.write_buffers = BufferPool(WRITE_BUFFER)
        self.read_buffers = BufferPool(READ_BUFFER)
        self.direct = hasattr(os, "O_DIRECT")  # cleared once the filesystem refuses it
        self.floor = room_floor(root)

    def _check_room(self, more: int) -> None:
        """ENOSPC if writing ``more`` bytes would leave less than the floor free."""
        free = free_bytes(self.root)
        if free - more < self.floor:
            raise OSError(
                errno.ENOSPC,
                f"{free // MiB} MiB free on the engine's disk, of which {self.floor // MiB} MiB stay for deletions"
                " and the database",
            )

    def path(self, blob_id: str) -> Path:
        return self.blob_dir / blob_id[:2] / blob_id

    def dir_of(self, blob_id: str) -> Path:
        return self.blob_dir / blob_id[:2]

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def _commit_tmp(self, tmp: Path, fd: int, blob_id: str) -> None:
        """fsync and close ``fd`` (closed even on error), then rename ``tmp`` into place."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        d = self.dir_of(blob_id)
        d.mkdir(exist_ok=True)
        os.rename(tmp, d / blob_id)

    async def write_bytes(self, data: bytes) -> tuple[str, int, Path]:
        blob_id = self.new_id()
        tmp = self.tmp_dir / blob_id

        def work() -> None:
            self._check_room(len(data))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                except BaseException:
                    os.close(fd)
                    raise
                self._commit_tmp(tmp, fd, blob_id)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

        await trio.to_thread.run_sync(work)
        return blob_id, len(data), self.dir_of(blob_id)

    def _open_tmp(self, tmp: Path) -> tuple[int, bool]:
        """Create ``tmp`` for writing: with O_DIRECT if the filesystem takes it (and whether it did)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        if self.direct:
            try:
                return os.open(tmp, flags | os.O_DIRECT, 0o600), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # e.g. a filesystem without O_DIRECT: buffered from now on
        return os.open(tmp, flags, 0o600), False

    async def receive(self, chunks: AsyncIterator[bytes]) -> tuple[str, int, Path]:
        """Stream ``chunks`` into a new blob; on any error nothing becomes visible. The chunks are
        gathered into an aligned :data:`WRITE_BUFFER` that a worker thread writes (O_DIRECT where
        it can: see the module's docstring) while the event loop waits; creating, writing and
        syncing the file happen on worker threads (creating a file costs 0.1-1 ms on ext4, which
        the event loop does not wait for)."""
        blob_id = self.new_id()
        tmp = self.tmp_dir / blob_id
        fd = -1
        direct = False
        size = 0
        buf = self.write_buffers.take()
        view = memoryview(buf)
        filled = 0

        def write(n: int) -> None:
            nonlocal fd, direct
            self._check_room(n)
            if fd < 0:
                fd, direct = self._open_tmp(tmp)
            done = 0
            if direct:  # whole aligned blocks (the buffer's are: only the tail is short)
                head = n - n % DIRECT_ALIGN
                try:
                    while done < head:
                        done += os.write(fd, view[done:head])
                except OSError as exc:  # a device wanting larger alignment: buffered from now on
                    if exc.errno != errno.EINVAL:
                        raise
                    self.direct = False
                if done < n:  # the tail, or the rest: O_DIRECT off from here
                    set_direct(fd, False)
                    direct = False
            while done < n:
                done += os.write(fd, view[done:n])

        def finish(n: int) -> None:
            nonlocal fd
            write(n)
            closing, fd = fd, -1
            self._commit_tmp(tmp, closing, blob_id)

        try:
            async for chunk in chunks:
                size += len(chunk)
                chunk = memoryview(chunk)
                while chunk:
                    take = min(len(chunk), WRITE_BUFFER - filled)
                    view[filled : filled + take] = chunk[:take]
                    filled += take
                    chunk = chunk[take:]
                    if filled == WRITE_BUFFER:
                        await trio.to_thread.run_sync(write, filled)
                        filled = 0
            await trio.to_thread.run_sync(finish, filled)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        finally:
            view.release()  # (an mmap with a view on it cannot be closed: BufferError)
            self.write_buffers.give(buf)
        return blob_id, size, self.dir_of(blob_id)

    def open_reader(self, blob_id: str) -> BlobReader:
        """A blob to stream out (FileNotFoundError if there is none)."""
        return BlobReader(self, os.open(self.path(blob_id), os.O_RDONLY | os.O_CLOEXEC))

    def delete(self, blob_id: str) -> None:
        try:
            self.path(blob_id).unlink()
        except FileNotFoundError:
            pass


class BlobReader:
    """Reads one blob in pieces of up to ``READ_BUFFER`` bytes, each a bytes of its own, on
    worker threads. A blob of at least ``DIRECT_READ_MIN`` bytes is read with ``O_DIRECT`` into
    a reused aligned buffer, as blobs are written: a buffered read first fills the page cache,
    whose fresh pages are dear on a VM (1 GiB read cold: 0.45-1.7 s of system time buffered,
    0.07 s direct), and the engine serves a big blob once (the reader keeps it in its own
    cache). Smaller ones are read through the page cache."""

    def __init__(self, store: BlobStore, fd: int):
        self.store = store
        self.fd = fd
        self.pos = 0
        self.direct = False
        try:
            self.size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        if store.direct and self.size >= DIRECT_READ_MIN:
            try:
                set_direct(fd, True)
                self.direct = True
            except OSError:
                store.direct = False  # (writes find out for themselves too)

    def read(self) -> bytes:
        """The next piece (b"" at the end). Blocking: call it on a worker thread."""
        want = min(READ_BUFFER, self.size - self.pos)
        if want <= 0:
            return b""
        if self.direct and self.pos % DIRECT_ALIGN == 0:
            # the buffer is the pool's again once its bytes are copied out: a download whose client
            # does not read holds the copy it is sending, not a second 4 MiB for its next read
            buf = self.store.read_buffers.take()
            try:
                n = os.preadv(self.fd, [buf], self.pos)  # whole aligned buffer; short at the end
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    self.store.read_buffers.give(buf)
                    raise
                n = -1  # a device wanting larger alignment
            if n >= 0:
                n = min(n, want)
                self.pos += n
                data = buf[:n]
                self.store.read_buffers.give(buf)
                return data
            self.store.read_buffers.give(buf)
        if self.direct:  # buffered from here: a read that failed so, or stopped short of the end
            set_direct(self.fd, False)
            self.direct = False
        data = os.pread(self.fd, want, self.pos)
        self.pos += len(data)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
