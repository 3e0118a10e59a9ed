"""The tree: nodes (inodes), directory entries, paths, and the local index that persists them.

The index (``index.sqlite3`` in the mount's state directory) is the mount's source of truth for
its own changes: every node with its attributes, the token backing it, the meta that token has
on the server (``remote_*``), and what is still to be done (``content_dirty`` — staged content
not yet uploaded; ``meta_dirty`` — name, place or attributes not yet written to the token).
Tokens to delete live in ``tombstones`` until the listing confirms they are gone. WAL with
``synchronous=NORMAL``: a committed change survives the daemon being killed. The layout carries a
version and is upgraded in place by ordered migration steps (``MIGRATIONS`` below). The WAL is
checkpointed on a thread of its own (:class:`Checkpointer`), never by a commit on the trio thread.

Ownership: :class:`Namespace` is the only writer of a :class:`Node`'s fields. Everyone else
(the filesystem, write-back, the refresher) reads nodes and changes them through the operations
below (``move``, ``remove``, ``set_staged``/``clear_staged``, ``mark_uploaded``, ``record_error``,
``set_attributes``, …), so each invariant (``staged`` and ``staged_id`` change together, a removed
node leaves the tree, the token map and the index at once) lives in one place.
``tests/test_fs_structure.py`` fails if another module of ``privifs/fs`` assigns a node field.

State and concurrency: all of this is touched only from the trio thread; no method here awaits,
so each call is atomic with respect to FUSE handlers and background tasks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from privifs.disk import DiskReserve, private_database
from privifs.errors import DiskFullError, FormatVersionError, LocalStoreError, NodeGone, PrivifsError
from privifs.fs.names import shown_name
from privifs.fs.space import open_error
from privifs.fs.tokenmeta import KIND_DIR, KIND_FILE, KIND_SYMLINK, attributes, join_context

if TYPE_CHECKING:
    from privifs.client.shapes import TokenInfo
    from privifs.fs.staging import StagedFile, Staging

log = logging.getLogger("privifs.fs")

ROOT = 1
INO_COUNTER = "next_ino"  # the counters row: inode numbers below it may have been handed out
# the counters row set while an index made anew has not yet taken in the staged files it found
# (Filesystem.open_staged_files): they are the changes of the index it replaced
RECOVER_COUNTER = "recover_staged"
INO_BLOCK = 1024  # inode numbers reserved at a time (Namespace._reserve_inos)
CONTENT_SIZES_KEPT = 65536  # tokens whose real size Namespace.learn_size remembers

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
    (
        "drop what nothing reads: nodes.upload_digest and the kv table",
        "ALTER TABLE nodes DROP COLUMN upload_digest; DROP TABLE kv;",
    ),
    ("the access time a utimensat sets (NULL reads as mtime)", "ALTER TABLE nodes ADD COLUMN atime_ns INTEGER"),
    (
        "uploads in flight that a change superseded (see Syncer.superseded)",
        "CREATE TABLE superseded (staged_id TEXT PRIMARY KEY, context TEXT NOT NULL, name TEXT NOT NULL)",
    ),
    (
        "a directory's other marker tokens (Node.extra_markers), kept for an rmdir or rename made offline",
        "ALTER TABLE nodes ADD COLUMN markers TEXT",
    ),
    (
        "a device node's device number (st_rdev; 0 for every other kind)",
        "ALTER TABLE nodes ADD COLUMN rdev INTEGER NOT NULL DEFAULT 0",
    ),
    (
        "parts a rewrite stopped naming, deleted once their grace is over (see Syncer.retire_parts)",
        "CREATE TABLE retired (token TEXT PRIMARY KEY, context TEXT NOT NULL, due REAL NOT NULL)",
    ),
    (
        "counters that outlive the rows they number: the inode numbers handed out (see Namespace.new_node)",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ),
    (
        "an entry's extended attributes, sealed (privifs.fs.xattrs; NULL: none)",
        "ALTER TABLE nodes ADD COLUMN xattrs TEXT",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)

# every persistent column of a node, read and written by name (never SELECT *)
COLUMNS = (
    "ino",
    "parent",
    "name",
    "kind",
    "mode",
    "uid",
    "gid",
    "mtime_ns",
    "ctime_ns",
    "size",
    "target",
    "token",
    "remote_context",
    "remote_name",
    "remote_extension",
    "remote_risk",
    "shown_as",
    "staged_id",
    "content_dirty",
    "meta_dirty",
    "explicit",
    "seq",
    "upload_started",
    "atime_ns",
    "markers",
    "rdev",
    "xattrs",
)


# the size and times: for a node with staged content its staged file's header records the size
# and the last write's time at every write, so an fdatasync needs no index write for them
_SIZE_AND_TIMES = frozenset(i for i, c in enumerate(COLUMNS) if c in ("size", "mtime_ns", "ctime_ns", "atime_ns"))


def _without_size_and_times(row: tuple) -> tuple:
    return tuple(v for i, v in enumerate(row) if i not in _SIZE_AND_TIMES)


_row = operator.attrgetter(*COLUMNS)  # a node's persistent columns, in order (one C call)


_MODES: dict[int, int] = {}  # one int object per mode the nodes loaded have (Node.from_row)


class Node:
    """One inode. Persistent fields are saved to the index; the rest lives for this mount only."""

    __slots__ = COLUMNS + (
        "children",
        "next_seq",
        "lookups",
        "opens",
        "writers",
        "staged",
        "synced_at",
        "unlinked",
        "last_error",
        "retry_at",
        "attempts",
        "uploading",
        "meta_version",
        "subdirs",
        "following",
        "shrunk_remotely",
    )

    def __init__(self, ino: int, parent: int, name: str, kind: str, mode: int, mtime_ns: int):
        self.ino, self.parent, self.name, self.kind = ino, parent, name, kind
        self.mode = mode
        self.uid = self.gid = None
        self.mtime_ns = self.ctime_ns = mtime_ns
        self.atime_ns: int | None = None  # None: reads as mtime (never set by utimens)
        self.size = 0
        self.target = None
        self.rdev = 0
        self.xattrs: str | None = None  # sealed (privifs.fs.xattrs)
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
        # a directory's other marker tokens the listing showed (two mkdirs of one name raced),
        # space-separated (see extra_markers); an rmdir deletes them with the token, a rename
        # too. Persisted: a mount that starts offline has no listing to learn them from, and
        # its rmdir or rename was undone by the marker it did not know
        self.markers: str | None = None
        self.subdirs = 0  # entries of a directory that are directories (its link count is 2 + this)
        # a read or a first write here found the token gone (another client replaced the file):
        # the listing may move the node on although it is open for writing, as nothing is staged
        self.following = False
        # the listing made it shorter (another client's content) since the kernel last asked for
        # its attributes: the kernel may still hold the larger size (Filesystem._check_kernel_size)
        self.shrunk_remotely = False

    @property
    def extra_markers(self) -> set[str]:
        """The directory's other marker tokens (a copy: change it by assigning)."""
        return set(self.markers.split()) if self.markers else set()

    @extra_markers.setter
    def extra_markers(self, tokens: set[str]) -> None:
        self.markers = " ".join(sorted(tokens)) or None

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    @property
    def is_file(self) -> bool:
        return self.kind == KIND_FILE

    @property
    def is_symlink(self) -> bool:
        return self.kind == KIND_SYMLINK

    @property
    def waiting_for_close(self) -> bool:
        """Written content not uploaded while a writer still has the file open: it is uploaded
        on the last close (or when an fsync asks)."""
        return self.writers > 0 and bool(self.content_dirty)

    def st_mode(self) -> int:
        kind = {KIND_DIR: stat.S_IFDIR, KIND_SYMLINK: stat.S_IFLNK}.get(self.kind, stat.S_IFREG)
        return kind | (self.mode & 0o7777)

    def risk(self) -> dict[str, str]:
        return json.loads(self.remote_risk) if self.remote_risk else {}

    def row(self) -> tuple:
        return _row(self)

    @classmethod
    def from_row(cls, row: tuple) -> Node:
        """The node an index row (the :data:`COLUMNS`, in order) describes."""
        n = cls(row[0], row[1], row[2], row[3], row[4], row[7])
        # one statement, not a setattr per column: loading 112,154 nodes 1.2-1.5 -> 0.6-0.8 s
        # (the order is COLUMNS'; test_index_saves reads every column back)
        (
            n.ino, n.parent, n.name, n.kind, n.mode, n.uid, n.gid, n.mtime_ns, n.ctime_ns, n.size, n.target,
            n.token, n.remote_context, n.remote_name, n.remote_extension, n.remote_risk, n.shown_as, n.staged_id,
            n.content_dirty, n.meta_dirty, n.explicit, n.seq, n.upload_started, n.atime_ns, n.markers, n.rdev,
            n.xattrs,
        ) = row  # fmt: skip
        # one object for what many nodes hold alike (a mount keeps every node: 1,416 -> 1,196
        # bytes a node, tracemalloc of 30,000 loaded; 999 -> 900 of 111,880): kinds, extensions,
        # a directory's context, the listed and shown names that are the entry's name, modes,
        # a change time that is the modification time
        n.kind = sys.intern(n.kind)
        if n.remote_extension is not None:
            n.remote_extension = sys.intern(n.remote_extension)
        if n.remote_context is not None:
            n.remote_context = sys.intern(n.remote_context)
        if n.remote_name == n.name:
            n.remote_name = n.name
        if n.shown_as == n.name:
            n.shown_as = n.name
        if n.ctime_ns == n.mtime_ns:  # (ints past 256 are objects of 32 bytes each)
            n.ctime_ns = n.mtime_ns
        n.mode = _MODES.setdefault(n.mode, n.mode)
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
    if _is_full(exc):
        return DiskFullError(f"the local index cannot grow: {text}")
    return LocalStoreError(f"the local index failed: {text}")


