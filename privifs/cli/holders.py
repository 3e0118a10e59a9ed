"""Which programs keep a mount busy, as ``fuser -vm`` finds them: open files, working and root
directories and mapped files on the mount, read from ``/proc`` (the links' text, and the mount
id or device of what they lead to, so that a mount that does not answer is never touched and
what is under the mountpoint is not taken for what is on it); and, from one read of the mount
table, the mounts inside it and the other places it shows (:func:`busy`). Another user's
processes are seen only by root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from privifs.kernelmounts import unescape


@dataclass(frozen=True)
class Holder:
    pid: int
    program: str
    how: str  # "has … open", "works in …", …
    path: str

    def __str__(self) -> str:
        return f"{self.program} (pid {self.pid}) {self.how} '{self.path}'"


@dataclass(frozen=True)
class Busy:
    """What keeps a mount from being unmounted as ``privifs umount`` should (empty lists: nothing)."""

    elsewhere: list[str]  # other places it shows (see bound_elsewhere)
    inside: list[str]  # mounts on it (see mounts_inside)
    held: list[Holder]  # programs holding something on it; looked for only when the others are empty


def busy(mountpoint: str | Path, proc: Path = Path("/proc")) -> Busy:
    """What keeps the drive at ``mountpoint`` (an absolute path as the mount table spells it)
    busy, from one read of the mount table."""
    rows = _mountinfo(proc)
    top = _top(rows, mountpoint)
    if top is None:
        return Busy([], [], _holders(str(mountpoint), None, proc))
    elsewhere, inside = bound_elsewhere(rows, top), mounts_inside(rows, top)
    return Busy(elsewhere, inside, [] if elsewhere or inside else _holders(top.mountpoint, top, proc))


def _holders(top: str, mount: _Row | None, proc: Path) -> list[Holder]:
    """Every other process holding something on the drive at ``top``, one entry each: what it
    holds first."""
    try:
        pids = sorted(int(e.name) for e in os.scandir(proc) if e.name.isdigit())
    except OSError:
        return []
    found = []
    for pid in pids:
        if pid == os.getpid():
            continue
        for how, path in _held(proc / str(pid), top, mount):
            found.append(Holder(pid, program(pid, proc), how, path.removesuffix(" (deleted)")))
            break
    return found


def mounts_inside(rows: list[_Row], top: _Row) -> list[str]:
    """The mounts on the drive ``top`` (a tmpfs, another drive mounted in it): each keeps it busy.
    One the drive was mounted over (``--nonempty`` on a directory holding a mount) is under it,
    not on it, and does not (helper hAI N3)."""
    on: set[str] = {top.id}
    inside = []
    for row in rows:  # (a mount is listed after the one it is on)
        if row.parent in on:
            on.add(row.id)
            inside.append(row.mountpoint)
    return inside


def bound_elsewhere(rows: list[_Row], top: _Row) -> list[str]:
    """The other places the drive ``top`` shows (``mount --bind``, a container's volume):
    unmounted here, it goes on there, and its daemon, which ends, leaves those dead (ENOTCONN).
    Copies the kernel made because the parent mount is shared (another mount of the parent's
    ``shared:N`` peer group received it, at the same place) go with it and are not counted
    (helper hAI N2)."""
    by_id = {r.id: r for r in rows}

    def received(r: _Row) -> bool:  # propagated from our parent to a peer of it, at the same place
        ours, theirs = by_id.get(top.parent), by_id.get(r.parent)
        return (
            ours is not None
            and theirs is not None
            and theirs.id != ours.id
            and bool(ours.peers & theirs.peers)
            and _below(top.mountpoint, ours.mountpoint) == _below(r.mountpoint, theirs.mountpoint)
        )

    return [r.mountpoint for r in rows if r.dev == top.dev and r.id != top.id and not received(r)]


def _below(path: str, parent: str) -> str:
    """``path`` relative to its parent mount's mountpoint ``parent``."""
    return path[len(parent.rstrip("/")) :]


@dataclass(frozen=True)
class _Row:
    """One line of /proc's mountinfo."""

    id: str  # the kernel's mount id (fdinfo's mnt_id)
    parent: str
    dev: str  # "major:minor", decimal
    mountpoint: str
    peers: frozenset[str]  # its "shared:N" peer groups


def _mountinfo(proc: Path) -> list[_Row]:
    rows = []
    try:
        with open(proc / "self" / "mountinfo", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 6:
                    optional = fields[6 : fields.index("-")] if "-" in fields else []
                    peers = frozenset(o for o in optional if o.startswith("shared:"))
                    rows.append(_Row(fields[0], fields[1], fields[2], unescape(fields[4]), peers))
    except OSError:
        pass
    return rows


def _top(rows: list[_Row], mountpoint: str | Path) -> _Row | None:
    """The mount on top at ``mountpoint`` (the last one mountinfo lists there), or None."""
    top = str(mountpoint).rstrip("/") or "/"
    return next((r for r in reversed(rows) if r.mountpoint == top), None)


def _held(process: Path, top: str, mount: _Row | None):
    """(how, path) of what ``process`` holds on the drive ``mount`` at ``top``: its working and
    root directories, open files and mapped files; nothing of a process that ended or that this
    user may not look at. A path under ``top`` is then checked to be on that mount (its mount id,
    or a mapped file's device): the directory under the mountpoint, which the mount daemon keeps
    open (and locked) and where a shell that was there before the mount still is, is not; the
    kernel does not count those."""
    prefix = top if top == "/" else top.rstrip("/") + "/"

    def under(path: str) -> bool:
        return path == top or path.startswith(prefix)

    for link, how in (("cwd", "works in"), ("root", "has its root in")):
        try:
            path = os.readlink(process / link)
        except OSError:
            continue
        if under(path) and (mount is None or _link_mount_id(process / link) in (mount.id, None)):
            yield how, path
    try:
        fds = os.listdir(process / "fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            path = os.readlink(process / "fd" / fd)
        except OSError:
            continue
        if under(path) and (mount is None or _fd_mount_id(process / "fdinfo" / fd) in (mount.id, None)):
            yield "has open", path
    dev = None if mount is None else _dev(mount.dev, 10)
    try:
        with open(process / "maps", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/") and (dev is None or _dev(fields[3], 16) == dev):
                    path = unescape(fields[5])
                    if under(path):
                        yield "maps", path
    except OSError:
        pass


def _dev(field: str, base: int) -> tuple[int, int] | None:
    """A device ``major:minor`` as numbers (mountinfo writes them in decimal, maps in hex)."""
    major, _, minor = field.partition(":")
    try:
        return int(major, base), int(minor, base)
    except ValueError:
        return None


def _link_mount_id(link: Path) -> str | None:
    """The mount id of what the magic link ``link`` (a process's cwd or root) leads to: opened with
    O_PATH, which goes straight to it, sending nothing to the file system there."""
    try:
        fd = os.open(link, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _fd_mount_id(Path(f"/proc/self/fdinfo/{fd}"))
    finally:
        os.close(fd)


def _fd_mount_id(fdinfo: Path) -> str | None:
    try:
        with open(fdinfo, errors="surrogateescape") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return line.split()[1]
    except OSError:
        pass
    return None


def process_of(tid: int, proc: Path = Path("/proc")) -> int:
    """The process a thread ``tid`` belongs to (FUSE names the thread that made a request); the
    id itself when it cannot be read."""
    try:
        with open(proc / str(tid) / "status", errors="replace") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return tid


def program(pid: int, proc: Path = Path("/proc")) -> str:
    """The name of process ``pid`` (its ``comm``), or "a program" when it is gone or hidden."""
    try:
        return (proc / str(pid) / "comm").read_text(errors="replace").strip() or "a program"
    except OSError:
        return "a program"
