"""The write-back's queue of inodes waiting for a worker: first in, first out, with an urgent lane
for the nodes an fsync waits on.

Without the lane an fsync waited behind everything queued before it: after a ``git clone`` onto
the mount (2,400 small files queued) the first ``fsync`` of ``git gc`` took 48 s. An inode is in the
queue at most once per lane; one moved to the urgent lane is skipped when its place in the
ordinary lane comes up (unless it was queued again meanwhile).
"""

from __future__ import annotations

from collections import deque

import trio


class WorkQueue:
    def __init__(self) -> None:
        self._ordinary: deque[int] = deque()
        self._urgent: deque[int] = deque()
        self._queued: set[int] = set()  # inodes waiting in either lane
        self._nonempty = trio.Event()

    def __contains__(self, ino: int) -> bool:
        return ino in self._queued

    def __len__(self) -> int:
        return len(self._queued)

    def put(self, ino: int) -> None:
        """Queue ``ino`` at the end of the ordinary lane, unless it is queued already."""
        if ino not in self._queued:
            self._queued.add(ino)
            self._ordinary.append(ino)
            self._nonempty.set()

    def put_urgent(self, ino: int) -> None:
        """Queue ``ino`` ahead of everything in the ordinary lane (moving it there if it waits in
        that lane already)."""
        if ino in self._urgent:
            return
        self._queued.add(ino)
        self._urgent.append(ino)
        self._nonempty.set()

    def put_back(self, ino: int) -> None:
        """Return ``ino``, taken from the ordinary lane and not worked on, to the front of that
        lane (a worker that gave way to an fsync's node keeps the file's turn)."""
        if ino not in self._queued:
            self._queued.add(ino)
            self._ordinary.appendleft(ino)
            self._nonempty.set()

    @property
    def urgent_waiting(self) -> bool:
        """Whether a node an fsync waits on is queued (entries of the urgent lane are never stale)."""
        return bool(self._urgent)

    async def get(self) -> int:
        """The next inode: the urgent lane first, then the ordinary one."""
        while True:
            while self._urgent or self._ordinary:
                ino = self._urgent.popleft() if self._urgent else self._ordinary.popleft()
                if ino in self._queued:
                    self._queued.discard(ino)
                    return ino
                # moved to the urgent lane and handled already: its ordinary place is stale
            if self._nonempty.is_set():  # a fresh event, shared by every worker waiting from now
                self._nonempty = trio.Event()
            await self._nonempty.wait()
