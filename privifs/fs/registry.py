"""The mounts' registry and control sockets, as clients see them: where a daemon registers its
mount, where its control socket is, the live mounts, and one request to a daemon. Light to import:
``privifs status`` and ``privifs umount`` need nothing else of the daemon."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

from privifs import paths
from privifs.errors import ConfigError


def registry_path(mountpoint: Path) -> Path:
    """Where the daemon of ``mountpoint`` (an already resolved path: resolving a path inside our own
    mount from the daemon would deadlock) registers itself."""
    key = hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]
    return paths.runtime_dir() / "mounts" / f"{key}.json"


def control_socket_path(state_dir: Path) -> Path:
    """``control.sock`` in the state directory, or — when that path is too long for a Unix socket
    (108 bytes) — in a private ``/tmp/privifs-<uid>`` directory."""
    path = state_dir / "control.sock"
    if len(os.fsencode(path)) < 100:
        return path
    short = Path(f"/tmp/privifs-{os.getuid()}")
    short.mkdir(mode=0o700, exist_ok=True)
    st = short.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not short.is_dir() or short.is_symlink():
        raise ConfigError(f"{short} is not a private directory of yours; remove it")
    return short / f"{hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]}.sock"


def registered_daemon_runs(entry: dict) -> bool:
    """Whether the daemon that wrote the registry ``entry`` still runs: its pid is a live mount
    daemon's which (when the entry says when it started) started then."""
    pid, started = entry.get("pid"), entry.get("started")
    return (
        isinstance(pid, int)
        and paths.pid_alive(pid)
        and paths.is_mount_daemon(pid, started if isinstance(started, str) else None)
    )


def registered_mounts() -> list[dict]:
    out = []
    files = sorted(f for d in paths.runtime_dirs() for f in (d / "mounts").glob("*.json"))
    for f in files:
        try:
            entry = json.loads(paths.read_small(f))
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("pid"), int)
                and isinstance(entry.get("mountpoint"), str)
                and isinstance(entry.get("control"), str)
            ):
                raise ValueError("not a mount's entry")
            if not registered_daemon_runs(entry):
                raise ValueError("daemon gone (its pid may be another process's now)")
            out.append(entry)
        except (OSError, ValueError, RecursionError):
            f.unlink(missing_ok=True)
    return out


def control_request(entry: dict, request: dict, *, timeout: float | None = 30):
    """Send one request to a daemon's control socket; yields its answers (a generator)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(entry["control"])
        s.sendall(json.dumps(request).encode() + b"\n")
        f = s.makefile("rb")
        for line in f:
            yield json.loads(line)
