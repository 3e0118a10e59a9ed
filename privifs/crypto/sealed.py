"""The local at-rest format for staged and cached content: a sealed file.

Plaintext never touches the local disk. Content is cut into 64 KiB chunks, each encrypted with
AES-256-GCM under the *local key* (derived from the user's key, see :func:`local_key`) with a
fresh random nonce on every write, so any chunk can be read or rewritten alone::

    offset 0   header, 64 bytes: b"PVFSSEAL" | version (1) | chunk shift (1) | flags (1) | 5 reserved |
               file id (16) | size (8, little-endian) | stamp (8, little-endian) | header MAC (16)
    offset 64 + i * (CHUNK + 32):  chunk i =
               nonce (12) | length n (4, little-endian) | ciphertext (n) | tag (16)

A chunk holds its first ``n`` ≤ CHUNK plaintext bytes; the rest of the chunk reads as zeros, so
a small file costs a small chunk. A write of zeros into a hole (past the end, or a chunk never
written) leaves it a hole: ``dd if=/dev/zero``, ``posix_fallocate``'s fallback and a sparse
file's gaps take no disk, and the parts made of them are holes in the vault too. The associated data of chunk ``i`` is
``file id || i (8 bytes) || n (4 bytes)``: chunks cannot be moved, swapped between files or
shortened unnoticed. A slot that was never written (all zero) is a hole, except in a file known
to have every chunk written (``SealedFile.dense``: a part's cache file, and a download's, whose
header has the flag ``DENSE``), where it is damage. ``size`` in the header is
the logical size; plaintext beyond it is kept zero. A chunk that fails authentication raises
:class:`~privifs.errors.IntegrityError`.

The header's last 16 bytes are two MACs under the header key, HMAC-SHA256(local key,
``privifs sealed header v1``), each the first 8 bytes of an HMAC-SHA256: of ``header\0`` and the
header's first 48 bytes (a size, stamp, flags or file id changed on the disk: an edited size was
served and uploaded, cut short or with zeros added), and of ``place\0``, the file id and the
file's *place* (a staged file's id, a cache entry's token: a file of another place copied or
moved there was served and uploaded as this one's). Files written before them carry 16 zero
bytes there (the field was reserved), which reads as a header without MACs, so they need no new
version (nor do older readers mind them); their next header write adds them. A staged file
whose header's own MAC fails (its place's holds) is opened with the size its last chunk states
(:meth:`SealedFile.open`'s ``recover``), not lost.

``stamp`` is the time (ns since the epoch) of the last write made with one (0: none): a write
given a stamp rewrites the header with its new size and that stamp as part of the write (in the
same ``pwrite`` when it touches only chunk 0), so a staged file describes itself after every
write, whether or not anything closed it (see :mod:`privifs.fs.staging`). Older readers ignore
the field (it was reserved and zero), so it needs no new version.

Versions: ``VERSION`` is the format written; ``READABLE`` the formats this code reads (a change of
the layout adds a version and, if old files are still to be read, a reader for them). A file of
a newer version raises :class:`~privifs.errors.FormatVersionError` naming both versions, so an
older privifs never misreads (or discards) what a newer one staged.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import hmac
import logging
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privifs.directio import DIRECT_ALIGN
from privifs.errors import DiskFullError, FormatVersionError, IntegrityError, LocalStoreError, ProcessLimitError
from privifs.zeros import all_zero

log = logging.getLogger("privifs.crypto.sealed")

MAGIC = b"PVFSSEAL"
VERSION = 2
READABLE = frozenset({2})
CHUNK_SHIFT = 16
CHUNK = 1 << CHUNK_SHIFT
PREFIX = 16  # nonce + length
OVERHEAD = PREFIX + 16
SLOT = CHUNK + OVERHEAD
HEADER = 64
_HEADER = struct.Struct("<8sBBB5s16sQQ16s")
DENSE = 0x01  # header flag (byte 10): every chunk below the size is written (a download's file)
ZERO_CHUNK = bytes(CHUNK)
ZERO_PREFIX = bytes(PREFIX)
PARKED = -2  # SealedFile._fd of a parked file (closed until its next use)
_UNPARK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _header_hmac(key: bytes) -> hmac.HMAC:
    """An HMAC keyed for headers under the local key ``key``, copied for each MAC: keying an
    HMAC again for each one cost about a third of a header's check (a cached small file's open
    checks two MACs)."""
    return hmac.new(hmac.digest(key, b"privifs sealed header v1", hashlib.sha256), digestmod=hashlib.sha256)


def _mac8(key: bytes, message: bytes) -> bytes:
    h = _header_hmac(key).copy()
    h.update(message)
    return h.digest()[:8]


def _header_mac(key: bytes, head: bytes) -> bytes:
    """The header's own MAC (bytes 48-55): of its first 48 bytes, under the local key ``key``."""
    return _mac8(key, b"header\0" + head[:48])


def _place_mac(key: bytes, file_id: bytes, place: str) -> bytes:
    """The MAC binding a file to its place (bytes 56-63): of its file id and ``place`` (a
    staged file's id, a cache entry's token), under the local key ``key``."""
    return _mac8(key, b"place\0" + file_id + place.encode())


def _place_of(path: str, place: str | None) -> str:
    """The place a sealed file at ``path`` is bound to: ``place``, or by default its name."""
    return place if place is not None else os.path.basename(path)


