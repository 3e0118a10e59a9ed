"""The read cache: verified content of tokens, sealed (never plaintext) in a diskcache.

One cache entry per token (content never changes under a token), holding a sealed file whose
chunks decrypt independently, so a random read of a cached 1 GiB file decrypts only the 64 KiB
chunks it touches. Unuploaded data lives in staging, never here, so eviction cannot lose it.

Reads never write. diskcache's own least-recently-used policy commits a transaction on every
``get`` (to store the access time), which fails on a full disk and made cached files unreadable
exactly when the disk filled; so diskcache runs with ``eviction_policy="none"`` (a ``get`` is
one SELECT) and this class keeps the LRU order in memory, loaded from diskcache's
``access_time`` column at start and written back in one batch when the cache next writes anyway
(an entry stored) and at close — best effort, never on a read. Where each entry's file is, is
remembered once the entry is stored or first opened, so a hit is one open(2) and no query (half
the CPU of a small file's read); evicting forgets it, and a remembered file that is gone or
damaged is looked up again.

Space (see :mod:`privifs.fs.space`): entries are evicted, least recently used first, to stay
within ``--cache-size`` *and* to keep the staging reserve free on the cache's filesystem; a
download needs room above the floor (else ENOSPC). Staging never takes space from the cache:
what is cached stays readable when writes fill the disk. Evicting unlinks the entry's file first and
then its row, so space comes back even when the table cannot be written; a row whose file is
gone reads as a miss.

``--cache-size`` bounds everything in the cache directory as the disk counts it: entries by
their allocated blocks, holes not counted (:func:`entry_footprint`), downloads in flight by the
blocks they will take (:attr:`ContentCache.reserved`, counted before they start, so several parts of a big file
fetched at once never take the cache past its limit), and diskcache's table (its database,
shared memory and WAL, kept small by checkpointing every :data:`WAL_PAGES` pages) with room for
its growth (:meth:`ContentCache.overhead`). Room is made before anything lands: a download
waits while the downloads in flight leave none, and an entry moved in evicts first.

A download is shared: concurrent readers of the same uncached token wait for one fetch. Its
plaintext goes into a sealed file under ``incoming/`` and enters the cache (by rename, see
:class:`AdoptingDisk`) only after the whole blob's GCM tag verified. The caller that downloads may
pass a :class:`Tap`, which sees each block of plaintext as it is sealed (the parts reader keeps a
part's plaintext in memory and computes its digest there, instead of reading the file back).
When the disk has no room even with every entry evicted (or fills while the content
downloads), content up to :data:`IN_MEMORY_MAX` is downloaded into a sealed file in memory
instead, for its caller alone (a full disk keeps files readable). A download that receives less
than :data:`DOWNLOAD_PROGRESS` bytes in :data:`DOWNLOAD_IDLE` seconds fails, whatever the
client retries meanwhile: a stalled server gives the reader EIO after that long, not after every
retry's timeout in turn (about 8 minutes before), and so does a server that trickles a byte a
second (any byte used to restart the wait: a 300 KB file took 83 hours, its reader unkillable
but by SIGKILL).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import diskcache
import trio

from privifs import paths
from privifs.client.datatokens import DOWNLOAD_PROGRESS
from privifs.client.sinks import BlockWriter
from privifs.client.vault import Vault
from privifs.crypto.sealed import CHUNK, SealedFile, data_extents, stored_size
from privifs.crypto.sealed_append import BLOCK_CHUNKS, SequentialSealer
from privifs.disk import free_bytes
from privifs.errors import DiskFullError, PrivifsError, ServerUnreachable, single_error
from privifs.fs.space import MiB, Space, open_error

log = logging.getLogger("privifs.fs.cache")

BLOCK = 4096  # the allocation unit a file not yet written is counted in
WAL_PAGES = 128  # diskcache's table checkpoints its WAL at this many pages (SQLite's default: 1000)
WAL_ROOM = 1 * MiB  # what the WAL may take: WAL_PAGES and a transaction's pages; truncated to this
TABLE_GROWTH = 64 * 1024  # pages the table's database may gain between two checks of the room
TABLE_FILES = ("cache.db", "cache.db-shm", "cache.db-wal")
ENTRY_DIRS = [f"{i:02x}" for i in range(256)]  # where entries go (AdoptingDisk.filename)
DIRS_CHECK = 5.0  # seconds between two measures of the entry directories (256 stats)
DOWNLOAD_IDLE = 90.0  # a download that gets no data this long fails (EIO for the read), retries or not
# … nor DOWNLOAD_PROGRESS (the client's rule for one request): data restart that wait only once
# that much more arrived
IN_MEMORY_MAX = 64 * MiB  # content up to this size is read through memory when the disk has no room
REOPEN_EVERY = 1.0  # seconds between two tries to open a table that could not be opened again
STALL_MEMORY = 2.0  # … and a fetch of the same token this soon after (the kernel retrying) fails at once


def _stall(token: str) -> ServerUnreachable:
    return ServerUnreachable(
        f"the vault sent no data for token {token} for {DOWNLOAD_IDLE:.0f}s "
        f"(none, or under {DOWNLOAD_PROGRESS // 1024} KiB: stalled or trickling)"
    )


def footprint(st: os.stat_result) -> int:
    """Disk space a file takes: its allocated blocks, and at least its size in whole blocks (a
    file just written may not have all its blocks allocated yet)."""
    return max(st.st_blocks * 512, -(-st.st_size // BLOCK) * BLOCK)


def entry_footprint(fd: int) -> int:
    """:func:`footprint` of an entry's sealed file, its holes not counted: a sparse file (a
    disk image with a few MiB written) takes what its data takes, not its size."""
    st = os.fstat(fd)
    used = st.st_blocks * 512
    if used >= st.st_size:
        return footprint(st)
    data = sum(hi - lo for lo, hi in data_extents(fd, 0, st.st_size))  # (dirty pages count)
    return max(used, -(-data // BLOCK) * BLOCK)


def entry_footprint_at(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return entry_footprint(fd)
    finally:
        os.close(fd)


def download_footprint(size: int) -> int:
    """What a download of ``size`` plaintext bytes will take once sealed: its whole blocks, and
    one more for the file's extent tree."""
    return -(-stored_size(size) // BLOCK) * BLOCK + BLOCK


@dataclass
class AdoptFile:
    """A value that moves an existing file into the cache instead of copying it."""

    path: str


TABLE_ERRORS = (sqlite3.Error, diskcache.Timeout)


class AdoptingDisk(diskcache.Disk):
    """diskcache's file storage, with entries moved in by rename (:class:`AdoptFile`) and kept in
    256 directories that stay.

    diskcache names a file ``xx/yy/<rest>.val``: with 65,536 possible directories, nearly every
    new entry made a directory and every evicted one removed its now-empty directories again, so
    a small file stored cost a ``mkdir`` (an inode allocation, which on ext4 without a journal
    scans past every recently freed inode: up to half a millisecond of CPU here) and an
    ``rmdir`` later, and 4 KiB per entry the cache limit did not count. Here a file is
    ``xx/<rest>.val`` and directories are never removed; entries of the older layout still
    read (their names are in the table) and their directories go as before."""

    last_path: str | None = None  # where the last adopted file went (to undo a failed insert)

    def filename(self, key=diskcache.core.UNKNOWN, value=diskcache.core.UNKNOWN):
        name = secrets.token_hex(16)
        filename = os.path.join(name[:2], name[2:] + ".val")
        return filename, os.path.join(self._directory, filename)

    def remove(self, file_path):
        if file_path.count(os.sep) > 1:  # the older two-level layout
            return super().remove(file_path)
        with suppress(OSError):
            os.remove(os.path.join(self._directory, file_path))

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if isinstance(value, AdoptFile):
            filename, full_path = self.filename(key, value)
            try:  # its directory usually exists (a makedirs first cost ~5 syscalls per file)
                os.rename(value.path, full_path)
            except FileNotFoundError:  # not yet, or diskcache removed it when it emptied
                os.makedirs(os.path.dirname(full_path), exist_ok=True)
                os.rename(value.path, full_path)
            self.last_path = full_path
            return os.path.getsize(full_path), diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key)


