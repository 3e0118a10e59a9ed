"""Sealing a new sealed file front to back, written with ``O_DIRECT`` where the disk takes it.

A part downloaded into the read cache is sealed chunk after chunk from its start, and the reads
that follow are served from the part's verified plaintext in memory, not from this file (see
:class:`privifs.fs.parts.PartReader`): the file is for later. Written through the page cache,
each fresh page cost more system time than everything else in a cold read (perf of a cold 1 GiB
read: a quarter of the daemon's samples in ``copy_folio_from_iter_atomic`` under ``pwrite``).

A :class:`SequentialSealer` keeps the file's byte stream from offset 0 (header, then one slot
after another: the layout of :mod:`privifs.crypto.sealed`) in a page-aligned buffer, seals each
chunk straight into it, and writes every whole :data:`~privifs.directio.DIRECT_ALIGN` block of it
with ``O_DIRECT``; the few bytes after the last whole block wait for the next chunks, and the
file's tail goes through the page cache at :meth:`finish`. The caller still rewrites the header
(its final size) with :meth:`SealedFile.write_header` afterwards, as with chunk-by-chunk writes.
A filesystem that refuses ``O_DIRECT`` (on open or on a write: EINVAL) gets the same bytes
through the file's ordinary descriptor.
"""

from __future__ import annotations

import errno
import os

from privifs.crypto.sealed import _NO_DIRECT, CHUNK, HEADER, SLOT, SealedFile, local_store_error
from privifs.directio import DIRECT_ALIGN, BufferPool
from privifs.errors import DiskFullError

BLOCK_CHUNKS = 16  # chunks sealed per :meth:`SequentialSealer.add` at most (a 1 MiB block of the download)
_BUFFER = -(-(HEADER + BLOCK_CHUNKS * SLOT + DIRECT_ALIGN) // DIRECT_ALIGN) * DIRECT_ALIGN
_buffers = BufferPool(_BUFFER)


class SequentialSealer:
    """Seals chunks 0, 1, 2, … of ``sealed`` (a file just created or truncated to nothing) in
    order. Used by one thread at a time; :meth:`close` (or :meth:`finish`) gives its buffer back."""

    def __init__(self, sealed: SealedFile):
        self.sealed = sealed
        self._buf = _buffers.take()
        self._view = memoryview(self._buf)
        self.restart()

    @property
    def _direct(self) -> bool:
        """Whether blocks go past the page cache: until the disk refused O_DIRECT (the sealed
        file's own O_DIRECT descriptor, :meth:`SealedFile._direct`; none for a file in memory)."""
        return self.sealed._direct_fd != _NO_DIRECT

    def restart(self) -> None:
        """Start again from chunk 0 (the file was truncated to nothing)."""
        self._pos = 0  # the file offset of the buffer's first byte (a multiple of DIRECT_ALIGN)
        header = self.sealed.header_bytes()
        self._view[:HEADER] = header
        self._fill = HEADER
        self._next = 0

    def add(self, index: int, data: memoryview) -> None:
        """Seal ``data`` (whole chunks, only the file's last may be short; at most
        :data:`BLOCK_CHUNKS` of them) as chunks ``index``, ``index + 1``, …, and write what
        fills whole blocks."""
        if index != self._next:
            raise ValueError(f"chunk {index} sealed out of order (expected {self._next})")
        if len(data) > BLOCK_CHUNKS * CHUNK:
            raise ValueError(f"{len(data)} bytes at once: at most {BLOCK_CHUNKS * CHUNK}")
        for off in range(0, len(data), CHUNK):
            piece = data[off : off + CHUNK]
            self._fill += self.sealed.seal_into(index, piece, self._view[self._fill :])
            index += 1
            if len(piece) < CHUNK:  # the last chunk: nothing may follow it
                self._next = -1
                break
        else:
            self._next = index
        self._write(self._fill - self._fill % DIRECT_ALIGN)

    def finish(self) -> None:
        """Write the rest (through the page cache) and give the buffer back."""
        try:
            self._write(self._fill, direct=False)
        finally:
            self.close()

    def close(self) -> None:
        self.sealed._close_direct()  # (the cache keeps the file open for reads: one descriptor, not two)
        if self._buf is not None:
            self._view.release()  # (an mmap with a view on it cannot be closed)
            _buffers.give(self._buf)
            self._buf = None

    def _write(self, n: int, *, direct: bool = True) -> None:
        """Write the buffer's first ``n`` bytes at its offset and keep what follows them."""
        if not n:
            return
        done = self._write_direct(n) if direct else 0
        try:
            while done < n:
                done += os.pwrite(self.sealed.fd, self._view[done:n], self._pos + done)
        except OSError as exc:
            raise local_store_error(exc, f"writing {self.sealed.path}") from None
        rest = self._fill - n
        self._view[:rest] = self._view[n : self._fill]
        self._pos += n
        self._fill = rest

    def _write_direct(self, n: int) -> int:
        """Write the buffer's first ``n`` bytes (a multiple of DIRECT_ALIGN) with O_DIRECT; how
        many it did (0 when the filesystem refuses O_DIRECT: from then on, none)."""
        fd = self.sealed._direct()
        if fd < 0:
            return 0
        try:
            done = 0
            while done < n:
                wrote = os.pwrite(fd, self._view[done:n], self._pos + done)
                if wrote <= 0:
                    raise DiskFullError(f"short write to {self.sealed.path}")
                done += wrote
            return done
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise local_store_error(exc, f"writing {self.sealed.path}") from None
            self.sealed._refused_direct()  # the filesystem refuses O_DIRECT (or its alignment): page cache
            return 0
