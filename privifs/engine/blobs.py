"""Blob files: one file per stored payload, kept byte for byte as received.

A blob is written to ``tmp/`` first, fsynced, then renamed to ``blobs/<xx>/<id>``; the caller
commits the database row that references it with the blob's directory in ``fsync_dirs`` so the
rename is durable before anything points at it. A half-received upload stays in ``tmp/`` and is
removed; leftovers there are swept at start.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import trio

WRITE_BUFFER = 1024 * 1024


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

    async def receive(self, chunks: AsyncIterator[bytes]) -> tuple[str, int, Path]:
        """Stream ``chunks`` into a new blob; on any error nothing becomes visible. The file is
        created, written and synced on worker threads (creating a file costs 0.1-1 ms on ext4,
        which the event loop does not wait for), a chunk of :data:`WRITE_BUFFER` or more as it
        came, smaller ones gathered first."""
        blob_id = self.new_id()
        tmp = self.tmp_dir / blob_id
        fd = -1
        size = 0
        pending: list[bytes] = []
        pending_len = 0

        def flush(bufs: list[bytes]) -> None:
            nonlocal fd
            if fd < 0:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            view = memoryview(bufs[0] if len(bufs) == 1 else b"".join(bufs))
            while view:
                view = view[os.write(fd, view) :]

        def finish(bufs: list[bytes]) -> None:
            nonlocal fd
            flush(bufs)
            closing, fd = fd, -1
            self._commit_tmp(tmp, closing, blob_id)

        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                pending.append(chunk)
                pending_len += len(chunk)
                size += len(chunk)
                if pending_len >= WRITE_BUFFER:
                    bufs, pending, pending_len = pending, [], 0
                    await trio.to_thread.run_sync(flush, bufs)
            await trio.to_thread.run_sync(finish, pending or [b""])
        except BaseException:
            if fd >= 0:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return blob_id, size, self.dir_of(blob_id)

    def delete(self, blob_id: str) -> None:
        try:
            self.path(blob_id).unlink()
        except FileNotFoundError:
            pass