class Tap(Protocol):
    """Sees a download's plaintext block by block, in order, on the sink's worker thread, after the
    block is sealed. The plaintext is unverified until :meth:`ContentCache.fetch` returns; the
    block is a view valid only during the call (copy what you keep)."""

    def block(self, offset: int, data: memoryview) -> None: ...

    def restart(self) -> None:
        """The download starts over: forget every block seen."""

    def target(self, block: int) -> bytearray | None:
        """Memory (whole blocks of ``block`` bytes) the download's plaintext is to be put in, in
        place, instead of blocks reused for the next ones; None: the tap copies what it keeps."""


class Check(Tap, Protocol):
    """A tap with a verdict: :meth:`verify` raises IntegrityError unless the plaintext it saw is
    the content expected (privifs.crypto.digest.ContentCheck)."""

    def verify(self) -> None: ...


class SealedSink(BlockWriter):
    """Seals downloaded plaintext chunk by chunk into a cache file, on a worker thread while the
    next block downloads."""

    def __init__(
        self,
        sealed: SealedFile,
        nursery: trio.Nursery,
        tap: Tap | None = None,
        *,
        limit: int | None = None,
        room: Callable[[int], None] | None = None,
    ):
        block = BLOCK_CHUNKS * CHUNK  # whole chunks: each block starts a chunk
        super().__init__(nursery, block=block, target=None if tap is None else tap.target(block))
        self.sealed = sealed
        # a part (its plaintext kept in memory, where its first reads are served from) is
        # written past the page cache where the disk allows (see privifs.crypto.sealed_append);
        # a whole file is read from this file, through the page cache, as it is written
        self._sealer = SequentialSealer(sealed) if self._target is not None else None
        self.tap = tap
        self.limit = limit  # the most plaintext it takes (DiskFullError past it)
        # called (on the trio thread) with the plaintext received so far before each block is
        # written: makes room for it on the disk, or raises DiskFullError (a download of no
        # stated size reserved none beforehand)
        self.room = room

    async def _flush(self) -> None:
        if self.room is not None:
            self.room(self._offset + self._fill)
        await super()._flush()

    def _write_block(self, offset: int, data: bytes) -> None:
        if self.limit is not None and offset + len(data) > self.limit:
            raise DiskFullError(f"the content is larger than the {self.limit // MiB} MiB readable through memory")
        view = memoryview(data)
        index = offset // CHUNK
        if self._sealer is not None:
            self._sealer.add(index, view)
        else:
            for off in range(0, len(view), CHUNK):
                self.sealed.write_chunk(index, view[off : off + CHUNK])
                index += 1
        if self.tap is not None:
            self.tap.block(offset, view)

    def _restart(self) -> None:
        self.sealed.truncate(0)
        if self._sealer is not None:
            self._sealer.restart()
        if self.tap is not None:
            self.tap.restart()

    async def finish(self) -> None:
        await super().finish()
        if self._sealer is not None:
            sealer, self._sealer = self._sealer, None
            await trio.to_thread.run_sync(sealer.finish)
        self.sealed.size = self.total
        self.sealed.dense = True  # every chunk written: a hole in it later is damage (see ContentCache.open)
        self.sealed.write_header()

    def close(self) -> None:
        """Give back what the sink holds (its sealer's buffer) when the download ends without
        :meth:`finish`; after a finish, nothing."""
        if self._sealer is not None:
            self._sealer.close()
            self._sealer = None


