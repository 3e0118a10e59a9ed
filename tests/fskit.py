"""The filesystem without a kernel: a :class:`~privifs.fs.filesystem.Filesystem` with its write-back
and refresher, wired as the daemon wires them, against the real session engine over loopback. Tests
call the FUSE-level methods directly (as S3QL's ``t3_fs_api`` drives its Operations), so races that
need precise interleavings can be written step by step and run in well under a second.

Everything that builds privifs objects lives here, so tests use only:

* the kernel's view by path (``mkdir``, ``create_file``, ``write``, ``rename``, ``setattr``,
  ``readdir``, ``tree`` …), each call going through the pyfuse3 handlers (``ops``), so errors
  are the errnos the kernel would get (:func:`fails_with`);
* the background tasks one step at a time: ``settle`` (write-back and deletes done),
  ``refresh`` (one listing merged), ``hold_write_back`` (local changes stay pending);
* the vault: ``listing``, ``vault_tree`` (decrypted), ``remote`` (another client changing tokens
  directly), ``fresh`` (another filesystem of the vault from an empty local state);
* node-level helpers for tests that follow one node through the background tasks."""

from __future__ import annotations

import errno
import os
import secrets
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio

from privifs.client.connect import Client, connect
from privifs.client.datatokens import FileMeta
from privifs.client.shapes import TokenInfo
from privifs.crypto import wire
from privifs.crypto.sealed import SealedFile, local_key
from privifs.errors import LocalStoreError
from privifs.fs.cache import ContentCache
from privifs.fs.filesystem import Filesystem, MountOptions
from privifs.fs.namespace import ROOT, Index, Namespace, Node
from privifs.fs.operations import Operations
from privifs.fs.refresh import Refresher
from privifs.fs.staging import Staging
from privifs.fs.sync import Syncer
from privifs.parts import format as fmt
from privifs.supervise import Supervisor


