"""Merging the vault's listing into the tree, so changes made elsewhere show up.

Every ``interval`` seconds the whole listing is read (no request per token) and compared with the
tree. Only *clean* nodes follow the listing — a node with local changes not yet written back, or
written back after the listing was taken, keeps its local state. Then:

* a known token whose name, place or attributes changed → the node moves or changes;
* a known token that is gone → the node goes (a directory with entries stays, implicit);
* an unknown token → a new node where its context and name put it; if that path is taken, it
  shows under a deterministic conflict name (no token is hidden or overwritten); if the entry at
  that path just lost its token, the new token replaces the content (another client rewrote it);
* an unknown token where one of our uploads was cut off by a crash → offered to the syncer for
  adoption (compared by content).

Every change is followed by the matching kernel cache invalidation, done on a worker thread so a
kernel callback can never deadlock the trio loop.
"""
from __future__ import annotations

import logging
import time

import pyfuse3
import trio

from privifs.client.datatokens import DataTokens
from privifs.client.shapes import TokenInfo
from privifs.errors import PrivifsError
from privifs.fs.filesystem import Filesystem
from privifs.fs.namespace import ROOT, Node
from privifs.fs.sync import Syncer, desired_name
from privifs.fs.tokenmeta import (KIND_DIR, RESERVED_CONTEXT, attributes, conflict_name, display_name, entry_name,
                                  shown_name, split_context)

log = logging.getLogger("privifs.fs.refresh")

RESERVED = split_context(RESERVED_CONTEXT)[0]


