"""The redo record: a chunk of a staged file being rewritten in place is first written here, so
that a daemon killed in the middle of the rewrite loses nothing.

A sealed chunk's slot spans 17 pages, and the kernel stops a write through the page cache
between two pages when the process gets SIGKILL: a ``kill -9`` of the daemon during a write
that rewrote part of a chunk holding data left the slot half new and half old. It no longer
authenticated, so the chunk read as EIO after the next mount (its bytes written before
included) and the file's upload failed until the chunk was written again (a helper measured 2
such chunks in 20 kills during random 4 KiB-1 MiB writes).

Before such a rewrite (a slot inside the size the file's header records; long runs go to disk
in one O_DIRECT write and are not cut so, see :meth:`SealedFile._write_run`), the new slot is
written to ``.redo/record`` in the staging directory (one ``pwrite``: the staged file's name,
the chunk's index and the sealed slot), then in place. :meth:`RedoRecord.replay`, when the
staging opens at the next mount, finds the slot it names: a slot that does not authenticate
gets the record's, provided the record's authenticates as that chunk of that file (a record a
kill cut short does not; the rewrite it announced had not begun). One record is enough: the
record and its rewrite are one step under a lock, and every rewrite completes before the next.
The record is not flushed: it covers a killed daemon, not a power loss (what ``fsync``
promises is flushed in place).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path

from privifs import paths
from privifs.crypto.sealed import CHUNK, HEADER, SLOT, SealedFile, local_store_error
from privifs.errors import DiskFullError, IntegrityError, PrivifsError

log = logging.getLogger("privifs.fs.redo")

MAGIC = b"PVFSREDO"
_HEAD = struct.Struct("<8sH64sQI")  # magic, name length, name (padded), chunk index, slot length


class RedoRecord:
    """The redo record of one staging directory; :meth:`rewrite` may be called from any thread."""

    def __init__(self, staging_dir: Path):
        self.dir = paths.private_dir(staging_dir / ".redo")
        self.path = self.dir / "record"
        self._lock = threading.Lock()
        self._fd: int | None = None

    def rewrite(self, sealed: SealedFile, index: int, slot: memoryview, out: memoryview, offset: int) -> int:
        """Record ``slot`` (chunk ``index`` of ``sealed``, sealed) here, then write ``out`` (the
        slot, possibly with the header before it) at ``offset`` of ``sealed``; returns what that
        pwrite wrote."""
        name = os.path.basename(sealed.path).encode()
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                record = _HEAD.pack(MAGIC, len(name), name, index, len(slot)) + bytes(slot)
                if os.pwrite(self._fd, record, 0) != len(record):
                    raise DiskFullError(f"short write to {self.path}")
                return os.pwrite(sealed.fd, out, offset)
            except OSError as exc:
                raise local_store_error(exc, f"writing {sealed.path}") from None

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def replay(self, staging_dir: Path, key: bytes) -> bool:
        """Complete the rewrite a killed daemon left half done, if any (see the module's
        docstring); whether one was completed."""
        try:
            data = self.path.read_bytes()
        except OSError:
            return False
        if len(data) < _HEAD.size:
            return False
        magic, length, name, index, size = _HEAD.unpack_from(data)
        slot = data[_HEAD.size : _HEAD.size + size]
        if magic != MAGIC or length > 64 or len(slot) != size or size > SLOT:
            return False
        target = staging_dir / name[:length].decode("ascii", "replace")
        if not target.is_file():
            return False
        try:
            sealed = SealedFile.open(target, key, writable=True)
        except PrivifsError:
            return False
        try:
            if index * CHUNK >= sealed.size:
                return False  # past the end now (the next mount cuts what is there)
            try:
                sealed.read_chunk(index)
                return False  # readable: the rewrite was done (or never begun)
            except IntegrityError:
                pass
            try:
                sealed.read_slot(index, memoryview(slot))  # authenticates as this chunk of this file?
            except IntegrityError:
                return False  # the record is not this chunk's (cut short by the kill, or stale)
            os.pwrite(sealed.fd, slot, HEADER + index * SLOT)
            log.warning(
                "completed a write to chunk %d of staged file %s that a killed daemon left half done",
                index,
                target.name,
            )
            return True
        except OSError as exc:
            log.error("could not complete a write a killed daemon left half done in %s: %s", target, exc)
            return False
        finally:
            sealed.close()
