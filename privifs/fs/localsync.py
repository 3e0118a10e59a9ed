"""``--fsync local``: an fsync that returns once the change is durable on this machine's disk.

The default fsync waits until the vault acknowledged a token made from the content (see
``Syncer.commit``). With ``--fsync local`` (meant for SQLite and other programs that fsync
often) fsync instead makes the change durable here and returns:

1. the staged file's header is brought up to date and its encrypted content flushed to disk
   (``fsync``), and the staging directory with it while the file's name there may not be on disk
   yet (the first fsync of a new staged file);
2. the index's WAL is flushed if the node's row has a write no earlier flush covered (for
   ``fdatasync``, as SQLite calls it: a write of more than the row's size and times). The fsync
   itself writes nothing to the index: the row's size and times go in with the index's next
   commit (``Index.save_soon``), because the staged file's header records both at every write
   and is flushed in step 1, and a restart takes them from it (``Filesystem.open_staged_files``);
   what only the index holds (the entry, the staged file it names, ``content_dirty``) was
   committed by the request that changed it (create, the first write, a copy-on-write clone).
   The index runs ``synchronous=NORMAL``: SQLite flushes the WAL before each checkpoint and the
   database file after it, so a commit whose WAL frames are on disk survives a power loss;
3. the upload follows in the background (``Syncer.upload_soon``): after the write-back delay,
   even while the file stays open, like any write-back, retried until it lands.

The flushes of one fsync run at the same time, each on its own thread: the filesystem journal
then commits them together (on this machine's ext4 three fsyncs in parallel cost about a third
of three in a row). The last one to finish wakes the waiting fsync itself (no trio worker thread
in between). They work on duplicated descriptors, so an upload finishing meanwhile (which closes
the staged file) cannot pull a descriptor away.

A SQLite rollback journal lives for one commit: created, written, fsynced twice, deleted. Its
deletion commits the index (its row goes, so it cannot come back after a crash and roll back a
committed transaction) and leaves the staged file to a thread of its own (``Staging.remove(...,
soon=True)``; an orphan a crash leaves is deleted at the next start), so nothing of it is
uploaded and it costs the vault nothing.

What it trades: until that upload lands, losing this machine (disk, theft) loses the change, and
other clients of the vault do not see it. ``privifs status`` shows the mode and how many changes
are not in the vault yet.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


async def _flush_all(fd: int | None, paths: list[Path]) -> None:
    """Flush ``fd`` (closed afterwards) and ``paths`` at the same time, each on a flusher thread,
    and return once every one is done; raise the first OSError. The last flush to finish wakes
    this task directly (``run_sync_soon``): no trio worker thread in between, which cost the
    trio thread more than the wake-up itself."""
    jobs: list[tuple[Callable[[Any], None], Any]] = [(_flush_fd, fd)] if fd is not None else []
    jobs += [(_flush_path, p) for p in paths]
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    lock = threading.Lock()
    errors: list[BaseException] = []
    left = len(jobs)

    def finished(future=None) -> None:
        nonlocal left
        exc = future.exception() if future is not None else None
        with lock:
            if exc is not None:
                errors.append(exc)
            left -= 1
            last = left == 0
        if last:
            token.run_sync_soon(trio.lowlevel.reschedule, task)

    for i, (fn, arg) in enumerate(jobs):
        try:
            _flushers.submit(fn, arg).add_done_callback(finished)
        except RuntimeError as exc:  # the pool is shut down (the interpreter is exiting)
            for fn_, arg_ in jobs[i:]:
                if fn_ is _flush_fd:
                    os.close(arg_)
                finished()
            errors.append(exc)
            break
    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
    if errors:
        raise errors[0]


async def flush_index(index) -> None:
    """Flush the index's WAL if anything was written since the last flush: what the index
    records (renames, deletes, new entries) then survives a power loss (``fsync`` of a
    directory, in either mode)."""
    index.settle()  # what it owes (see Index.kept) first: a flush must cover it
    upto = index.writes
    if upto <= index.flushed_writes:
        return
    try:
        await _flush_all(None, [index.wal_path])
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
    index.settle()  # the row may be owed (see Index.kept): a flush must cover it
    # The size and times go into the index with its next commit, not one of their own: the
    # staged file's header records them at every write and is flushed here with the content, and
    # a restart takes them from it (Filesystem.open_staged_files). The row's other columns (its
    # place, the staged file it names, content_dirty) were committed by the change that set them.
    index.save_soon(node)
    paths = []
    entry = not staged.entry_flushed
    if entry:
        paths.append(Path(fs.staging.dir))
    upto = index.writes
    wal = not index.row_flushed(node.ino, datasync)
    if wal:
        paths.append(index.wal_path)
    try:
        await _flush_all(os.dup(staged.sealed.fd), paths)
    except OSError as exc:
        raise local_store_error(exc, f"flushing {staged.path} and the index to disk") from None
    if wal:
        index.wal_flushed(upto)
    if entry:
        staged.entry_flushed = True
    if fs.sync is not None:
        fs.sync.upload_soon(node)