OPEN_ROOM = 4 * MiB  # what the cache's table needs free to open on a full disk (its WAL files)


def drop_entries_for_room(entries: Path, room: int = OPEN_ROOM) -> bool:
    """Delete the cache's entry files, least recently written first, until ``room`` bytes are
    free on their disk (the table's rows of the files gone are dropped when it loads); whether
    any was deleted and the disk has that room now."""

    try:
        if free_bytes(entries) >= room:
            return False  # not a full disk: dropping entries would not help
        files = []
        for dirpath, _, names in os.walk(entries):
            for name in names:
                if name.endswith(".val"):
                    path = os.path.join(dirpath, name)
                    with suppress(OSError):
                        files.append((os.stat(path).st_mtime, path))
    except OSError:
        return False
    dropped = 0
    for _, path in sorted(files):
        if free_bytes(entries) >= room:
            break
        with suppress(OSError):
            os.unlink(path)
            dropped += 1
    if dropped:
        log.warning("the cache's disk is full: dropped %d cached files to open the cache; free space on it", dropped)
    return dropped > 0 and free_bytes(entries) >= room


class ContentCache:
    def __init__(self, directory: Path, size_limit: int, key: bytes):
        self.dir = directory
        paths.private_dir(self.dir)
        self.incoming = directory / "incoming"
        for leftover in self.incoming.glob("*") if self.incoming.exists() else ():
            # (a download's file; anything else, such as a directory, is not ours either: the
            # mount refused to start with "Is a directory")
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        self.incoming.mkdir(exist_ok=True, mode=0o700)
        self.size_limit = size_limit
        self.space = Space(directory)
        self._key = key
        self._lru: OrderedDict[str, int] = OrderedDict()  # token -> sealed size, least recent first
        self._touched: dict[str, float] = {}  # access times not yet written back
        self._paths: dict[str, str] = {}  # token -> its entry's file, as diskcache last said (no SELECT per open)
        self._evict_hooks: list[Callable[[str], None]] = []
        self._stalled: dict[str, float] = {}  # token -> when its download last stalled (see _download)
        self.used = 0
        self._dirs_measured: tuple[float, int] | None = None  # (when, footprint of the entry directories)
        self._dir_names: set[str] = set()  # the entry directories there when last measured
        self._down: float | None = None  # since when (monotonic) the table could not be opened again
        self.unavailable: str | None = None  # why not (privifs status), while it cannot
        try:
            try:
                self._open()
            except TABLE_ERRORS:
                # a disk something else filled: SQLite cannot make the table's WAL files. The
                # entries are only a cache: dropping the oldest makes the room (a full cache disk
                # refused the mount, though every file could have been read from the vault)
                if not drop_entries_for_room(directory / "entries"):
                    raise
                self._open()
        except TABLE_ERRORS as exc:
            raise open_error(directory, "the read cache", exc) from None
        self._inflight: dict[str, trio.Event] = {}
        self.downloads = 0
        self.reserved = 0  # bytes of downloads in flight: counted against the limit before they land
        self._landed = trio.Event()  # set (and replaced) whenever a download's reservation ends
        # within the limit from the start: a mount given a smaller --cache-size than the last one
        # kept the entries of the larger (status: '34.8 MiB of 8 MiB') until a download landed
        self._trim()

    def _made_again(self) -> bool:
        """Whether the cache directory was removed while mounted (``rm -rf ~/.cache`` to free
        space, a cleaner) and is made here again: every entry is forgotten (readers keeping
        files open are told) and diskcache's table opened afresh. Every download failed with
        ENOENT until the next mount, so uncached files were EIO.

        A table that cannot be opened again yet (a long ``rm -rf`` takes the new files as they
        are made; the disk refuses) leaves the cache *unavailable*: nothing is cached, reads go
        through memory (:meth:`fetch`), an uploaded file is not kept, and the table is tried
        again every :data:`REOPEN_EVERY` seconds. (The failure reached the programs: an fsync
        during such an ``rm`` was EIO, as was every read of a file not cached.)"""
        if self._down is None:
            if self.incoming.is_dir() and os.path.isdir(self.cache.directory):
                return False
            log.warning(
                "the cache directory %s was removed while mounted: it is made again "
                "(cached files are downloaded again)",
                self.dir,
            )
            for token in list(self._lru):
                self._forget(token)
            self._paths.clear()
            self._touched.clear()
            with suppress(*TABLE_ERRORS):
                self.cache.close()
        elif time.monotonic() - self._down < REOPEN_EVERY:
            return False
        try:
            paths.private_dir(self.dir)
            self.incoming.mkdir(exist_ok=True, mode=0o700)
            self._open()
        except (OSError, *TABLE_ERRORS) as exc:
            if self._down is None:
                log.warning(
                    "the read cache in %s cannot be opened again yet (%s): files are read through memory "
                    "and not cached until it can",
                    self.dir,
                    exc,
                )
            self._down = time.monotonic()
            self.unavailable = f"cannot be opened again after its directory was removed ({exc})"
            return False
        if self._down is not None:
            log.info("the read cache in %s is open again", self.dir)
            self._down = self.unavailable = None
        return True

    def _open(self) -> None:
        self.cache = diskcache.Cache(
            str(self.dir / "entries"),
            eviction_policy="none",
            disk=AdoptingDisk,
            statistics=False,
            sqlite_wal_autocheckpoint=WAL_PAGES,
            sqlite_journal_size_limit=WAL_ROOM,
        )
        self._dirs_measured = None
        try:
            for name in ENTRY_DIRS:  # made now, so that the limit counts them from the start (overhead)
                with suppress(OSError):
                    os.mkdir(os.path.join(self.cache.directory, name))
            self._load()
        except BaseException:
            self.cache.close()
            raise

    def _load(self) -> None:
        """The LRU order from diskcache's table (its documented columns; a read); entry files
        no row names are deleted (:meth:`_sweep_unnamed`)."""
        rows = self.cache._sql(
            "SELECT key, size, filename FROM Cache WHERE raw = 1 AND filename IS NOT NULL ORDER BY access_time"
        ).fetchall()
        self._sweep_unnamed()
        for token, _, filename in rows:
            try:
                size = entry_footprint_at(os.path.join(self.cache.directory, filename))
            except OSError:  # evicted on a full disk: the file went, the row stayed
                with suppress(*TABLE_ERRORS):
                    self.cache.delete(token)
            else:
                self._lru[token] = size
                self.used += size

    def _sweep_unnamed(self) -> None:
        """Delete entry files that no row of the table names. An entry moves in by a rename and
        then a row of the table (diskcache's ``set``): a daemon killed between the two left a
        file no limit counted and nothing would ever remove, as large as the file (a whole
        staged file of a GiB moves in so). Run when the cache opens, before any entry moves in."""
        named = {row[0] for row in self.cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        base = self.cache.directory
        gone = freed = 0
        for dirpath, _, names in os.walk(base):
            for name in names:
                if not name.endswith(".val"):
                    continue
                path = os.path.join(dirpath, name)
                if os.path.relpath(path, base) in named:
                    continue
                with suppress(OSError):
                    freed += entry_footprint_at(path)
                    os.unlink(path)
                    gone += 1
        if gone:
            log.info(
                "deleted %d cache files no entry named (%.1f MiB; left by a daemon that was killed, "
                "or by a removal of the cache directory while mounted)",
                gone,
                freed / MiB,
            )

    def close(self) -> None:
        if self._down is None:
            self._save_access()
            self.cache.close()

    def _save_access(self) -> None:
        if not self._touched:
            return
        try:
            with self.cache.transact():
                for token, when in self._touched.items():
                    self.cache._sql("UPDATE Cache SET access_time = ? WHERE key = ? AND raw = 1", (when, token))
            self._touched.clear()
        except TABLE_ERRORS as exc:
            log.debug("cache access times not saved (%s)", exc)

    def _touch(self, token: str, size: int) -> None:
        if token not in self._lru:
            self._lru[token] = size
            self.used += size
        self._lru.move_to_end(token)
        self._touched[token] = time.time()

    def _touch_open(self, token: str, sealed: SealedFile) -> None:
        """:meth:`_touch` for an entry just opened, measured only if not counted yet (a sparse
        entry's measure costs an lseek pair per data extent)."""
        self._touch(token, 0 if token in self._lru else entry_footprint(sealed.fd))

    def open(self, token: str) -> SealedFile | None:
        path = self._paths.get(token)
        if path is not None:  # known from an earlier open: no SELECT, one open(2)
            try:
                sealed = self._open_entry(path, token)
            except PrivifsError:
                del self._paths[token]  # gone or damaged: diskcache decides below
            else:
                self._touch_open(token, sealed)
                return sealed
        if self._down is not None:
            return None
        f = self.cache.get(token, read=True)  # one SELECT: eviction_policy "none" writes nothing
        if f is None:
            return None
        try:
            sealed = self._open_entry(f.name, token)
        except PrivifsError as exc:
            if os.path.exists(f.name):
                log.warning("dropping an unreadable cache entry (%s)", exc)
            self.evict(token)
            return None  # evicted between the lookup and the open, damaged, or of a newer format
        finally:
            f.close()
        self._paths[token] = sealed.path
        self._touch_open(token, sealed)
        return sealed

    def _open_entry(self, path: str, token: str) -> SealedFile:
        """``token``'s entry's file, opened for reading (bound to the token: another entry's file
        in its place is refused); a download's (its header says every chunk was written) reads
        a chunk of zeros or one cut off as damage, never as zeros."""
        sealed = SealedFile.open(path, self._key, place=token)
        sealed.dense = sealed.header_dense
        return sealed

    async def fetch(
        self, token: str, vault: Vault, size: int | None = None, *, tap: Tap | None = None, check: Check | None = None
    ) -> SealedFile:
        """The token's content, downloading and verifying it once for all concurrent callers.
        ``tap`` sees the plaintext if this call downloads it (not on a hit, nor when it waited for
        another caller's download); so does ``check``, whose verdict decides, before the download
        is kept, whether it is the content (IntegrityError if not: see privifs.crypto.digest)."""
        need = download_footprint(size or 0)
        self._made_again()
        while True:
            sealed = self.open(token)
            if sealed is not None:
                return sealed
            if self._down is not None:
                return await self._fetch_in_memory(token, vault, size, tap, check)
            event = self._inflight.get(token)
            if event is not None:
                await event.wait()
                if token in self._lru:
                    continue
                # the shared download failed: each waiter tries (and reports) on its own
            try:
                room = self._room_for_download(need)
            except DiskFullError:
                if size is not None and size > IN_MEMORY_MAX:
                    raise
                return await self._fetch_in_memory(token, vault, size, tap, check)
            if room:
                break
            await self._landed.wait()  # the downloads in flight leave no room: look again once one lands
        event = trio.Event()
        self._inflight[token] = event
        self.reserved += need
        held = [need]  # the room reserved for this download (grows with a download of no stated size)

        def room(received: int) -> None:
            more = download_footprint(received) - held[0]
            if more > 0:
                self._room_for_download(more)  # evicts, or DiskFullError (the size limit is kept at adoption)
                self.reserved += more
                held[0] += more

        path = self.incoming / secrets.token_hex(12)
        try:
            sealed = SealedFile.create(path, self._key, place=token)
        except BaseException as exc:
            self._release(need)
            del self._inflight[token]
            event.set()
            if isinstance(exc, PrivifsError) and not self.incoming.is_dir():
                # the directory went since _made_again looked (an rm -rf running): through memory
                return await self._fetch_in_memory(token, vault, size, tap, check)
            raise
        fallback = False
        try:
            self.downloads += 1
            await self._download(token, vault, size, sealed, tap, check, room=room if size is None else None)
            self._release(held[0])  # from here the file counts as an entry (no await in between)
            held[0] = 0
            if not self.adopt(token, str(path), bound_to=token):
                return sealed  # not kept (too large, no room): this reader keeps a private, unlinked copy
            sealed.close()
        except DiskFullError:
            # the disk could not hold the content after all: read through memory, as content
            # the disk has no room for from the start is. The room checked before may have gone
            # to another download that started at the same time (a read and the read-ahead, two
            # readers: each found room for itself, the second write got ENOSPC and so did the
            # read) or to another program; content of no stated size filled the disk to the
            # last byte, or read as ENOSPC
            sealed.close()
            path.unlink(missing_ok=True)
            if size is not None and size > IN_MEMORY_MAX:
                raise
            fallback = True
        except BaseException:
            sealed.close()
            path.unlink(missing_ok=True)
            raise
        finally:
            if self._inflight.get(token) is event:  # waiters retrying a failed download overlap
                del self._inflight[token]
            self._release(held[0])
            event.set()
        if fallback:
            for seen in (check, tap):
                if seen is not None:
                    seen.restart()  # it saw part of the content already
            return await self._fetch_in_memory(token, vault, size, tap, check)
        opened = self.open(token)
        if opened is None:
            return await self.fetch(token, vault, size, tap=tap, check=check)  # evicted at once by a concurrent insert
        return opened

    async def _fetch_in_memory(
        self, token: str, vault: Vault, size: int, tap: Tap | None, check: Check | None
    ) -> SealedFile:
        """No room on the cache's disk: the content, still sealed, in memory for this caller
        alone (never an entry; gone when the caller closes it), so that a full disk does not
        make files unreadable. Content of no stated size (None) larger than
        :data:`IN_MEMORY_MAX` is refused as the disk was."""
        if self._down is None:
            log.info(
                "no room in %s: reading %s bytes through memory, not cached",
                self.dir,
                size if size is not None else f"up to {IN_MEMORY_MAX}",
            )
        sealed = SealedFile.in_memory(self._key)
        try:
            await self._download(token, vault, size, sealed, tap, check, limit=IN_MEMORY_MAX)
        except BaseException:
            sealed.close()
            raise
        return sealed

    async def _download(
        self,
        token: str,
        vault: Vault,
        size: int | None,
        sealed: SealedFile,
        tap: Tap | None,
        check: Check | None,
        limit: int | None = None,
        room: Callable[[int], None] | None = None,
    ) -> None:
        """Download ``token`` into ``sealed``; a download that gets less than
        :data:`DOWNLOAD_PROGRESS` bytes in :data:`DOWNLOAD_IDLE` seconds (whatever the vault
        client retries meanwhile: a stalled or trickling server) fails, and so does the next
        fetch of that token for :data:`STALL_MEMORY` seconds (the kernel asks again at once when
        a read fails: the reader would wait twice)."""
        if trio.current_time() - self._stalled.get(token, float("-inf")) < STALL_MEMORY:
            raise _stall(token)
        with trio.CancelScope(deadline=trio.current_time() + DOWNLOAD_IDLE) as idle:
            arrived = 0  # since the wait last restarted
            furthest = 0  # the most of the content any attempt has received

            def progress(n: int) -> None:
                # only bytes past what an earlier attempt received: a server that sent the same
                # first 300 KB to each retry and then stalled restarted the wait every time, and
                # held a read for each of the client's attempts in turn (over 3 minutes, not 90 s)
                nonlocal arrived, furthest
                reached = sink.total + n
                if reached <= furthest:
                    return
                arrived += reached - furthest
                furthest = reached
                if arrived >= DOWNLOAD_PROGRESS:
                    arrived = 0
                    idle.deadline = trio.current_time() + DOWNLOAD_IDLE

            sink: SealedSink | None = None
            try:
                with single_error():
                    async with trio.open_nursery() as nursery:
                        sink = SealedSink(sealed, nursery, check if tap is None else tap, limit=limit, room=room)
                        sink.on_data = progress
                        try:
                            await vault.get(token, sink, size=size)
                            await sink.finish()
                        finally:
                            # progress refers to the sink: left so, the cycle kept each download's
                            # buffers until the garbage collector ran (a cold 1 GiB read of parts
                            # took the daemon from 79 to 265 MiB)
                            sink.on_data = None
                        if check is not None:
                            check.verify()
            finally:
                if sink is not None:
                    sink.close()  # once no block is being written (the nursery waited for them)
        if idle.cancelled_caught:
            self._stalled[token] = trio.current_time()
            while len(self._stalled) > 64:
                del self._stalled[next(iter(self._stalled))]
            raise _stall(token)
        self._stalled.pop(token, None)

    def _release(self, need: int) -> None:
        """A download's reservation ends: downloads waiting for room look again."""
        if need:
            self.reserved -= need
            self._landed.set()
            self._landed = trio.Event()

    def overhead(self) -> int:
        """Disk space held back from the entries for diskcache's table: its files as they are,
        the WAL counted at its largest, and room for the table to grow until the next check."""
        total = TABLE_GROWTH
        for name in TABLE_FILES:
            try:
                size = footprint(os.stat(os.path.join(self.cache.directory, name)))
            except OSError:
                size = 0
            total += max(size, WAL_ROOM) if name.endswith("-wal") else size
        return total + self._entry_dirs()

    def _entry_dirs(self) -> int:
        """What the 256 entry directories take on the disk: made when the cache opens and kept,
        4 KiB each and more as entries fill them, and du counts them (uncounted, a 16 MiB cache
        of 6,000 small files measured 16.5 MiB). Measured again every ``DIRS_CHECK`` seconds (a
        directory of many entries grows) and after an entry landed in a directory not there when
        last measured (one removed by hand, made again: see :meth:`adopt`)."""
        now = time.monotonic()
        if self._dirs_measured is None or now - self._dirs_measured[0] >= DIRS_CHECK:
            total = 0
            self._dir_names.clear()
            for name in ENTRY_DIRS:
                try:
                    total += footprint(os.stat(os.path.join(self.cache.directory, name)))
                except OSError:
                    continue
                self._dir_names.add(name)
            self._dirs_measured = (now, total)
        return self._dirs_measured[1]

    def _room_for_download(self, need: int) -> bool:
        """Evict until ``need`` more bytes fit within the size limit and the floor stays free
        (the reserve is restored once the entry is in, see :meth:`_trim`), or raise
        DiskFullError. False when the downloads in flight leave no room even with nothing
        cached: the caller waits for one to land. A download larger than the whole cache is
        never kept, and may go at once."""
        budget = self.size_limit - self.overhead()
        keepable = need <= budget
        if self.space.above_floor() + self.used < need:  # even an empty cache leaves too little:
            raise self._no_room(need)  # keep the entries (the caller may read through memory)
        while self._lru and (keepable and self.used + self.reserved + need > budget or self.space.above_floor() < need):
            self.evict(next(iter(self._lru)))
        if keepable and self.reserved and self.used + self.reserved + need > budget:
            return False
        if self.space.above_floor() < need:
            raise self._no_room(need)
        return True

    def _no_room(self, need: int) -> DiskFullError:
        return DiskFullError(
            f"no space left in {self.dir} to download {need / MiB:.1f} MiB for reading; free space on that disk"
        )

    def _trim(self, budget: int | None = None) -> None:
        """Evict least recently used entries while over the size limit or inside the staging
        reserve."""
        if budget is None:
            budget = self.size_limit - self.overhead()
        while self._lru and (self.used > budget or self.space.above_reserve() < 0):
            self.evict(next(iter(self._lru)))

    def adopt(self, token: str, path: str, bound_to: str | None = None) -> bool:
        """Move a sealed file holding ``token``'s content into the cache, evicting least recently
        used entries first so that it lands within the size limit. False (the file is then
        gone) when it cannot be kept: larger than the cache, no room left by the downloads in
        flight or above the staging reserve, another filesystem, or the cache's table cannot be
        written (a full disk). ``bound_to``: the place the file is bound to (see
        SealedFile.open; default: its name, as a staged file is); unless that is ``token``
        already (a download's), the file is bound to the token first."""
        self._made_again()
        if self._down is not None:
            with suppress(OSError):  # (gone too, if the directory was removed)
                os.unlink(path)
            return False
        if (bound_to if bound_to is not None else os.path.basename(path)) != token:
            try:
                sealed = SealedFile.open(path, self._key, writable=True, place=bound_to)  # (None: its name)
                try:
                    sealed.dense = sealed.header_dense  # (its flags kept as they are)
                    sealed.move_to(path, token)
                finally:
                    sealed.close()
            except PrivifsError as exc:
                log.debug("not caching %s (%s)", path, exc)
                with suppress(OSError):
                    os.unlink(path)
                return False
        try:
            size = entry_footprint_at(path)
        except FileNotFoundError:  # the cache directory was removed meanwhile (an rm -rf running)
            return False
        budget = self.size_limit - self.overhead()
        if size > budget:
            os.unlink(path)
            return False
        if token in self._lru or token in self._paths:  # (diskcache's set replaces a row it has)
            self.evict(token)  # a stale entry (file gone) is replaced, never counted twice
        while self._lru and self.used + self.reserved + size > budget:
            self.evict(next(iter(self._lru)))
        if self.used + self.reserved + size > budget:
            os.unlink(path)
            return False
        disk = self.cache.disk
        disk.last_path = None
        try:
            self.cache.set(token, AdoptFile(path))
        except (OSError, *TABLE_ERRORS) as exc:
            log.debug("not caching %s bytes (%s)", size, exc)
            for leftover in (path, disk.last_path):
                if leftover:
                    with suppress(OSError):
                        os.unlink(leftover)
            return False
        if disk.last_path:
            self._paths[token] = disk.last_path
            if os.path.basename(os.path.dirname(disk.last_path)) not in self._dir_names:
                self._dirs_measured = None  # a directory made for it: counted from now on
                budget = self.size_limit - self.overhead()
        self._touch(token, size)
        self._touched.pop(token, None)  # the new row has its access time: no UPDATE for it
        self._save_access()  # those of entries read meanwhile
        self._trim(budget)
        return token in self._lru

    def _forget(self, token: str) -> None:
        """What this object knows of the entry goes (readers keeping its file open are told);
        its file and row are the caller's."""
        for hook in self._evict_hooks:
            hook(token)
        size = self._lru.pop(token, None)
        if size is not None:
            self.used -= size
        self._touched.pop(token, None)
        self._paths.pop(token, None)

    def evict(self, token: str) -> None:
        """Drop the entry: its file first (the space comes back even if the table cannot be
        written), then its row."""
        self._forget(token)
        if self._down is not None:
            return
        f = self.cache.get(token, read=True)
        if f is None:
            return
        f.close()
        with suppress(OSError):
            os.unlink(f.name)
        try:
            self.cache.delete(token)
        except TABLE_ERRORS as exc:
            log.debug("cache row kept after its file was removed (%s)", exc)

    def give_room(self, need: int) -> int:
        """The server that shares this disk (the embedded engine) has no room for an upload of
        ``need`` bytes: least recently used entries are evicted until that much is free above
        the staging reserve, or none is left; returns how many went. Each entry is a copy of
        what the vault holds. (Kept, they held the disk while every upload failed with 507 for
        as long as the mount ran: a home directory on one small disk.)"""
        return self.evict_until(lambda: self.space.above_reserve() >= need, "the server sharing the cache's disk")

    def evict_until(self, enough: Callable[[], bool], who: str) -> int:
        """Least recently used entries are evicted until ``enough()`` or none is left (each is a
        copy of what the vault holds); returns how many went. ``who`` needed the room."""
        gone = 0
        while self._lru and not enough():
            self.evict(next(iter(self._lru)))
            gone += 1
        if gone:
            log.warning("%s had no room left: dropped %d cached files for it", who, gone)
        return gone

    def put(self, key: str, data: bytes) -> bool:
        """Keep ``data`` (small: a big file's manifest) as the entry ``key``, sealed like every
        entry; False when it cannot be kept (see :meth:`adopt`)."""
        self._made_again()
        path = self.incoming / f"put-{secrets.token_hex(8)}"
        try:
            sealed = SealedFile.create(path, self._key, place=key)
            try:
                sealed.write(0, data, stamp=0)
            finally:
                sealed.close()
        except PrivifsError as exc:
            log.debug("not caching %d bytes under %s (%s)", len(data), key, exc)
            with suppress(OSError):
                os.unlink(path)
            return False
        return self.adopt(key, str(path), bound_to=key)

    def get(self, key: str) -> bytes | None:
        """The bytes of the entry ``key`` (one :meth:`put` made), or None."""
        sealed = self.open(key)
        if sealed is None:
            return None
        try:
            return bytes(sealed.read(0, sealed.size))
        except PrivifsError as exc:
            log.warning("dropping an unreadable cache entry (%s)", exc)
            self.evict(key)
            return None
        finally:
            sealed.close()

    def take(self, token: str, dest: Path) -> bool:
        """Move ``token``'s cached file to ``dest`` (same filesystem) and drop the entry: the
        content leaves the cache without a copy. False if it is not cached or cannot be moved."""
        if self._down is not None:
            return False
        f = self.cache.get(token, read=True)
        if f is None:
            return False
        f.close()
        try:
            os.rename(f.name, dest)
        except OSError:
            return False
        self._forget(token)
        try:
            self.cache.delete(token)
        except TABLE_ERRORS as exc:  # a row whose file is gone reads as a miss
            log.debug("cache row kept after its file was moved (%s)", exc)
        return True

    def holds(self, token: str) -> bool:
        """Whether ``token``'s content is in the cache (no I/O)."""
        return token in self._lru

    def used_again(self, token: str) -> None:
        """Mark ``token``'s entry recently used without opening it (a reader that keeps the file
        open reads it again); nothing if it is not held."""
        if token in self._lru:
            self._lru.move_to_end(token)
            self._touched[token] = time.time()

    def on_evict(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(token)`` whenever an entry is dropped (a reader keeping files open closes them)."""
        self._evict_hooks.append(hook)

    def volume(self) -> int:
        return self.used
