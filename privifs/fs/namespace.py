"""The tree: nodes (inodes), directory entries, paths, and the local index that persists them.

The index (``index.sqlite3`` in the mount's state directory) is the mount's source of truth for
its own changes: every node with its attributes, the token backing it, the meta that token has
on the server (``remote_*``), and what is still to be done (``content_dirty`` — staged content
not yet uploaded; ``meta_dirty`` — name, place or attributes not yet written to the token).
Tokens to delete live in ``tombstones`` until the listing confirms they are gone. WAL with
``synchronous=NORMAL``: a committed change survives the daemon being killed. The layout carries a
version and is upgraded in place by ordered migration steps (``MIGRATIONS`` below).

State and concurrency: all of this is touched only from the trio thread; no method here awaits,
so each call is atomic with respect to FUSE handlers and background tasks.
"""
from __future__ import annotations

import json
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path

from privifs.errors import DiskFullError, FormatVersionError, LocalStoreError, NodeGone
from privifs.fs.space import open_error
from privifs.fs.tokenmeta import KIND_DIR, KIND_FILE, KIND_SYMLINK, join_context

ROOT = 1

# The index layout is versioned (``PRAGMA user_version``). MIGRATIONS[i] takes an index from
# version i to i + 1, in one transaction that also sets the new version; opening an index runs
# the steps it lacks, in order, and refuses an index of a newer version than len(MIGRATIONS).
# Version 0 is an empty file or an index from before versions existed: step 1 (today's layout as
# it was then, CREATE ... IF NOT EXISTS) makes the former and changes nothing in the latter.
#
# To change the layout: append a step (never edit or reorder one that shipped), then make
# COLUMNS and Node agree with the result. Adding a column is one line here (see step 3)
# plus its name in COLUMNS and its default in Node.__init__. A step is SQL (several statements
# allowed) or a function of the connection, for data that needs computing.
LAYOUT_V1 = """
CREATE TABLE IF NOT EXISTS nodes (
    ino INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER, gid INTEGER,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    target TEXT,
    token TEXT,
    remote_context TEXT, remote_name TEXT, remote_extension TEXT, remote_risk TEXT,
    shown_as TEXT,
    staged_id TEXT,
    content_dirty INTEGER NOT NULL DEFAULT 0,
    meta_dirty INTEGER NOT NULL DEFAULT 0,
    explicit INTEGER NOT NULL DEFAULT 0,
    seq INTEGER NOT NULL DEFAULT 0,
    upload_started REAL,
    upload_digest TEXT
);
CREATE INDEX IF NOT EXISTS nodes_token ON nodes(token);
CREATE TABLE IF NOT EXISTS tombstones (token TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

Step = str | Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Step]] = [
    ("the layout from before schema versions", LAYOUT_V1),
    ("drop what nothing reads: nodes.upload_digest and the kv table",
     "ALTER TABLE nodes DROP COLUMN upload_digest; DROP TABLE kv;"),
    ("the access time a utimensat sets (NULL reads as mtime)", "ALTER TABLE nodes ADD COLUMN atime_ns INTEGER"),
]
SCHEMA_VERSION = len(MIGRATIONS)

# every persistent column of a node, read and written by name (never SELECT *)
COLUMNS = ("ino", "parent", "name", "kind", "mode", "uid", "gid", "mtime_ns", "ctime_ns", "size", "target",
           "token", "remote_context", "remote_name", "remote_extension", "remote_risk", "shown_as", "staged_id",
           "content_dirty", "meta_dirty", "explicit", "seq", "upload_started", "atime_ns")


class Node:
    """One inode. Persistent fields are saved to the index; the rest lives for this mount only."""

    __slots__ = COLUMNS + ("children", "next_seq", "lookups", "opens", "writers", "staged", "synced_at",
                           "unlinked", "last_error", "retry_at", "attempts", "uploading", "meta_version")

    def __init__(self, ino: int, parent: int, name: str, kind: str, mode: int, mtime_ns: int):
        self.ino, self.parent, self.name, self.kind = ino, parent, name, kind
        self.mode = mode
        self.uid = self.gid = None
        self.mtime_ns = self.ctime_ns = mtime_ns
        self.atime_ns: int | None = None  # None: reads as mtime (never set by utimens)
        self.size = 0
        self.target = None
        self.token = self.remote_context = self.remote_name = self.remote_extension = None
        self.remote_risk: str | None = None
        self.shown_as = self.staged_id = None
        self.content_dirty = self.meta_dirty = self.explicit = 0
        self.seq = 0
        self.upload_started = None
        self.children: dict[str, int] | None = {} if kind == KIND_DIR else None
        self.next_seq = 1
        self.lookups = 0
        self.opens = 0
        self.writers = 0
        self.staged = None
        self.synced_at = 0.0
        self.unlinked = False
        self.last_error: str | None = None
        self.retry_at = 0.0
        self.attempts = 0
        self.uploading = False
        self.meta_version = 0

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    @property
    def is_file(self) -> bool:
        return self.kind == KIND_FILE

    @property
    def is_symlink(self) -> bool:
        return self.kind == KIND_SYMLINK

    def st_mode(self) -> int:
        kind = {KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK}.get(self.kind, stat.S_IFREG)
        return kind | (self.mode & 0o7777)

    def risk(self) -> dict[str, str]:
        return json.loads(self.remote_risk) if self.remote_risk else {}

    def row(self) -> tuple:
        return tuple(getattr(self, c) for c in COLUMNS)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Node":
        n = cls(row["ino"], row["parent"], row["name"], row["kind"], row["mode"], row["mtime_ns"])
        for c in COLUMNS:
            setattr(n, c, row[c])
        return n


def _statements(script: str):
    """The statements of an SQL script, one by one (``;`` inside literals or triggers kept)."""
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                yield pending
            pending = ""


def _local_error(exc: sqlite3.Error) -> Exception:
    text = str(exc)
    if "full" in text:
        return DiskFullError(f"the local index cannot grow: {text}")
    return LocalStoreError(f"the local index failed: {text}")


class Index:
    """The persistent half: SQLite with one transaction per call (or per ``with index:`` block).
    SQLite failures surface as :class:`~privifs.errors.DiskFullError` (ENOSPC) or
    :class:`~privifs.errors.LocalStoreError`; an index of a newer schema version than this code
    knows as :class:`~privifs.errors.FormatVersionError`.

    A save that would write exactly the row the index already holds is skipped: the rows of the
    nodes saved last (at most ``SAVED_ROWS``) are remembered as committed, and forgotten again when
    the transaction that wrote them rolls back. Closing a file saves its node at ``flush`` and
    again at ``release``, and a ``chmod``/``utime`` often changes nothing, so this saves an SQLite
    commit (a WAL write) on most of them; what is on disk is the same either way."""

    SAVED_ROWS = 20_000

    def __init__(self, path: Path):
        self.path = path
        try:
            self.conn = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise open_error(path.parent, "the local index", exc) from None
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self.conn.close()
            raise open_error(path.parent, "the local index", exc) from None
        except BaseException:
            self.conn.close()
            raise
        self._depth = 0
        self._saved: dict[int, tuple] = {}  # ino -> the row the index holds (committed, or in this transaction)
        self._unsure: list[int] = []  # inos saved in the open transaction: unknown again if it rolls back
        self._upsert = (f"INSERT OR REPLACE INTO nodes ({', '.join(COLUMNS)}) "
                        f"VALUES ({', '.join('?' for _ in COLUMNS)})")
        self._select = f"SELECT {', '.join(COLUMNS)} FROM nodes ORDER BY ino"

    def version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        """Bring the index to the latest version, one step per transaction, or refuse a newer one."""
        version, latest = self.version(), len(MIGRATIONS)
        if version > latest:
            raise FormatVersionError(
                f"the local index {self.path} was written by a newer privifs (index version {version}; "
                f"this one knows versions up to {latest}); mount with that newer privifs, or "
                f"unmount it there (so everything is uploaded) and remove {self.path.parent} to start "
                "again from the vault")
        for number in range(version + 1, latest + 1):
            description, step = MIGRATIONS[number - 1]
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if callable(step):
                    step(self.conn)
                else:
                    for statement in _statements(step):
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number}")
                self.conn.execute("COMMIT")
            except BaseException as exc:
                self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and "full" not in str(exc):
                    raise LocalStoreError(f"upgrading the local index {self.path} to version {number} "
                                          f"({description}) failed: {exc}; it is left at version "
                                          f"{number - 1}") from None
                raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Index":
        if self._depth == 0:
            self.conn.execute("BEGIN")
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._depth -= 1
        if self._depth == 0:
            unsure, self._unsure = self._unsure, []
            try:
                self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            except sqlite3.Error as err:
                for ino in unsure:
                    self._saved.pop(ino, None)
                if exc_type is None:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    raise _local_error(err) from None
            else:
                if exc_type is not None:
                    for ino in unsure:
                        self._saved.pop(ino, None)

    def _write(self, sql: str, args) -> None:
        try:
            self.conn.execute(sql, args)
        except sqlite3.Error as exc:
            raise _local_error(exc) from None

    def save(self, node: Node) -> None:
        """Persist ``node``; a node that left the tree (still open, or uploading) is never
        written back, so it cannot reappear after a restart."""
        if node.unlinked:
            return
        row = node.row()
        saved = self._saved.pop(node.ino, None)
        if saved != row:
            self._write(self._upsert, row)
            if self._depth:
                self._unsure.append(node.ino)
        self._saved[node.ino] = row  # the most recently saved last
        if len(self._saved) > self.SAVED_ROWS:
            del self._saved[next(iter(self._saved))]

    def forget(self, ino: int) -> None:
        self._saved.pop(ino, None)
        self._write("DELETE FROM nodes WHERE ino = ?", (ino,))

    def load(self) -> list[Node]:
        return [Node.from_row(r) for r in self.conn.execute(self._select)]

    def add_tombstone(self, token: str) -> None:
        self._write("INSERT OR IGNORE INTO tombstones (token, since) VALUES (?, ?)", (token, time.time()))

    def drop_tombstone(self, token: str) -> None:
        self._write("DELETE FROM tombstones WHERE token = ?", (token,))

    def tombstone_count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]

    def tombstones(self) -> dict[str, float]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT token, since FROM tombstones")}


class Namespace:
    """The in-memory tree over the index."""

    def __init__(self, index: Index, *, dir_mode: int, file_mode: int):
        self.index = index
        self.nodes: dict[int, Node] = {}
        self.by_token: dict[str, int] = {}
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        loaded = index.load()
        for n in loaded:
            self.nodes[n.ino] = n
        if ROOT not in self.nodes:
            root = Node(ROOT, ROOT, "", KIND_DIR, dir_mode, time.time_ns())
            self.nodes[ROOT] = root
            index.save(root)
        for n in sorted(loaded, key=lambda n: n.seq):
            if n.ino == ROOT:
                continue
            parent = self.nodes.get(n.parent)
            if parent is None or not parent.is_dir:
                parent = self.nodes[ROOT]
                n.parent = ROOT
            name = n.name
            if name in parent.children:  # cannot happen unless the index was damaged
                name = f"{name}.recovered-{n.ino}"
                n.name = name
            parent.children[name] = n.ino
            parent.next_seq = max(parent.next_seq, n.seq + 1)
            if n.token:
                self.by_token[n.token] = n.ino
        self.next_ino = max(self.nodes) + 1

    @property
    def root(self) -> Node:
        return self.nodes[ROOT]

    def get(self, ino: int) -> Node | None:
        return self.nodes.get(ino)

    def child(self, parent: Node, name: str) -> Node | None:
        ino = parent.children.get(name) if parent.children is not None else None
        return self.nodes.get(ino) if ino is not None else None

    def path_parts(self, node: Node) -> list[str]:
        """The names from the root to ``node``; :class:`NodeGone` if it is no longer in the tree
        (unlinked, or an ancestor was removed)."""
        parts: list[str] = []
        start = node
        while node.ino != ROOT:
            parent = self.nodes.get(node.parent)
            if node.unlinked or parent is None or parent.children.get(node.name) != node.ino:
                raise NodeGone(f"{start.name} is no longer in the tree")
            parts.append(node.name)
            node = parent
        parts.reverse()
        return parts

    def path(self, node: Node) -> str:
        return join_context(self.path_parts(node))

    def describe(self, node: Node) -> str:
        """The node's path for logs and status; never fails, also for a node that left the tree."""
        try:
            return self.path(node)
        except NodeGone:
            return f"(removed) {node.name}"

    def context(self, node: Node) -> str:
        parent = self.nodes.get(node.parent)
        if parent is None:
            raise NodeGone(f"{node.name} is no longer in the tree")
        return self.path(parent)

    def is_ancestor(self, maybe_ancestor: Node, node: Node) -> bool:
        while node.ino != ROOT:
            if node.ino == maybe_ancestor.ino:
                return True
            node = self.nodes[node.parent]
        return maybe_ancestor.ino == ROOT

    def descendants(self, node: Node):
        stack = [node]
        while stack:
            n = stack.pop()
            yield n
            if n.children:
                stack.extend(self.nodes[i] for i in n.children.values())

    def new_node(self, parent: Node, name: str, kind: str, mode: int, mtime_ns: int | None = None) -> Node:
        node = Node(self.next_ino, parent.ino, name, kind, mode, mtime_ns or time.time_ns())
        self.next_ino += 1
        self.nodes[node.ino] = node
        self.attach(parent, name, node)
        return node

    def attach(self, parent: Node, name: str, node: Node) -> None:
        node.parent = parent.ino
        node.name = name
        node.seq = parent.next_seq
        parent.next_seq += 1
        parent.children[name] = node.ino

    def detach(self, node: Node) -> None:
        parent = self.nodes.get(node.parent)
        if parent is not None and parent.children is not None and parent.children.get(node.name) == node.ino:
            del parent.children[node.name]

    def set_token(self, node: Node, token: str | None) -> None:
        if node.token and self.by_token.get(node.token) == node.ino:
            del self.by_token[node.token]
        node.token = token
        if token:
            self.by_token[token] = node.ino

    def drop(self, node: Node) -> None:
        """Remove a node for good (detached, no kernel references left)."""
        self.set_token(node, None)
        self.nodes.pop(node.ino, None)
        self.index.forget(node.ino)

    def ensure_dirs(self, parts: list[str], mtime_ns: int) -> Node:
        """The directory at ``parts``, creating implicit directories on the way (and saving them).
        A non-directory in the way keeps its name; the directory gets a conflict name instead."""
        node = self.root
        for part in parts:
            child = self.child(node, part)
            if child is None or not child.is_dir:
                if child is not None:
                    alt = f"{part}.dir"
                    existing = self.child(node, alt)
                    if existing is not None and existing.is_dir:
                        node = existing
                        continue
                    part = alt
                child = self.new_node(node, part, KIND_DIR, self.dir_mode, mtime_ns)
                self.index.save(child)
            node = child
        return node
