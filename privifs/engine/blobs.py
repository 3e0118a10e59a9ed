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
import fcntl
import mmap
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from privifs.disk import free_bytes

WRITE_BUFFER = 1024 * 1024
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, length and file offset multiples of this
SPARE_BUFFERS = 8  # aligned write buffers kept for the next uploads
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
        self._buffers: list[mmap.mmap] = []  # reused: fresh pages are dear
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
        buf = self._buffers.pop() if self._buffers else mmap.mmap(-1, WRITE_BUFFER)
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
                    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
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
            if len(self._buffers) < SPARE_BUFFERS:
                self._buffers.append(buf)
            else:
                buf.close()
        return blob_id, size, self.dir_of(blob_id)

    def delete(self, blob_id: str) -> None:
        try:
            self.path(blob_id).unlink()
        except FileNotFoundError:
            pass