def _is_full(exc: sqlite3.Error) -> bool:
    return "full" in str(exc)


class Checkpointer:
    """Checkpoints of an SQLite WAL on a thread of its own. A checkpoint copies the WAL into the
    database file and, with ``synchronous=NORMAL``, fsyncs both: 1–30 ms on this machine, one
    commit in a few hundred. SQLite runs it inside the commit that fills the WAL past 1,000 pages,
    which here is a commit on the trio thread, so every FUSE request waited for it (two thirds of
    the time of 40,000 small commits measured here went to those few). The writer's connection
    therefore does not checkpoint (``wal_autocheckpoint=0``) and asks this thread instead, which
    runs a PASSIVE checkpoint (it never blocks a writer) on its own connection. Such a checkpoint
    cannot catch up with a writer that keeps committing, and only a WAL checkpointed to its end
    starts over, so the writer still checkpoints itself once in a while (:class:`Index`), then
    mostly finding the work done. Durability does not change: a commit is durable once in the
    WAL, checkpointed or not. A checkpoint that fails (a full disk) is logged and tried again at
    the next request; the WAL keeps the data meanwhile."""

    def __init__(self, path: Path):
        self.path = path
        self.done = 0  # checkpoints run (tests)
        self._cond = threading.Condition()
        self._asked = 0  # requests so far
        self._covered = 0  # requests a finished checkpoint covered
        self._stop = False
        self._thread: threading.Thread | None = None

    def ask(self) -> None:
        """Checkpoint soon (requests made meanwhile are one checkpoint)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="privifs-index-checkpoint", daemon=True)
                self._thread.start()
            self._asked += 1
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until every checkpoint asked for so far has run (tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._covered >= self._asked, timeout)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or self._asked > self._covered)
                    if self._stop:
                        return
                    target = self._asked
                try:
                    if conn is None:
                        conn = sqlite3.connect(self.path, isolation_level=None)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("checkpointing the local index failed (kept in its WAL, tried again later): %s", exc)
                with self._cond:
                    self.done += 1
                    self._covered = target
                    self._cond.notify_all()
        finally:
            if conn is not None:
                conn.close()

    def close(self) -> None:
        with self._cond:
            thread, self._thread = self._thread, None
            self._stop = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(60)


class Index:
    """The persistent half: SQLite with one transaction per call (or per ``with index:`` block).
    SQLite failures surface as :class:`~privifs.errors.DiskFullError` (ENOSPC) or
    :class:`~privifs.errors.LocalStoreError`; an index of a newer schema version than this code
    knows as :class:`~privifs.errors.FormatVersionError`.

    A save that would write exactly the row the index already holds is skipped: the rows of the
    nodes saved last (at most ``SAVED_ROWS``) are remembered as committed, and forgotten again when
    the transaction that wrote them rolls back. A ``chmod``/``utime`` often changes nothing, and
    an ``fsync`` after a close finds the row saved, so this saves an SQLite commit (a WAL write)
    on many of them; what is on disk is the same either way."""

    SAVED_ROWS = 20_000
    # what to do about an index that cannot be opened (damaged): it can be made again
    REMEDY = (
        "move {path} (and its -wal and -shm files) away and mount again: the tree is read from the vault "
        "again, and changes not yet uploaded come back in /lost+found"
    )
    CHECKPOINT_EVERY = 300  # commits between checkpoints on the checkpointer's thread (about as
    # often as SQLite would, at 1,000 WAL pages: more often costs CPU, each fsyncs twice)
    CATCH_UP_EVERY = 1_500  # commits between checkpoints of the writer itself: bounds the WAL

    def __init__(self, path: Path):
        self.path = path
        self.reserve = DiskReserve(path.with_name(path.name + ".reserve"), "the local index")
        try:
            self._open()
        except sqlite3.Error as exc:
            # a full disk (SQLite could not make its WAL files): the reserve makes room. A damaged
            # index on a disk with room was logged as a full disk, and its reserve deleted (hX)
            if not self.reserve.release_if_full():
                raise open_error(path.parent, "the local index", exc, self.REMEDY.format(path=path)) from None
            try:
                self._open()
            except sqlite3.Error as again:
                raise open_error(path.parent, "the local index", again, self.REMEDY.format(path=path)) from None
        self.checkpointer = Checkpointer(path)
        self.reserve.ensure()
        self._commits = 0
        self._catch_up_at = self.CATCH_UP_EVERY
        self._depth = 0
        self._done: list[tuple[str, object]] = []  # statements of the open transaction (see _redo)
        # kept transactions (see kept) whose commit failed: their statements and what was to run
        # after them, committed before anything else by the next transaction that succeeds
        self._owed: list[tuple[str, object]] = []
        self._owed_after: list[Callable[[], None]] = []
        self.owed_error: str | None = None  # why the index owes them (status shows it)
        self._keep = False  # the open transaction is kept
        self._broken: sqlite3.Error | None = None  # a statement of the open kept transaction failed
        self.writes = 0  # statements written so far; --fsync local flushes the WAL only after new ones
        self.flushed_writes = 0  # of those, how many a flush of the WAL (--fsync local) has covered
        # ino -> the number of the last write of its row, and of the last that changed more than
        # its size and times (an fdatasync needs only those in the index: the staged file's header
        # records the size and times); kept from the first row_flushed on
        # (never in the default --fsync vault) and dropped once a WAL flush covers them
        self._row_writes: dict[int, tuple[int, int]] = {}
        self._tracked_from: int | None = None
        self._soon: dict[int, Node] = {}  # saved with the next commit (save_soon)
        self._saved: dict[int, tuple] = {}  # ino -> the row the index holds (committed, or in this transaction)
        self._unsure: list[int] = []  # inos saved in the open transaction: unknown again if it rolls back
        self._after: list[Callable[[], None]] = []  # run once the open transaction has committed
        self._updates: dict[tuple[int, ...], str] = {}  # changed columns -> their UPDATE
        self._upsert = f"INSERT OR REPLACE INTO nodes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
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
                "again from the vault"
            )
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
                if version == 0 and number == latest:  # made now: what staging holds was staged
                    # under an index that is gone (in this transaction: a stop right after it
                    # would otherwise leave a new index that deletes them)
                    self.conn.execute("INSERT OR REPLACE INTO counters (name, value) VALUES (?, 1)", (RECOVER_COUNTER,))
                self.conn.execute("COMMIT")
            except BaseException as exc:
                self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and "full" not in str(exc):
                    raise LocalStoreError(
                        f"upgrading the local index {self.path} to version {number} "
                        f"({description}) failed: {exc}; it is left at version "
                        f"{number - 1}"
                    ) from None
                raise

    def close(self) -> None:
        if self._soon or self._owed:
            try:
                with self:
                    pass  # commits what waited for a commit
            except LocalStoreError as exc:
                log.warning("the last changes of the local index were not written: %s", exc)
        self.checkpointer.close()
        self.conn.close()  # the last connection: SQLite checkpoints and removes the WAL

    def _committed(self) -> None:
        self._commits += 1
        if self._commits >= self._catch_up_at:
            self._catch_up()
        elif self._commits % self.CHECKPOINT_EVERY == 0:
            self.checkpointer.ask()

    def _open(self) -> None:
        private_database(self.path)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does it
            self.conn.execute(f"PRAGMA journal_size_limit={16 * 2**20}")  # a WAL starting over shrinks
            self._check()
            self._migrate()
        except BaseException:
            self.conn.close()
            raise

    def _check(self) -> None:
        """Refuse an index whose pages are damaged (``PRAGMA quick_check``): a page zeroed on the
        disk opened, and a read of it later ended the mount with "internal error: DatabaseError"
        or failed a task for good (helper hZ); it is refused now with what to do (REMEDY)."""
        found = self.conn.execute("PRAGMA quick_check(1)").fetchone()
        if found is None or found[0] != "ok":
            raise sqlite3.DatabaseError(f"it is damaged ({found[0] if found else 'no answer'})")

    def _catch_up(self) -> None:
        """Checkpoint the rest of the WAL here, so the next commit starts it over (see
        :class:`Checkpointer`); again at the next commit if the checkpointer's thread was busy
        (it is not asked again meanwhile, so it is done after its current checkpoint)."""
        try:
            busy = self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0]
        except sqlite3.Error as exc:
            log.warning("checkpointing the local index failed (kept in its WAL, tried again later): %s", exc)
            busy = 0
        if not busy:
            self._catch_up_at = self._commits + self.CATCH_UP_EVERY
        self.reserve.ensure()  # (again, once the disk has room: one statvfs per catch-up)

    def _redo(self, in_block: bool) -> None:
        """After SQLite gave up a transaction on a full disk (it may roll back all of it), its
        statements so far again, in a new one (the statement that failed is the caller's);
        ``in_block``: the failure was inside a ``with index:`` block."""
        if in_block and not self.conn.in_transaction:
            self.conn.execute("BEGIN")
            for sql, args in self._done:
                self.conn.execute(sql, args)

    def __enter__(self) -> Index:
        if self._depth == 0:
            self._done = []
            self.conn.execute("BEGIN")
        self._depth += 1
        if self._depth == 1 and (self._soon or self._owed):
            try:
                for sql, args in self._owed:  # first: what came later may change the same rows
                    self._write(sql, args)
                for node in list(self._soon.values()):
                    self.save(node)
            except BaseException as exc:
                self.__exit__(type(exc), exc, exc.__traceback__)
                raise
        return self

    @contextlib.contextmanager
    def kept(self):
        """A transaction for a change the tree has made in memory and cannot take back (an
        unlink whose staged file is gone, a rename, a token the vault recorded): if its commit
        fails (the disk full beyond the reserve, an I/O error), nothing is raised and nothing
        rolled back in memory. Its statements are *owed* instead: the next transaction that
        commits writes them first, :meth:`settle` tries again, and a flush of the index
        (``fsync`` of a directory, ``--fsync local``) fails while any are owed. Without this, a
        ``rm`` that reported ENOSPC still showed as done, and came back after a restart."""
        outer = self._keep
        self._keep = True
        try:
            with self:
                yield self
        finally:
            self._keep = outer

    @property
    def owed(self) -> int:
        """How many statements of kept transactions are not committed yet."""
        return len(self._owed)

    def settle(self) -> None:
        """Commit what the index owes now; DiskFullError or LocalStoreError if it still cannot."""
        if self._owed and not self._depth:
            with self:
                pass

    def _owe(self, err: sqlite3.Error, after: list[Callable[[], None]]) -> None:
        self._owed = list(self._done)  # (it begins with what was owed before)
        self._owed_after += after
        text = str(_local_error(err))
        if text != self.owed_error:
            log.warning(
                "%s; the change stands and the index records it once it can (%d statements owed)",
                text,
                len(self._owed),
            )
        self.owed_error = text

    def __exit__(self, exc_type, exc, tb) -> None:
        self._depth -= 1
        if self._depth == 0:
            unsure, self._unsure = self._unsure, []
            after, self._after = self._after, []
            broken, self._broken = self._broken, None
            try:
                try:
                    if broken is not None and exc_type is None:
                        raise broken
                    self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
                except sqlite3.Error as full:
                    # the disk is full: with the reserve given back, the same commit again
                    if exc_type or broken or not _is_full(full) or not self.reserve.release():
                        raise
                    self._redo(True)
                    self.conn.execute("COMMIT")
            except sqlite3.Error as err:
                for ino in unsure:
                    self._saved.pop(ino, None)
                if exc_type is None:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    if self._keep:
                        self._owe(err, after)
                        return
                    raise _local_error(err) from None
            else:
                if exc_type is not None:
                    for ino in unsure:
                        self._saved.pop(ino, None)
                else:
                    self._soon.clear()  # written in this transaction
                    if self._owed:
                        log.info("the local index recorded the %d statements it owed", len(self._owed))
                    after = self._owed_after + after
                    self._owed, self._owed_after, self.owed_error = [], [], None
                    for fn in after:
                        try:
                            fn()
                        except Exception:  # the commit stands: one follow-up failing stops neither it nor the rest
                            log.exception("a step after an index commit failed")
                    self._committed()

    @property
    def in_transaction(self) -> bool:
        """Whether a ``with index:`` block is open (a write joins its transaction)."""
        return self._depth > 0

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the open transaction has committed (at once outside one; never if it
        rolls back): for a file change the committed index must already account for, such as
        moving an uploaded staged file away only once the index no longer names it."""
        if self._depth == 0:
            fn()
        else:
            self._after.append(fn)

    def _write(self, sql: str, args) -> int:
        """Execute one statement (in a transaction of its own outside a ``with index:`` block);
        the number of rows it changed."""
        if not self._depth and (self._soon or self._owed):
            with self:  # one commit with what waited for one
                return self._write(sql, args)
        self.writes += 1
        if self._broken is not None:  # the kept transaction is owed already: this statement too
            self._done.append((sql, args))
            return 1
        try:
            try:
                changed = self.conn.execute(sql, args).rowcount
            except sqlite3.Error as full:
                if not _is_full(full) or not self.reserve.release():
                    raise
                self._redo(self._depth > 0)  # with the reserve given back
                changed = self.conn.execute(sql, args).rowcount
            if self._depth:
                self._done.append((sql, args))
        except sqlite3.Error as exc:
            if self._depth and self._keep:  # owed with the rest of the transaction (see kept)
                self._broken = exc
                self._done.append((sql, args))
                return 1
            raise _local_error(exc) from None
        if not self._depth:
            self._committed()
        return changed

    def _update(self, saved: tuple, row: tuple) -> bool:
        """Write only the columns of ``row`` that differ from ``saved`` (what the index holds):
        half the WAL of a whole row, and the token index untouched unless the token changed.
        False if the index had no such row after all."""
        changed = tuple(i for i in range(1, len(row)) if row[i] != saved[i])
        sql = self._updates.get(changed)
        if sql is None:
            sql = f"UPDATE nodes SET {', '.join(f'{COLUMNS[i]} = ?' for i in changed)} WHERE ino = ?"
            self._updates[changed] = sql
        return self._write(sql, [row[i] for i in changed] + [row[0]]) == 1

    @property
    def wal_path(self) -> Path:
        return self.path.with_name(self.path.name + "-wal")

    def row_flushed(self, ino: int, datasync: bool = False) -> bool:
        """Whether the WAL flushes so far cover the last write of ``ino``'s row (with
        ``datasync``: the last that changed more than its size and times)."""
        if self._tracked_from is None:
            self._tracked_from = self.writes
        untracked = self._tracked_from  # a row last written before tracking began: at most this
        last, data = self._row_writes.get(ino, (untracked, untracked))
        return (data if datasync else last) <= self.flushed_writes

    def wal_flushed(self, upto: int) -> None:
        """The WAL was flushed to disk after the first ``upto`` writes (``--fsync local``); with
        ``synchronous=NORMAL`` SQLite itself flushes the WAL before a checkpoint and the database
        file after it, so what those writes committed now survives a power loss."""
        self.flushed_writes = max(self.flushed_writes, upto)
        self._row_writes = {ino: w for ino, w in self._row_writes.items() if w[0] > upto}

    def save(self, node: Node) -> None:
        """Persist ``node``; a node that left the tree (still open, or uploading) is never
        written back, so it cannot reappear after a restart."""
        if node.unlinked:
            return
        if not self._depth and node.ino in self._soon:
            with self:  # saves it with what waited for a commit (saving it first, then again
                return  # inside that commit, wrote its row twice and counted it as new)
        row = node.row()
        saved = self._saved.pop(node.ino, None)
        if saved != row:
            if saved is None or not self._update(saved, row):
                self._write(self._upsert, row)
            if self._tracked_from is not None:
                data = self.writes
                if saved is not None and _without_size_and_times(saved) == _without_size_and_times(row):
                    data = self._row_writes.get(node.ino, (0, self._tracked_from))[1]
                self._row_writes[node.ino] = (self.writes, data)
            if self._depth:
                self._unsure.append(node.ino)
        self._saved[node.ino] = row  # the most recently saved last
        if len(self._saved) > self.SAVED_ROWS:
            del self._saved[next(iter(self._saved))]

    def save_soon(self, node: Node) -> None:
        """Persist ``node`` with the next commit rather than in one of its own. Only for changes
        a restart recovers without the index: the size and times of a node with staged content,
        whose header records them at every write (``Filesystem.open_staged_files``); or whose loss
        in a crash costs no data: a directory's times after an entry changed. Inside a
        transaction this is :meth:`save`; :meth:`close` commits what still waits."""
        if self._depth:
            self.save(node)
        elif not node.unlinked:
            self._soon[node.ino] = node

    def discard(self, ino: int) -> None:
        """Forget what this connection remembers of a node whose row was never committed."""
        self._saved.pop(ino, None)
        self._soon.pop(ino, None)
        self._row_writes.pop(ino, None)

    def forget(self, ino: int) -> None:
        self.discard(ino)  # first: a save waiting in _soon would write the row back
        self._write("DELETE FROM nodes WHERE ino = ?", (ino,))

    def load(self) -> list[Node]:
        rows = self.conn.cursor()
        rows.row_factory = None  # (tuples: Node.from_row)
        return [Node.from_row(r) for r in rows.execute(self._select)]

    def add_tombstone(self, token: str) -> None:
        self._write("INSERT OR IGNORE INTO tombstones (token, since) VALUES (?, ?)", (token, time.time()))

    def drop_tombstone(self, token: str) -> None:
        self._write("DELETE FROM tombstones WHERE token = ?", (token,))

    def tombstone_count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]

    def tombstones(self) -> dict[str, float]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT token, since FROM tombstones")}

    def add_superseded(self, staged_id: str, context: str, name: str) -> None:
        """An upload of the staged file ``staged_id`` under ``context``/``name`` is in flight, and
        the node it was for has moved on (removed, renamed, written again): a token it leaves
        behind unrecorded (a crash) is not the node's (see ``Syncer.superseded``)."""
        self._write(
            "INSERT OR REPLACE INTO superseded (staged_id, context, name) VALUES (?, ?, ?)", (staged_id, context, name)
        )

    def drop_superseded(self, staged_id: str) -> None:
        self._write("DELETE FROM superseded WHERE staged_id = ?", (staged_id,))

    def add_retired(self, parts: list[tuple[str, str, float]]) -> None:
        """(part token, context, when it may be deleted: seconds since the epoch), kept so that
        a stop before then leaves the deletion to the next start, not to the hour-old sweep."""
        with self:
            for token, context, due in parts:
                self._write(
                    "INSERT OR REPLACE INTO retired (token, context, due) VALUES (?, ?, ?)", (token, context, due)
                )

    def drop_retired(self, tokens: list[str]) -> None:
        with self:
            for token in tokens:
                self._write("DELETE FROM retired WHERE token = ?", (token,))

    def retired(self) -> list[tuple[str, str, float]]:
        return [(r[0], r[1], r[2]) for r in self.conn.execute("SELECT token, context, due FROM retired")]

    def counter(self, name: str) -> int:
        """The value last set for ``name`` (0 if never)."""
        row = self.conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def set_counter(self, name: str, value: int) -> None:
        self._write("INSERT OR REPLACE INTO counters (name, value) VALUES (?, ?)", (name, value))

    def superseded(self) -> dict[str, tuple[str, str]]:
        return {r[0]: (r[1], r[2]) for r in self.conn.execute("SELECT staged_id, context, name FROM superseded")}


