"""``--fsync local``: an fsync that returns once the change is durable on this machine's disk.

The default fsync waits until the vault acknowledged a token made from the content (see
``Syncer.commit``). With ``--fsync local`` (meant for SQLite and other programs that fsync
often) fsync instead makes the change durable here and returns:

1. the staged file's header is brought up to date and its encrypted content flushed to disk
   (``fsync``), and the staging directory with it (a staged file made since the last flush);
2. the node's row (size, ``content_dirty``, the staged file it names) is committed to the index
   and the index's WAL and database file are flushed, so the commit survives a power loss and
   not only a killed daemon (the index runs ``synchronous=NORMAL``);
3. the upload follows in the background (``Syncer.upload_soon``): after the write-back delay,
   even while the file stays open, like any write-back, retried until it lands.

What it trades: until that upload lands, losing this machine (disk, theft) loses the change, and
other clients of the vault do not see it. ``privifs status`` shows the mode and how many changes
are not in the vault yet. The flushes run on a worker thread on duplicated descriptors, so an
upload finishing meanwhile (which closes the staged file) cannot pull a descriptor away.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from privifs.crypto.sealed import local_store_error

VAULT, LOCAL = "vault", "local"
MODES = (VAULT, LOCAL)


def _flush_paths(fds: list[int], paths: list[Path]) -> None:
    try:
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # no WAL right after a checkpoint: nothing of it to flush
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def fsync_locally(fs, node) -> None:
    """Make ``node``'s staged content and its index row durable on the local disk, then have the
    upload follow in the background. Raises LocalStoreError (EIO, ENOSPC) when the disk refuses."""
    staged = node.staged
    staged.sealed.sync_header()
    fs.index.save(node)
    index = Path(fs.index.path)
    paths = [Path(fs.staging.dir), index.with_name(index.name + "-wal"), index]
    try:
        fds = [os.dup(staged.sealed.fd)]
        await trio.to_thread.run_sync(_flush_paths, fds, paths)
    except OSError as exc:
        raise local_store_error(exc, f"flushing {staged.path} and the index to disk") from None
    if fs.sync is not None:
        fs.sync.upload_soon(node)
