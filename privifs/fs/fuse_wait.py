"""How pyfuse3's request loop waits for the next request: owns the trio facade pyfuse3 runs on.

pyfuse3 reaches trio through its module attribute ``pyfuse3.trio`` (its own asyncio mode swaps
that attribute the same way). Per request its loop takes a ``trio.Lock`` and then awaits
``trio.lowlevel.wait_readable`` on ``/dev/fuse``; both always pass through trio's scheduler (the
lock's uncontended acquire yields, the wait registers the descriptor with epoll and parks until
the next round of events), which costs more than many handlers. While requests are queued the
facade answers the wait with one ``poll`` that does not block and takes an uncontended lock
without yielding. So that a stream of requests cannot starve the daemon's other tasks, the wait
goes through trio's scheduler at least every ``FAIR_EVERY`` requests and whenever
``FAIR_AFTER`` seconds have passed since it last did.

The loop keeps one idle worker (``min_tasks=1``) instead of several: pyfuse3 starts another
worker whenever it takes a request and none is left waiting, so requests whose handlers wait
(downloads, uploads) still run side by side, while a program's stream of quick requests is not
passed from worker to worker through the lock.
"""

from __future__ import annotations

import select
import time
import types
from typing import Any

import pyfuse3
import trio

FAIR_EVERY = 16
FAIR_AFTER = 0.002


class _ReadLock:
    """trio.Lock, but an acquire nobody contends takes it without yielding."""

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class _Waits:
    """``wait_readable`` that returns at once when the descriptor already has a request."""

    def __init__(self) -> None:
        self._polls: dict[int, Any] = {}
        self._quick = 0
        self._since = time.monotonic()

    def _ready(self, fd: int) -> bool:
        poll = self._polls.get(fd)
        if poll is None:
            poll = self._polls[fd] = select.poll()
            poll.register(fd, select.POLLIN)
        try:
            events = poll.poll(0)
        except OSError:
            return False
        # Only a plain "readable": an error or hang-up (the unmount) goes through trio's wait,
        # which reports the closing as pyfuse3 expects.
        return bool(events) and events[0][1] == select.POLLIN

    async def wait_readable(self, fd: int) -> None:
        if self._quick < FAIR_EVERY and self._ready(fd) and time.monotonic() - self._since < FAIR_AFTER:
            self._quick += 1
            return
        self._quick = 0
        await trio.lowlevel.wait_readable(fd)
        self._since = time.monotonic()


def facade() -> types.ModuleType:
    """A module that is trio for pyfuse3 but for its read lock and its wait on /dev/fuse."""
    waits = _Waits()
    lowlevel = types.ModuleType("privifs_fuse_lowlevel")
    lowlevel.__dict__.update(vars(trio.lowlevel))
    lowlevel.wait_readable = waits.wait_readable  # type: ignore[attr-defined]
    fake = types.ModuleType("privifs_fuse_trio")
    fake.__dict__.update(vars(trio))
    fake.lowlevel = lowlevel  # type: ignore[attr-defined]
    fake.Lock = _ReadLock  # type: ignore[attr-defined]
    return fake


async def serve_requests(max_tasks: int = 64) -> None:
    """Run pyfuse3's request loop (after ``pyfuse3.init``) on the facade until the unmount."""
    real = pyfuse3.trio  # type: ignore[attr-defined]
    pyfuse3.trio = facade()  # type: ignore[attr-defined]
    try:
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
    finally:
        pyfuse3.trio = real  # type: ignore[attr-defined]