def local_key(user_key: bytes) -> bytes:
    """The key for local at-rest data, derived from the user's AES key (HKDF-SHA256)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"privifs-local-at-rest",
        info=b"privifs local staging and cache key v1",
    ).derive(user_key)


MEMORY = "<memory>"  # the path of a sealed file in memory (SealedFile.in_memory)

_buffers = threading.local()
SCRATCH_MAX = 16 * SLOT + CHUNK  # what a 1 MiB read needs, unaligned
# Long writes and an upload's reads go past the page cache (O_DIRECT) where the disk allows: on
# the VMs privifs runs on each fresh page-cache page is dear (1 GiB written through it: 1.2-5.8 s
# of system time; with O_DIRECT 0.1 s: see privifs.directio). A run of at least DIRECT_CHUNKS
# whole chunks is sealed into a page-aligned buffer and its whole pages written so; the partial
# page at each end goes through the page cache. Short writes (a database's pages) and the reads
# programs make stay in the page cache, where repeating them is cheap.
DIRECT_CHUNKS = 4
_NO_DIRECT = -3  # SealedFile._direct_fd of a file whose disk refused O_DIRECT


class RedoLog(Protocol):
    """Records a slot before it is written in place (privifs.fs.redo.RedoRecord)."""

    def rewrite(self, sealed: SealedFile, index: int, slot: memoryview, out: memoryview, offset: int) -> int: ...


def _scratch(name: str, size: int) -> memoryview:
    """A reusable per-thread buffer of ``size`` bytes. Reads and writes go through these instead
    of fresh allocations: on VMs that hand freed memory back to the host, touching new pages
    costs more than the AES-GCM work itself."""
    if size > SCRATCH_MAX:
        return memoryview(bytearray(size))  # a rare large read: not kept
    buf = getattr(_buffers, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(max(size, CHUNK))
        setattr(_buffers, name, buf)
    return memoryview(buf)[:size]


def _aligned_scratch(size: int) -> memoryview:
    """A reusable per-thread page-aligned buffer of ``size`` bytes (for O_DIRECT)."""
    keep = -(-(SCRATCH_MAX + 3 * DIRECT_ALIGN) // DIRECT_ALIGN) * DIRECT_ALIGN  # 17 slots and their pages' edges
    if size > keep:
        return memoryview(mmap.mmap(-1, -(-size // DIRECT_ALIGN) * DIRECT_ALIGN))[:size]  # rare: not kept
    buf = getattr(_buffers, "aligned", None)
    if buf is None:
        buf = _buffers.aligned = mmap.mmap(-1, keep)
    return memoryview(buf)[:size]


# what a user can do about a limit of the daemon reached on the local disk
PROCESS_LIMITS = {
    errno.EMFILE: "the mount's open-file limit: close files, or mount again with a higher 'ulimit -n'",
    errno.ENFILE: "the system's open-file limit: close files, or raise fs.file-max",
    # (the daemon raises its soft limit to the hard one: what is left is a hard limit, a
    # service's LimitFSIZE=, or the largest file the staging disk's filesystem holds)
    errno.EFBIG: "the largest file the mount may write (its hard 'ulimit -f', or the staging disk's filesystem)",
}


def local_store_error(exc: OSError, what: str) -> Exception:
    """The error of this hierarchy for a failed local-disk operation (ENOSPC → DiskFullError)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left for {what}")
    if exc.errno in PROCESS_LIMITS:
        return ProcessLimitError(f"{what}: {exc.strerror} ({PROCESS_LIMITS[exc.errno]})", exc.errno)
    return LocalStoreError(f"{what}: {exc.strerror}")


def check_version(path: str | os.PathLike, version: int) -> None:
    """Refuse a sealed file this code cannot read, saying which version wrote it."""
    if version in READABLE:
        return
    if version > VERSION:
        raise FormatVersionError(
            f"{path} is in local format version {version}, written by a newer privifs "
            f"(this one reads version {VERSION}); use that newer privifs, or upload "
            "what it staged with it before going back"
        )
    raise FormatVersionError(
        f"{path} is in local format version {version}, which this privifs no longer reads (it reads version {VERSION})"
    )


def stored_size(size: int) -> int:
    """Bytes a sealed file of logical ``size`` takes at most on disk (header and whole slots)."""
    full, rest = divmod(size, CHUNK)
    return HEADER + full * SLOT + (OVERHEAD + rest if rest else 0)


EDGE_SLOTS = 64  # never-written slots looked for at each edge of a data extent (a part's worth)
# filesystems whose SEEK_DATA has been seen to call written data a hole (some OpenZFS releases,
# for dirty data): on them a sealed file is taken as data throughout
SEEK_DATA_UNRELIABLE = frozenset({"zfs"})


