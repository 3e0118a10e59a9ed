"""The kernel's table of privifs mounts: which exist, which are dead (their daemon crashed or was
killed: every access fails with ENOTCONN), how to detach a dead one, and which daemon serves a
mountpoint."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from privifs.cli.failures import LocalFileError


def unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_rows() -> list[list[str]]:
    try:
        with open("/proc/mounts") as f:
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


def dead_mounts(candidates: list[str], timeout: float = 3.0) -> list[str]:
    """Those of ``candidates`` that are FUSE mounts whose daemon is gone (ENOTCONN). Each probe
    runs on its own thread, all at once, so a hung daemon cannot hang the caller. The probe is a
    statfs, which always reaches the daemon: a stat is answered from the kernel's attribute cache
    for a few seconds after the daemon died."""
    results: dict[str, int | None] = {}

    def probe(path: str) -> None:
        try:
            os.statvfs(path)
            results[path] = None
        except OSError as exc:
            results[path] = exc.errno

    threads = [threading.Thread(target=probe, args=(p,), daemon=True) for p in candidates]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [p for p in candidates if results.get(p) in (errno.ENOTCONN, errno.ECONNABORTED)]


def is_dead_mount(path: str | Path, timeout: float = 3.0) -> bool:
    return bool(dead_mounts([str(path)], timeout))


def clean_dead_mount(path: str | Path) -> None:
    """Detach a dead FUSE mount (fusermount3 -u, lazily if it is busy)."""
    for cmd in (["fusermount3", "-u", str(path)], ["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            continue
    raise LocalFileError(f"{path} is a dead mount and could not be unmounted; run 'umount -l {path}' as root")


def registered_entry(mountpoint: Path) -> dict | None:
    from privifs.fs.registry import registered_mounts

    real = mount_path(mountpoint)
    for entry in registered_mounts():
        if entry["mountpoint"] == real:
            return entry
    return None


def _vault_markers() -> list[tuple[str, Path]]:
    """(mountpoint, state dir) of this user's vaults, as their daemons last recorded them."""
    from privifs import paths

    out = []
    for marker in (paths.state_dir() / "vaults").glob("*/mountpoint"):
        try:
            out.append((marker.read_text().strip(), marker.parent))
        except OSError:
            continue
    return out


def my_mountpoints() -> set[str]:
    """Mountpoints this user's vaults were last mounted at (to tell their dead mounts from
    other users')."""
    return {mp for mp, _ in _vault_markers()}


def changes_waiting(state: Path) -> tuple[int, int] | None:
    """(changes, deletes) the index in the vault state directory ``state`` records as not in
    the vault yet; None if it cannot be read (newer, damaged, or gone)."""
    import sqlite3

    from privifs.paths import INDEX_NAME

    index = state / INDEX_NAME
    if not index.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{index.as_uri()}?mode=ro", uri=True, timeout=1)
        try:
            changes = conn.execute("SELECT COUNT(*) FROM nodes WHERE content_dirty OR meta_dirty").fetchone()[0]
            deletes = conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return int(changes), int(deletes)


def waiting_vaults() -> list[dict]:
    """This user's vaults that no daemon holds and whose last mount left changes the vault does
    not have (an unmount that gave up on the server, a crash, a reboot): they are uploaded at the
    vault's next mount. ``privifs status`` showed "no privifs mounts" for them (helper hAO F4)."""
    from privifs import paths

    out = []
    for mp, state in _vault_markers():
        if paths.lock_held(state / "lock"):
            continue
        waiting = changes_waiting(state)
        if waiting is None:  # (the index cannot be read: what is staged still tells)
            waiting = (_staged_files(state), 0)
        if any(waiting):
            out.append(
                {
                    "mountpoint": mp,
                    "mounted": False,
                    "waiting": True,
                    "state_dir": str(state),
                    "pending_count": waiting[0],
                    "pending_deletes": waiting[1],
                }
            )
    return out


def staged_left(mountpoint: str | Path) -> tuple[int, Path] | None:
    """How many files the last daemon of ``mountpoint`` left staged (not uploaded), and where;
    None if its state directory is not the default one or holds nothing staged."""
    real = mount_path(mountpoint)
    for mp, state in _vault_markers():
        staged = _staged_files(state) if mp == real else 0
        if staged:
            return staged, state
    return None


def _staged_files(state: Path) -> int:
    """How many staged files the vault state directory ``state`` holds."""
    try:
        return sum(1 for f in (state / "staging").iterdir() if f.is_file())
    except OSError:
        return 0