@dataclass
class InProcessFs:
    fs: Filesystem
    syncer: Syncer
    refresher: Refresher
    client: Client
    supervisor: Supervisor
    state: Path
    key: bytes = b""
    endpoints: object = None
    credentials: object = None

    _ops: Operations | None = field(default=None, init=False, repr=False)
    _open: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # fh → ino

    @property
    def ns(self) -> Namespace:
        """The tree (the same one the filesystem, the syncer and the refresher share)."""
        return self.fs.ns

    @property
    def ops(self) -> Operations:
        """The pyfuse3 handlers over ``fs``: errnos exactly as the kernel would get them."""
        if self._ops is None:
            self._ops = Operations(self.fs)
        return self._ops

    # -- node-level helpers, for tests that follow one node through the background tasks --------
    def node(self, path: str) -> Node:
        node = self.fs.ns.root
        for part in filter(None, path.split("/")):
            child = self.fs.ns.child(node, part)
            assert child is not None, f"{path}: no {part!r}"
            node = child
        return node

    def mkdir_node(self, parent: Node | int, name: str) -> Node:
        attrs = self.fs.mkdir(_ino(parent), name.encode(), 0o755)
        return self.fs.ns.get(attrs.st_ino)

    def create_node(
        self, parent: Node | int, name: str, mode: int = 0o644, flags: int = os.O_RDWR | os.O_CREAT
    ) -> tuple[int, Node]:
        info, attrs = self.fs.create(_ino(parent), name.encode(), stat.S_IFREG | mode, flags)
        return info.fh, self.fs.ns.get(attrs.st_ino)

    async def open_node(self, node: Node, flags: int = os.O_RDWR) -> int:
        return (await self.fs.open(node.ino, flags)).fh

    def forget(self, node: Node) -> None:
        """What the kernel does when it drops its references to ``node``."""
        self.fs.forget([(node.ino, node.lookups)])

    def unlink_node(self, parent: Node | int, name: str) -> None:
        """``unlink(2)`` of a file nothing else holds: the entry goes, and the kernel forgets the
        inode at once (until then a removed file keeps its content: an open may be on its way)."""
        node = self.fs.ns.child(self.fs.ns.get(_ino(parent)), name)
        self.fs.unlink(_ino(parent), name.encode())
        if node is not None:
            self.forget(node)

    async def truncate(self, fh: int, size: int) -> None:
        attr = pyfuse3.EntryAttributes()
        attr.st_size = size
        fields = setattr_fields(update_size=True)
        node = self.fs.handles[fh].node
        await self.fs.setattr(node.ino, attr, fields, fh)

    async def wait_idle(self, timeout: float = 20) -> None:
        """Until nothing is pending and no token awaits deletion."""
        with trio.fail_after(timeout):
            while self.fs.pending() or self.fs.index.tombstone_count():
                self.syncer.retry_all_now()
                await trio.sleep(0.02)

    async def vault_names(self) -> dict[str, int]:
        """context/name → size of every data token in the vault but the key check."""
        return {
            f"{i.context.strip('/')}/{i.file_name}".strip("/"): i.size or 0
            async for i in self.client.tokens.list()
            if not i.context.startswith("/.privifs")
        }

    # -- the kernel's view, by path (every call goes through the pyfuse3 handlers) --------------
    async def ino(self, path: str) -> int:
        """Resolve ``path`` as the kernel does (lookup, then forget: no reference is kept)."""
        ino = ROOT
        for part in filter(None, path.split("/")):
            attrs = await self.ops.lookup(ino, part.encode(), CTX)
            if attrs.st_ino == 0:  # a negative entry: the kernel answers ENOENT
                raise pyfuse3.FUSEError(errno.ENOENT)
            await self.ops.forget([(attrs.st_ino, 1)])
            ino = attrs.st_ino
        return ino

    async def _parent(self, path: str) -> tuple[int, bytes]:
        head, _, name = path.strip("/").rpartition("/")
        return await self.ino(head), name.encode()

    async def lookup(self, path: str) -> pyfuse3.EntryAttributes:
        return await self.ops.getattr(await self.ino(path), CTX)

    async def exists(self, path: str) -> bool:
        try:
            await self.ino(path)
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise
        return True

    async def mkdir(self, path: str, mode: int = 0o755) -> pyfuse3.EntryAttributes:
        parent, name = await self._parent(path)
        return await self._entered(await self.ops.mkdir(parent, name, stat.S_IFDIR | mode, CTX))

    async def rmdir(self, path: str) -> None:
        parent, name = await self._parent(path)
        await self.ops.rmdir(parent, name, CTX)

    async def unlink(self, path: str) -> None:
        parent, name = await self._parent(path)
        await self.ops.unlink(parent, name, CTX)

    async def rename(self, old: str, new: str, flags: int = 0) -> None:
        old_parent, old_name = await self._parent(old)
        new_parent, new_name = await self._parent(new)
        await self.ops.rename(old_parent, old_name, new_parent, new_name, flags, CTX)

    async def symlink(self, path: str, target: str | bytes) -> pyfuse3.EntryAttributes:
        parent, name = await self._parent(path)
        target = target.encode() if isinstance(target, str) else target
        return await self._entered(await self.ops.symlink(parent, name, target, CTX))

    async def mknod(self, path: str, mode: int, rdev: int = 0) -> pyfuse3.EntryAttributes:
        parent, name = await self._parent(path)
        return await self._entered(await self.ops.mknod(parent, name, mode, rdev, CTX))

    async def readlink(self, path: str) -> bytes:
        return await self.ops.readlink(await self.ino(path), CTX)

    async def _entered(self, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        await self.ops.forget([(attrs.st_ino, 1)])  # the kernel's reference from the new entry
        return attrs

    async def create_file(self, path: str, mode: int = 0o644, flags: int = os.O_RDWR | os.O_CREAT) -> int:
        """``open(path, O_CREAT)`` of a new file; returns the file handle."""
        parent, name = await self._parent(path)
        info, attrs = await self.ops.create(parent, name, stat.S_IFREG | mode, flags, CTX)
        await self.ops.forget([(attrs.st_ino, 1)])
        self._open[info.fh] = attrs.st_ino
        return info.fh

    async def open_file(self, path: str, flags: int = os.O_RDWR) -> int:
        ino = await self.ino(path)
        fh = (await self.ops.open(ino, flags, CTX)).fh
        self._open[fh] = ino
        return fh

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self.ops.write(fh, offset, data)

    async def read(self, fh: int, offset: int = 0, size: int = 1 << 30) -> bytes:
        return await self.ops.read(fh, offset, size)

    async def close(self, fh: int) -> None:
        """What close(2) leads to: a release (the last close of the file; privifs has no flush,
        so the kernel sends none)."""
        await self.ops.release(fh)
        self._open.pop(fh, None)

    async def fsync(self, fh: int) -> None:
        await self.ops.fsync(fh, False)

    async def write_file(self, path: str, data: bytes, *, fsync: bool = False) -> None:
        """Create or truncate ``path`` and write ``data`` into it, then close it."""
        if await self.exists(path):
            fh = await self.open_file(path, os.O_WRONLY | os.O_TRUNC)
        else:
            fh = await self.create_file(path, flags=os.O_WRONLY | os.O_CREAT)
        await self.write(fh, 0, data)
        if fsync:
            await self.fsync(fh)
        await self.close(fh)

    async def read_file(self, path: str) -> bytes:
        fh = await self.open_file(path, os.O_RDONLY)
        try:
            out = b""
            while chunk := await self.read(fh, len(out), 1 << 20):
                out += chunk
            return out
        finally:
            await self.ops.release(fh)
            self._open.pop(fh, None)

    async def setattr(
        self,
        path: str | None = None,
        *,
        fh: int | None = None,
        size: int | None = None,
        mode: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
    ) -> pyfuse3.EntryAttributes:
        """truncate / chmod / chown / utimens of ``path`` (or of the file open as ``fh``)."""
        ino = await self.ino(path) if path is not None else self._open[fh]
        attr = pyfuse3.EntryAttributes()
        if size is not None:
            attr.st_size = size
        if mode is not None:
            attr.st_mode = mode
        if atime_ns is not None:
            attr.st_atime_ns = atime_ns
        if mtime_ns is not None:
            attr.st_mtime_ns = mtime_ns
        if uid is not None:
            attr.st_uid = uid
        if gid is not None:
            attr.st_gid = gid
        fields = setattr_fields(
            update_size=size is not None,
            update_mode=mode is not None,
            update_atime=atime_ns is not None,
            update_mtime=mtime_ns is not None,
            update_uid=uid is not None,
            update_gid=gid is not None,
        )
        return await self.ops.setattr(ino, attr, fields, fh, CTX)

    # extended attributes (a filesystem built with ``xattrs=True``, as a mount with --xattrs)
    async def setxattr(self, path: str, name: bytes, value: bytes) -> None:
        await self.ops.setxattr(await self.ino(path), name, value, CTX)

    async def getxattr(self, path: str, name: bytes) -> bytes:
        return await self.ops.getxattr(await self.ino(path), name, CTX)

    async def listxattr(self, path: str) -> list[bytes]:
        return list(await self.ops.listxattr(await self.ino(path), CTX))

    async def removexattr(self, path: str, name: bytes) -> None:
        await self.ops.removexattr(await self.ino(path), name, CTX)

    async def readdir(
        self, path: str, start: int = 0, limit: int | None = None, *, dots: bool = False
    ) -> list[tuple[str, int]]:
        """(name, next offset) of the entries from offset ``start`` on, at most ``limit`` of them
        (a full kernel buffer answers False from readdir_reply); ``.`` and ``..`` only with ``dots``."""
        fh = await self.ops.opendir(await self.ino(path), CTX)
        try:
            return await self.readdir_handle(fh, start, limit, dots=dots)
        finally:
            await self.ops.releasedir(fh)

    async def readdir_handle(
        self, fh: int, start: int = 0, limit: int | None = None, *, dots: bool = False
    ) -> list[tuple[str, int]]:
        got: list[tuple[str, int, int]] = []
        real = pyfuse3.readdir_reply

        def reply(token, name: bytes, attrs: pyfuse3.EntryAttributes, next_id: int) -> bool:
            if name in (b".", b"..") and not dots:  # no lookup count: the kernel keeps none for them
                return True
            if limit is not None and len(got) >= limit:
                return False
            got.append((name.decode("utf-8", "surrogateescape"), next_id, attrs.st_ino))
            return True

        pyfuse3.readdir_reply = reply  # the real one needs a kernel request behind its token
        try:
            await self.ops.readdir(fh, start, None)
        finally:
            pyfuse3.readdir_reply = real
        await self.ops.forget([(ino, 1) for name, _, ino in got if name not in (".", "..")])
        return [(name, next_id) for name, next_id, _ in got]

    async def opendir(self, path: str) -> int:
        return await self.ops.opendir(await self.ino(path), CTX)

    async def releasedir(self, fh: int) -> None:
        await self.ops.releasedir(fh)

    async def statfs(self) -> pyfuse3.StatvfsData:
        return await self.ops.statfs(CTX)

    async def tree(self, path: str = "") -> dict[str, object]:
        """Every entry below ``path``: ``"dir"``, file content (bytes), ``("->", target)``, or
        for a FIFO, socket or device node the letter ``ls -l`` shows (``"p"``, ``"s"``, ``"c"``, ``"b"``)."""
        out: dict[str, object] = {}
        for name, _ in await self.readdir(path):
            p = f"{path}/{name}".strip("/")
            attrs = await self.lookup(p)
            if stat.S_ISDIR(attrs.st_mode):
                out[p] = "dir"
                out.update(await self.tree(p))
            elif stat.S_ISLNK(attrs.st_mode):
                out[p] = ("->", (await self.readlink(p)).decode())
            elif not stat.S_ISREG(attrs.st_mode):
                out[p] = stat.filemode(attrs.st_mode)[0]  # p: FIFO, s: socket, c, b: devices
            else:
                out[p] = await self.read_file(p)
        return out

    # -- the background tasks, one step at a time ------------------------------------------------
    async def settle(self, timeout: float = 20) -> None:
        """Everything written back and every removed token deleted (no write-back delay, and no
        wait for the mount to be quiet: the test's requests are done)."""
        self.syncer.last_activity = float("-inf")
        await self.wait_idle(timeout)

    def hold_write_back(self) -> Callable[[], None]:
        """Keep the write-back from sending anything until the returned function is called
        (changes made meanwhile stay local: pending, as on a busy or slow mount)."""
        real = self.syncer.reconcile
        go = trio.Event()

        async def held(node: Node) -> None:
            await go.wait()
            await real(node)

        self.syncer.reconcile = held

        def resume() -> None:
            self.syncer.reconcile = real
            go.set()

        return resume

    async def refresh(self) -> None:
        """One pass of the refresher: read the listing, merge it into the tree."""
        await self.refresher.refresh_once()

    # -- the vault itself ------------------------------------------------------------------------
    async def listing(self) -> list[TokenInfo]:
        return [i async for i in self.client.tokens.list() if not i.context.startswith("/.privifs")]

    async def vault_tree(self) -> dict[str, object]:
        """What the vault holds, by token path: ``"dir"`` for a directory marker, else the
        decrypted content (a path held by several tokens maps to a sorted list of contents)."""
        vault = self.client.vault(self.key)
        out: dict[str, object] = {}
        for info in await self.listing():
            path = f"{info.context.strip('/')}/{_joined(info)}".strip("/")
            value = (
                "dir"
                if info.risk.get("privifs.type") == "dir"
                else ("->", info.risk.get("privifs.target"))
                if info.risk.get("privifs.type") == "symlink"
                else await vault.get_bytes(info.token)
            )
            if path in out:
                out[path] = sorted([*(out[path] if isinstance(out[path], list) else [out[path]]), value], key=repr)
            else:
                out[path] = value
        return out

    @property
    def remote(self) -> Remote:
        """Another client of the same vault (same key), changing tokens directly."""
        return Remote(self.client, self.key)

    @asynccontextmanager
    async def fresh(self, *, xattrs: bool = False):
        """Another filesystem of this vault built from an empty local state."""
        state = self.state / f"fresh-{secrets.token_hex(4)}"
        state.mkdir()
        async with inprocess_fs(state, self.endpoints, self.credentials, key=self.key, xattrs=xattrs) as other:
            yield other


class Remote:
    """Changes another client of the vault makes, by path (``ctx/name``): what ``privifs token``
    or another mount sends, straight to the vault."""

    def __init__(self, client: Client, key: bytes):
        self.client = client
        self.key = key
        self.vault = client.vault(key)

    async def token(self, path: str) -> TokenInfo:
        context, name = _split(path)
        found = [i async for i in self.client.tokens.list(context=context) if _joined(i) == name]
        assert len(found) == 1, f"{path}: {len(found)} tokens"
        return found[0]

    async def put(self, path: str, data: bytes, **risk: str) -> str:
        """A new token at ``path`` (with privifs' risk fields ``risk`` if given)."""
        context, name = _split(path)
        ext = name.rpartition(".")[2] if "." in name.strip(".") else ""
        token = await self.vault.put_bytes(data, FileMeta(name, ext, context, len(data), "/" + path.strip("/")))
        if risk:
            await self.client.tokens.set_risk(token, {f"privifs.{k}": v for k, v in risk.items()})
        return token

    async def put_stating(self, path: str, data: bytes, size: int) -> str:
        """A new token at ``path`` whose meta states ``size`` whatever ``data`` holds, and no
        risk meta: what another application may store."""
        context, name = _split(path)
        ext = name.rpartition(".")[2] if "." in name.strip(".") else ""
        blob = wire.seal(self.key, data)
        meta = FileMeta(name, ext, context, size, "/" + path.strip("/"))
        return await self.client.tokens.store(blob, len(blob), meta)

    async def mkdir(self, path: str) -> str:
        """A directory marker, as privifs writes one."""
        return await self.put(path, b"", type="dir", mode="755")

    async def rewrite(self, path: str, data: bytes) -> str:
        """Another privifs client's edit: a new token with the content, then the old one deleted."""
        old = await self.token(path)
        token = await self.put(path, data)
        await self.client.tokens.delete(old.token)
        return token

    async def move(self, path: str, new_path: str) -> None:
        info = await self.token(path)
        context, name = _split(new_path)
        ext = name.rpartition(".")[2] if "." in name.strip(".") else ""
        await self.client.tokens.update(info.token, file_name=name, extension=ext, context=context)

    async def move_dir(self, path: str, new_path: str, only: set[str] | None = None) -> None:
        """A directory renamed by another privifs client: every token below it (and its marker,
        if any) gets the new context; ``only``: just these tokens (what that client had seen)."""
        old = "/" + path.strip("/")
        new = "/" + new_path.strip("/")
        for info in [i async for i in self.client.tokens.list()]:
            if only is not None and info.token not in only:
                continue
            ctx = "/" + info.context.strip("/")
            if ctx == old or ctx.startswith(old + "/"):
                await self.client.tokens.update(info.token, context=new + ctx[len(old) :])
            elif f"{ctx.rstrip('/')}/{_joined(info)}" == old:
                await self.move(path, new_path)

    async def delete(self, path: str) -> None:
        await self.client.tokens.delete((await self.token(path)).token)

    async def next_second(self) -> None:
        """Until tokens stored from now on have a later ``createdAt`` (whole seconds) than
        every token listed now."""
        newest = max([i.created_at async for i in self.client.tokens.list() if i.created_at] or [0])
        with trio.fail_after(5):
            while time.time() < newest + 1:
                await trio.sleep(newest + 1 - time.time() + 0.01)

    async def chmod(self, path: str, mode: int) -> None:
        info = await self.token(path)
        await self.client.tokens.set_risk(info.token, {**info.risk, "privifs.mode": f"{mode:o}"})


def _split(path: str) -> tuple[str, str]:
    head, _, name = path.strip("/").rpartition("/")
    return "/" + head, name


def _joined(info: TokenInfo) -> str:
    ext = info.extension
    return f"{info.file_name}.{ext}" if ext and not info.file_name.endswith("." + ext) else info.file_name


@contextmanager
def fails_with(code: int):
    """The operation inside answers the kernel ``code`` (an errno)."""
    with pytest.raises(pyfuse3.FUSEError) as caught:
        yield
    got = caught.value.errno
    assert got == code, f"expected {errno.errorcode[code]}, got {errno.errorcode.get(got, got)}"


async def across_a_refresh(call: Callable[[], Awaitable], refresh: Callable[[], Awaitable]):
    """What ``call`` (a read or write that finds the version it had open gone from the vault, so
    it waits for the listing to move the node on) returned, or the FUSEError it answered, while
    one ``refresh`` ran, as the nudged refresher does on a mount."""
    got: list = []

    async def run() -> None:
        try:
            got.append(await call())
        except pyfuse3.FUSEError as exc:
            got.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await trio.sleep(0.3)  # the call is waiting: it found its token gone
            await refresh()
    return got[0]


@contextmanager
def chunk_writes_refused(monkeypatch, from_call: int, *, later_too: bool = False):
    """Inside, :meth:`SealedFile.write_chunk` refuses its ``from_call``-th call as a disk that
    refuses a write would (LocalStoreError), and with ``later_too`` every call after it; long
    writes go chunk by chunk too (not past the page cache), so each chunk is counted."""
    real = SealedFile.write_chunk
    calls = []

    def refusing(self, index, data, header=None, **how):
        calls.append(index)
        if len(calls) == from_call or (later_too and len(calls) > from_call):
            raise LocalStoreError("the disk refused")
        return real(self, index, data, header, **how)

    monkeypatch.setattr(SealedFile, "write_chunk", refusing)
    real_direct = SealedFile._direct
    monkeypatch.setattr(SealedFile, "_direct", lambda self: -1)  # every chunk through write_chunk
    try:
        yield
    finally:
        monkeypatch.setattr(SealedFile, "write_chunk", real)
        monkeypatch.setattr(SealedFile, "_direct", real_direct)


CTX = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), pid=os.getpid(), umask=0o022)
"""The request context pyfuse3 passes: the test process's own user."""


