"""The filesystem logic behind each FUSE operation: POSIX semantics over the namespace, staging,
cache and write-back. Local first: every change is made in the tree and the index at once and
reaches the vault in the background (:mod:`privifs.fs.sync`); only reads of uncached content,
the first write to a clean file (its content is fetched), and ``fsync`` wait for the network.

Errors are raised as ``pyfuse3.FUSEError(errno)`` where POSIX decides the errno (ENOENT, EEXIST,
ENOTEMPTY, …); any :class:`~privifs.errors.PrivifsError` from below gets its errno from its type
(:mod:`privifs.fs.errnos`: EIO for vault failures, ENOSPC for a full local disk, …), here or in
:mod:`privifs.fs.operations` after logging the path and the cause.

Concurrency: handlers run on the trio thread; between awaits they are atomic. After any await a
handler re-reads the node (it may have been renamed, unlinked or replaced meanwhile).
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import math
import mmap
import os
import stat
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyfuse3
import trio

from privifs.client.datatokens import find
from privifs.crypto.sealed import SealedFile
from privifs.errors import IntegrityError, NodeGone, NotFoundError, PrivifsError
from privifs.fs import xattrs
from privifs.fs.cache import ContentCache
from privifs.fs.caller import Caller, unless_killed
from privifs.fs.errnos import errno_for
from privifs.fs.localsync import flush_index, fsync_locally
from privifs.fs.names import NAME_MAX, VAULT_PATH_MAX, entry_problem
from privifs.fs.namespace import RECOVER_COUNTER, ROOT, Index, Namespace, Node
from privifs.fs.parts import is_manifest_node
from privifs.fs.staging import StagedFile, Staging
from privifs.fs.sync import Syncer
from privifs.fs.tokenmeta import (
    DEVICE_KINDS,
    KIND_DIR,
    KIND_FILE,
    KIND_SYMLINK,
    RESERVED_CONTEXT,
    SPECIAL_KINDS,
    clamp_time,
)
from privifs.parts import format as fmt

if TYPE_CHECKING:
    from privifs.client.vault import Vault

log = logging.getLogger("privifs.fs")
PAGE = mmap.PAGESIZE  # the kernel's page: reads through its page cache never pass the one holding the end

BLOCK = 1024 * 1024  # st_blksize: programs size their I/O by it, and each read or write is a FUSE request
# the largest file (EFBIG past it, as ext4 past 16 TiB): a sparse file's manifest lists every 4 MiB
# part, a hole included, so a 4 TiB file's is 37 MiB, uploaded at each write-back
MAX_FILE_SIZE = 1 << 42
USED_EVERY = 1.0  # seconds statfs reuses its sum of every file's size (see Filesystem._files_size)
FOLLOW_WAIT = 10.0  # seconds a read waits for the listing to show a big file another client replaced
RESERVED_ROOT_NAME = RESERVED_CONTEXT.strip("/")
DOT_OFFSET, DOTDOT_OFFSET = 1, 2  # readdir offsets of "." and ".."; an entry's is its seq + 2


def fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


def _forget_attributes(ino: int) -> None:
    """The kernel drops the attributes it holds of ``ino`` (asks again at their next use)."""
    with suppress(OSError, pyfuse3.FUSEError):  # it did not know the inode
        pyfuse3.invalidate_inode(ino, attr_only=True)


# what a read that does not verify says (helper hF: "the stored ciphertext" blamed the vault
# for bytes a proxy had changed on their way)
UNVERIFIED = "the ciphertext does not verify (changed in the vault, on its way here or in the local cache)"


@dataclass
class MountOptions:
    uid: int = os.getuid()
    gid: int = os.getgid()
    umask: int = 0o022
    read_only: bool = False
    attr_timeout: float = 5.0
    fsync_timeout: float = 300.0
    fsync_mode: str = "vault"  # "local": fsync returns once durable on the local disk (fs/localsync.py)
    # extended attributes answered (privifs.fs.xattrs); off, each xattr request answers ENOSYS, and
    # the kernel then answers EOPNOTSUPP itself and stops asking (before every write(2) among others)
    xattrs: bool = False

    @property
    def file_mode(self) -> int:
        return 0o666 & ~self.umask

    @property
    def dir_mode(self) -> int:
        return 0o777 & ~self.umask


class FileHandle:
    __slots__ = ("fh", "node", "writable", "append", "direct", "reader", "reader_token", "opener")

    def __init__(self, fh: int, node: Node, writable: bool, append: bool, direct: bool = False, opener: int = 0):
        self.fh = fh
        self.node = node
        self.opener = opener  # the thread that opened it (0: not known): an fsync's likely caller
        self.writable = writable
        self.append = append
        self.direct = direct  # opened with O_DIRECT: its writes bypass the kernel's page cache
        self.reader: SealedFile | None = None
        self.reader_token: str | None = None

    def close_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None
            self.reader_token = None


class Filesystem:
    """POSIX over the parts the daemon builds: the tree (``ns``), staged content, the read cache,
    the vault (reads) and the write-back (``sync``, built from the same tree, staging and cache)."""

    def __init__(
        self, ns: Namespace, staging: Staging, cache: ContentCache, vault: Vault, opts: MountOptions, sync: Syncer
    ):
        self.ns = ns
        self.index: Index = ns.index
        self.staging = staging
        self.cache = cache
        self.vault = vault
        self.parts = sync.parts.reader  # content of files stored as parts (shared with the write-back)
        self.opts = opts
        self.sync = sync
        self.xattrs = xattrs.Sealer(vault.derive(xattrs.xattr_key))
        self._xattrs_refused: dict[int, str | None] = {}  # inode -> the sealed value last refused
        self.handles: dict[int, FileHandle] = {}
        self.dir_handles: dict[int, int | tuple[int, list[tuple[int, int]]]] = {}  # the inode until the first readdir
        self._next_fh = 1
        self._own_ids = (os.getuid(), os.getgid())  # the daemon's own user and group
        self._used: tuple[float, int] = (-math.inf, 0)  # (when, bytes): statfs's sum of every file's size
        # the last open for writing (trio time, the caller's pid, the node): umount stops its
        # upload at a program that began writing during it (see Daemon._flush_wait)
        self.last_writer: tuple[float, int, Node] | None = None
        # the last read that failed (path and cause) and when, for `privifs status`
        self.last_read_error: str | None = None
        self.last_read_error_at: float | None = None
        # the last request the local disk had no room for (ENOSPC, EDQUOT) and when: on a full
        # disk mount.log loses its lines too, and status said 'last error: none'
        self.last_disk_full: str | None = None
        self.last_disk_full_at: float | None = None
        self.last_local_error: str | None = None  # the last request local state failed otherwise
        self.last_local_error_at: float | None = None
        # files staged here that the index made anew no longer named, put in /lost+found at the
        # start (their nodes and that folder's), for `privifs mount` and `privifs status` to say
        self._recovered: tuple[list[Node], Node] | None = None
        self.kernel = False  # mounted: the kernel is told of attributes that changed under it
        # reads come through the kernel's page cache (mounted): none asks past the page holding
        # the end of the size the kernel holds (in-process tests ask for any length)
        self.page_cache_reads = False
        self._direct_written: set[int] = set()  # inodes written through O_DIRECT (in this mount)
        self._reads: set[trio.CancelScope] = set()  # the reads in progress (see abandon_reads)
        self._reads_abandoned = False

    def note_disk_full(self, request: str, exc: BaseException) -> None:
        """A request failed because the local disk (staging, cache, index) has no room; said by
        ``privifs status`` until a write succeeds again."""
        self.last_disk_full, self.last_disk_full_at = f"{request}: {exc}", time.time()

    def note_local_failure(self, request: str, exc: BaseException) -> None:
        """A request failed on local state for another reason than a full disk (no descriptor
        left, a file size limit, a damaged staged file); said by ``privifs status``, whose last
        error was only the write-back's (helper hAO F6)."""
        self.last_local_error, self.last_local_error_at = f"{request}: {exc}", time.time()

    def note_activity(self) -> None:
        """A FUSE request arrived: background write-back yields while requests keep coming."""
        self.sync.note_activity()

    # -- helpers ---------------------------------------------------------------------------
    def node(self, ino: int) -> Node:
        node = self.ns.get(ino)
        if node is None:
            raise fail(errno.ENOENT)
        return node

    def dir_node(self, ino: int) -> Node:
        node = self.node(ino)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        return node

    @staticmethod
    def decode(name: bytes) -> str:
        if len(name) > NAME_MAX:
            raise fail(errno.ENAMETOOLONG)
        try:
            return name.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EINVAL) from None

    def writable_fs(self) -> None:
        if self.opts.read_only:
            raise fail(errno.EROFS)

    def valid_name(self, parent: Node, name: bytes) -> str:
        """A name an entry of ``parent`` may take (EINVAL, or EPERM for the reserved root name)."""
        text = self.decode(name)
        if entry_problem(text) is not None:
            raise fail(errno.EINVAL)
        if parent.ino == ROOT and text == RESERVED_ROOT_NAME:
            raise fail(errno.EPERM)
        return text

    def own(self, node: Node, parent: Node, owner: tuple[int, int] | None) -> None:
        """A new entry belongs to the caller (``owner`` = its uid, gid); its group is the
        directory's when that directory is set-group-ID, and a new directory inherits the bit.
        The mount's owner and group (``--uid``/``--gid``, or the daemon's own) are stored as None."""
        uid, gid = owner if owner is not None else (self.opts.uid, self.opts.gid)
        uid = None if uid in (self.opts.uid, self._own_ids[0]) else uid
        if parent.mode & stat.S_ISGID:
            mode = node.mode | stat.S_ISGID if node.is_dir else node.mode
            self.ns.set_attributes(node, uid=uid, gid=parent.gid, mode=mode, atime_ns=node.mtime_ns)
        else:
            gid = None if gid in (self.opts.gid, self._own_ids[1]) else gid
            self.ns.set_attributes(node, uid=uid, gid=gid, atime_ns=node.mtime_ns)

    def new_name(self, parent: Node, name: bytes) -> str:
        """Validate a name for a new entry in ``parent``."""
        self.writable_fs()
        text = self.valid_name(parent, name)
        if self.ns.child(parent, text) is not None:
            raise fail(errno.EEXIST)
        self.fits_the_vault(parent, text)
        return text

    def fits_the_vault(self, parent: Node, text: str, below: int = 0) -> None:
        """ENAMETOOLONG unless the entry ``text`` of ``parent`` (and a path ``below`` characters
        longer under it) stays within the path length the vault records; a longer one was
        accepted here and then rejected by every upload, staying staged for good."""
        try:
            prefix = 0 if parent.ino == ROOT else len(self.ns.path(parent))
        except NodeGone:  # the directory left the tree meanwhile
            raise fail(errno.ENOENT) from None
        if prefix + 1 + len(text) + below > VAULT_PATH_MAX:
            raise fail(errno.ENAMETOOLONG)

    def deepest_below(self, node: Node) -> int:
        """The length of the longest path below the directory ``node``, relative to it ("/a/b")."""
        best, stack = 0, [(node, 0)]
        while stack:
            n, length = stack.pop()
            best = max(best, length)
            for name, ino in (n.children or {}).items():
                child = self.ns.get(ino)
                if child is not None:
                    stack.append((child, length + 1 + len(name)))
        return best

    def path(self, node: Node) -> str:
        """The node's path for logs (safe for a node that left the tree)."""
        return self.ns.describe(node)

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.ino
        e.generation = 0
        e.entry_timeout = self.opts.attr_timeout
        e.attr_timeout = self.opts.attr_timeout
        special = SPECIAL_KINDS.get(node.kind)
        e.st_mode = special | (node.mode & 0o7777) if special is not None else node.st_mode()
        if node.is_dir:
            # kept by the namespace: counting was O(entries) per getattr; a removed directory (rmdir,
            # or a rename over it) still open has none, as a removed file
            e.st_nlink = 0 if node.unlinked else 2 + node.subdirs
            size = 4096
        else:
            e.st_nlink = 0 if node.unlinked else 1
            size = len(node.target.encode("utf-8", "surrogateescape")) if node.is_symlink and node.target else node.size
        e.st_uid = node.uid if node.uid is not None else self.opts.uid
        e.st_gid = node.gid if node.gid is not None else self.opts.gid
        e.st_rdev = node.rdev
        e.st_size = size
        e.st_blksize = BLOCK
        e.st_blocks = (size + 511) // 512
        e.st_atime_ns = node.atime_ns if node.atime_ns is not None else node.mtime_ns
        e.st_mtime_ns = node.mtime_ns
        e.st_ctime_ns = node.ctime_ns
        return e

    def touch_meta(self, node: Node, *, save: bool = True) -> None:
        """Attributes or place changed: the token's meta must be rewritten."""
        self.ns.meta_changed(node)
        if save:
            self.index.save(node)
        self.sync.schedule(node)

    def touch_parent(self, parent: Node) -> None:
        """An entry of ``parent`` was added, removed or renamed: its times change, and are kept
        with the index's next commit (a remount showed the directory's older times)."""
        self.ns.touched(parent)
        self.index.save_soon(parent)

    def keep_empty_dir(self, parent: Node) -> None:
        """A directory that just became empty persists through a marker token."""
        if parent.ino != ROOT and not parent.children and parent.token is None and not parent.explicit:
            self.ns.set_explicit(parent, True)
            self.touch_meta(parent)

    def release_node(self, node: Node) -> None:
        """Forget an unlinked node once the kernel and every open file let go of it."""
        if self.ns.release(node, self.staging):
            self.sync.wake_tombstones()

    @staticmethod
    def park_staged(node: Node) -> None:
        """Close the descriptor of the node's staged file while no open file or upload uses it
        (:meth:`SealedFile.park <privifs.crypto.sealed.SealedFile.park>`): a mount holds every
        file until its upload, and the open-files limit must not bound how many."""
        if node.staged is not None and node.opens <= 0 and not node.uploading:
            node.staged.sealed.park()

    # -- lookups and attributes --------------------------------------------------------------
    def lookup(self, parent_ino: int, name: bytes) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self.lookup_self(parent_ino)
        parent = self.dir_node(parent_ino)
        text = self.decode(name)
        if text == "..":  # (asked only from a file handle: the parent of a directory)
            node = None if parent.unlinked else self.ns.get(parent.parent)
        else:
            node = self.ns.child(parent, text)
        if node is None:
            return self.absent()
        self.ns.looked_up(node)
        self.ns.attributes_given(node)
        return self.attrs(node)

    def lookup_self(self, ino: int) -> pyfuse3.EntryAttributes:
        """``ino`` itself, of any kind: how the kernel finds a node again from a file handle
        (``open_by_handle_at``, an NFS export of the mount) once it has dropped the inode from its
        cache; it never asks so for a path. A node no longer in the tree (removed, or removed
        while open) is absent, which the kernel turns into ``ESTALE``."""
        node = self.ns.get(ino)
        if node is None or node.unlinked:
            return self.absent()
        self.ns.looked_up(node)
        return self.attrs(node)

    def absent(self) -> pyfuse3.EntryAttributes:
        """A name with no entry, for the kernel to remember for ``attr_timeout`` (inode 0: a
        negative entry). Programs look for the same missing files over and over (SQLite its
        ``-wal`` at every commit, git its ``.gitignore`` in every directory, Python its modules
        along sys.path): each look is a round trip to this process otherwise. A name that
        appears without the kernel knowing (another client's file, shown by the refresher) is
        invalidated when it appears."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.opts.attr_timeout
        return e

    def forget(self, inode_list) -> None:
        for ino, n in inode_list:
            node = self.ns.get(ino)
            if node is not None:
                self.ns.forgotten(node, n)
                self.release_node(node)

    def getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        node = self.node(ino)
        self.ns.attributes_given(node)
        return self.attrs(node)

    async def setattr(
        self, ino: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None
    ) -> pyfuse3.EntryAttributes:
        node = self.node(ino)
        self.writable_fs()
        now = time.time_ns()
        staged = None
        if fields.update_size:
            if node.is_dir:
                raise fail(errno.EISDIR)
            if not node.is_file:
                raise fail(errno.EINVAL)
            if attr.st_size > MAX_FILE_SIZE:
                raise fail(errno.EFBIG)
            staged = await self.writable_staged(node, truncate_to_zero=attr.st_size == 0)
        try:
            with self.index.kept():  # a truncated file stays truncated: the index records it when it can
                return self._set_attributes(node, staged, attr, fields, now)
        finally:
            if staged is not None:
                self.park_staged(node)  # (a truncate by path: no close of it follows)

    def _set_attributes(
        self,
        node: Node,
        staged: StagedFile | None,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        now: int,
    ) -> pyfuse3.EntryAttributes:
        """setattr's changes, once what a truncate needs is staged (``staged``)."""
        if staged is not None:
            staged.sealed.truncate(attr.st_size, stamp=now)
            self.parts.changes.resized(staged.id, attr.st_size)
            self.ns.set_attributes(node, size=attr.st_size, mtime_ns=now)
            self.mark_content_dirty(node)
            if node.writers == 0:
                self.sync.schedule_upload(node)
        meta = False
        if fields.update_mode:
            self.ns.set_attributes(node, mode=stat.S_IMODE(attr.st_mode))
            meta = True
        if fields.update_uid:
            self.ns.set_attributes(node, uid=attr.st_uid)
            meta = True
        if fields.update_gid:
            self.ns.set_attributes(node, gid=attr.st_gid)
            meta = True
        if fields.update_atime:
            self.ns.set_attributes(node, atime_ns=clamp_time(attr.st_atime_ns))
            meta = True
        if fields.update_mtime:
            if node.atime_ns is None:
                # an unset atime reads as mtime: keep what it showed
                self.ns.set_attributes(node, atime_ns=node.mtime_ns)
            self.ns.set_attributes(node, mtime_ns=clamp_time(attr.st_mtime_ns))
            meta = True
        # reads never update atime (noatime); only utimens sets it
        if meta or fields.update_size:
            self.attributes_changed(node)
        return self.attrs(node)

    def attributes_changed(self, node: Node) -> None:
        """Attributes of ``node`` (mode, owner, times, size, extended attributes) were set here."""
        if node.ino == ROOT:
            # the mount's root has no token (nothing in the vault to hold its attributes): its
            # mode, owner and times are this machine's, kept in the index (written back, the
            # server refused its empty name for good and every umount reported it)
            self.ns.set_attributes(node, ctime_ns=time.time_ns())
            self.index.save(node)
            return
        if node.is_dir:
            self.ns.set_explicit(node, True)
        self.touch_meta(node)

    # -- extended attributes (privifs.fs.xattrs) ----------------------------------------------
    def xattr_node(self, ino: int) -> Node:
        """The node an xattr request is about; ENOSYS unless the mount stores extended attributes
        (``--xattrs``). A node keeps those others stored either way: they are in its meta."""
        if not self.opts.xattrs:
            raise fail(errno.ENOSYS)
        return self.node(ino)

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.xattr_node(ino)
        # (the kernel asks for security.capability before each write(2): a node with no
        # attributes answers without opening anything)
        value = self._xattrs(node).get(name) if node.xattrs else None
        if value is None:
            raise fail(errno.ENODATA)
        return value

    def listxattr(self, ino: int, caller: Caller) -> list[bytes]:
        node = self.xattr_node(ino)
        names = sorted(self._xattrs(node)) if node.xattrs else []
        if any(n.startswith(b"trusted.") for n in names) and not caller.may_read_trusted():
            # as ext4 and tmpfs list them: only to CAP_SYS_ADMIN (the kernel refuses the others'
            # getxattr of them with ENODATA, so 'rsync -X' and 'getfattr -d -m-' failed on them)
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        node = self.xattr_node(ino)
        self.writable_fs()
        if name in xattrs.NAMESPACES:
            raise fail(errno.EINVAL)  # a namespace without a name (as ext4 answers)
        if not xattrs.stored(name):
            raise fail(errno.EOPNOTSUPP)  # system.* (POSIX ACLs, not enforced here) or no namespace
        attrs = self._xattrs(node)
        attrs[name] = bytes(value)
        if not xattrs.fits(attrs):
            raise fail(errno.ENOSPC)
        self._store_xattrs(node, attrs)

    def removexattr(self, ino: int, name: bytes) -> None:
        node = self.xattr_node(ino)
        self.writable_fs()
        attrs = self._xattrs(node)
        if attrs.pop(name, None) is None:
            raise fail(errno.ENODATA)
        self._store_xattrs(node, attrs)

    def _xattrs(self, node: Node) -> xattrs.Attrs:
        try:
            return self.xattrs.open(node.xattrs)
        except IntegrityError as exc:
            if self._xattrs_refused.get(node.ino) != node.xattrs:  # logged once (asked before every write)
                self._xattrs_refused[node.ino] = node.xattrs
                log.error("%s: extended attributes refused (EIO): %s", self.ns.path(node), exc)
            raise fail(errno.EIO) from None

    def _store_xattrs(self, node: Node, attrs: xattrs.Attrs) -> None:
        self.ns.set_attributes(node, xattrs=self.xattrs.seal(attrs))
        with self.index.kept():
            self.attributes_changed(node)

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if not node.is_symlink:
            raise fail(errno.EINVAL)
        target = (node.target or "").encode("utf-8", "surrogateescape")
        if len(target) > 4095:  # another application's: the kernel refused the reply, readlink saw EIO
            raise fail(errno.ENAMETOOLONG)
        return target

    # -- creating entries ----------------------------------------------------------------------
    def mkdir(
        self, parent_ino: int, name: bytes, mode: int, owner: tuple[int, int] | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir_node(parent_ino)
        return self._new_entry(parent, self.new_name(parent, name), KIND_DIR, stat.S_IMODE(mode), owner, explicit=True)

    def symlink(
        self, parent_ino: int, name: bytes, target: bytes, owner: tuple[int, int] | None = None
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir_node(parent_ino)
        text = self.new_name(parent, name)
        if len(target) > 4095:  # PATH_MAX with its NUL; no limit per component: it is not looked up
            raise fail(errno.ENAMETOOLONG)
        try:  # UTF-8 like names: the index and the token meta hold text
            target_text = target.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(errno.EINVAL) from None
        return self._new_entry(parent, text, KIND_SYMLINK, 0o777, owner, target=target_text)

    def mknod(
        self, parent_ino: int, name: bytes, mode: int, owner: tuple[int, int] | None = None, rdev: int = 0
    ) -> pyfuse3.EntryAttributes:
        kind = next((k for k, fmt in SPECIAL_KINDS.items() if stat.S_IFMT(mode) == fmt), None)
        if kind is not None:  # FIFO, socket, device node: no content (the kernel carries what passes through)
            parent = self.dir_node(parent_ino)
            text = self.new_name(parent, name)
            return self._new_entry(
                parent, text, kind, stat.S_IMODE(mode), owner, rdev=rdev if kind in DEVICE_KINDS else 0
            )
        if not stat.S_ISREG(mode):
            raise fail(errno.EINVAL)  # no other file type exists
        node = self._new_file(self.dir_node(parent_ino), name, mode, owner)
        self._save_new(node)
        self.sync.schedule_upload(node)
        self.ns.looked_up(node)
        return self.attrs(node)

    def _new_entry(
        self,
        parent: Node,
        text: str,
        kind: str,
        mode: int,
        owner: tuple[int, int] | None,
        *,
        explicit: bool = False,
        target: str | None = None,
        rdev: int = 0,
    ) -> pyfuse3.EntryAttributes:
        """A new entry without content (directory, symlink, FIFO, socket, device node), owned by
        its maker, saved with its meta to be written back."""
        node: Node | None = None
        try:
            with self.index:
                node = self.ns.new_node(parent, text, kind, mode)
                self.own(node, parent, owner)
                if explicit:
                    self.ns.set_explicit(node, True)
                if target is not None:
                    self.ns.set_attributes(node, target=target)
                if rdev:
                    self.ns.set_attributes(node, rdev=rdev)
                self.touch_parent(parent)
                self.touch_meta(node)
        except BaseException:
            if node is not None:  # not committed (a full disk): the entry was not made
                self.ns.unmake(node, self.staging)
            raise
        self.ns.looked_up(node)
        return self.attrs(node)

    def _save_new(self, node: Node) -> None:
        """Commit a new file's row; if that fails (a full disk), the file was not made: the
        caller gets the error and no entry is left behind (one left in memory only showed, stayed
        pending for good and was gone after a remount)."""
        try:
            self.index.save(node)
        except BaseException:
            self.ns.unmake(node, self.staging)
            raise

    def _new_file(self, parent: Node, name: bytes, mode: int, owner: tuple[int, int] | None) -> Node:
        text = self.new_name(parent, name)
        staged = self.staging.create()
        node = self.ns.new_node(parent, text, KIND_FILE, stat.S_IMODE(mode))
        self.own(node, parent, owner)
        self.ns.set_staged(node, staged)
        self.ns.content_changed(node)
        self.touch_parent(parent)
        return node

    async def create_or_open(
        self, parent_ino: int, name: bytes, mode: int, flags: int, caller: Caller | None = None
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """``open(name, O_CREAT | flags)``: the kernel asks to create only a name its look-up did
        not find, but another client's entry the listing brought in since may be there. Without
        O_EXCL that file is opened, as open(2) does (it failed with EEXIST)."""
        existing = self.ns.child(self.dir_node(parent_ino), self.decode(name))
        owner = None if caller is None else (caller.uid, caller.gid)
        if existing is None or flags & os.O_EXCL:
            made = self.create(parent_ino, name, mode, flags, owner, 0 if caller is None else caller.pid)
            self._writer(caller, self.ns.nodes[made[1].st_ino])
            return made
        self._may_open(existing, flags, caller)
        info = await self.open(existing.ino, flags, caller)
        self.ns.looked_up(existing)
        return info, self.attrs(existing)

    def create(
        self, parent_ino: int, name: bytes, mode: int, flags: int, owner: tuple[int, int] | None = None, opener: int = 0
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.dir_node(parent_ino)
        node = self._new_file(parent, name, mode, owner)
        self._save_new(node)
        self.ns.looked_up(node)
        info = self._open_node(node, flags, opener)
        if flags & os.O_ACCMODE == os.O_RDONLY:
            self._changed_by_reader(node)
        return info, self.attrs(node)

    def _may_open(self, node: Node, flags: int, caller: Caller | None) -> None:
        """EACCES unless the caller may open ``node`` with ``flags`` by its mode (what the kernel's
        default_permissions checks before an open, but not for an entry it believed missing),
        its supplementary groups counted as the kernel counts them."""
        if caller is None or caller.uid == 0:
            return
        attrs = self.attrs(node)
        shift = caller.class_of(attrs.st_uid, attrs.st_gid)
        allowed = (attrs.st_mode >> shift) & 0o7
        accmode = flags & os.O_ACCMODE
        wanted = (4 if accmode in (os.O_RDONLY, os.O_RDWR) else 0) | (
            2 if accmode in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC else 0
        )
        if wanted & ~allowed:
            raise fail(errno.EACCES)

    def link(self) -> None:
        raise fail(errno.EPERM)  # no hard links

    # -- removing and renaming -----------------------------------------------------------------
    def _remove(self, node: Node) -> None:
        """Take ``node`` out of the tree; its token (if any) is deleted in the background."""
        parent = self.ns.nodes[node.parent]
        if node.staged is not None and node.opens <= 0 and node.lookups <= 0 and not node.uploading:
            # before the index records the removal: on a full disk it needs the space (removed
            # at once then; otherwise on a thread, see staging.Remover). One the kernel still
            # holds (it looked it up: an open of it may be on its way) keeps its content until
            # the kernel forgets it (Namespace.release)
            self.staging.remove(node.staged, soon=True)
            self.ns.clear_staged(node)
        if node.uploading:
            self.sync.superseded(node)
        if node.token and is_manifest_node(node.remote_risk):  # a big file: its parts go with it
            self.sync.manifest_removed(node.token, node.remote_context or "", node.risk())
        token = node.token
        self.sync.removing(node)
        self.ns.remove(node, delete_token=True)
        self.sync.removed(node, token)
        self.touch_parent(parent)
        self.sync.wake_tombstones()
        self.release_node(node)

    def unlink(self, parent_ino: int, name: bytes) -> None:
        parent = self.dir_node(parent_ino)
        self.writable_fs()
        node = self.ns.child(parent, self.decode(name))
        if node is None:
            raise fail(errno.ENOENT)
        if node.is_dir:
            raise fail(errno.EISDIR)
        with self.index.kept():
            self._remove(node)
            self.sync.holder_removed(parent.ino, node.name)
            self.keep_empty_dir(parent)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent = self.dir_node(parent_ino)
        self.writable_fs()
        text = self.decode(name)
        if text == ".":
            raise fail(errno.EINVAL)
        node = self.ns.child(parent, text)
        if node is None:
            raise fail(errno.ENOENT)
        if not node.is_dir:
            raise fail(errno.ENOTDIR)
        if node.children:
            raise fail(errno.ENOTEMPTY)
        with self.index.kept():
            self._remove(node)
            self.keep_empty_dir(parent)

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int, new_name: bytes, flags: int) -> None:
        self.writable_fs()
        if flags & ~(pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE) or flags == (
            pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE
        ):  # RENAME_WHITEOUT (it was ignored), or both
            raise fail(errno.EINVAL)
        old_parent = self.dir_node(old_parent_ino)
        new_parent = self.dir_node(new_parent_ino)
        node = self.ns.child(old_parent, self.decode(old_name))
        if node is None:
            raise fail(errno.ENOENT)
        text = self.valid_name(new_parent, new_name)
        target = self.ns.child(new_parent, text)
        if flags & pyfuse3.RENAME_EXCHANGE:
            return self._exchange(node, target, new_parent)
        if target is node:
            return
        if node.is_dir and self.ns.is_ancestor(node, new_parent):
            raise fail(errno.EINVAL)
        self.fits_the_vault(new_parent, text, self.deepest_below(node) if node.is_dir else 0)
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise fail(errno.EEXIST)
            if node.is_dir and not target.is_dir:
                raise fail(errno.ENOTDIR)
            if not node.is_dir and target.is_dir:
                raise fail(errno.EISDIR)
            if target.is_dir and target.children:
                raise fail(errno.ENOTEMPTY)
        with self.index.kept():
            if target is not None:
                self.sync.replaced_by_rename(target, node)
                self._remove(target)
            self.sync.renaming(node, old_parent.ino)
            self.ns.move(node, new_parent, text)
            self._moved(node)
            self.touch_parent(old_parent)
            self.touch_parent(new_parent)
            self.keep_empty_dir(old_parent)

    def _moved(self, node: Node) -> None:
        """``node`` took another place in the tree: its token's meta, and that of every token
        below it, must say so (a rename is a meta update, never an upload)."""
        self.sync.superseded_under(node)
        if node.is_dir:
            self.ns.set_explicit(node, True)
            for d in self.ns.descendants(node):
                if d is not node and (d.token or d.explicit):
                    self.touch_meta(d)
        self.touch_meta(node)

    def _exchange(self, node: Node, other: Node | None, other_parent: Node) -> None:
        """``renameat2(RENAME_EXCHANGE)``: ``node`` and ``other`` (an entry of ``other_parent``)
        trade places, of any types, atomically here; in the vault, as two renames (each token's
        meta written, a directory's subtree with it), after which every client shows the swap."""
        if other is None:
            raise fail(errno.ENOENT)
        if other is node:
            return
        parent = self.ns.get(node.parent)
        if parent is None:
            raise fail(errno.ENOENT)
        if (
            node.is_dir
            and self.ns.is_ancestor(node, other_parent)
            or other.is_dir
            and self.ns.is_ancestor(other, parent)
        ):
            raise fail(errno.EINVAL)  # into its own subtree
        here, there = node.name, other.name
        self.fits_the_vault(other_parent, there, self.deepest_below(node) if node.is_dir else 0)
        self.fits_the_vault(parent, here, self.deepest_below(other) if other.is_dir else 0)
        with self.index.kept():
            self.ns.exchange(node, other)
            self._moved(node)
            self._moved(other)
            self.touch_parent(parent)
            if other_parent is not parent:
                self.touch_parent(other_parent)

    # -- file content ----------------------------------------------------------------------------
    def _open_node(self, node: Node, flags: int, opener: int = 0) -> pyfuse3.FileInfo:
        accmode = flags & os.O_ACCMODE
        writable = accmode in (os.O_WRONLY, os.O_RDWR)
        fh = FileHandle(self._next_fh, node, writable, bool(flags & os.O_APPEND), bool(flags & os.O_DIRECT), opener)
        self._next_fh += 1
        self.handles[fh.fh] = fh
        self.ns.opened(node, writable=writable)
        info = pyfuse3.FileInfo(fh=fh.fh)
        # remote changes invalidate the kernel's page cache explicitly; a file written through
        # O_DIRECT has the kernel drop it at every open (see write). Not only at the first open
        # after such a write: the kernel drops the pages in that opener's context, after the
        # answer, and another open answered meanwhile read them first (generic/451, now and then)
        info.keep_cache = node.ino not in self._direct_written
        return info

    async def open(self, ino: int, flags: int, caller: Caller | None = None) -> pyfuse3.FileInfo:
        node = self.node(ino)
        if node.is_dir:
            raise fail(errno.EISDIR)
        if not node.is_file:
            raise fail(errno.EINVAL)
        accmode = flags & os.O_ACCMODE
        writable = accmode in (os.O_WRONLY, os.O_RDWR)
        if writable or flags & os.O_TRUNC:
            self.writable_fs()
            self._writer(caller, node)
        if flags & os.O_TRUNC:  # also O_RDONLY | O_TRUNC, which Linux truncates (the kernel checked write permission)
            staged = await self.writable_staged(node, truncate_to_zero=True)
            now = time.time_ns()
            with self.index.kept():  # truncated is truncated: the index records it when it can
                if staged.size:
                    self.parts.changes.resized(staged.id, 0)
                # also when empty: the header carries the new time (a release leaves the index's
                # commit for later, and a restart takes the time from the header)
                staged.sealed.truncate(0, stamp=now)
                self.ns.set_attributes(
                    node, size=0, mtime_ns=now, ctime_ns=now, **self._privileges_dropped(node, caller)
                )
                self.mark_content_dirty(node)
        elif self._size_unverified(node):
            # also for writing: lseek(SEEK_END) then write, an append, took the claimed size and
            # wrote over another application's content (helper hAG F2); and an open for writing
            # whose download failed (the vault unreachable) fails too: the kernel kept the claim,
            # and the write, once the vault answered, wrote over the content as well (hAH F1)
            await self._learn_size(node)
        info = self._open_node(node, flags, 0 if caller is None else caller.pid)
        if not writable and flags & os.O_TRUNC:
            self._changed_by_reader(node)
        return info

    def _changed_by_reader(self, node: Node) -> None:
        """A handle opened for reading that changed the file (made it: ``open(O_RDONLY |
        O_CREAT)``, as flock(1) and lock files do; truncated it: ``O_RDONLY | O_TRUNC``) has no
        write to upload at its release: the upload is scheduled here, as a ``mknod`` does. Such
        files stayed pending until the unmount (helper hAL F1, F2)."""
        if node.content_dirty and node.writers == 0:
            self.sync.schedule_upload(node)

    def _writer(self, caller: Caller | None, node: Node) -> None:
        if caller is not None:
            self.last_writer = (trio.current_time(), caller.pid, node)  # (its path only if asked)

    @staticmethod
    def _privileges_dropped(node: Node, caller: Caller | None) -> dict[str, int]:
        """A truncating open by a caller other than root clears set-user-ID, and set-group-ID on
        a group-executable file, as the kernel's truncate does; it skips that for an open the
        file system truncates itself (helper hAD F3: a setuid file stayed setuid)."""
        if caller is None or caller.uid == 0:
            return {}
        drop = stat.S_ISUID | (stat.S_ISGID if node.mode & stat.S_IXGRP else 0)
        return {"mode": node.mode & ~drop} if node.mode & drop else {}

    def _size_unverified(self, node: Node) -> bool:
        """Whether the node's size is only what its token's meta claims: a file stored whole
        whose meta states no content digest (another application wrote it), not yet downloaded
        in this run."""
        return (
            node.staged is None
            and node.token is not None
            and node.token not in self.ns.content_sizes
            and not is_manifest_node(node.remote_risk)
            and self.sync.content_check(node) is None
        )

    async def _learn_size(self, node: Node) -> None:
        """Opened, a file of unverified size is downloaded (as its first read or write would
        do: content stored whole is verified whole before a byte of it is served) and shows its
        content's size at once, so that programs that read ``st_size`` bytes, map the file or
        append after a seek to its end see all of it; a file stated empty is read at all. A
        failure fails the open (its errno, logged as a read's): the kernel holds only the
        claimed size, and never asks for a file claimed empty (it read as empty, with no error,
        when the cache's disk could not hold it), and a write opened under the claim wrote over
        the content once the vault answered. An open that truncates needs no download and does
        not come here."""
        token = node.token
        sealed = await self._fetch_following(node)
        if sealed is None or self._unmarked_manifest(node, token, sealed):
            return
        try:
            self._size_learned(node, token, sealed.size)
        finally:
            sealed.close()

    def _size_learned(self, node: Node, token: str | None, size: int) -> None:
        """A verified download of ``token`` holds ``size`` bytes: the node, if it still shows
        that token, shows that size (:meth:`Namespace.learn_size`), and the kernel drops the
        attributes it holds, so that a read past the claimed end asks again (attributes only:
        no page lock is taken, so this cannot wait for a request of the same inode, this one
        included). A node written here meanwhile (staged: the download awaited while another
        handle truncated or wrote it) keeps its staged size: the token is its past."""
        if node.staged is not None or node.token != token:
            return
        changed = node.size != size
        self.ns.learn_size(node, size)
        if changed:
            log.info(
                "%s: its token's meta states a size its content does not have; showing %d bytes", self.path(node), size
            )
            if self.kernel:
                _forget_attributes(node.ino)

    def mark_content_dirty(self, node: Node) -> None:
        if self.ns.content_changed(node):
            self.index.save(node)

    async def writable_staged(self, node: Node, *, truncate_to_zero: bool = False) -> StagedFile:
        """The node's staged content, ready for writing: cloned if an upload is reading it,
        created from the current content (fetched if needed) if there was none."""
        staged = node.staged
        if staged is not None:
            if staged.frozen:
                fresh = self.staging.create() if truncate_to_zero else self.staging.clone(staged)
                if not truncate_to_zero:
                    self.parts.changes.cloned(staged.id, fresh.id)
                with self.index.kept():
                    self.sync.superseded(node)  # an upload of the old content may be in flight
                    self.ns.set_staged(node, fresh)
                    self.index.save(node)
                return fresh
            return staged
        if truncate_to_zero or node.token is None:
            fresh = self.staging.create()
        elif is_manifest_node(node.remote_risk):
            token = node.token
            fresh = await self._parts(node, self._stage_parts(node))
            if fresh is None:  # another client replaced it: stage its new content (or none)
                return await self.writable_staged(node, truncate_to_zero=truncate_to_zero)
            if node.staged is not None or node.token != token:  # staged meanwhile, or moved on
                self.staging.remove(fresh)
                return await self.writable_staged(node, truncate_to_zero=truncate_to_zero)
        else:
            # another client may have replaced it (deleting this token) before the listing showed
            # it here: follow the node as a read does; the write failed with ENOENT
            token = node.token
            sealed = await self._fetch_following(node)
            if sealed is None:
                return await self.writable_staged(node, truncate_to_zero=truncate_to_zero)
            if self._unmarked_manifest(node, token, sealed):
                return await self.writable_staged(node)  # staged from its parts
            try:
                if node.staged is not None or node.token != token:  # staged meanwhile, or moved on
                    return await self.writable_staged(node, truncate_to_zero=truncate_to_zero)
                fresh = self.staging.from_sealed(sealed)
            finally:
                sealed.close()
        with self.index.kept():
            self.ns.set_staged(node, fresh)
            self.index.save(node)
        return fresh

    async def _stage_parts(self, node: Node) -> StagedFile | None:
        """A file stored as parts, staged whole for a write; None when its manifest or a part was
        gone because another client replaced the file and the node has moved on since (see
        :meth:`_followed`; a file deleted elsewhere is ENOENT)."""
        token = node.token
        try:
            await self.parts.manifest(token, node.risk(), keep=True)  # checked, then kept
            return await self.parts.stage(token, self.staging)
        except (IntegrityError, NotFoundError):
            if not await self._followed(node, token):
                raise
        except PrivifsError as exc:
            # the manifest cannot be fetched now (offline, unreachable, 5xx): a file whose whole
            # content is cached is written as it is read, from the cache
            staged = self.parts.stage_cached(token, node.size, self.staging) if exc.transient else None
            if staged is None:
                raise
            return staged
        return None

    async def content(self, node: Node) -> SealedFile:
        """The verified content of the node's token (downloaded into the cache if needed)."""
        try:
            return await self.sync.fetch_content(node, node.token)
        except PrivifsError as exc:
            raise self._fetch_failed(node, exc) from None

    def _unmarked_manifest(self, node: Node, token: str | None, sealed: SealedFile) -> bool:
        """Whether ``sealed``, fetched as the content of ``token`` (the node's), is in fact a
        manifest whose mark the listing did not show yet (listed between its writer's
        configure-file-meta and its risk meta write): the content is not the size the token's meta says, and it decodes
        as a manifest of that size (it decrypted with the vault's key). The node is then marked a
        manifest here, as the listing will, and True: the caller reads it through its parts.
        Served as it was, a read got the manifest's bytes, and a write staged them as the file.
        The mark may also have been listed (or set by another reader) while the download ran:
        the download is then the manifest all the same, and True (taken for the file's content,
        the open showed the manifest's size and the reads served its bytes). ``sealed`` is closed
        when True; a node that moved on to another token meanwhile is left to the caller."""
        if node.token != token:
            return False
        manifest = fmt.unmarked(sealed.size, node.size, lambda: bytes(sealed.read(0, sealed.size)))
        if manifest is None:
            return False
        sealed.close()
        self.cache.evict(node.token)
        if is_manifest_node(node.remote_risk):  # marked while the download ran
            return True
        self.parts.remember(node.token, manifest)
        log.info("%s: its token is a manifest the listing did not mark yet; read through its parts", self.path(node))
        with self.index.kept():
            self.ns.set_remote_risk(node, json.dumps({**node.risk(), fmt.MARK: str(manifest.version)}, sort_keys=True))
            self.index.save(node)
        return True

    def _fetch_failed(self, node: Node, exc: PrivifsError) -> pyfuse3.FUSEError:
        """Log why the node's content could not be fetched; the error to answer with."""
        if isinstance(exc, IntegrityError):
            self._read_failed(node, f"integrity failure: {UNVERIFIED}", exc)
            return fail(errno.EIO)
        self._read_failed(node, "cannot fetch the content", exc)
        self.sync.unanswered(exc)  # a server a read cannot reach is unreachable for status and umount too
        return fail(errno_for(exc))

    def _read_failed(self, node: Node, what: str, exc: Exception) -> None:
        """Log a failed read of ``node`` with its path and cause, and keep it for ``privifs status``."""
        message = f"{self.path(node)}: {what} ({exc})"
        log.error("%s", message)
        self.last_read_error, self.last_read_error_at = message, time.time()

    async def _parts(self, node: Node, work):
        """Await ``work`` on the node's parts (see :mod:`privifs.fs.parts`); a failure is EIO
        (or the error's own errno), logged with the path."""
        try:
            return await work
        except IntegrityError as exc:
            self._read_failed(node, f"integrity failure in a part: {UNVERIFIED}", exc)
            raise fail(errno.EIO) from None
        except PrivifsError as exc:
            self._read_failed(node, "cannot fetch a part", exc)
            self.sync.unanswered(exc)
            raise fail(errno_for(exc)) from None

    async def _read_parts(self, fh_id: int, node: Node, offset: int, length: int) -> bytes | memoryview:
        """Read a file stored as parts, following it when another client replaced it (see
        :meth:`_followed`): its manifest or a part missing from the vault is then no damage."""
        token = node.token
        try:
            if not self.parts.knows(token, kept=True):  # fetched now, checked against what its token states
                m = await self.parts.manifest(token, node.risk(), keep=True)
                if m.total != node.size:  # the meta stated another size: the manifest's is authenticated
                    self._size_learned(node, token, m.total)
            return await self.parts.read(token, offset, length)
        except (IntegrityError, NotFoundError):
            if not await self._followed(node, token):
                raise
        return await self._read(fh_id, offset, length)  # the node's new content (or none)

    async def _fetch_following(self, node: Node) -> SealedFile | None:
        """:meth:`content`, or None when the token was missing because another client replaced
        or deleted the file and the node has moved on since (see :meth:`_followed`)."""
        token = node.token
        try:
            return await self.sync.fetch_content(node, token)
        except PrivifsError as exc:
            if isinstance(exc, NotFoundError) and await self._followed(node, token):
                return None
            raise self._fetch_failed(node, exc) from None

    def _deleted_elsewhere(self, node: Node) -> pyfuse3.FUSEError:
        """The file open here was deleted by another client, content and all (the listing took
        the node out): ENOENT, and no failure of this mount to report in ``privifs status``."""
        log.info("%s: deleted by another client while open here; its content is gone from the vault", self.path(node))
        return fail(errno.ENOENT)

    async def _followed(self, node: Node, token: str) -> bool:
        """After ``token`` (the node's content) could not be fetched: True if the node moved on to
        new content (:meth:`_moved_on`); a node that left the tree instead (the file deleted
        elsewhere) is answered ENOENT here (:meth:`_deleted_elsewhere`); False otherwise."""
        if await self._moved_on(node, token):
            return True
        if node.unlinked:
            raise self._deleted_elsewhere(node)
        return False

    async def _moved_on(self, node: Node, token: str) -> bool:
        """If ``token`` is gone from the vault, another client replaced or deleted the file (its
        write-back deletes the old token and parts) before the listing showed it here. The
        refresher is asked to look now and this waits (at most :data:`FOLLOW_WAIT` seconds) for
        the node to move on; True if it did. False at once if the token is still there (damage
        stays an error). If the listing does not show what the file became in time (a slow
        server), EIO with that said: the file is there, and ``ENOENT`` told a program it was not
        (an append on one of three mounts under injected faults)."""
        try:
            if await find(self.vault.tokens, token) is not None:
                return False
        except PrivifsError:
            return False
        log.info("%s: replaced or deleted by another client while open; following the listing", self.path(node))
        self.sync.remote_changed()
        self.ns.set_following(node, True)  # also when it is open for writing (nothing staged yet)
        try:
            with trio.move_on_after(FOLLOW_WAIT):
                # A rare path (another client replaced an open file): a bounded poll of the node
                # rather than a wake-up wired into every place the refresher may move it on.
                while node.token == token and not node.unlinked:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        finally:
            self.ns.set_following(node, False)
        if node.token == token and not node.unlinked:
            message = (
                f"{self.path(node)}: replaced or deleted by another client, and the listing did not show what "
                f"it became within {FOLLOW_WAIT:g}s; try again"
            )
            log.error("%s", message)
            self.last_read_error, self.last_read_error_at = message, time.time()
            raise fail(errno.EIO)
        return node.token != token

    async def read(self, fh_id: int, offset: int, length: int) -> bytes | memoryview:
        fh = self.handles[fh_id]
        node = fh.node
        # what is here already is answered at once: nothing to wait for, so nothing to abandon
        # (and no cancel scope: 4 µs, a tenth of a cached 4 KiB read)
        if node.staged is not None:
            return node.staged.sealed.read(offset, length)
        if fh.reader is not None and node.token is not None and fh.reader_token == node.token:
            data = self._read_open(fh, node, offset, length)
            if len(data) < length:  # (near the end only: the check is not on every read's way)
                self._check_kernel_size(fh, node, offset, length)
            return data
        if not self._reads_abandoned:
            with trio.CancelScope() as scope:
                self._reads.add(scope)
                try:
                    data = await self._read(fh_id, offset, length)
                    if len(data) < length:
                        self._check_kernel_size(fh, node, offset, length)
                    return data
                finally:
                    self._reads.discard(scope)
        log.info("a read of %s was abandoned: the mount is being unmounted", self.path(self.handles[fh_id].node))
        raise fail(errno.EIO)

    def _check_kernel_size(self, fh: FileHandle, node: Node, offset: int, length: int) -> None:
        """EIO for a short read past the page that holds the file's end: the kernel asked for it
        because it still holds a larger size (another client replaced the file with shorter
        content, and the listing changed the node before the kernel's attributes were dropped),
        and it would fill the rest up to that size with zeros no version ever had (helper hQ: 1
        read in 10 on two mounts, new content then zeros). Only for a node the listing shortened
        since the kernel last asked for its attributes (``shrunk_remotely``): reads through the
        page cache never reach past that page otherwise, but O_DIRECT ones do, also on a
        descriptor that turned it on with fcntl, which the daemon never hears of (helper hR:
        ``dd iflag=direct < file`` read EIO)."""
        if (
            not self.page_cache_reads
            or not node.shrunk_remotely
            or fh.direct
            or node.staged is not None
            or offset + length <= -(-node.size // PAGE) * PAGE
        ):
            return
        log.info(
            "%s: the kernel read as if the file were larger than its %d bytes (replaced elsewhere with shorter "
            "content); EIO rather than zeros, read it again",
            self.path(node),
            node.size,
        )
        if self.kernel:
            _forget_attributes(node.ino)  # (attributes only: no page lock, see _size_learned)
        raise fail(errno.EIO)

    def abandon_reads(self) -> None:
        """The mount is going away (``privifs umount``, a signal): the reads in progress end with
        EIO now, and any later one at once. A read waiting for a download from a stalled server
        (the kernel's read-ahead of a file its program had closed) held the unmount for the
        download's idle limit, 90 s: the FUSE loop ends only once every request is answered.
        Writes are not touched: what was written is staged, and uploaded as before."""
        self._reads_abandoned = True
        for scope in self._reads:
            scope.cancel()

    async def _read(self, fh_id: int, offset: int, length: int) -> bytes | memoryview:
        fh = self.handles[fh_id]
        node = fh.node
        if node.staged is not None:
            return node.staged.sealed.read(offset, length)
        if node.token is None:
            return b""
        if is_manifest_node(node.remote_risk) and not self._whole_content(fh, node):
            return await self._parts(node, self._read_parts(fh_id, node, offset, length))
        if fh.reader is None or fh.reader_token != node.token:
            fh.close_reader()
            token, believed = node.token, node.size
            sealed = await self._fetch_following(node)
            if sealed is None and node.size < believed and not fh.direct:
                # replaced by shorter content while the kernel still holds the old size for this
                # read: it would fill the rest up to that size with zeros no version ever had
                log.info(
                    "%s: replaced by another client with shorter content during this read (%d bytes, was %d); "
                    "EIO, read it again",
                    self.path(node),
                    node.size,
                    believed,
                )
                raise fail(errno.EIO)
            if sealed is not None and self._unmarked_manifest(node, token, sealed):
                return await self._read(fh_id, offset, length)  # read through its parts
            if sealed is None or fh.reader is not None or node.token != token or node.staged is not None:
                if sealed is not None:  # (staged meanwhile: written here while this read waited)
                    sealed.close()
                return await self._read(fh_id, offset, length)
            fh.reader, fh.reader_token = sealed, token
            if node.size != sealed.size:  # the token's meta did not state its content's size
                self._size_learned(node, token, sealed.size)
        return self._read_open(fh, node, offset, length)

    def _read_open(self, fh: FileHandle, node: Node, offset: int, length: int) -> bytes | memoryview:
        """From the handle's open reader (the node's content, cached)."""
        try:
            return fh.reader.read(offset, length)
        except IntegrityError as exc:
            log.error("%s: cached content failed authentication (%s); dropping it", self.path(node), exc)
            self.cache.evict(node.token)
            fh.close_reader()
            raise fail(errno.EIO) from None

    def _whole_content(self, fh: FileHandle, node: Node) -> bool:
        """For a file stored as parts: whether the cache holds its whole content under the
        manifest's token (what this mount uploaded last; see :mod:`privifs.fs.partwrite`), now
        open as the handle's reader. Otherwise reads go through the parts."""
        if fh.reader is not None and fh.reader_token == node.token:
            return True
        if not self.cache.holds(node.token):
            return False
        sealed = self.cache.open(node.token)
        if sealed is None:
            return False
        if sealed.size != node.size:  # not the whole content: the manifest itself, downloaded as a
            # file's content by a read that came before the listing showed its mark
            sealed.close()
            self.cache.evict(node.token)
            return False
        fh.close_reader()
        fh.reader, fh.reader_token = sealed, node.token
        return True

    async def write(self, fh_id: int, offset: int, data: bytes) -> int:
        fh = self.handles[fh_id]
        node = fh.node
        if not fh.writable:
            raise fail(errno.EBADF)
        if (node.size if fh.append else offset) >= MAX_FILE_SIZE:
            raise fail(errno.EFBIG)  # (before anything is staged for it)
        # no write succeeds before the index records what it owes (nothing, mostly): that may be
        # the very staged copy the write goes to (ENOSPC while it cannot)
        self.index.settle()
        staged = await self.writable_staged(node)
        if fh.append:
            offset = staged.size
        if offset + len(data) > MAX_FILE_SIZE:  # what fits is written, as write(2) does at a file size limit
            if offset >= MAX_FILE_SIZE:
                raise fail(errno.EFBIG)
            data = data[: MAX_FILE_SIZE - offset]
        now = time.time_ns()
        self.parts.changes.wrote(staged.id, offset, len(data))  # first: a write that fails halfway changed parts too
        try:
            n = staged.write(offset, data, now)
        except BaseException:
            if staged.sealed.wrote_chunks:  # it changed what this mount shows: the vault must get it too
                self.ns.set_attributes(node, size=staged.size, mtime_ns=now, ctime_ns=now)
                self.mark_content_dirty(node)
            raise
        self.ns.set_attributes(node, size=staged.size, mtime_ns=now, ctime_ns=now)
        self.mark_content_dirty(node)
        if fh.direct:
            # the kernel drops cached pages of the range before an O_DIRECT write, but after an
            # asynchronous one (aio, io_uring) it drops nothing, and a buffered read running
            # meanwhile cached the old bytes for good (keep_cache): a later read(2) returned them
            # (xfstests generic/451). Every open of the file drops them from now (no keep_cache). Not
            # an invalidation from here: it waits for pages under writeback (a program's mmap
            # writes), whose requests the kernel holds back until this write is answered (fsx -Z
            # hung so, generic/263)
            self._direct_written.add(node.ino)
        if self.last_disk_full is not None:  # there is room again (hE: still said a minute after)
            self.last_disk_full = self.last_disk_full_at = None
        return n

    async def fsync(self, fh_id: int, datasync: bool = False) -> None:
        """The file's content, and unless ``datasync`` its attributes (mode, owner, times,
        extended attributes), are committed in the vault; with ``--fsync local`` on the local
        disk, the upload following."""
        handle = self.handles[fh_id]
        node = handle.node
        content = node.staged is not None and bool(node.content_dirty)
        if node.unlinked or not content and (datasync or not node.meta_dirty and not self.sync.replaces(node)):
            return
        if self.opts.fsync_mode == "local":
            if content:
                await fsync_locally(self, node, datasync)
            else:
                self.index.save(node)
                await flush_index(self.index)
            return
        if content:
            node.staged.sealed.sync_header()
            self.index.save(node)
        async with unless_killed(handle.opener, self.ns.describe(node)):
            await self.sync.reach_vault()
            if node.staged is not None and node.content_dirty and not node.unlinked:  # (else uploaded or gone)
                await self.sync.commit(node, self.opts.fsync_timeout)
            if not datasync and not node.unlinked and node.meta_dirty:  # its attributes and name
                await self.sync.commit_meta(node, self.opts.fsync_timeout)
        if not datasync and not node.unlinked:  # and the entry its name replaced
            await self.sync.delete_replaced(node)
        # what the index records of it (its new token, the version and entries it replaced, the
        # deletes owed) then survives a power loss too: rolled back to an older state, it did not
        # know its newest token and deletes, and a journal SQLite had deleted came back as the
        # plain file and was rolled into a newer database (helper hN F2). The content is in the
        # vault whatever the local disk says: a flush it refuses is logged, not the fsync's error
        try:
            await flush_index(self.index)
        except PrivifsError as exc:
            log.warning("%s: in the vault; the index cannot be flushed to disk (%s)", self.ns.describe(node), exc)

    async def fsyncdir(self, fh_id: int) -> None:
        """The directory's changes (entries made, renamed, removed) as the index records them are
        flushed to the local disk; they reach the vault in the background, like any of them."""
        await flush_index(self.index)

    def release(self, fh_id: int) -> None:
        """The last close of a handle (the kernel sends it after close(2) returned: what was
        written is durable by then, see :mod:`privifs.fs.staging`); the node's size and times go
        into the index with its next commit, and the upload is scheduled."""
        fh = self.handles.pop(fh_id, None)
        if fh is None:
            return
        fh.close_reader()
        node = fh.node
        self.ns.closed(node, writable=fh.writable)
        if fh.writable:
            if node.staged is not None and not node.unlinked:
                node.staged.sealed.sync_header()
                if node.opens <= 0:  # the last writer closed it: no partial write follows soon
                    node.staged.sealed.forget_kept_plaintext()
                if node.content_dirty:  # size and times: the staged file's header has them already
                    self.index.save_soon(node)
                else:
                    self.index.save(node)
                if node.writers == 0 and node.content_dirty:
                    self.sync.schedule_upload(node)
        self.park_staged(node)
        self.release_node(node)

    def release_left(self) -> int:
        """The FUSE connection has ended: release every handle the kernel had not released.
        close(2) does not wait for the daemon (RELEASE comes in the background), and an unmount
        drops the requests the daemon has not read yet, so a file closed just before it stayed
        open for writing here and was not uploaded. Returns how many handles were left."""
        left = list(self.handles)
        for fh_id in left:
            self.release(fh_id)
        self.dir_handles.clear()
        return len(left)

    # -- directories -----------------------------------------------------------------------------
    def opendir(self, ino: int) -> int:
        """A handle on the directory; its entries are taken at the first readdir, not here: SQLite
        opens the directory at each commit only to fsync it (sorting the entries cost O(n log n)
        per commit in a large directory)."""
        self.dir_node(ino)
        fh = self._next_fh
        self._next_fh += 1
        self.dir_handles[fh] = ino
        return fh

    def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """``.`` and ``..`` first (offsets 1 and 2, as a local filesystem lists them: ``ls -a``,
        the shell's ``.*``), then the entries at their ``seq`` + 2, so an offset stays stable
        while entries come and go. The kernel keeps no lookup count for ``.`` and ``..``."""
        import bisect

        handle = self.dir_handles[fh]
        if isinstance(handle, int):  # the first readdir of the handle: the entries as they are now
            node = self.ns.get(handle)
            children = node.children if node is not None and node.children is not None else {}
            handle = (handle, sorted((self.ns.nodes[i].seq, i) for i in children.values()))
            self.dir_handles[fh] = handle
        ino, entries = handle
        if start_id < DOTDOT_OFFSET:
            here = self.ns.get(ino)
            if here is None:
                return
            parent = self.ns.get(here.parent) if here.parent is not None else None
            dots = (b".", here, DOT_OFFSET), (b"..", parent if parent is not None else here, DOTDOT_OFFSET)
            for name, node, offset in dots:
                if offset > start_id and not pyfuse3.readdir_reply(token, name, self.attrs(node), offset):
                    return
        pos = bisect.bisect_right(entries, (start_id - DOTDOT_OFFSET, float("inf")))
        for seq, ino in entries[pos:]:
            node = self.ns.get(ino)
            if node is None or node.unlinked:
                continue
            name = node.name.encode("utf-8", "surrogateescape")
            if not pyfuse3.readdir_reply(token, name, self.attrs(node), seq + DOTDOT_OFFSET):
                return
            self.ns.looked_up(node)

    def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    def statfs(self) -> pyfuse3.StatvfsData:
        """Free space is what can really be written: the staging filesystem's free space above
        the floor kept for the index (:meth:`~privifs.fs.staging.Staging.writable`)."""
        st = os.statvfs(self.staging.dir)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        avail = self.staging.writable() // max(1, st.f_frsize)
        used = self._files_size() // max(1, st.f_frsize)
        s.f_blocks = max(used + avail, 1)  # (0 made df show '-' for a full disk and no files)
        s.f_bfree = avail
        s.f_bavail = avail
        s.f_files = len(self.ns.nodes) + st.f_favail
        s.f_ffree = st.f_favail
        s.f_favail = st.f_favail
        s.f_namemax = NAME_MAX
        return s

    def _files_size(self) -> int:
        """Every file's size, summed at most every :data:`USED_EVERY` seconds: a sum over every
        node (100,000 and more in a big vault) at each statfs made a program that asks often
        (a file manager, a backup tool checking room before each file) cost the loop that each time."""
        now = time.monotonic()
        when, used = self._used
        if now - when >= USED_EVERY:
            used = sum(n.size for n in self.ns.nodes.values() if n.is_file)
            self._used = (now, used)
        return used

    # -- startup -----------------------------------------------------------------------------------
    def open_staged_files(self) -> None:
        """Reattach staged files to their nodes after a restart; remove orphans. A staged file
        that is gone or damaged has lost its content: the node shows its last uploaded content,
        or, never uploaded, is removed (never read as zeros). One that cannot be opened for
        another reason (too many open files, permissions) stops the start, and is kept."""
        referenced = set(self.sync.leftover)  # uploads the last run cut off (Syncer.superseded)
        for node in list(self.ns.nodes.values()):
            if not node.staged_id:
                continue
            try:
                self.ns.set_staged(node, self.staging.open(node.staged_id))
                referenced.add(node.staged_id)
                node.staged.sealed.trim()  # what a write the stop cut short left past the recorded end
                if not node.content_dirty and node.staged.sealed.stamp > node.ctime_ns:
                    # written after the row last said the file was clean: the write's commit was
                    # cut off by the stop, or owed (Index.kept); the header says what it holds
                    self.ns.content_changed(node)
                    self.index.save_soon(node)
                if node.content_dirty:
                    # the header is current after every write; the index row after a release
                    sealed = node.staged.sealed
                    self.ns.set_attributes(node, size=sealed.size)
                    if sealed.stamp > node.ctime_ns:  # written after the row was last saved
                        self.ns.set_attributes(node, mtime_ns=sealed.stamp, ctime_ns=sealed.stamp)
                self.park_staged(node)  # (opened again by its upload, or a program's open)
                continue
            except IntegrityError as exc:
                why = str(exc)
            except PrivifsError as exc:
                if self.staging.path(node.staged_id).exists():
                    raise
                why = f"{exc}"
            if node.token is None:
                log.error(
                    "%s: the staged content is lost (%s); the file had never been uploaded, so it is removed",
                    self.path(node),
                    why,
                )
                with self.index.kept():
                    self.ns.remove(node, delete_token=False)
                self.ns.release(node, self.staging)
                continue
            log.error(
                "%s: the staged content is lost (%s); the file shows its last uploaded content", self.path(node), why
            )
            self.ns.clear_staged(node, content_clean=True)
            self.index.save(node)
        orphans = self.staging.ids() - referenced
        if self.index.counter(RECOVER_COUNTER):
            if not self.opts.read_only:
                self._recover_staged(orphans)
            elif orphans:  # kept for the next writable mount, which shows them (helper hZ: they were deleted)
                log.warning(
                    "%d staged files no entry of the local index names (it was made anew) are kept for the "
                    "next mount that is not read-only, which shows them in /lost+found",
                    len(orphans),
                )
            return
        for orphan in orphans:
            self.staging.remove(orphan)

    def _recover_staged(self, orphans: set[str]) -> None:
        """The index was made anew (the old one deleted, or moved away after its damage was
        reported), so no entry names the files staged under it: they hold changes no upload had
        taken yet. Each that holds data shows as a new file in ``/lost+found`` (mode 0600, named
        by when it was last written and its id; its name and mode were the old index's) and is
        uploaded like any new file; an empty one (a spare made ahead) or one that cannot be read
        is removed. Deleting the index deleted them all without a word (helper hX). All in one
        transaction with the clearing of :data:`RECOVER_COUNTER`: a stop halfway does it again."""
        found: list[tuple[Node, int]] = []
        with self.index:
            for staged_id in sorted(orphans):
                try:
                    staged = self.staging.open(staged_id)
                    staged.sealed.trim()
                except PrivifsError as exc:
                    log.warning("a staged file no entry names cannot be read (%s); removed", exc)
                    self.staging.remove(staged_id)
                    continue
                sealed = staged.sealed
                if not sealed.size:
                    self.staging.remove(staged)
                    continue
                folder = self._lost_and_found()
                written = time.strftime("%Y%m%d-%H%M%S", time.localtime(sealed.stamp / 1e9))
                node = self.ns.new_node(folder, f"{written}-{staged_id[:12]}", KIND_FILE, 0o600)
                self.own(node, folder, None)
                self.ns.set_staged(node, staged)
                self.ns.content_changed(node)
                self.ns.set_attributes(node, size=sealed.size, mtime_ns=sealed.stamp, ctime_ns=sealed.stamp)
                self.index.save(node)
                self.park_staged(node)
                found.append((node, sealed.size))
            self.index.set_counter(RECOVER_COUNTER, 0)
        if found:
            self._recovered = ([node for node, _ in found], self.ns.nodes[found[0][0].parent])
        for node, size in found:
            log.warning(
                "%s: %d bytes staged on this machine that no entry of the local index names (it was "
                "made anew): kept here, and uploaded; its name and mode were the old index's",
                self.path(node),
                size,
            )

    def recovered(self) -> tuple[int, str] | None:
        """How many of the files put in /lost+found at the start are still there, and that
        folder's path; None when none are (moved away or removed: status stops saying so)."""
        if self._recovered is None:
            return None
        nodes, folder = self._recovered
        left = sum(1 for n in nodes if not n.unlinked and n.parent == folder.ino)
        return (left, self.path(folder)) if left and not folder.unlinked else None

    def _lost_and_found(self) -> Node:
        """``/lost+found``, made (0700) if there is none; a file of that name makes it
        ``/lost+found.1`` (or the next number free)."""
        root = self.ns.nodes[ROOT]
        for name in itertools.chain(["lost+found"], (f"lost+found.{n}" for n in itertools.count(1))):
            node = self.ns.child(root, name)
            if node is None:
                node = self.ns.new_node(root, name, KIND_DIR, 0o700)
                self.own(node, root, None)
                self.ns.set_explicit(node, True)
                self.index.save(node)
                return node
            if node.is_dir:
                return node
        raise AssertionError("unreachable")

    def pending(self) -> list[Node]:
        """What write-back still has to do (:meth:`Namespace.pending
        <privifs.fs.namespace.Namespace.pending>`)."""
        return self.ns.pending()
