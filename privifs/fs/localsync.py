"""``--fsync local``: an fsync that returns once the change is durable on this machine's disk.

The default fsync waits until the vault acknowledged a token made from the content (see
``Syncer.commit``). With ``--fsync local`` (meant for SQLite and other programs that fsync
often) fsync instead makes the change durable here and returns:

1. the staged file's header is brought up to date and its encrypted content flushed to disk
   (``fsync``), and the staging directory with it while the file's name there may not be on disk
   yet (the first fsync of a new staged file);
2. the node's row (size, ``content_dirty``, the staged file it names) is committed to the index
   and the index's WAL is flushed, unless an earlier flush already covered the row's last write
   (for ``fdatasync``, as SQLite calls it: its last write of more than the file's times). The
   index runs ``synchronous=NORMAL``: SQLite flushes the WAL before each checkpoint and the
   database file after it, so a commit whose WAL frames are on disk survives a power loss;
3. the upload follows in the background (``Syncer.upload_soon``): after the write-back delay,
   even while the file stays open, like any write-back, retried until it lands.

The flushes of one fsync run at the same time, each on its own thread: the filesystem journal
then commits them together (on this machine's ext4 three fsyncs in parallel cost about a third
of three in a row). They work on duplicated descriptors, so an upload finishing meanwhile (which
closes the staged file) cannot pull a descriptor away.

What it trades: until that upload lands, losing this machine (disk, theft) loses the change, and
other clients of the vault do not see it. ``privifs status`` shows the mode and how many changes
are not in the vault yet.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import trio

from privifs.crypto.sealed import local_store_error

VAULT, LOCAL = "vault", "local"
MODES = (VAULT, LOCAL)

_flushers = ThreadPoolExecutor(max_workers=3, thread_name_prefix="privifs-fsync")


def _flush_fd(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # no WAL right after a checkpoint reset it: nothing of it to flush
        return
    _flush_fd(fd)


def _flush_together(fd: int, paths: list[Path]) -> None:
    """Flush ``fd`` (closed afterwards) and ``paths`` at the same time; raise the first OSError."""
    futures = [_flushers.submit(_flush_fd, fd)] + [_flushers.submit(_flush_path, p) for p in paths]
    errors = [f.exception() for f in futures]  # waits for every flush, failed or not
    for exc in errors:
        if exc is not None:
            raise exc


async def flush_index(index) -> None:
    """Flush the index's WAL if anything was written since the last flush: what the index
    records (renames, deletes, new entries) then survives a power loss (``fsync`` of a
    directory, in either mode)."""
    upto = index.writes
    if upto <= index.flushed_writes:
        return
    try:
        await trio.to_thread.run_sync(_flush_path, index.wal_path)
    except OSError as exc:
        raise local_store_error(exc, f"flushing the index {index.path} to disk") from None
    index.wal_flushed(upto)


async def fsync_locally(fs, node, datasync: bool = False) -> None:
    """Make ``node``'s staged content and its index row durable on the local disk, then have the
    upload follow in the background (``datasync``: its times may stay behind, as fdatasync allows).
    Raises LocalStoreError (EIO, ENOSPC) when the disk refuses."""
    staged = node.staged
    staged.sealed.sync_header()
    index = fs.index
    index.save(node)
    paths = []
    entry = not staged.entry_flushed
    if entry:
        paths.append(Path(fs.staging.dir))
    upto = index.writes
    wal = not index.row_flushed(node.ino, datasync)
    if wal:
        paths.append(index.wal_path)
    try:
        fd = os.dup(staged.sealed.fd)
        await trio.to_thread.run_sync(_flush_together, fd, paths)
    except OSError as exc:
        raise local_store_error(exc, f"flushing {staged.path} and the index to disk") from None
    if wal:
        index.wal_flushed(upto)
    if entry:
        staged.entry_flushed = True
    if fs.sync is not None:
        fs.sync.upload_soon(node)