def setattr_fields(**true) -> SimpleNamespace:
    """What pyfuse3 passes to setattr (its own class is read-only from Python)."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid", "update_size")
    return SimpleNamespace(**{n: bool(true.get(n)) for n in names})


def _ino(node: Node | int) -> int:
    return node if isinstance(node, int) else node.ino


@asynccontextmanager
async def inprocess_fs(
    state: Path,
    endpoints,
    credentials,
    *,
    key: bytes | None = None,
    workers: int = 2,
    big_uploads: int = 8,
    write_back_delay: float = 0.0,
    empty_vault: bool = False,
    xattrs: bool = False,
):
    """A mounted-but-kernel-less filesystem over a fresh state directory; yields InProcessFs.
    ``empty_vault``: first delete every token the profile has (a profile shared by the tests of
    a module: see :func:`module_account`); ``xattrs``: as a mount with ``--xattrs``."""
    key = key or secrets.token_bytes(32)
    supervisor = Supervisor()
    async with connect(endpoints, credentials, supervisor=supervisor) as client:
        if empty_vault:
            await _delete_all(client)
        vault = client.vault(key)
        index = Index(state / "index.sqlite3")
        try:
            ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
            staging = Staging(state / "staging", local_key(key), keep_free=index.reserve.missing)
            cache = ContentCache(state / "cache", 64 * 2**20, local_key(key))
            syncer = Syncer(
                ns,
                staging,
                cache,
                client.tokens,
                vault,
                workers=workers,
                big_uploads=big_uploads,
                write_back_delay=write_back_delay,
                supervisor=supervisor,
            )
            fs = Filesystem(ns, staging, cache, vault, MountOptions(xattrs=xattrs), syncer)
            fs.open_staged_files()
            refresher = Refresher(ns, client.tokens, syncer, 3600, invalidate=False)
            await refresher.refresh_once()
            async with trio.open_nursery() as nursery:
                await nursery.start(syncer.run)
                try:
                    yield InProcessFs(fs, syncer, refresher, client, supervisor, state, key, endpoints, credentials)
                finally:
                    nursery.cancel_scope.cancel()
            fs.cache.close()
        finally:
            index.close()


ROOT_INO = ROOT


async def _delete_all(client: Client) -> None:
    tokens = [i.token async for i in client.tokens.list()]
    limiter = trio.CapacityLimiter(8)

    async def delete(token: str) -> None:
        async with limiter:
            await client.tokens.delete(token)

    async with trio.open_nursery() as n:
        for token in tokens:
            n.start_soon(delete, token)


@pytest.fixture(scope="module")
def module_account(engine):
    """One profile for the tests of a module (registering costs more than emptying the vault);
    build each test's filesystem with ``inprocess_fs(..., empty_vault=True)``."""
    import uuid

    from privifs.client.provision import new_identity, register_profile
    from privifs.client.session import PasswordCredentials
    from privifs.client.transport import Endpoints

    endpoints = Endpoints.from_dict(engine.urls)
    username = f"fskit-{uuid.uuid4().hex[:10]}@example.com"
    _, public = new_identity()
    trio.run(register_profile, endpoints, username, "correct-horse-battery", public)
    return endpoints, PasswordCredentials(username, "correct-horse-battery")