@functools.lru_cache(maxsize=32)
def _seek_data_reliable(dev: int) -> bool:
    """Whether the filesystem of device ``dev`` is trusted to report holes (from
    /proc/self/mountinfo; a device it does not list, such as memfd's, is)."""
    want = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == want and "-" in fields:
                    return fields[fields.index("-") + 1] not in SEEK_DATA_UNRELIABLE
    except OSError:
        pass
    return True


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The byte ranges of ``fd`` within [start, end) that may hold data: its holes on disk are
    skipped (``SEEK_DATA``/``SEEK_HOLE``); where the filesystem cannot tell, or is not trusted
    to (:data:`SEEK_DATA_UNRELIABLE`), the whole range."""
    if start < end and not _seek_data_reliable(os.fstat(fd).st_dev):
        yield start, end
        return
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from here to the end of the file
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


class SealedFile:
    """Random-access encrypted file. One file is used by one thread at a time (the trio thread,
    or the worker that fills or uploads it); scratch buffers are per thread."""

    def __init__(
        self,
        path: str | os.PathLike,
        fd: int,
        key: bytes,
        file_id: bytes,
        size: int,
        stamp: int = 0,
        *,
        writable: bool = True,
        place: str | None = None,
    ):
        self.path = os.fspath(path)
        self.place = _place_of(self.path, place)  # what the header binds the file to (see _place_mac)
        self._place_tag: bytes | None = None  # its MAC, made at the first header write (or by open)
        self._fd = fd
        # a second descriptor of the same file, with O_DIRECT, for long writes and an upload's
        # reads (-1: not opened yet; _NO_DIRECT: the disk refused it; a file in memory has none)
        self._direct_fd = _NO_DIRECT if self.path == MEMORY else -1
        self.direct_written = False  # a long run was written past the page cache (by this object)
        self.redo: RedoLog | None = None  # where a rewrite of a slot holding data is recorded first
        self._writable = writable  # how :meth:`park`'s file is opened again
        self._aead = AESGCM(key)
        self._key = key
        self.file_id = file_id
        self.size = size
        self.stamp = stamp
        self._header_size = size
        # the plaintext of the chunk the last partial write made (index, bytes as stored): the
        # next partial write of that chunk (SQLite's page writes, a journal's appends) starts
        # from it instead of reading and decrypting the chunk again
        self._plain: tuple[int, bytes] | None = None
        # a write failed and what it left past the end could not be cut then (the disk refused
        # the rewrite of the last chunk): cut before the next write or truncate, which fails if
        # it still cannot be (its bytes must never show up as the file's)
        self.uncut = False
        self.wrote_chunks = 0  # chunks the last write put on disk (some, when it failed halfway)
        self._reached = -1  # the last chunk the last write began to put on disk (see _mend)
        self._holes: bool | None = None  # whether it may have holes on disk (None: not known yet)
        self._holes_reported: bool | None = None  # its filesystem is trusted to report them (None: not asked)
        # every chunk below ``size`` was written (a download's file, never sparse): a chunk that
        # reads as a hole (a slot of zeros, or one past a cut-off end) is damage, not zeros.
        # Written into the header as DENSE; a header read says so in ``header_dense``, which only
        # the read cache trusts (ContentCache.open: staging copies entries as they are, and a
        # staged file's next header rewrite clears the flag)
        self.dense = False
        self.header_dense = False

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, key: bytes, *, place: str | None = None) -> SealedFile:
        """A new empty sealed file at ``path``, bound to ``place`` (default: its name)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise local_store_error(exc, f"creating {path}") from None
        f = cls(path, fd, key, uuid.uuid4().bytes, 0, place=place)
        try:
            f.write_header()
        except BaseException:
            f.close()
            os.unlink(path)
            raise
        return f

    @classmethod
    def in_memory(cls, key: bytes) -> SealedFile:
        """A sealed file in memory (a memfd, never on a disk): for content that has no room on
        the local disk. Gone when closed."""
        fd = os.memfd_create("privifs-sealed", os.MFD_CLOEXEC)
        f = cls(MEMORY, fd, key, uuid.uuid4().bytes, 0, place=MEMORY)
        f.write_header()
        return f

    @property
    def is_in_memory(self) -> bool:
        return self.path == MEMORY

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        key: bytes,
        *,
        writable: bool = False,
        recover: bool = False,
        place: str | None = None,
    ) -> SealedFile:
        """Open a sealed file bound to ``place`` (default: its name); one bound elsewhere (a
        file of another place copied or moved here) is refused with IntegrityError. ``recover``
        (a staged file, opened writable): a header whose size, stamp or flags do not
        authenticate is rewritten with the size the last chunk on disk states and the file's
        modification time as its stamp, logged, rather than refused."""
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            raise local_store_error(exc, f"opening {path}") from None
        damaged = False
        try:
            head = os.pread(fd, HEADER, 0)
            if len(head) != HEADER:
                raise IntegrityError(f"{path} is not a sealed file (short header)")
            magic, version, shift, flags, _, file_id, size, stamp, mac = _HEADER.unpack(head)
            if magic != MAGIC:
                raise IntegrityError(f"{path} is not a sealed file")
            check_version(path, version)
            if shift != CHUNK_SHIFT:
                raise IntegrityError(f"{path} has an unsupported chunk size (shift {shift})")
            tag = _place_mac(key, file_id, _place_of(os.fspath(path), place))
            if mac != bytes(16):  # (16 zero bytes: a header written before it had MACs)
                if not hmac.compare_digest(mac[8:], tag):
                    raise IntegrityError(
                        f"{path} is bound to another place (a file copied or moved here, by hand or by an "
                        "older privifs)"
                    )
                if not hmac.compare_digest(mac[:8], _header_mac(key, head)):
                    if not (recover and writable):
                        raise IntegrityError(f"the header of {path} does not authenticate (its size or time changed)")
                    damaged = True
        except BaseException:
            os.close(fd)
            raise
        f = cls(path, fd, key, file_id, 0 if damaged else size, stamp, writable=writable, place=place)
        f._place_tag = tag  # (its next header write needs it: made once)
        f.header_dense = bool(flags & DENSE) and not damaged
        if damaged:
            f._recover_header()
        return f

    def _recover_header(self) -> None:
        """Take the size from the last slot on disk that holds a chunk which authenticates (a
        hole after it, from a truncate that grew the file, is not known and is dropped), the
        stamp from the file's modification time, and write the header again."""
        st = os.fstat(self._fd)
        last = (st.st_size - HEADER - 1) // SLOT
        size = 0
        while last >= 0:
            slot = memoryview(os.pread(self._fd, SLOT, HEADER + last * SLOT))
            try:
                length = self._open_into(last, slot, _scratch("chunk", CHUNK))
            except IntegrityError:
                length = 0  # damaged as well: what lies before it is looked at
            if length:
                size = (last << CHUNK_SHIFT) + length
                break
            last -= 1
        if size == 0 and st.st_size > HEADER:
            self.close()
            raise IntegrityError(f"the header of {self.path} does not authenticate, and no chunk of it does either")
        self.size, self.stamp = size, st.st_mtime_ns
        self.write_header()
        log.warning("the header of %s did not authenticate; its size is taken from its last chunk: %d", self.path, size)

    # -- the descriptor --------------------------------------------------------------------
    @property
    def fd(self) -> int:
        """The file's descriptor, opened again by path if :meth:`park` closed it."""
        fd = self._fd
        if fd == PARKED:
            fd = self._unpark()
        return fd

    @fd.setter
    def fd(self, fd: int) -> None:
        self._fd = fd

    @property
    def parked(self) -> bool:
        return self._fd == PARKED

    def park(self) -> None:
        """Close the descriptor of a file no one is using now (its header written first); the
        next use opens it again by its path. A mount keeps every staged file until its upload,
        and one descriptor each exhausted the process's open-files limit: an untar of some
        20,000 files while the server was unreachable (or faster than the uploads) failed every
        further create with EIO, and the next mount could not even start. Only for a file on
        disk whose path stays its own while parked, used by one thread at the time of the call."""
        if self._fd < 0 or self.path == MEMORY:
            return
        try:
            self.sync_header()
        except LocalStoreError:
            return  # (kept open: what the header lacks is written with the next write or close)
        self._plain = None
        self._close_direct()
        fd, self._fd = self._fd, PARKED
        os.close(fd)

    def _unpark(self) -> int:
        with _UNPARK:  # two threads using a parked file (an upload, a read) open it once
            if self._fd == PARKED:
                try:
                    self._fd = os.open(self.path, os.O_RDWR if self._writable else os.O_RDONLY)
                except OSError as exc:
                    raise local_store_error(exc, f"opening {self.path}") from None
            return self._fd

    def _header(self, size: int) -> bytes:
        flags = DENSE if self.dense else 0
        head = _HEADER.pack(MAGIC, VERSION, CHUNK_SHIFT, flags, bytes(5), self.file_id, size, self.stamp, bytes(16))
        if self._place_tag is None:  # (once per place: a header is written at every write)
            self._place_tag = _place_mac(self._key, self.file_id, self.place)
        return head[:48] + _header_mac(self._key, head) + self._place_tag

    def move_to(self, path: str | os.PathLike, place: str | None = None) -> None:
        """The file was renamed to ``path``: bind it to ``place`` there (default: its new name),
        its header written again."""
        self.path = os.fspath(path)
        self.place = _place_of(self.path, place)
        self._place_tag = None
        self.write_header()

    def write_header(self) -> None:
        try:
            os.pwrite(self.fd, self._header(self.size), 0)
        except OSError as exc:
            raise local_store_error(exc, f"writing {self.path}") from None
        self._header_size = self.size

    def sync_header(self) -> None:
        if self._header_size != self.size:
            self.write_header()

    def forget_kept_plaintext(self) -> None:
        """Drop the plaintext kept from the last partial write (see ``_plain``): a file its
        writers closed keeps no memory while it waits for its upload (thousands of small files
        written at once, an untar, each held up to 64 KiB)."""
        self._plain = None

    def close(self) -> None:
        self._plain = None
        self._close_direct()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _close_direct(self) -> None:
        fd = self._direct_fd
        if fd >= 0:
            self._direct_fd = -1
            os.close(fd)

    def _direct(self) -> int:
        """The O_DIRECT descriptor, opened at its first use (the same file, even if it was
        renamed since), or -1 where the disk refuses O_DIRECT."""
        fd = self._direct_fd
        if fd != -1:
            return fd if fd >= 0 else -1
        main = self.fd  # (opened again first if parked: that takes the lock too)
        with _UNPARK:  # an upload's thread and the trio thread may both want it
            if self._direct_fd == -1:
                flags = (os.O_RDWR if self._writable else os.O_RDONLY) | os.O_DIRECT | os.O_CLOEXEC
                try:
                    self._direct_fd = os.open(f"/proc/self/fd/{main}", flags)
                except OSError:
                    self._direct_fd = _NO_DIRECT  # no O_DIRECT on this disk (or no /proc): page cache
            return self._direct_fd if self._direct_fd >= 0 else -1

    def _refused_direct(self) -> None:
        """The disk refused an O_DIRECT transfer (EINVAL: e.g. a larger alignment): page cache from now on."""
        fd, self._direct_fd = self._direct_fd, _NO_DIRECT
        if fd >= 0:
            os.close(fd)

    # -- chunks ----------------------------------------------------------------------------
    def _aad(self, index: int, length: int) -> bytes:
        return self.file_id + index.to_bytes(8, "little") + length.to_bytes(4, "little")

    def _slot_length(self, index: int, slot: bytes | memoryview) -> int | None:
        """The plaintext length a stored slot claims (None for a hole), checked for damage."""
        if len(slot) < PREFIX or slot[:PREFIX] == ZERO_PREFIX:
            if not all_zero(slot):
                raise IntegrityError(f"chunk {index} of {self.path} is damaged")
            return None
        length = int.from_bytes(slot[12:16], "little")
        if length > CHUNK or len(slot) < OVERHEAD + length:
            raise IntegrityError(f"chunk {index} of {self.path} is truncated or damaged")
        return length

    def read_chunk(self, index: int) -> bytes:
        """The stored plaintext of chunk ``index`` (possibly shorter than CHUNK: zeros follow)."""
        slot = os.pread(self.fd, SLOT, HEADER + index * SLOT)
        plain = _scratch("chunk", CHUNK)
        return bytes(plain[: self._open_into(index, memoryview(slot), plain)])

    def _open_into(self, index: int, slot: memoryview, dest: memoryview) -> int:
        """Decrypt ``slot`` (chunk ``index``) into the CHUNK bytes of ``dest``, zeros after its
        end; returns the chunk's stored length (0 for a hole)."""
        length = self._slot_length(index, slot)
        if length is None:
            if self.dense:
                raise IntegrityError(f"chunk {index} of {self.path} is missing (zeroed or cut off)")
            length = 0
        else:
            try:
                self._aead.decrypt_into(
                    slot[:12], slot[PREFIX : OVERHEAD + length], self._aad(index, length), dest[:length]
                )
            except InvalidTag:
                raise IntegrityError(f"chunk {index} of {self.path} failed authentication") from None
        if length < CHUNK:
            dest[length:] = ZERO_CHUNK[length:]
        return length

    def seal_into(self, index: int, data: bytes | memoryview, slot: memoryview) -> int:
        """Seal ``data`` (at most CHUNK bytes) as chunk ``index`` into the first bytes of
        ``slot``; returns how many it took (OVERHEAD + len(data))."""
        length = len(data)
        slot[:12] = os.urandom(12)
        slot[12:PREFIX] = length.to_bytes(4, "little")
        self._aead.encrypt_into(slot[:12], data, self._aad(index, length), slot[PREFIX : OVERHEAD + length])
        return OVERHEAD + length

    def header_bytes(self) -> bytes:
        """The header as :meth:`write_header` would write it now."""
        return self._header(self.size)

    def read_slot(self, index: int, slot: memoryview) -> bytes:
        """The plaintext of ``slot``, a stored slot given as chunk ``index`` of this file
        (IntegrityError unless it authenticates as that)."""
        plain = _scratch("chunk", CHUNK)
        return bytes(plain[: self._open_into(index, slot, plain)])

    def write_chunk(
        self, index: int, data: bytes | memoryview, header: bytes | None = None, *, stake: bool | None = None
    ) -> None:
        """Seal ``data`` into slot ``index``; with ``header`` (chunk 0 only), write the header in
        the same ``pwrite``. ``stake``: whether the slot may hold data now (default: it lies
        inside the size the header on disk records); such a rewrite goes through :attr:`redo`
        when the file has one (a staged file: see privifs.fs.redo)."""
        if self._plain is not None and self._plain[0] == index:
            self._plain = None
        length = len(data)
        at = 0 if header is not None else HEADER
        out = _scratch("seal", HEADER - at + OVERHEAD + length)
        if header is not None:
            out[:HEADER] = header
        self.seal_into(index, data, out[HEADER - at :])
        if stake is None:
            stake = index << CHUNK_SHIFT < self._header_size
        if stake and self.redo is not None:
            n = self.redo.rewrite(self, index, out[HEADER - at :], out, at + index * SLOT)
        else:
            try:
                n = os.pwrite(self.fd, out, at + index * SLOT)
            except OSError as exc:
                raise local_store_error(exc, f"writing {self.path}") from None
        if n != len(out):
            raise DiskFullError(f"short write to {self.path}")

    # -- byte ranges -----------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.read_view(offset, length))

    def read_view(self, offset: int, length: int, *, direct: bool = False) -> memoryview:
        """Like :meth:`read`, but a view into this thread's scratch buffer: valid only until the
        thread's next read (no fresh memory for a streamed upload's pieces). ``direct`` (an
        upload's reads): a long read of a file whose long runs this object wrote past the page
        cache goes past it too (see :meth:`_read_slots`)."""
        end = min(self.size, offset + length)
        if offset >= end:
            return memoryview(b"")
        first, last = offset >> CHUNK_SHIFT, (end - 1) >> CHUNK_SHIFT
        n = last - first + 1
        slots, got = self._read_slots(first, n, direct and n >= DIRECT_CHUNKS)
        plain = _scratch("plain", n * CHUNK)
        for k in range(n):
            self._open_into(
                first + k, slots[k * SLOT : max(k * SLOT, min(got, (k + 1) * SLOT))], plain[k * CHUNK : (k + 1) * CHUNK]
            )
        start = offset - (first << CHUNK_SHIFT)
        return plain[start : start + end - offset]

    def _read_slots(self, first: int, n: int, direct: bool) -> tuple[memoryview, int]:
        """The stored bytes of slots ``first`` … ``first + n - 1``, and how many of them the file
        has (fewer at its end). ``direct``: with O_DIRECT if this object wrote the file's long
        runs so (:attr:`direct_written`): they are not in the page cache, and reading them
        through it would fill it with fresh pages after all (the kernel writes back what the
        page cache holds dirty of the range first). Otherwise through the page cache, which
        holds what short writes put there."""
        start, length = HEADER + first * SLOT, n * SLOT
        fd = self._direct() if direct and self.direct_written else -1
        try:
            if fd >= 0:
                lo = start - start % DIRECT_ALIGN
                buf = _aligned_scratch(-(-(start + length - lo) // DIRECT_ALIGN) * DIRECT_ALIGN)
                skip = start - lo
                try:
                    got = os.preadv(fd, [buf], lo)
                    return buf[skip : skip + length], max(0, min(length, got - skip))
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._refused_direct()  # (e.g. a larger alignment) the page cache, from here on
            if self._all_hole(start, length):
                return memoryview(b""), 0
            slots = _scratch("slots", length)
            return slots, os.preadv(self.fd, [slots], start)
        except OSError as exc:
            raise local_store_error(exc, f"reading {self.path}") from None

    def _all_hole(self, start: int, length: int) -> bool:
        """Whether the stored bytes [start, start + length) are a hole on disk, told by one
        ``lseek(SEEK_DATA)`` instead of reading them: a read of a sparse file's gap filled the
        page cache with zeros first, which this VM makes dear (a 2 GiB file with data only at
        its end read at 160-200 MB/s). Only for a file that may have holes, on a filesystem
        trusted to report them (:data:`SEEK_DATA_UNRELIABLE`); a hole of a dense file is damage,
        which its read reports either way."""
        if self.dense or not self.sparse_on_disk():
            return False
        if self._holes_reported is None:
            self._holes_reported = _seek_data_reliable(os.fstat(self.fd).st_dev)
        if not self._holes_reported:
            return False
        try:
            return os.lseek(self.fd, start, os.SEEK_DATA) >= start + length
        except OSError as exc:
            return exc.errno == errno.ENXIO  # (no data from there on)

    def write(self, offset: int, data: bytes | memoryview, *, stamp: int | None = None) -> int:
        """Write plaintext at ``offset``. With ``stamp`` (this write's time), the header is
        rewritten too, after the chunks (with chunk 0 when that is the only chunk touched)."""
        before: dict[int, bytes] = {}  # the stored plaintext of the partial chunks it rewrites
        try:
            return self._write(offset, data, stamp, before)
        except BaseException:
            self._plain = None
            self._mend(offset >> CHUNK_SHIFT, min((offset + len(data) - 1) >> CHUNK_SHIFT, self._reached), before)
            if offset + len(data) > self.size:  # nothing may stay past the end (see _is_hole, trim)
                try:
                    self._cut(self.size)
                except Exception:  # noqa: BLE001 - the write's own error is the one to report
                    self.uncut = True
            if self._header_size != self.size:  # the header went with chunk 0, then the write failed
                try:
                    self.write_header()  # (else the next mount took the file for that long)
                except LocalStoreError:
                    pass  # (rewritten by the next sync_header)
            raise

    def _write(self, offset: int, data: bytes | memoryview, stamp: int | None, before: dict[int, bytes]) -> int:
        recorded = self._header_size  # the chunks below it may hold data: a rewrite of one is at stake
        self.wrote_chunks = 0
        self._reached = -1
        if self.uncut:
            self.trim()
        view = memoryview(data)
        pos = offset
        end = offset + len(view)
        if offset > self.size:
            self._holes = True  # the gap
        if stamp is not None:
            self.stamp = stamp
        with_chunk0 = stamp is not None and end <= CHUNK and len(view) > 0  # header and chunk: one pwrite
        header_written = False
        run: list[memoryview] = []  # whole chunks in a row, from chunk run_first, not written yet
        run_first = 0
        while view:
            index = pos >> CHUNK_SHIFT
            within = pos - (index << CHUNK_SHIFT)
            n = min(CHUNK - within, len(view))
            partial = not (within == 0 and n == CHUNK)
            old = None
            if not partial:
                chunk = view[:n]
            else:
                if (index << CHUNK_SHIFT) >= self.size:
                    old = b""
                elif self._plain is not None and self._plain[0] == index:
                    old = self._plain[1]
                else:
                    old = self.read_chunk(index)
                before[index] = old
                padded = old + bytes(within - len(old)) if len(old) < within else old
                chunk = padded[:within] + bytes(view[:n]) + padded[within + n :]
            self._plain = None  # until the chunk is written: a failed write leaves it unknown
            if all_zero(chunk) and self._is_hole(index, old):
                self._holes = True  # zeros into a hole: it stays one (no disk taken, nothing uploaded)
            elif not partial and not with_chunk0:
                if not run:
                    run_first = index
                run.append(chunk)
            else:
                self._reached = max(self._reached, index)
                if with_chunk0:
                    size = max(self.size, end)
                    self._header_size = size  # (from here the disk may have it: see write)
                    self.write_chunk(0, chunk, self._header(size), stake=recorded > 0)
                    header_written = True
                else:
                    self.write_chunk(index, chunk, stake=index << CHUNK_SHIFT < recorded)
                self.wrote_chunks += 1
                if partial:
                    self._plain = (index, chunk)
            pos += n
            view = view[n:]
            if run and (run_first + len(run) != pos >> CHUNK_SHIFT or not view or len(run) == 16):
                self._reached = max(self._reached, run_first + len(run) - 1)
                self._write_run(run_first, run)  # (a hole or a partial chunk follows, or the end)
                run = []
        if pos > self.size and pos > offset:  # (a write of nothing makes no file longer)
            self.size = pos
        if stamp is not None and not header_written:
            self.write_header()
        return len(data)

    def _mend(self, first: int, last: int, before: dict[int, bytes]) -> None:
        """After a write failed: make each chunk ``first`` … ``last`` (what it reached) inside the
        file readable again. A disk that fills in the middle of a slot (an overwrite on a copy-on-write
        filesystem, a hole filled, a short chunk lengthened) keeps the slot's first bytes new and
        the rest old: the chunk failed authentication, read(2) gave EIO there and the file's
        upload failed for ever. Such a chunk gets its old plaintext back where the write had read
        it (a partial chunk, ``before``: its bytes outside the write are the file's) and the
        disk takes it; else (and a whole chunk, all of it the write's range, whose content a
        failed write leaves unspecified) it becomes an empty chunk, read as zeros: 32 bytes at
        the start of its slot, where the failed write itself took the disk."""
        last = min(last, (self.size - 1) >> CHUNK_SHIFT)  # (past the end, the caller cuts what the write left)
        for index in range(first, last + 1):
            try:
                self.read_chunk(index)
                continue  # readable: untouched, or all of it written
            except IntegrityError:
                pass
            except (OSError, LocalStoreError):
                return  # the disk cannot be read: nothing to tell
            for plain in ([before[index]] if before.get(index) else []) + [b""]:
                try:
                    self.write_chunk(index, plain)
                    break
                except LocalStoreError:
                    continue

    def _write_run(self, first: int, chunks: list[memoryview]) -> None:
        """Seal whole chunks ``first``, ``first + 1``, … (at most 16) into their slots: a long
        run with O_DIRECT where the disk allows (see DIRECT_CHUNKS), counted in ``wrote_chunks``
        before it is written (a failed write may have put some of it on disk); else chunk by chunk."""
        if len(chunks) < DIRECT_CHUNKS or (fd := self._direct()) < 0:
            for k, chunk in enumerate(chunks):
                self.write_chunk(first + k, chunk)
                self.wrote_chunks += 1
            return
        self.wrote_chunks += len(chunks)
        self.direct_written = True
        start = HEADER + first * SLOT
        stop = start + len(chunks) * SLOT
        lo = start - start % DIRECT_ALIGN  # whole pages from here …
        hi = stop - stop % DIRECT_ALIGN  # … to here with O_DIRECT; the page cache after it
        # … unless the run's last chunk lies inside the size the header records: then it goes
        # to disk whole in the one pwrite, with the rest of its last page as the file has it
        # (a kill -9 between two pwrites left it half new and half old: EIO there at the next
        # mount, and its upload failed for ever). Past that size a chunk a kill cut short is
        # cut by the next mount (trim), and the file's end stays where a chunk ends
        tail = hi < stop and (first + len(chunks) - 1) << CHUNK_SHIFT < self._header_size
        if tail:
            hi += DIRECT_ALIGN
        out = _aligned_scratch(max(stop, hi) - lo)
        try:
            if start > lo:  # the page's first bytes as the file has them (the slot before, or the header)
                head = os.preadv(self.fd, [out[: start - lo]], lo)
                out[head : start - lo] = bytes(start - lo - head)
            if tail:  # the last page's last bytes (the next slot's first ones), or zeros past the end
                after = os.preadv(self.fd, [out[stop - lo : hi - lo]], stop)
                out[stop - lo + after : hi - lo] = bytes(hi - stop - after)
            for k, chunk in enumerate(chunks):
                at = start - lo + k * SLOT
                self.seal_into(first + k, chunk, out[at : at + SLOT])
            done = 0
            try:
                while done < hi - lo:
                    wrote = os.pwrite(fd, out[done : hi - lo], lo + done)
                    if wrote <= 0 or wrote % DIRECT_ALIGN:
                        raise DiskFullError(f"short write to {self.path}")
                    done += wrote
                if tail and stop + after < hi:
                    os.ftruncate(self.fd, stop + after)  # (the zeros the page took past the file's end)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refused_direct()
                done = -1
            if done < 0:  # all of the run through the page cache, as a short run's (the redo record too)
                for k, chunk in enumerate(chunks):
                    self.write_chunk(first + k, chunk)
                return
            while lo + done < stop:
                done += os.pwrite(self.fd, out[done : stop - lo], lo + done)
        except OSError as exc:
            raise local_store_error(exc, f"writing {self.path}") from None

    def _is_hole(self, index: int, old: bytes | None) -> bool:
        """Whether chunk ``index`` holds nothing now (past the end, or never written); ``old``:
        its stored plaintext when the caller read it (empty for a hole)."""
        if (index << CHUNK_SHIFT) >= self.size:
            return True  # (nothing is kept past the end: truncate cuts it)
        if old is not None:
            return not old
        try:
            return self._never_written(index)
        except OSError:
            return False

    def truncate(self, size: int, *, stamp: int | None = None) -> None:
        """Make the logical size ``size`` (the header is rewritten, with ``stamp`` if given)."""
        self._plain = None
        if size < self.size:
            self._cut(size)
            self.uncut = False
        elif self.uncut:
            self.trim()
        if size > self.size:
            self._holes = True
        self.size = size
        if stamp is not None:
            self.stamp = stamp
        self.write_header()

    def written_chunks(self) -> list[tuple[int, int]]:
        """The ranges [first, end) of chunk indices that may hold data, in order: the slots the
        file's data extents on disk reach, less the never-written slots at their edges (an
        extent's first or last page may be shared with a written neighbour; up to
        :data:`EDGE_SLOTS` are looked at on each side, so a filesystem that reports no holes
        costs no scan of the whole file). Everything else
        reads as zeros. One ``lseek`` pair per extent: a sparse file of a terabyte costs nothing
        to look through."""
        out: list[tuple[int, int]] = []
        try:
            for lo, hi in data_extents(self.fd, HEADER, HEADER + -(-self.size // CHUNK) * SLOT):
                first, end = (lo - HEADER) // SLOT, (hi - HEADER - 1) // SLOT + 1
                edge = min(end, first + EDGE_SLOTS)
                while first < edge and self._never_written(first):
                    first += 1
                edge = max(first, end - EDGE_SLOTS)
                while end > edge and self._never_written(end - 1):
                    end -= 1
                if first == end:
                    continue
                if out and out[-1][1] >= first:
                    out[-1] = (out[-1][0], max(out[-1][1], end))
                else:
                    out.append((first, end))
        except OSError as exc:
            raise local_store_error(exc, f"reading {self.path}") from None
        return out

    def _never_written(self, index: int) -> bool:
        slot = os.pread(self.fd, SLOT, HEADER + index * SLOT)
        return slot.count(0) == len(slot)  # all zero, or past the end of the file

    def _cut(self, size: int) -> None:
        """Remove every stored byte past ``size`` (the chunk it ends in is rewritten shorter)."""
        index = size >> CHUNK_SHIFT
        within = size - (index << CHUNK_SHIFT)
        if within:
            chunk = self.read_chunk(index)
            if len(chunk) > within:
                self.write_chunk(index, chunk[:within])  # no stale bytes past the new end
            keep = HEADER + index * SLOT + OVERHEAD + min(len(chunk), within)
        else:
            keep = HEADER + index * SLOT
        self._shorten_to(keep)

    def _shorten_to(self, keep: int) -> None:
        """Remove the stored bytes from ``keep`` on (nothing when the file ends before it)."""
        try:
            if os.fstat(self.fd).st_size > keep:
                os.ftruncate(self.fd, keep)
        except OSError as exc:
            raise local_store_error(exc, f"truncating {self.path}") from None

    def touches_hole(self, offset: int, end: int) -> bool:
        """Whether writing plaintext [offset, end) reaches a hole on disk (a never-written slot,
        the unwritten rest of a short chunk's slot that the write lengthens, or past the file's
        end on disk): a write there takes new disk. One ``lseek``: a hole that starts before the
        last stored byte the write needs (its slots from the first one's start to the end of the
        write's ciphertext in the last). False where the filesystem cannot tell."""
        first, last = offset >> CHUNK_SHIFT, (end - 1) >> CHUNK_SHIFT
        needed = HEADER + last * SLOT + OVERHEAD + (end - (last << CHUNK_SHIFT))
        try:
            return os.lseek(self.fd, HEADER + first * SLOT, os.SEEK_HOLE) < needed
        except OSError as exc:
            return exc.errno == errno.ENXIO  # (past the end of the file on disk: all hole)

    def sparse_on_disk(self) -> bool:
        """Whether the file may take less disk than its size would whole (a write inside it may
        then take new blocks): one ``fstat`` the first time, then known from what made holes
        (a write past the end, zeros left unwritten, a truncate that grew the file)."""
        if self._holes is None:
            self._holes = os.fstat(self.fd).st_blocks * 512 < stored_size(self.size)
        return self._holes

    def trim(self) -> None:
        """Remove what lies on disk past the size the header records: a write a crash stopped
        before its header was rewritten. Its bytes must not show up if the file grows again (a
        truncate, or zeros written there, which leave holes as they are)."""
        self._plain = None
        try:
            if os.fstat(self.fd).st_size > stored_size(self.size):  # (else nothing lies past the end)
                self._cut(self.size)
        except IntegrityError:
            # the chunk the size ends in is damaged (a write the stop tore, see kill -9 between
            # the pages of a pwrite): it reads as an error, as it would have, and what lies past
            # its slot is cut all the same; the rest of the file is kept
            self._shorten_to(HEADER + ((self.size >> CHUNK_SHIFT) + 1) * SLOT)
        self.uncut = False

    def chunks(self, piece: int = 16):
        """Yield the plaintext from the start to ``size`` in pieces of ``piece`` chunks."""
        pos = 0
        while pos < self.size:
            n = min(piece * CHUNK, self.size - pos)
            yield self.read(pos, n)
            pos += n
