"""The engine's durable state: one SQLite database with group-committed writes.

Writes run on one writer thread. Jobs queued while a commit is in progress are applied
together, each inside its own SAVEPOINT (so one failing job rolls back only itself), and
committed with one ``synchronous=FULL`` commit; a job's caller resumes only after that commit,
so everything the engine acknowledges is on disk. Directories that received new blob files are
fsynced by the writer before the commit that references them. Reads use a separate connection
on the trio thread (WAL lets them run beside the writer).

On a disk something else filled to the last byte, every command failed ("database or disk is
full", answered 507): reads too, since a download is a durable command and a claim of its
authorization, and deletes, which would give room back. Before each batch the writer gives back
the data directory's 4 MiB reserve when less than that is free (:data:`RESERVE_NAME`, logged
once), so the database goes on for a while; the reserve is made again once the disk has ample
room (checked every :data:`RESERVE_CHECK` seconds).
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from privifs.disk import DiskReserve, private_database

T = TypeVar("T")

log = logging.getLogger("privifs.engine")

# Disk the database can always take (:class:`privifs.disk.DiskReserve`): SQLite cannot make its
# WAL files on a full disk. A home disk something else filled kept the embedded engine from
# starting, and with it every mount of its vault ("the embedded engine's database cannot be
# opened: the disk is full"), although a few MiB let it start, serve reads and take the deletes
# that free space.
RESERVE_NAME = "disk.reserve"
RESERVE_CHECK = 5.0  # seconds between two tries to make a reserve given back again


def reserve_of(data_dir: Path) -> DiskReserve:
    return DiskReserve(data_dir / RESERVE_NAME, "the engine's database")


def opened_on_a_full_disk(open_db: Callable[[], T], data_dir: Path) -> T:
    """``open_db()``; if it fails while the disk is full, once more after giving back the data
    directory's reserve (the first attempt's error if there is none to give)."""
    try:
        return open_db()
    except sqlite3.Error:
        if not reserve_of(data_dir).release_if_full():
            raise
    return open_db()


SCHEMA = """
CREATE TABLE IF NOT EXISTS profiles (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    pw_hash TEXT NOT NULL,
    public_key TEXT,
    active INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_tokens (
    token_hash TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'profile',
    app_id TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_tokens_profile ON auth_tokens(profile_id);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    profile_id TEXT,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    status INTEGER NOT NULL,
    body TEXT,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands(status) WHERE status = 1;
CREATE INDEX IF NOT EXISTS commands_finished ON commands(finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS reservations (
    command_id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    context TEXT NOT NULL,
    ttl INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    temp_token TEXT UNIQUE,
    stream_auth TEXT UNIQUE,
    stream_used INTEGER NOT NULL DEFAULT 0,
    blob_id TEXT,
    blob_size INTEGER,
    promoted_token TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_expiry ON reservations(expires_at);
CREATE TABLE IF NOT EXISTS data_tokens (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL UNIQUE,
    profile_id TEXT NOT NULL,
    context TEXT NOT NULL,
    file_name TEXT NOT NULL,
    extension TEXT NOT NULL,
    size INTEGER NOT NULL,
    path TEXT NOT NULL,
    data_type TEXT NOT NULL DEFAULT 'file',
    risk TEXT NOT NULL DEFAULT '{}',
    blob_id TEXT NOT NULL,
    blob_size INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS data_tokens_profile ON data_tokens(profile_id, seq);
CREATE TABLE IF NOT EXISTS downstream (
    auth TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS oauth_apps (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    name TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    scopes TEXT NOT NULL,
    client_id TEXT UNIQUE,
    secret_hash TEXT,
    config_retrieved INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS oauth_codes (
    command_id TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    scopes TEXT NOT NULL,
    code_hash TEXT,
    code_retrieved INTEGER NOT NULL DEFAULT 0,
    code_used INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    UNIQUE(app_id, nonce)
);
CREATE TABLE IF NOT EXISTS oauth_refresh (
    token_hash TEXT PRIMARY KEY,
    app_id TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    access_hash TEXT NOT NULL,
    scopes TEXT NOT NULL,
    expires_at REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    command_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    storage INTEGER NOT NULL DEFAULT 0,
    authenticator INTEGER NOT NULL DEFAULT 0,
    meta TEXT NOT NULL DEFAULT '{}',
    public_key TEXT,
    created_at REAL NOT NULL,
    storage_since REAL
);
CREATE TABLE IF NOT EXISTS voting_configs (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    name TEXT NOT NULL,
    strategy TEXT NOT NULL,
    time_limit INTEGER NOT NULL,
    device_ids TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE(profile_id, name)
);
CREATE TABLE IF NOT EXISTS policies (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    name TEXT NOT NULL,
    template_id TEXT NOT NULL,
    event_ids TEXT NOT NULL,
    voting_config_id TEXT NOT NULL,
    configuration TEXT NOT NULL,
    active INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    UNIQUE(profile_id, name)
);
CREATE TABLE IF NOT EXISTS pools (
    id TEXT PRIMARY KEY,
    profile_id TEXT NOT NULL,
    command_id TEXT NOT NULL UNIQUE,
    policy_id TEXT NOT NULL,
    voting_config_id TEXT NOT NULL,
    voters TEXT NOT NULL,
    required INTEGER NOT NULL,
    strategy TEXT NOT NULL,
    deadline REAL NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ballots (
    pool_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    decision TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (pool_id, device_id)
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class _Job:
    __slots__ = ("fn", "done", "result", "error", "dirs", "token")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], dirs: tuple[Path, ...]):
        self.fn = fn
        self.dirs = dirs
        self.done = trio.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.result: Any = None
        self.error: BaseException | None = None


def _set_all(events: list[trio.Event]) -> None:
    for event in events:
        event.set()


def _connect(path: Path) -> sqlite3.Connection:
    private_database(path)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class Database:
    """SQLite state with a group-committing writer thread; see the module docstring."""

    def __init__(self, path: Path):
        self.path = path

        def open_writer() -> sqlite3.Connection:
            conn = _connect(path)
            try:
                conn.executescript(SCHEMA)
            except BaseException:
                conn.close()
                raise
            return conn

        self._writer = opened_on_a_full_disk(open_writer, path.parent)
        self._reserve = reserve_of(path.parent)
        self._reserve.ensure()
        self._reserve_checked = 0.0
        self._reader = _connect(path)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-db-writer", daemon=True)
        self._thread.start()

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < 256:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            self._apply(batch)

    def _keep_room(self) -> None:
        """Give the reserve back when the disk is (nearly) full; make it again once it has room."""
        reserve = self._reserve
        try:
            if not reserve.given_back:
                reserve.release_if_full()
            elif time.monotonic() - self._reserve_checked >= RESERVE_CHECK:
                self._reserve_checked = time.monotonic()
                reserve.ensure()
        except OSError as exc:  # (the reserve is a help; the commit says whether there was room)
            log.debug("disk reserve of the engine's database: %s", exc)

    def _apply(self, batch: list[_Job]) -> None:
        self._keep_room()
        conn = self._writer
        dirs: set[Path] = set()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(conn)
                except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                    job.error = exc
                    conn.execute("ROLLBACK TO job")
                conn.execute("RELEASE job")
                if job.error is None:
                    dirs.update(job.dirs)
            for d in dirs:
                fd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            conn.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - rolled back and handed to every job of the batch
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for job in batch:
                if job.error is None:
                    job.error = exc
        # one wake-up of the trio loop per batch, not per job (each is a socket write and a turn
        # of the loop)
        waiting: dict[trio.lowlevel.TrioToken, list[trio.Event]] = {}
        for job in batch:
            waiting.setdefault(job.token, []).append(job.done)
        for token, events in waiting.items():
            try:
                token.run_sync_soon(_set_all, events)
            except trio.RunFinishedError:
                pass

    # -- trio side ------------------------------------------------------------------------
    async def write(self, fn: Callable[[sqlite3.Connection], T], *, fsync_dirs: tuple[Path, ...] = ()) -> T:
        """Run ``fn(conn)`` in a transaction; return once it is durably committed."""
        job = _Job(fn, fsync_dirs)
        self._queue.put(job)
        with trio.CancelScope(shield=True):
            await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``fn(conn)`` on the reader connection (a consistent snapshot)."""
        conn = self._reader
        conn.execute("BEGIN")
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._writer.close()
        self._reader.close()