@pytest.fixture
async def kit(module_account, eng, tmp_path):
    """An in-process filesystem over the module's profile, its vault emptied first."""
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True) as k:
        yield k


CACHE_KEY = local_key(bytes(32))


def sealed_file(path: Path, data: bytes, key: bytes = CACHE_KEY) -> str:
    """A sealed (locally encrypted) file holding ``data``, as the cache adopts after a download."""
    f = SealedFile.create(path, key)
    f.write(0, data)
    f.sync_header()
    f.close()
    return str(path)


def disk_usage(root: Path, *, directories: bool = False) -> int:
    """What the disk counts under ``root``: every file's allocated blocks, each file once (as
    ``du`` and scripts/bench count a cache directory: a file moved between two directories while
    the walk runs is not counted twice), 0 if it does not exist; ``directories``: theirs too, as
    ``du`` adds them."""
    total = 0
    seen: set[int] = set()
    for d, _, files in os.walk(root):
        if directories:
            with suppress(OSError):
                total += os.lstat(d).st_blocks * 512
        for f in files:
            try:
                st = os.lstat(os.path.join(d, f))
            except OSError:  # removed while we looked
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


class DiskPeak:
    """The largest :func:`disk_usage` of ``root`` seen while the block runs, sampled by a thread
    as fast as it can (files land and go on worker threads, between the test's awaits)."""

    def __init__(self, root: Path):
        self.root, self.peak, self.samples = root, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, disk_usage(self.root))
            self.samples += 1
            time.sleep(0.001)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_usage(self.root))


@contextmanager
def manifest_marks_cut_off(store):
    """``store``'s (a PartStore's) manifests are stored without their mark: the risk meta write a
    kill between a manifest's configure-file-meta and its risk meta never made."""
    real = store.tokens.set_risk

    async def cut_off(token: str, fields: dict) -> None:
        if fmt.MARK not in fields:
            await real(token, fields)

    store.tokens.set_risk = cut_off
    try:
        yield
    finally:
        del store.tokens.set_risk
