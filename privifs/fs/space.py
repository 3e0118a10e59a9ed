"""Local disk space: what the staging area may still take, what the read cache must leave free,
and the figures behind ``statfs``.

Two margins are kept on each filesystem that holds privifs state, both scaled to its size:

* the **floor** (2 % of the filesystem, between 1 MiB and 64 MiB): staged writes stop at it with
  ENOSPC, so the index, the cache's bookkeeping and the log can still commit the changes (an
  unlink, a finished upload) that free space again;
* the **staging reserve** (the floor plus 10 % of the filesystem, at most 1 GiB more): the read
  cache never fills the disk past it, evicting least-recently-used entries first, so new writes
  always find room. When another program took the disk's free space, a staged write that finds
  no room has the cache drop entries on the same disk while the vault can be reached
  (:attr:`privifs.fs.staging.Staging.make_room`); offline the cache is kept.

Nothing here caches a figure: each question is one ``statvfs``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from privifs.disk import free_bytes
from privifs.errors import DiskFullError, LocalStoreError

MiB = 1024 * 1024
FLOOR_FRACTION, FLOOR_MIN, FLOOR_MAX = 0.02, 1 * MiB, 64 * MiB
RESERVE_FRACTION, RESERVE_MAX = 0.10, 1024 * MiB


def floor_of(total: int) -> int:
    return int(min(FLOOR_MAX, max(FLOOR_MIN, total * FLOOR_FRACTION)))


def reserve_of(total: int) -> int:
    return floor_of(total) + int(min(RESERVE_MAX, total * RESERVE_FRACTION))


def engine_headroom(staging_dir: Path, engine_dir: Path, engine_floor: int, largest_blob: int) -> int:
    """What staged writes leave free beyond their own floor when the embedded engine keeps its
    blobs on the same filesystem: the engine refuses a blob that would leave less than
    ``engine_floor`` free (HTTP 507), so staging must stop above that floor with room for two
    of the largest blobs an upload sends, or the drain can never start. Staging stopped at its
    own floor (1 MiB on a small disk, below the engine's 4), every upload got 507 and nothing
    drained until files were deleted (helper hAM F1: 1,027 changes pending for 10 minutes). 0
    when the engine's data is on another filesystem."""
    try:
        if os.stat(staging_dir).st_dev != os.stat(engine_dir).st_dev:
            return 0
    except OSError:
        return 0
    return max(0, engine_floor + 2 * largest_blob - Space(staging_dir).floor())


@dataclass(frozen=True)
class Space:
    """The filesystem holding ``path`` (a directory; one removed meanwhile, e.g. the cache's by
    ``rm -rf ~/.cache``, is measured at its nearest parent that exists)."""

    path: Path

    def _sizes(self) -> tuple[int, int]:
        """(free bytes an unprivileged writer may use, total bytes), from one ``statvfs``."""
        path = self.path
        while True:
            try:
                st = os.statvfs(path)
                break
            except FileNotFoundError:
                if path.parent == path:
                    raise
                path = path.parent
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def above_floor(self) -> int:
        """Free bytes above the floor (negative inside it)."""
        free, total = self._sizes()
        return free - floor_of(total)

    def above_reserve(self) -> int:
        """Free bytes above the staging reserve (negative inside it)."""
        free, total = self._sizes()
        return free - reserve_of(total)

    def floor(self) -> int:
        return floor_of(self._sizes()[1])


def open_error(path: Path, what: str, exc: Exception, remedy: str = "") -> LocalStoreError:
    """The error for local state that cannot be opened: SQLite reports a full disk as a "disk
    I/O error" when it cannot create its WAL files, so the free space decides. ``remedy``: what
    to do about a damaged one (appended after a semicolon)."""
    try:
        full = free_bytes(path) < MiB
    except OSError:
        full = False
    if full:
        return DiskFullError(
            f"{what} in {path} cannot be opened: the disk is full; free some space on it and mount again"
        )
    return LocalStoreError(f"{what} in {path} cannot be opened: {exc}" + (f"; {remedy}" if remedy else ""))
