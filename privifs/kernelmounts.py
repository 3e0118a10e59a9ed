"""The kernel's table of mounts as /proc/mounts shows it: which filesystems are mounted where, with
which options, and how the table spells a path. Read by the daemon (is its mount still there) and
the commands (status, mount, umount, remount); it imports nothing of either."""

from __future__ import annotations

import os
import re
from pathlib import Path


def unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_rows() -> list[list[str]]:
    try:
        with open("/proc/mounts", errors="surrogateescape") as f:
            return [line.split() for line in f]
    except OSError:
        return []


def _mount_table() -> list[tuple[str, str]]:
    """(mountpoint, filesystem type) of every mount the kernel knows."""
    return [(unescape(r[1]), r[2]) for r in _mount_rows() if len(r) > 2]


def mount_options(mountpoint: str) -> set[str]:
    """The options /proc/mounts shows for the mount at ``mountpoint`` (as the table spells it)."""
    for row in _mount_rows():
        if len(row) > 3 and unescape(row[1]) == mountpoint:
            return set(row[3].split(","))
    return set()


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem ``path`` is on (``proc``, ``ext4`` …), from the mount table."""
    real = os.path.realpath(path)
    best = None
    for mp, kind in _mount_table():
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) >= len(best[0])):
            best = (mp, kind)
    return best[1] if best else None


def privifs_mounts() -> list[str]:
    """Mountpoints of every privifs FUSE mount the kernel knows (live or dead)."""
    return [mp for mp, kind in _mount_table() if kind == "fuse.privifs"]


def mount_path(path: str | Path) -> str:
    """``path`` made absolute and free of symbolic links, as the kernel's mount table spells it,
    without looking into the mount when ``path`` names one: ``os.path.realpath`` stats every
    component, and a stat of a FUSE mount whose daemon is stopped or hung waits for ever."""
    given = os.path.abspath(path)
    if ".." not in Path(path).parts:
        mounted = {mp for mp, _ in _mount_table()}
        if given in mounted:
            return given
        head, tail = os.path.split(given)
        resolved = os.path.join(os.path.realpath(head), tail)  # stats the parents only
        if resolved in mounted:
            return resolved
    return os.path.realpath(given)


def is_fuse_mount(path: str | Path) -> bool:
    real = mount_path(path)
    return any(mp == real and "fuse" in kind for mp, kind in _mount_table())
