"""Who makes a request: its uid and gid (from the request's context) and, read only when a
mode check needs them, its supplementary groups, which the FUSE context lacks (the kernel's
``default_permissions`` counts them; :meth:`Filesystem._may_open
<privifs.fs.filesystem.Filesystem._may_open>` must agree with it). And whether the program
waiting for a long request was killed meanwhile (:func:`unless_killed`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from privifs.errors import CallerKilled, single_error

log = logging.getLogger("privifs.fs")

KILL_POLL = 0.5  # seconds between looks at whether a waiting caller was killed
SIGKILL_BIT = 1 << 8  # SIGKILL (9) in /proc's signal masks; a fatal signal pends as SIGKILL too

CAP_SYS_ADMIN = 21


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    pid: int = 0

    def groups(self) -> frozenset[int]:
        """The caller's supplementary groups (``Groups:`` of ``/proc/PID/status``); none when
        the process is gone or its status cannot be read."""
        if self.pid <= 0:
            return frozenset()
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
        except OSError:
            pass
        return frozenset()

    def may_read_trusted(self) -> bool:
        """Whether the caller holds CAP_SYS_ADMIN (``CapEff:`` of ``/proc/PID/status``), which the
        kernel asks of whoever reads a ``trusted.*`` attribute and ext4 of whoever lists one; when
        the status cannot be read, only uid 0 is taken for it."""
        if self.pid > 0:
            try:
                with open(f"/proc/{self.pid}/status", encoding="ascii", errors="replace") as f:
                    for line in f:
                        if line.startswith("CapEff:"):
                            return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
            except (OSError, ValueError, IndexError):
                pass
        return self.uid == 0

    def class_of(self, uid: int, gid: int) -> int:
        """The shift of the permission bits that apply to this caller for a file owned by
        ``uid``:``gid``: 6 (owner), 3 (group: primary or supplementary) or 0 (others)."""
        if self.uid == uid:
            return 6
        if self.gid == gid or gid in self.groups():
            return 3
        return 0


def killed(tid: int) -> bool:
    """Whether thread ``tid`` has a SIGKILL pending: killed, or sent a signal that kills it (the
    kernel marks every thread of a process a fatal signal ends with SIGKILL). False when it is
    gone or cannot be read."""
    try:
        with open(f"/proc/{tid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")) and int(line.split()[1], 16) & SIGKILL_BIT:
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


@asynccontextmanager
async def unless_killed(tid: int, what: str) -> AsyncIterator[None]:
    """Run the block, ended with :class:`CallerKilled` if thread ``tid`` (the request's caller;
    0: not known) is killed meanwhile. pyfuse3 answers no FUSE interrupt, and the kernel holds a
    program in a request the daemon has read until it is answered, a SIGKILL notwithstanding: a
    program killed in an fsync that waited for a hung server stayed in D state until the fsync
    gave up, about two minutes (helper hAS F1)."""
    if tid <= 0:
        yield
        return
    with trio.CancelScope() as scope, single_error():  # (the block's own errors, as they are)
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while not killed(tid):  # noqa: ASYNC110 (the kernel tells of no signal)
                    await trio.sleep(KILL_POLL)
                scope.cancel()

            nursery.start_soon(watch)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    if scope.cancelled_caught:
        log.info("%s: the program waiting for its fsync was killed; the upload goes on", what)
        raise CallerKilled(f"{what}: the program waiting was killed")
