"""Free space on a local disk, the small reserves that let a database commit on a full one, and
databases only their owner reads.

A :class:`DiskReserve` is a file of :data:`DiskReserve.SIZE` bytes beside a database, made while
the disk has room and deleted when the database meets a full disk, so the commit that frees space
(an unlink, a finished upload, the engine opening its WAL) goes through even when something else
took the last byte. The mount's index (:class:`privifs.fs.namespace.Index`) and the engine's
database (:mod:`privifs.engine.db`) each keep one. Nothing here imports the filesystem or the
engine, so both can use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger("privifs.disk")


def free_bytes(path: Path | str) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (one ``statvfs``)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def private_database(path: Path) -> None:
    """Make the SQLite database ``path`` (and the WAL and shared-memory files SQLite makes with
    the database's mode) readable by its owner only, before SQLite opens it: they were made
    0644 by the umask, in a 0700 directory, where every other file of a vault is 0600. A new
    database is made 0600; an existing one is only chmod-ed, never opened: closing any
    descriptor of a file drops every POSIX lock the process holds on it, so opening the engine's
    database beside its open connection let another process take itself for its last user,
    fold the WAL in and delete it, and the engine's later commits went to a deleted file a
    ``kill -9`` lost (helper hB)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError:  # no room for it, or no such directory: SQLite's own open says what is wrong
        return
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):
            os.chmod(name, 0o600)


class DiskReserve:
    """The reserve file at ``path``, kept for ``owner`` (named in the log line when it is used)."""

    SIZE = 4 * 2**20

    def __init__(self, path: Path, owner: str):
        self.path = path
        self.owner = owner
        self.given_back = False

    def missing(self) -> int:
        """Bytes other writers must leave free: the reserve's, while it is given back (else the
        next write takes the room it made for the database)."""
        return self.SIZE if self.given_back else 0

    def ensure(self) -> None:
        """Make the reserve if it is missing and the disk has ample room (four times its size)."""
        if self.path.exists():
            self.given_back = False
            return
        try:
            if free_bytes(self.path.parent) < 4 * self.SIZE:
                return
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.SIZE)
            finally:
                os.close(fd)
            self.given_back = False
        except OSError as exc:  # no room after all, or a filesystem without fallocate
            log.debug("no disk reserve for %s: %s", self.owner, exc)
            with contextlib.suppress(OSError):
                self.path.unlink()

    def release(self) -> bool:
        """Delete the reserve; whether there was one."""
        try:
            self.path.unlink()
        except OSError:
            return False
        self.given_back = True
        log.warning(
            "the disk of %s is full: %s used its %d MiB reserve; free space on the disk",
            self.path.parent,
            self.owner,
            self.SIZE >> 20,
        )
        return True

    def release_if_full(self) -> bool:
        """:meth:`release`, but only when the disk is full (less than the reserve's size free):
        on a disk with room the reserve would not help whatever failed."""
        try:
            if free_bytes(self.path.parent) >= self.SIZE:
                return False
        except OSError:
            return False
        return self.release()