class Refresher:
    def __init__(self, fs: Filesystem, tokens: DataTokens, syncer: Syncer, interval: float, *,
                 invalidate: bool = True):
        self.fs = fs
        self.ns = fs.ns
        self.tokens = tokens
        self.syncer = syncer
        self.interval = interval
        self.invalidate = invalidate
        self.last_refresh: float | None = None
        self.last_error: str | None = None
        self._invalidations: list[tuple] = []

    async def run(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            try:
                await self.refresh_once()
            except PrivifsError as exc:
                self.last_error = str(exc)
                log.warning("refreshing the listing failed: %s", exc)
            except Exception as exc:  # noqa: BLE001 - the mount must outlive a bad listing
                self.last_error = repr(exc)
                log.exception("refreshing the listing failed unexpectedly")

    async def fetch(self) -> tuple[list[TokenInfo], float]:
        started = trio.current_time()
        infos = [info async for info in self.tokens.list()]
        return infos, started

    async def refresh_once(self) -> None:
        infos, started = await self.fetch()
        await self.apply(infos, started)

    # -- merging ---------------------------------------------------------------------------------
    def eligible(self, node: Node, started: float) -> bool:
        return (not node.content_dirty and not node.meta_dirty and not node.uploading and node.writers == 0
                and node.synced_at < started and not node.unlinked)

    async def apply(self, infos: list[TokenInfo], started: float) -> None:
        ns = self.ns
        tombstones = self.fs.index.tombstones()
        deleted = self.syncer.recently_deleted
        seen: set[int] = set()
        changed: list[tuple[Node, TokenInfo]] = []
        unknown: list[TokenInfo] = []
        for info in infos:
            if info.token in tombstones or info.token in deleted:
                continue
            parts = split_context(info.context)
            if parts[:1] == [RESERVED]:
                continue
            ino = ns.by_token.get(info.token)
            if ino is None:
                unknown.append(info)
            else:
                seen.add(ino)
                changed.append((ns.nodes[ino], info))
        vanished = {n.ino: n for n in ns.nodes.values() if n.token and n.ino not in seen and self.eligible(n, started)}
        orphans = {}
        for n in ns.nodes.values():
            if n.upload_started is not None and n.content_dirty and not n.uploading and not n.unlinked:
                orphans.setdefault((self.ns.context(n), desired_name(n)), []).append(n)
        with self.fs.index:
            for node, info in changed:
                if self.eligible(node, started):
                    self._follow(node, info)
            adoptions = []
            # older first (then listing order): the oldest token of a path keeps the plain name
            order = {id(info): n for n, info in enumerate(infos)}
            for info in sorted(unknown, key=lambda i: (i.created_at or 0, order[id(i)])):
                parts = split_context(info.context)
                raw = entry_name(info)
                if (tuple(parts), info.file_name) in self.syncer.inflight_names:
                    continue
                waiting = [n for (ctx, name), nodes in orphans.items() for n in nodes
                           if split_context(ctx) == parts and name == info.file_name]
                if waiting:
                    adoptions.append((waiting[0], info))
                    continue
                self._add(info, parts, raw, vanished)
            for node in vanished.values():
                self._vanish(node)
            self._restore_conflict_names(started)
        self.last_refresh = time.time()
        self.last_error = None
        await self._flush_invalidations()
        for node, info in adoptions:
            if not await self.syncer.adopt_orphan(node, info):
                with self.fs.index:
                    self._add(info, split_context(info.context), entry_name(info), {})
                await self._flush_invalidations()

    def _apply_attributes(self, node: Node, info: TokenInfo) -> None:
        a = attributes(info)
        if a.mode is not None:
            node.mode = a.mode
        if a.mtime_ns is not None:
            node.mtime_ns = node.ctime_ns = a.mtime_ns
        node.atime_ns = a.atime_ns
        node.uid, node.gid = a.uid, a.gid
        if node.is_symlink:
            node.target = a.target
        if info.size is not None and not node.is_dir:
            node.size = info.size
        node.remote_context, node.remote_name, node.remote_extension = info.context, info.file_name, info.extension
        node.remote_risk = _risk_json(info)

    def _follow(self, node: Node, info: TokenInfo) -> None:
        """A known token changed on the server (another client): follow it."""
        parts = split_context(info.context)
        raw = entry_name(info)
        old_risk = node.remote_risk
        moved = not (node.remote_name == info.file_name and node.remote_extension == info.extension
                     and split_context(node.remote_context or "") == parts)
        if not moved and old_risk == _risk_json(info) and (info.size is None or node.size == info.size
                                                            or node.is_dir):
            return
        if moved:
            parent = self.ns.ensure_dirs(parts, node.mtime_ns)
            name = display_name(raw)
            holder = self.ns.child(parent, name)
            if holder is not None and holder is not node:
                name = conflict_name(name, info.token)
            old_parent, old_name = node.parent, node.name
            self.ns.detach(node)
            self.ns.attach(parent, name, node)
            node.shown_as = name
            self._inval_entry(old_parent, old_name)
            self._inval_entry(parent.ino, name)
            self._drop_empty_implicit(self.ns.nodes.get(old_parent))
        self._apply_attributes(node, info)
        self._inval_inode(node.ino, attr_only=True)
        self.fs.index.save(node)

    def _add(self, info: TokenInfo, parts: list[str], raw: str, vanished: dict[int, Node]) -> None:
        a = attributes(info)
        parent = self.ns.ensure_dirs(parts, a.mtime_ns or time.time_ns())
        name = display_name(raw)
        holder = self.ns.child(parent, name)
        if holder is not None and holder.ino in vanished and (holder.is_dir == (a.kind == KIND_DIR)):
            # the entry lost its token and this one claims its place: its content was replaced
            del vanished[holder.ino]
            self.ns.set_token(holder, info.token)
            self._apply_attributes(holder, info)
            holder.shown_as = name
            self.fs.index.save(holder)
            self._inval_inode(holder.ino, attr_only=False)
            return
        if holder is not None and a.kind == KIND_DIR and holder.is_dir and holder.token is None:
            # a marker for a directory we only knew implicitly
            self.ns.set_token(holder, info.token)
            self._apply_attributes(holder, info)
            holder.explicit = 1
            holder.shown_as = name
            self.fs.index.save(holder)
            self._inval_inode(holder.ino, attr_only=True)
            return
        if holder is not None:
            if a.kind == KIND_DIR and not holder.is_dir:
                # directories keep their plain name (entries live under it); the file moves aside
                moved_name = conflict_name(name, holder.token or str(holder.ino))
                self.ns.detach(holder)
                self.ns.attach(parent, moved_name, holder)
                holder.shown_as = moved_name
                self.fs.index.save(holder)
                self._inval_entry(parent.ino, name)
            else:
                name = conflict_name(name, info.token)
        mode = a.mode if a.mode is not None else (self.ns.dir_mode if a.kind == KIND_DIR else self.ns.file_mode)
        node = self.ns.new_node(parent, name, a.kind, mode, a.mtime_ns)
        self.ns.set_token(node, info.token)
        self._apply_attributes(node, info)
        node.shown_as = name
        node.explicit = 1 if a.kind == KIND_DIR else 0
        node.synced_at = trio.current_time()
        self.fs.index.save(node)
        self._inval_entry(parent.ino, name)

    def _vanish(self, node: Node) -> None:
        """The node's token is gone from the vault (deleted elsewhere)."""
        if node.is_dir and node.children:
            self.ns.set_token(node, None)
            node.explicit = 0
            self.fs.index.save(node)
            return
        parent = self.ns.nodes.get(node.parent)
        self.ns.detach(node)
        self.ns.set_token(node, None)
        node.unlinked = True
        self.fs.index.forget(node.ino)
        self._inval_entry(node.parent, node.name, deleted=node.ino)
        self.fs.release_node(node)
        self._drop_empty_implicit(parent)

    def _drop_empty_implicit(self, node: Node | None) -> None:
        while (node is not None and node.ino != ROOT and node.is_dir and not node.children and node.token is None
               and not node.explicit and not node.meta_dirty):
            parent = self.ns.nodes.get(node.parent)
            self.ns.detach(node)
            node.unlinked = True
            self.fs.index.forget(node.ino)
            self._inval_entry(node.parent, node.name, deleted=node.ino)
            self.fs.release_node(node)
            node = parent

    def _restore_conflict_names(self, started: float) -> None:
        """A token shown under a conflict name gets its plain name back once that is free."""
        for node in list(self.ns.nodes.values()):
            if (node.token and node.shown_as and ".conflict-" in node.shown_as and node.name == node.shown_as
                    and self.eligible(node, started)):
                parent = self.ns.nodes[node.parent]
                plain = shown_name(node.remote_name or "", node.remote_extension)
                if plain != node.name and self.ns.child(parent, plain) is None:
                    old = node.name
                    self.ns.detach(node)
                    self.ns.attach(parent, plain, node)
                    node.shown_as = plain
                    self.fs.index.save(node)
                    self._inval_entry(parent.ino, old)
                    self._inval_entry(parent.ino, plain)

    # -- kernel invalidation --------------------------------------------------------------------
    def _inval_entry(self, parent: int, name: str, deleted: int = 0) -> None:
        self._invalidations.append(("entry", parent, name.encode("utf-8", "surrogateescape"), deleted))

    def _inval_inode(self, ino: int, attr_only: bool) -> None:
        self._invalidations.append(("inode", ino, attr_only))

    async def _flush_invalidations(self) -> None:
        todo, self._invalidations = self._invalidations, []
        if not todo or not self.invalidate:
            return

        def run() -> None:
            for item in todo:
                try:
                    if item[0] == "entry":
                        pyfuse3.invalidate_entry(item[1], item[2], deleted=item[3])
                    else:
                        pyfuse3.invalidate_inode(item[1], attr_only=item[2])
                except (OSError, pyfuse3.FUSEError):
                    pass  # the kernel did not know the entry: nothing to invalidate

        await trio.to_thread.run_sync(run)


def _risk_json(info: TokenInfo) -> str | None:
    import json
    return json.dumps(info.risk, sort_keys=True) if info.risk else None