class Namespace:
    """The in-memory tree over the index."""

    def __init__(self, index: Index, *, dir_mode: int, file_mode: int):
        self.index = index
        self.nodes: dict[int, Node] = {}
        self.by_token: dict[str, int] = {}
        # tokens of removed files that are still open: a descriptor keeps reading (and copying on
        # write) the content, so their deletion waits for the last close (the tombstone is in the
        # index already, so a crash before that still deletes them)
        self.held: dict[str, int] = {}
        self.dir_mode = dir_mode
        self.file_mode = file_mode
        # token -> its content's size, from a verified download of a token whose meta states no
        # content digest (another application's): that meta's size is only a claim (see learn_size)
        self.content_sizes: dict[str, int] = {}
        # (parent ino, plain name) -> the nodes whose token claims that name while they show under
        # another (their conflict name): written by the refresher at each listing, read by the
        # write-back (a save under the plain name first names these copies so in the vault)
        self.aside: dict[tuple[int, str], list[int]] = {}
        loaded = index.load()
        for n in loaded:
            self.nodes[n.ino] = n
        if ROOT not in self.nodes:
            root = Node(ROOT, ROOT, "", KIND_DIR, dir_mode, time.time_ns())
            self.nodes[ROOT] = root
            index.save(root)
        elif self.nodes[ROOT].meta_dirty:  # a change of the root's attributes older privifs meant
            root = self.nodes[ROOT]  # to write back (the server refuses it): it stays local
            root.meta_dirty = root.explicit = 0
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
            if n.is_dir:
                parent.subdirs += 1
            parent.next_seq = max(parent.next_seq, n.seq + 1)
            if n.token:
                self.by_token[n.token] = n.ino
        # inode numbers are never handed out twice, across restarts too: a file handle the kernel
        # gave out (open_by_handle_at, an NFS export of the mount) names a node by its number
        # alone (generation 0), so a number reused after its node was removed would open another
        # file. Numbers are reserved in blocks; the index records how far (one write per block).
        self.next_ino = max(max(self.nodes) + 1, index.counter(INO_COUNTER))
        self._inos_reserved = self.next_ino

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
        if self.next_ino >= self._inos_reserved:
            self._reserve_inos()
        node = Node(self.next_ino, parent.ino, name, kind, mode, mtime_ns or time.time_ns())
        self.next_ino += 1
        self.nodes[node.ino] = node
        self.attach(parent, name, node)
        return node

    def _reserve_inos(self) -> None:
        """Record the next block of inode numbers as handed out, before the first of them is:
        with the transaction that makes the node (a failure is that transaction's, owed with it
        if it is kept, see :meth:`Index.kept`), or on its own: if that fails (a full disk), the
        node is made all the same and the next one tries again (its row, when it commits, keeps
        its number from being handed out again)."""
        upto = self.next_ino + INO_BLOCK
        if self.index.in_transaction:
            self.index.set_counter(INO_COUNTER, upto)
        else:
            try:
                self.index.set_counter(INO_COUNTER, upto)
            except PrivifsError as exc:
                log.debug("inode numbers not reserved yet (%s)", exc)
                return
        self._inos_reserved = upto

    def attach(self, parent: Node, name: str, node: Node) -> None:
        node.parent = parent.ino
        node.name = name
        node.seq = parent.next_seq
        parent.next_seq += 1
        parent.children[name] = node.ino
        if node.is_dir:
            parent.subdirs += 1

    def detach(self, node: Node) -> None:
        parent = self.nodes.get(node.parent)
        if parent is not None and parent.children is not None and parent.children.get(node.name) == node.ino:
            del parent.children[node.name]
            if node.is_dir:
                parent.subdirs -= 1

    def set_token(self, node: Node, token: str | None) -> None:
        if node.token and self.by_token.get(node.token) == node.ino:
            del self.by_token[node.token]
        node.token = token
        if token:
            self.by_token[token] = node.ino
            if node.markers and token in node.extra_markers:
                node.extra_markers = node.extra_markers - {token}

    def drop(self, node: Node) -> None:
        """Remove a node for good (detached, no kernel references left; its row left the index
        with :meth:`remove`, so nothing is written here)."""
        self.set_token(node, None)
        self.nodes.pop(node.ino, None)

    def dir_step(self, parent: Node, part: str) -> tuple[str, Node | None]:
        """The name the directory ``part`` of a path takes in ``parent`` (``part``, or
        ``part.dir`` while a non-directory holds the name, ``part.dir.dir`` while one holds that
        too, ...) and the directory there, if any."""
        child = self.child(parent, part)
        while child is not None and not child.is_dir:
            # (helper hH: a directory NAME.dir made where a file held that name took the file's
            # place among the children: the file was hidden for good)
            part = f"{part}.dir"
            child = self.child(parent, part)
        return part, child

    def ensure_dirs(self, parts: list[str], mtime_ns: int, made: Callable[[Node], None] = lambda n: None) -> Node:
        """The directory at ``parts``, creating implicit directories on the way (and saving them;
        ``made`` sees each). A non-directory in the way keeps its name; the directory is
        ``NAME.dir`` instead (``NAME.dir.dir`` when a file holds that name too, and so on)."""
        node = self.root
        for part in parts:
            name, child = self.dir_step(node, part)
            if child is None:
                child = self.new_node(node, name, KIND_DIR, self.dir_mode, mtime_ns)
                self.index.save(child)
                made(child)
            node = child
        return node

    # -- the operations that change a node (the only writers of its fields) ---------------------
    # Nothing here saves to the index unless it says so: callers group changes in one
    # ``with index:`` transaction and save once.

    def pending(self) -> list[Node]:
        """The nodes in the tree whose content or meta the vault does not have yet, and uploads
        still in flight (a removed node that is still open is not pending: nothing of it will be
        uploaded; one whose upload was under way when it was removed is, until its token is
        recorded for deletion)."""
        return [n for n in self.nodes.values() if n.uploading or (n.content_dirty or n.meta_dirty) and not n.unlinked]

    def move(self, node: Node, parent: Node, name: str) -> None:
        """Put ``node`` at ``name`` in ``parent`` (after every other entry there)."""
        self.detach(node)
        self.attach(parent, name, node)

    def exchange(self, a: Node, b: Node) -> None:
        """Put ``a`` where ``b`` is and ``b`` where ``a`` was (RENAME_EXCHANGE)."""
        a_parent, a_name = self.get(a.parent), a.name
        b_parent, b_name = self.get(b.parent), b.name
        if a_parent is None or b_parent is None:
            raise NodeGone(f"{a.name} or {b.name} left the tree")
        self.detach(a)
        self.detach(b)
        self.attach(b_parent, b_name, a)
        self.attach(a_parent, a_name, b)

    def show_as(self, node: Node, name: str | None) -> None:
        """Record the name the entry shows under because its token says so (None: chosen here)."""
        node.shown_as = name

    def remove(self, node: Node, *, delete_token: bool) -> None:
        """Take ``node`` out of the tree and the index for good. Its token, if any, is recorded for
        deletion when ``delete_token`` (removed here), or just forgotten (already gone from the
        vault). The node itself lives on until :meth:`release` while the kernel or an open file
        still refers to it."""
        self.detach(node)
        if delete_token:
            self.retire_markers(node)
        node.extra_markers = set()
        if node.token:
            if delete_token:
                self.index.add_tombstone(node.token)
            if node.opens > 0 or delete_token and node.is_file and node.lookups > 0:
                # still readable through its descriptors until released, and by an open of the
                # inode the kernel holds (an open(2) resolves the path before the daemon sees the
                # open: a rename over the file can land in between; it read as empty)
                if self.by_token.get(node.token) == node.ino:
                    del self.by_token[node.token]
                self.held[node.token] = node.ino
            else:
                self.set_token(node, None)
        node.unlinked = True
        node.content_dirty = 0
        self.index.forget(node.ino)

    def unmake(self, node: Node, staging: Staging) -> None:
        """Take back a new node whose creation could not be committed (the index's disk is
        full): it leaves the tree as if never made, with its staged file. No row of it was
        committed and the kernel holds no reference, so nothing is written here (on that disk a
        write would fail too)."""
        self.detach(node)
        if node.staged is not None:
            staging.remove(node.staged)
            self.clear_staged(node)
        node.unlinked = True
        node.content_dirty = 0
        self.index.discard(node.ino)
        self.drop(node)

    def release(self, node: Node, staging: Staging) -> bool:
        """Let go of a removed node's content once every open file closed it and the kernel let
        go of it (it may still open it: see :meth:`remove`), and forget the node then (its
        staged content too, unless an upload is reading it: the upload frees it when it ends).
        True if a held token's deletion may go ahead now."""
        if not node.unlinked or node.opens > 0:
            return False
        freed = node.lookups <= 0 and node.token is not None and self.held.get(node.token) == node.ino
        if freed:
            del self.held[node.token]
            node.token = None
        # (None: dropped already while its upload was in flight, which kept the staged copy;
        # the upload's end, successful or not, calls this again to free it)
        if node.lookups <= 0 and self.get(node.ino) in (node, None):
            if node.staged is not None and not node.uploading:
                staging.remove(node.staged, soon=True)
                self.clear_staged(node)
            self.drop(node)
        return freed

    # kernel references and open files
    def looked_up(self, node: Node, count: int = 1) -> None:
        node.lookups += count

    def forgotten(self, node: Node, count: int) -> None:
        node.lookups -= count

    def opened(self, node: Node, *, writable: bool) -> None:
        node.opens += 1
        if writable:
            node.writers += 1

    def closed(self, node: Node, *, writable: bool) -> None:
        node.opens -= 1
        if writable:
            node.writers -= 1

    # attributes and local changes
    ATTRIBUTES = ("mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "size", "target", "rdev", "xattrs")

    def set_attributes(self, node: Node, **values) -> None:
        """Set POSIX attributes (any of :attr:`ATTRIBUTES`); marks nothing dirty by itself."""
        for field, value in values.items():
            if field not in self.ATTRIBUTES:
                raise TypeError(f"{field} is not an attribute of a node")
            setattr(node, field, value)

    def touched(self, node: Node) -> None:
        """An entry of the directory ``node`` was added, removed or renamed."""
        node.mtime_ns = node.ctime_ns = time.time_ns()

    def add_marker(self, node: Node, token: str) -> None:
        """The listing shows ``token`` as another marker of the directory ``node`` (another
        client made the same directory): deleted along with the node's own token by an rmdir."""
        if token != node.token:
            node.extra_markers = node.extra_markers | {token}

    def hand_over_markers(self, node: Node, to: Node, info: TokenInfo) -> None:
        """The directory ``to`` becomes the one the marker ``info`` of ``node`` (and its other
        markers) stands for; ``node`` stays as an implicit directory (entries only)."""
        extra, node.extra_markers = node.extra_markers, set()
        self.make_implicit(node)
        self.set_token(to, info.token)
        self.follow_remote(to, info)
        self.set_explicit(to, True)
        to.extra_markers |= {m for m in extra if m != info.token}

    def retire_markers(self, node: Node) -> bool:
        """Record the directory's other markers for deletion (it was removed, or moved: its own
        token now carries it, and a marker left at the old place would bring the old path back);
        True if there were any."""
        for marker in sorted(node.extra_markers):
            self.index.add_tombstone(marker)
        had = bool(node.extra_markers)
        node.extra_markers = set()
        return had

    def make_implicit(self, node: Node) -> None:
        """The directory ``node`` lost its marker (deleted elsewhere) but holds entries: it stays,
        known from them only, with the mode and owner a mount with no state gives such a
        directory (it kept the marker's, which no other mount showed, for good: hU D1)."""
        self.set_token(node, None)
        self.set_explicit(node, False)
        node.mode, node.uid, node.gid = self.dir_mode, None, None
        node.xattrs = None  # they were the marker's (helper hF: kept on every mount that knew it)

    def set_explicit(self, node: Node, explicit: bool) -> None:
        """Whether the directory ``node`` must exist on its own (a marker token) even when empty."""
        node.explicit = 1 if explicit else 0

    def meta_changed(self, node: Node) -> None:
        """Name, place or attributes changed here: the token's meta must be rewritten."""
        node.ctime_ns = time.time_ns()
        node.meta_dirty = 1
        node.meta_version += 1

    def meta_pending(self, node: Node) -> None:
        """The token's meta must be (re)written, without a local change (after an upload)."""
        node.meta_dirty = 1

    def content_changed(self, node: Node) -> bool:
        """The staged content differs from the token's; True if it was clean until now."""
        if node.content_dirty:
            return False
        node.content_dirty = 1
        node.meta_version += 1
        return True

    def set_staged(self, node: Node, staged: StagedFile) -> None:
        """The node's content is now ``staged`` (remembered by id in the index)."""
        node.staged = staged
        node.staged_id = staged.id

    def clear_staged(self, node: Node, *, content_clean: bool = False) -> None:
        """The node has no staged content any more; ``content_clean``: the vault has its content
        (uploaded), or it is lost (unreadable after a restart)."""
        node.staged = None
        node.staged_id = None
        if content_clean:
            node.content_dirty = 0

    # write-back bookkeeping
    def defer(self, node: Node, until: float) -> None:
        """Write-back of ``node`` waits until ``until`` (trio time) at least."""
        node.retry_at = max(node.retry_at, until)

    def schedule_retry(self, node: Node, when: float) -> None:
        """The next write-back attempt of ``node`` is due at ``when`` (trio time; 0: now)."""
        node.retry_at = when

    def record_error(self, node: Node, message: str) -> int:
        """A write-back attempt failed; returns the number of failed attempts in a row."""
        node.attempts += 1
        node.last_error = message
        return node.attempts

    def record_success(self, node: Node) -> None:
        node.attempts = 0
        node.last_error = None

    def begin_upload(self, node: Node, *, streaming: bool) -> None:
        """A token is being made for ``node`` (``streaming``: from its staged content, which is
        then read by the upload); ``upload_started`` lets the next start find it if cut off."""
        if streaming:
            node.uploading = True
        node.upload_started = time.time()

    def end_upload(self, node: Node) -> None:
        node.uploading = False

    def set_remote_name(self, node: Node, context: str | None, name: str | None, extension: str | None) -> None:
        """The place and name the node's token carries on the server (None: no token)."""
        node.remote_context, node.remote_name, node.remote_extension = context, name, extension
        node.shown_as = shown_name(name, extension) if name is not None else None

    def set_remote_risk(self, node: Node, risk_json: str | None) -> None:
        node.remote_risk = risk_json

    def mark_uploaded(self, node: Node, token: str, context: str, name: str, extension: str, at: float) -> None:
        """The node's content (or marker) now lives in ``token``, named as the server has it;
        ``at``: trio time of the record (listings taken before it do not undo it)."""
        self.set_token(node, token)
        self.set_remote_name(node, context, name, extension)
        node.remote_risk = None
        node.upload_started = None
        node.synced_at = at

    def meta_written(self, node: Node, version: int, at: float) -> bool:
        """The token's meta was written from the node as it was at ``version``; True if nothing
        changed since (the node is clean), False if it must be written again."""
        node.synced_at = at
        if node.meta_version != version:
            return False
        node.meta_dirty = 0
        return True

    def restage(self, node: Node, fresh: StagedFile) -> None:
        """The node's token is gone from the vault but its content is at hand: it becomes new
        content (``fresh``) to store again, as if never uploaded."""
        self.set_token(node, None)
        self.set_remote_name(node, None, None, None)
        self.set_staged(node, fresh)
        node.content_dirty = 1
        node.meta_dirty = 1

    def drop_meta_change(self, node: Node) -> None:
        """The local meta change cannot be written (the token is gone): the node follows the
        vault at the next listing."""
        node.meta_dirty = 0
        node.synced_at = 0.0

    # following the vault
    def listed_size(self, info: TokenInfo) -> int | None:
        """The size of ``info``'s content: what its meta states, unless a verified download of
        that token found another (:meth:`learn_size`)."""
        return self.content_sizes.get(info.token, info.size)

    def learn_size(self, node: Node, size: int) -> None:
        """A verified download of the node's token, whose meta states no content digest, holds
        ``size`` bytes: the node shows that size from now on, whatever the token's meta says (an
        application that wrote it may state the ciphertext's size, none, or any other), and
        listings of the token do not take it back. Kept for this run, for the last
        :data:`CONTENT_SIZES_KEPT` such tokens (the next run learns again at the first open)."""
        self.content_sizes.pop(node.token, None)
        self.content_sizes[node.token] = size
        while len(self.content_sizes) > CONTENT_SIZES_KEPT:
            del self.content_sizes[next(iter(self.content_sizes))]
        node.size = size

    def follow_remote(self, node: Node, info: TokenInfo) -> None:
        """Take the attributes, size, place, name and risk meta ``info`` (the listing) shows."""
        a = attributes(info)
        if a.mode is not None:
            node.mode = a.mode
        if a.mtime_ns is not None:
            node.mtime_ns = node.ctime_ns = a.mtime_ns
        node.atime_ns = a.atime_ns
        node.uid, node.gid = a.uid, a.gid
        if node.is_symlink:
            node.target = a.target
        node.rdev = a.rdev
        node.xattrs = a.xattrs
        size = self.listed_size(info)
        if size is not None and not node.is_dir:
            if size < node.size:
                node.shrunk_remotely = True
            node.size = size
        node.remote_context, node.remote_name, node.remote_extension = info.context, info.file_name, info.extension
        node.remote_risk = risk_json(info)

    def attributes_given(self, node: Node) -> None:
        """The kernel gets the node's attributes now (a lookup, a getattr): it holds its size."""
        node.shrunk_remotely = False

    def set_following(self, node: Node, following: bool) -> None:
        """Whether a read or first write waits for the listing to move the node on to another
        client's version (the refresher may then update it though it is open for writing)."""
        node.following = following

    def set_synced(self, node: Node, at: float) -> None:
        """The node matches the vault as of ``at`` (trio time)."""
        node.synced_at = at


def risk_json(info: TokenInfo) -> str | None:
    """The risk meta of a listed token as the index keeps it (``remote_risk``)."""
    return json.dumps(info.risk, sort_keys=True) if info.risk else None
