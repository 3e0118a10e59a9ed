"""Which programs keep a mount busy, as ``fuser -vm`` finds them: open files, working and root
directories and mapped files on the mount, read from ``/proc`` (the links' text, and the mount
id or device of what they lead to, so that a mount that does not answer is never touched and
what is under the mountpoint is not taken for what is on it); and the mounts inside it.
Another user's processes are seen only by root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from privifs.cli.mounttable import unescape


@dataclass(frozen=True)
class Holder:
    pid: int
    program: str
    how: str  # "has … open", "works in …", …
    path: str

    def __str__(self) -> str:
        return f"{self.program} (pid {self.pid}) {self.how} '{self.path}'"


def holders(mountpoint: str | Path, proc: Path = Path("/proc")) -> list[Holder]:
    """Every other process holding something under ``mountpoint`` (an absolute path as the mount
    table spells it), one entry each: what it holds first."""
    top = str(mountpoint).rstrip("/") or "/"
    prefix = top if top == "/" else top + "/"
    mount = _mount(top, proc)
    found = []
    try:
        pids = sorted(int(e.name) for e in os.scandir(proc) if e.name.isdigit())
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        for how, path in _held(proc / str(pid), mount):
            if path == top or path.startswith(prefix):
                found.append(Holder(pid, _program(proc / str(pid)), how, path.removesuffix(" (deleted)")))
                break
    return found


def mounts_inside(mountpoint: str | Path, proc: Path = Path("/proc")) -> list[str]:
    """The mounts under ``mountpoint`` (a tmpfs, another drive mounted in it): each keeps it busy."""
    top = str(mountpoint).rstrip("/") or "/"
    prefix = top if top == "/" else top + "/"
    return [mp for _, _, mp in _mountinfo(proc) if mp.startswith(prefix)]


def bound_elsewhere(mountpoint: str | Path, proc: Path = Path("/proc")) -> list[str]:
    """The other places the same mount shows (``mount --bind``, a container's volume): unmounted
    here, it goes on there, and its daemon, which ends, leaves those dead (ENOTCONN)."""
    top = str(mountpoint).rstrip("/") or "/"
    rows = _mountinfo(proc)
    devs = [dev for _, dev, mp in rows if mp == top]
    return [mp for _, dev, mp in rows if devs and dev == devs[-1] and mp != top]


@dataclass(frozen=True)
class _Mount:
    id: str  # the kernel's mount id (fdinfo's mnt_id)
    dev: tuple[int, int]  # its device (major, minor), as /proc/PID/maps names a mapped file's


def _mountinfo(proc: Path) -> list[tuple[str, str, str]]:
    """(mount id, "major:minor", mountpoint) of each line of /proc's mountinfo."""
    rows = []
    try:
        with open(proc / "self" / "mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    rows.append((fields[0], fields[2], unescape(fields[4])))
    except OSError:
        pass
    return rows


def _mount(mountpoint: str, proc: Path) -> _Mount | None:
    """The mount on top at ``mountpoint`` (the last one mountinfo lists there), or None."""
    found = None
    for mount_id, dev, mp in _mountinfo(proc):
        if mp == mountpoint:
            major, _, minor = dev.partition(":")
            try:
                found = _Mount(mount_id, (int(major), int(minor)))
            except ValueError:
                found = None
    return found


def _held(process: Path, mount: _Mount | None):
    """(how, path) of what ``process`` holds on ``mount``: its working and root directories,
    open files and mapped files; nothing of a process that ended or that this user may not look
    at. What is on another mount at the same path is left out: the directory under the
    mountpoint, which the mount daemon keeps open (and locked) and where a shell that was there
    before the mount still is; the kernel does not count those."""
    for link, how in (("cwd", "works in"), ("root", "has its root in")):
        try:
            path = os.readlink(process / link)
            if mount is None or _link_mount_id(process / link) in (mount.id, None):
                yield how, path
        except OSError:
            pass
    try:
        fds = os.listdir(process / "fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            path = os.readlink(process / "fd" / fd)
            if mount is None or _fd_mount_id(process / "fdinfo" / fd) in (mount.id, None):
                yield "has open", path
        except OSError:
            pass
    try:
        with open(process / "maps", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/") and (mount is None or _dev(fields[3]) == mount.dev):
                    yield "maps", fields[5]
    except OSError:
        pass


def _dev(field: str) -> tuple[int, int] | None:
    """A maps line's device, ``major:minor`` in hex."""
    major, _, minor = field.partition(":")
    try:
        return int(major, 16), int(minor, 16)
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
        with open(fdinfo) as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return line.split()[1]
    except OSError:
        pass
    return None


def _program(process: Path) -> str:
    try:
        return (process / "comm").read_text().strip() or "a program"
    except OSError:
        return "a program"
