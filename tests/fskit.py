"""The filesystem without a kernel: a :class:`~privifs.fs.filesystem.Filesystem` with its write-back
and refresher, wired as the daemon wires them, against the real session engine over loopback. Tests
call the FUSE-level methods directly (as S3QL's ``t3_fs_api`` drives its Operations), so races that
need precise interleavings can be written step by step and run in well under a second."""
from __future__ import annotations

import os
import secrets
import stat
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import trio

from privifs.client.connect import Client, connect
from privifs.crypto.sealed import local_key
from privifs.fs.cache import ContentCache
from privifs.fs.filesystem import Filesystem, MountOptions
from privifs.fs.namespace import ROOT, Index, Namespace, Node
from privifs.fs.refresh import Refresher
from privifs.fs.staging import Staging
from privifs.fs.sync import Syncer
from privifs.supervise import Supervisor


@dataclass
class InProcessFs:
    fs: Filesystem
    syncer: Syncer
    refresher: Refresher
    client: Client
    supervisor: Supervisor
    state: Path

    @property
    def ns(self) -> Namespace:
        """The tree (the same one the filesystem, the syncer and the refresher share)."""
        return self.fs.ns

    # -- FUSE-level helpers (names as bytes, like the kernel passes them) ----------------------
    def node(self, path: str) -> Node:
        node = self.fs.ns.root
        for part in filter(None, path.split("/")):
            child = self.fs.ns.child(node, part)
            assert child is not None, f"{path}: no {part!r}"
            node = child
        return node

    def mkdir(self, parent: Node | int, name: str) -> Node:
        attrs = self.fs.mkdir(_ino(parent), name.encode(), 0o755)
        return self.fs.ns.get(attrs.st_ino)

    def create(self, parent: Node | int, name: str, mode: int = 0o644,
               flags: int = os.O_RDWR | os.O_CREAT) -> tuple[int, Node]:
        info, attrs = self.fs.create(_ino(parent), name.encode(), stat.S_IFREG | mode, flags)
        return info.fh, self.fs.ns.get(attrs.st_ino)

    async def open(self, node: Node, flags: int = os.O_RDWR) -> int:
        return (await self.fs.open(node.ino, flags)).fh

    def forget(self, node: Node) -> None:
        """What the kernel does when it drops its references to ``node``."""
        self.fs.forget([(node.ino, node.lookups)])

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
                await trio.sleep(0.05)

    async def vault_names(self) -> dict[str, int]:
        """context/name → size of every data token in the vault but the key check."""
        return {f"{i.context.strip('/')}/{i.file_name}".strip("/"): i.size or 0
                async for i in self.client.tokens.list() if not i.context.startswith("/.privifs")}


def setattr_fields(**true) -> SimpleNamespace:
    """What pyfuse3 passes to setattr (its own class is read-only from Python)."""
    names = ("update_atime", "update_mtime", "update_ctime", "update_mode", "update_uid", "update_gid",
             "update_size")
    return SimpleNamespace(**{n: bool(true.get(n)) for n in names})


def _ino(node: Node | int) -> int:
    return node if isinstance(node, int) else node.ino


@asynccontextmanager
async def inprocess_fs(state: Path, endpoints, credentials, *, key: bytes | None = None, workers: int = 2,
                       write_back_delay: float = 0.0):
    """A mounted-but-kernel-less filesystem over a fresh state directory; yields InProcessFs."""
    key = key or secrets.token_bytes(32)
    supervisor = Supervisor()
    async with connect(endpoints, credentials, supervisor=supervisor) as client:
        vault = client.vault(key)
        index = Index(state / "index.sqlite3")
        try:
            ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
            staging = Staging(state / "staging", local_key(key))
            cache = ContentCache(state / "cache", 64 * 2**20, local_key(key))
            syncer = Syncer(ns, staging, cache, client.tokens, vault, workers=workers,
                            write_back_delay=write_back_delay, supervisor=supervisor)
            fs = Filesystem(ns, staging, cache, vault, MountOptions(), syncer)
            fs.open_staged_files()
            refresher = Refresher(ns, client.tokens, syncer, 3600, invalidate=False)
            await refresher.refresh_once()
            async with trio.open_nursery() as nursery:
                await nursery.start(syncer.run)
                try:
                    yield InProcessFs(fs, syncer, refresher, client, supervisor, state)
                finally:
                    nursery.cancel_scope.cancel()
            fs.cache.close()
        finally:
            index.close()


ROOT_INO = ROOT
