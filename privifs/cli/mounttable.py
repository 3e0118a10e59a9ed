"""privifs mounts in the kernel's table (privifs.kernelmounts): which are dead (their daemon crashed or was
killed: every access fails with ENOTCONN), how to detach a dead one, and which daemon serves a
mountpoint."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

from privifs.cli.failures import LocalFileError
from privifs.kernelmounts import mount_path

MNT_FORCE = 1  # umount2(2)


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


def wedged_daemon(mountpoint: str) -> tuple[int, Path] | None:
    """The pid and vault state directory of the killed daemon that still holds the mount at
    ``mountpoint`` (as the kernel's table spells it), if it is one of this user's vaults: its main
    thread is gone (a zombie) but another of its threads waits in the kernel for ever, on a page
    lock a read holds, and that read waits for the daemon's answer (a kill -9 while the daemon told
    the kernel to drop a file's cached pages, helper hAV F4). The process never ends, so the kernel
    never ends the mount's connection, and every access to the mount hangs instead of failing with
    ENOTCONN. Told by the vault's lock, which the zombie still holds; the mount is never looked into."""
    from privifs import paths

    for mp, state in _vault_markers():
        if mp != mountpoint:
            continue
        pid = paths.flock_holder(state / "lock")
        if pid is not None and paths.process_state(pid) == "Z":
            return pid, state
    return None


def _abort_connection(mountpoint: str) -> bool:
    """End the FUSE connection of the mount at ``mountpoint`` as a forced unmount does (FUSE's
    ``umount_begin`` aborts it: every request waiting fails). Needs root (CAP_SYS_ADMIN); False
    when it could not be done."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), MNT_FORCE) == 0:
        return True
    return ctypes.get_errno() == errno.EBUSY  # aborted; files stay open in it until their reads fail


def unwedge(mountpoint: str, wedged: tuple[int, Path], timeout: float = 10.0) -> None:
    """Abort the connection of the mount a killed daemon wedged (:func:`wedged_daemon`), so its
    last thread ends and lets go of the vault: the mount is then an ordinary dead one (ENOTCONN)
    for :func:`clean_dead_mount`."""
    from privifs import paths

    pid, state = wedged
    if not _abort_connection(mountpoint):
        raise LocalFileError(
            f"{mountpoint} hangs: its daemon (pid {pid}) was killed while the kernel held one of its threads, "
            f"which keeps the mount's connection open; run 'umount -f {mountpoint}' as root (it ends the "
            f"connection), then 'privifs mount {mountpoint}'"
        )
    deadline = time.monotonic() + timeout
    while paths.flock_holder(state / "lock") == pid and time.monotonic() < deadline:
        time.sleep(0.05)


def served_by_none(mountpoint: str) -> bool:
    """Whether no daemon serves the privifs mount at ``mountpoint`` (as the kernel's table spells
    it), so that it is to be detached: dead (ENOTCONN), or wedged by a killed daemon
    (:func:`wedged_daemon`), whose connection is ended here first (:func:`unwedge`)."""
    wedged = wedged_daemon(mountpoint)
    if wedged is None:
        return is_dead_mount(mountpoint)
    unwedge(mountpoint, wedged)
    return True


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
