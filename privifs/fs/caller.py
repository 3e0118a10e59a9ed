"""Who makes a request: its uid and gid (from the request's context) and, read only when a
mode check needs them, its supplementary groups, which the FUSE context lacks (the kernel's
``default_permissions`` counts them; :meth:`Filesystem._may_open
<privifs.fs.filesystem.Filesystem._may_open>` must agree with it)."""

from __future__ import annotations

from dataclasses import dataclass

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
