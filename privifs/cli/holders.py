"""Which programs keep a mount busy, as ``fuser -vm`` finds them: open files, working and root
directories and mapped files under the mountpoint, read from ``/proc`` (the links' text and each
open file's mount id, so a mount that does not answer is never touched). Another user's
processes are seen only by root."""

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
    mount_id = _mount_id(top, proc)
    found = []
    try:
        pids = sorted(int(e.name) for e in os.scandir(proc) if e.name.isdigit())
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        for how, path in _held(proc / str(pid), mount_id):
            if path == top or path.startswith(prefix):
                found.append(Holder(pid, _program(proc / str(pid)), how, path.removesuffix(" (deleted)")))
                break
    return found


def _mount_id(mountpoint: str, proc: Path) -> str | None:
    """The kernel's id of the mount on top at ``mountpoint`` (the last one /proc's mountinfo lists
    there), or None."""
    found = None
    try:
        with open(proc / "self" / "mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and unescape(fields[4]) == mountpoint:
                    found = fields[0]
    except OSError:
        pass
    return found


def _held(process: Path, mount_id: str | None):
    """(how, path) of what ``process`` holds: its working and root directories, open files and
    mapped files; nothing of a process that ended or that this user may not look at. An open file
    on another mount than ``mount_id`` is left out: the mount daemon keeps the directory under its
    mountpoint open (and locked), which the kernel does not count."""
    for link, how in (("cwd", "works in"), ("root", "has its root in")):
        try:
            yield how, os.readlink(process / link)
        except OSError:
            pass
    try:
        fds = os.listdir(process / "fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            path = os.readlink(process / "fd" / fd)
            if mount_id is None or _fd_mount_id(process, fd) in (mount_id, None):
                yield "has open", path
        except OSError:
            pass
    try:
        with open(process / "maps", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(None, 5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    yield "maps", fields[5]
    except OSError:
        pass


def _fd_mount_id(process: Path, fd: str) -> str | None:
    try:
        with open(process / "fdinfo" / fd) as f:
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
