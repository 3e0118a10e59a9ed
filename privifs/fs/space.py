"""Local disk space: what the staging area may still take, what the read cache must leave free,
and the figures behind ``statfs``.

Two margins are kept on each filesystem that holds privifs state, both scaled to its size:

* the **floor** (2 % of the filesystem, between 1 MiB and 64 MiB): staged writes stop at it with
  ENOSPC, so the index, the cache's bookkeeping and the log can still commit the changes (an
  unlink, a finished upload) that free space again;
* the **staging reserve** (the floor plus 10 % of the filesystem, at most 1 GiB more): the read
  cache never fills the disk past it, evicting least-recently-used entries first, so new writes
  always find room. Staging does not evict the cache: a write that fills the disk leaves what is
  cached readable.

Nothing here caches a figure: each question is one ``statvfs``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
FLOOR_FRACTION, FLOOR_MIN, FLOOR_MAX = 0.02, 1 * MiB, 64 * MiB
RESERVE_FRACTION, RESERVE_MAX = 0.10, 1024 * MiB


@dataclass(frozen=True)
class Space:
    """The filesystem holding ``path`` (a directory that exists)."""

    path: Path

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.path)

    def free(self) -> int:
        """Bytes an unprivileged writer may still use."""
        st = self.statvfs()
        return st.f_bavail * st.f_frsize

    def total(self) -> int:
        st = self.statvfs()
        return st.f_blocks * st.f_frsize

    def floor(self) -> int:
        return int(min(FLOOR_MAX, max(FLOOR_MIN, self.total() * FLOOR_FRACTION)))

    def reserve(self) -> int:
        return self.floor() + int(min(RESERVE_MAX, self.total() * RESERVE_FRACTION))
