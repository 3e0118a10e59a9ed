"""Staged content: files written in the mount and not yet uploaded, sealed on local disk
(see :mod:`privifs.crypto.sealed`) under ``<state>/staging/<id>``.

A staged file is kept until the vault has acknowledged the token made from it, whatever happens
in between (failed uploads, restarts, ``kill -9``). Every write also rewrites the file's header
with its size and the write's time (in the same ``pwrite`` for a write within the first 64 KiB),
so the content a write returned is recoverable from the staged file and its index row (committed
when the file was created or first written) alone: a ``close`` needs no request of its own to be
durable (privifs has no FUSE ``flush`` handler), and a restart takes the size, and the time of a
write the index had not recorded yet, from the header. While an upload reads a staged file it is
*frozen*; a write arriving meanwhile first clones it (copy-on-write), so an upload never sends a
mix of two versions.

Space: a write that makes a staged file grow first makes sure the disk keeps its *floor* free
(:mod:`privifs.fs.space`) and fails with :class:`~privifs.errors.DiskFullError` (ENOSPC)
otherwise. Nothing staged is ever given up for space, and staging does not evict the read cache
either (the cache keeps the staging reserve free by itself), so what is cached stays readable
when a write fills the disk. A staged file written by a newer privifs (a newer sealed format) stops the
mount with a clear error instead of being taken for damage and dropped.

Creating a file costs this machine's ext4 0.2–1 ms of kernel time (inode allocation), far more
than anything else a small-file ``create`` does, so empty sealed files (a header, no content) are
made ahead by one worker thread in ``staging/.spare/`` (:class:`SparePool`) and a new staged file
is a spare renamed into place (~25 µs). Spares hold no data: those left by a stop are removed at
the next start.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import secrets
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

from privifs import paths
from privifs.crypto.sealed import CHUNK, SLOT, SealedFile, data_extents, local_store_error, stored_size
from privifs.disk import free_bytes
from privifs.errors import DiskFullError, FormatVersionError, LocalStoreError, PrivifsError
from privifs.fs.redo import RedoRecord
from privifs.fs.space import MiB, Space

log = logging.getLogger("privifs.fs.staging")

REMOVER_WAIT = 5.0  # seconds a write that finds no room waits for staged files being deleted


class StagedFile:
    __slots__ = ("id", "sealed", "frozen", "staging", "entry_flushed")

    def __init__(self, staged_id: str, sealed: SealedFile, staging: Staging):
        self.id = staged_id
        self.sealed = sealed
        sealed.redo = staging.redo  # a rewrite of a chunk holding data survives a kill -9 (privifs.fs.redo)
        self.frozen = False
        self.staging = staging
        # whether the staging directory, holding this file's name, was flushed to disk since the
        # file got that name (``--fsync local`` flushes the directory only for files not yet)
        self.entry_flushed = False

    def freeze(self) -> None:
        """No more writes here (a write goes to a copy, see ``Filesystem.writable_staged``); the
        header records the size, so the file says what it holds wherever it goes next (uploaded,
        recorded as an interrupted upload, moved into the cache)."""
        self.frozen = True
        self.sealed.sync_header()

    def write(self, offset: int, data: bytes | memoryview, stamp: int) -> int:
        """Write plaintext at ``offset`` at time ``stamp`` (ns; recorded in the header with the
        new size; 0 for a copy of content, not a change), after making sure the disk has room
        for what it may take: up to its own slots (past the end, the gap stays a hole on disk and
        nothing is reserved for it; inside a file with holes, filling one takes new blocks)."""
        end, size = offset + len(data), self.sealed.size
        own = (len(data) // CHUNK + 2) * SLOT  # the most a write takes on disk: its own slots
        if offset < size and self.sealed.sparse_on_disk() and self.sealed.touches_hole(offset, min(end, size)):
            self.staging.ensure_room(own)  # into a hole: new disk, as an append of the same length takes
        elif end > size:
            self.staging.ensure_room(min(stored_size(end) - stored_size(size), own))
        return self.sealed.write(offset, data, stamp=stamp)

    @property
    def size(self) -> int:
        return self.sealed.size

    @property
    def path(self) -> str:
        return self.sealed.path


class SparePool:
    """Empty sealed files made ahead on a worker thread (started at the first :meth:`take`), kept
    open; the trio thread takes them. The worker only creates files in its own directory and
    hands each over whole through a deque, so no sealed file is used by two threads at once."""

    SIZE = 16

    def __init__(self, directory: Path, key: bytes):
        self.dir = directory
        paths.private_dir(self.dir)
        for leftover in self.dir.iterdir():  # made by an earlier run and never used: no data
            leftover.unlink(missing_ok=True)
        self._key = key
        self._ready: deque[SealedFile] = deque()
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> SealedFile | None:
        """An empty sealed file (its ``path`` inside the pool's directory), or None if none is
        ready; asks the worker for more when the pool runs low."""
        try:
            sealed = self._ready.popleft()
        except IndexError:
            sealed = None
        if len(self._ready) <= self.SIZE // 2 and not self._wanted.is_set():
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, name="privifs-spare-files", daemon=True)
                self._thread.start()
            self._wanted.set()
        return sealed

    def ready(self) -> int:
        return len(self._ready)

    def _fill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self.SIZE:
                try:
                    self._ready.append(SealedFile.create(self.dir / secrets.token_hex(12), self._key))
                except PrivifsError:
                    break  # e.g. a full disk: staged files are created on demand until asked again


def _copy_range(src: int, dst: int, size: int) -> None:
    """Copy the first ``size`` bytes of ``src`` to ``dst`` by offset (the descriptors' positions
    are left alone), its holes on disk left holes (:func:`data_extents`): in the kernel where
    the filesystems allow it, else through a buffer."""
    in_kernel = True
    for pos, end in data_extents(src, 0, size):
        while pos < end:
            if in_kernel:
                try:
                    n = os.copy_file_range(src, dst, end - pos, pos, pos)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    in_kernel = False
                    continue
            else:
                data = os.pread(src, min(1 << 20, end - pos), pos)
                n = os.pwrite(dst, data, pos) if data else 0
            if n == 0:
                break
            pos += n
    os.ftruncate(dst, size)  # (a hole at the end)


class Remover:
    """Deletes staged files on a thread of its own (started at the first :meth:`remove`). Deleting
    a file costs ext4 tens of microseconds of kernel time, and it waits when the journal is busy
    committing (an fsync of --fsync local): 0.1-0.3 ms per SQLite commit in rollback-journal mode
    (its journal is created and deleted at each commit), all of it on the trio thread. Nothing
    depends on the file being gone at once: it is no longer named by the index, and a file the
    thread did not get to before a crash is an orphan the next start deletes
    (``Filesystem.open_staged_files``)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pending: set[str] = set()
        self._thread: threading.Thread | None = None

    def remove(self, staged_id: str, path: str | os.PathLike) -> None:
        with self._lock:
            self._pending.add(staged_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="privifs-staged-removal", daemon=True)
            self._thread.start()
        self._queue.put((staged_id, os.fspath(path)))

    def pending(self) -> set[str]:
        with self._lock:
            return set(self._pending)

    def drain(self, timeout: float) -> None:
        """Wait until every file queued so far is deleted (``timeout`` seconds at most)."""
        with self._done:
            self._done.wait_for(lambda: not self._pending, timeout)

    def _run(self) -> None:
        while True:
            staged_id, path = self._queue.get()
            with contextlib.suppress(OSError):  # gone already, or left as an orphan for the next start
                os.unlink(path)
            with self._lock:
                self._pending.discard(staged_id)
                if not self._pending:
                    self._done.notify_all()


class Staging:
    def __init__(self, directory: Path, key: bytes, *, keep_free: Callable[[], int] = lambda: 0):
        """``keep_free``: bytes to leave free beyond the floor (the index's reserve while it is
        given back, :class:`privifs.disk.DiskReserve`)."""
        self.keep_free = keep_free
        self.dir = directory
        self._dir = os.fspath(directory)
        paths.private_dir(self.dir)
        self._key = key
        self.space = Space(self.dir)
        self.remover = Remover()
        self.redo = RedoRecord(self.dir)
        self.redo.replay(self.dir, key)  # before anything reads the staged files
        self._refuse_newer_files()
        self.spares = SparePool(self.dir / ".spare", key)
        # given the room a write needs (a test of it) before it gets ENOSPC: the read cache on the
        # same disk drops entries (set by the daemon; see Space for the margins)
        self.make_room: Callable[[Callable[[], bool]], object] | None = None

    def _refuse_newer_files(self) -> None:
        for staged_id in self.ids():
            try:
                SealedFile.open(self.path(staged_id), self._key).close()
            except FormatVersionError:
                raise
            except PrivifsError:
                pass  # damage is reported (and handled) when the node reattaches it

    def ensure_room(self, need: int) -> None:
        """Make sure ``need`` more bytes can be staged while the floor stays free, or raise
        DiskFullError."""
        if need <= 0 or self._has_room(need):
            return
        if self.remover.pending():
            # files removed a moment ago free their space on the remover's thread: a write
            # right after an unlink got ENOSPC while it was still deleting them
            self.remover.drain(REMOVER_WAIT)
            if self._has_room(need):
                return
        if self._room_made(need):
            return
        floor = self.space.floor()
        raise DiskFullError(
            f"no space left for staging in {self.dir}: the disk is full (privifs keeps "
            f"{floor / MiB:.0f} MiB free for its index); delete files or free space on it"
        )

    def _has_room(self, need: int) -> bool:
        """Whether ``need`` more bytes can be staged with the floor (and ``keep_free``) left free."""
        return self.space.above_floor() - self.keep_free() >= need

    def _room_made(self, need: int) -> bool:
        """Whether :attr:`make_room` made room for ``need`` more bytes."""
        if self.make_room is None:
            return False
        self.make_room(lambda: self._has_room(need))
        return self._has_room(need)

    def writable(self) -> int:
        """Bytes of content that can still be written: free space above the floor, less the
        sealing overhead."""
        return max(0, self.space.above_floor() - self.keep_free()) * CHUNK // SLOT

    def path(self, staged_id: str) -> Path:
        return self.dir / staged_id

    def create(self) -> StagedFile:
        spare = self.spares.take()
        if spare is not None:
            # (named by the id it is staged under: its header binds it to that name)
            staged_id = os.path.basename(spare.path)
            path = f"{self._dir}/{staged_id}"  # a string: pathlib's joins cost more than the rename
            try:
                os.rename(spare.path, path)
            except OSError:
                spare.close()
                with contextlib.suppress(OSError):
                    os.unlink(spare.path)
            else:
                spare.path = path
                return StagedFile(staged_id, spare, self)
        staged_id = secrets.token_hex(12)
        path = f"{self._dir}/{staged_id}"
        try:
            return StagedFile(staged_id, SealedFile.create(path, self._key), self)
        except DiskFullError:
            if not self._room_made(SLOT):
                raise
            return StagedFile(staged_id, SealedFile.create(path, self._key), self)
        except LocalStoreError:
            if self.dir.is_dir():
                raise
        # removed while mounted (by hand, a cleaner): every create failed with EIO until a
        # remount (helper hX). What was staged in it is lost; new files can be staged again.
        log.error("the staging directory %s was removed while mounted; made again", self.dir)
        for d in (self.dir, self.redo.dir, self.spares.dir):
            paths.private_dir(d)
        return StagedFile(staged_id, SealedFile.create(path, self._key), self)

    def open(self, staged_id: str, *, bound_to: str | None = None) -> StagedFile:
        """The staged file ``staged_id``; ``bound_to``: the place a file just moved here was bound
        to (a cache entry's token, see SealedFile.open), which then binds it to its new place."""
        path = self.path(staged_id)
        sealed = SealedFile.open(path, self._key, writable=True, recover=True, place=bound_to)
        if bound_to is not None:
            try:
                sealed.move_to(path)
            except BaseException:
                sealed.close()
                raise
        return StagedFile(staged_id, sealed, self)

    def open_read(self, staged_id: str) -> SealedFile:
        """A staged file opened for reading only."""
        return SealedFile.open(self.path(staged_id), self._key)

    def clone(self, staged: StagedFile) -> StagedFile:
        """A writable copy of a frozen staged file (raw sealed bytes; no decryption)."""
        staged.sealed.sync_header()
        fresh = self.from_sealed(staged.sealed)
        fresh.sealed.uncut = staged.sealed.uncut  # (the copy is cut before its first change)
        return fresh

    def from_sealed(self, source: SealedFile) -> StagedFile:
        """A staged copy of an open sealed file (a cache entry or another staged file: same format
        and key, copied as it is, never decrypted). It is copied from the open descriptor, not by
        path: the cache may evict an entry while it is open (short of space), and its name is
        gone then while its content still reads."""
        new_id = secrets.token_hex(12)
        try:
            st = os.fstat(source.fd)
            size = st.st_size
            self.ensure_room(min(size, st.st_blocks * 512))  # a sparse file's holes are copied as holes
        except OSError as exc:
            raise local_store_error(exc, "staging a file for writing") from None
        dest = self.path(new_id)
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _copy_range(source.fd, fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            dest.unlink(missing_ok=True)
            raise local_store_error(exc, "staging a file for writing") from None
        try:  # bound to the source's place as copied: bound to its own now
            return self.open(new_id, bound_to=source.place)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def remove(self, staged: StagedFile | str, *, soon: bool = False) -> None:
        """Delete a staged file; ``soon``: on the remover's thread (see :class:`Remover`), unless
        the disk is down to its floor (then the space is freed before the caller goes on)."""
        staged_id = staged if isinstance(staged, str) else staged.id
        if isinstance(staged, StagedFile):
            staged.sealed.close()
        if soon and self.space.above_floor() > 0:
            self.remover.remove(staged_id, self.path(staged_id))
        else:
            self.path(staged_id).unlink(missing_ok=True)

    def ids(self) -> set[str]:
        """The staged files on disk (not those the remover is about to delete)."""
        return {p.name for p in self.dir.iterdir() if p.is_file()} - self.remover.pending()

    def usage(self) -> int:
        """Disk the staged files take (0 while the directory is missing: status still answers)."""
        total = 0
        with contextlib.suppress(FileNotFoundError):
            for p in self.dir.iterdir():
                with contextlib.suppress(FileNotFoundError):  # (removed meanwhile)
                    if p.is_file():
                        total += p.stat().st_blocks * 512
        return total

    def free(self) -> int | None:
        """Bytes free on the staging directory's disk for this user (None if it cannot be told)."""
        try:
            return free_bytes(self.dir)
        except OSError:
            return None
