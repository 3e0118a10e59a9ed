"""Where privifs keeps things, following the XDG base directories (via platformdirs).

* config (``~/.config/privifs``): ``config.toml``, the AES key, the identity key, credentials
* data (``~/.local/share/privifs``): the embedded engine's vault
* state (``~/.local/state/privifs``): per-mount index, journal and staged (unuploaded) files
* cache (``~/.cache/privifs``): the encrypted read cache
* runtime (``$XDG_RUNTIME_DIR/privifs`` or the state dir): control sockets of running mounts
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "privifs"


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def state_dir() -> Path:
    return Path(platformdirs.user_state_dir(APP))


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP))


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / APP if base else state_dir() / "run"


def embedded_engine_dir() -> Path:
    return data_dir() / "engine"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 and return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
