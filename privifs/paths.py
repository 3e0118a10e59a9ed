"""Where privifs keeps things, following the XDG base directories (via platformdirs).

* config (``~/.config/privifs``): ``config.toml``, the AES key, the identity key, credentials
* data (``~/.local/share/privifs``): the embedded engine's vault
* state (``~/.local/state/privifs``): per-mount index, journal and staged (unuploaded) files
* cache (``~/.cache/privifs``): the encrypted read cache
* runtime (``$XDG_RUNTIME_DIR/privifs`` or the state dir): control sockets of running mounts
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import NamedTuple, Protocol

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


class Vault(Protocol):
    """What names a vault's directories (a :class:`privifs.config.Config`)."""

    embedded: bool
    api: str | None
    username: str | None


def vault_id(cfg: Vault) -> str:
    """The name of a vault's directories: one per server and account."""
    server = "embedded" if cfg.embedded else (cfg.api or "")
    return hashlib.sha256(f"{server}|{cfg.username}".encode()).hexdigest()[:16]


INDEX_NAME = "index.sqlite3"  # in a vault's state directory: its existence means a mount has started there


def vault_state_dir(cfg: Vault) -> Path:
    """Where a vault's index, staging, control socket and mount log live unless --state-dir says."""
    return state_dir() / "vaults" / vault_id(cfg)


def vault_cache_dir(cfg: Vault) -> Path:
    """Where a vault's encrypted read cache lives unless --cache-dir says."""
    return cache_dir() / "vaults" / vault_id(cfg)


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / APP if base else state_dir() / "run"


SESSION_RUNTIME = Path("/run/user")  # where a login session's XDG_RUNTIME_DIR is (systemd-logind)


def runtime_dirs() -> list[Path]:
    """Every runtime directory a mount of this user may have registered in: the current one; the
    state directory's, which a mount started without ``XDG_RUNTIME_DIR`` uses (at boot from
    fstab or ``mount -t fuse.privifs``, from cron) and a login shell must see too; and, from such
    a place, the login session's (``/run/user/UID``, when it is this user's)."""
    dirs = [runtime_dir(), state_dir() / "run"]
    if not os.environ.get("XDG_RUNTIME_DIR"):
        session = SESSION_RUNTIME / str(os.getuid())
        try:
            st = os.lstat(session)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                dirs.append(session / APP)
        except OSError:
            pass
    return list(dict.fromkeys(dirs))


def embedded_engine_dir() -> Path:
    return data_dir() / "engine"


def private_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700 and return it; missing parents are made 0700 as well (as
    the XDG base directory spec asks: made with the umask's mode, ``~/.config`` and
    ``~/.local/state`` were 0777 under umask 000, where another user could put a configuration
    of their own in place of this one)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
    except FileNotFoundError:
        private_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
    return path


class Shared(NamedTuple):
    """Why another local user may replace a path: the ``place`` (it or a directory above it) and
    ``why``; ``writable``: by every user (else it belongs to another user)."""

    place: Path
    why: str
    writable: bool


def shared_with_others(path: Path) -> Shared | None:
    """Whether another local user may replace ``path`` or what is in it, or None. Refused:
    ``path`` or any directory above it writable by every user (a directory with the sticky bit,
    like /tmp, is not: others cannot replace what is in it), ``path`` or its directory owned by a
    user other than the caller and root; so is the deepest directory above ``path`` that exists
    when its own directory does not: privifs would make the rest in it (root running with a
    user's HOME before that user set privifs up made a vault of root's there, with
    ``~/.config`` and the rest root's own, and locked the user out of it: helper hAO F2).
    Missing places are not judged otherwise (privifs makes them, 0700)."""
    path = path.absolute()
    found = False  # an existing place below was judged already
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        if st.st_mode & stat.S_IWOTH and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return Shared(p, f"is writable by every user (mode {stat.S_IMODE(st.st_mode):o})", True)
        if (p in (path, path.parent) or not found) and st.st_uid not in (os.geteuid(), 0):
            return Shared(p, f"belongs to another user (uid {st.st_uid})", False)
        found = True
    return None


def not_empty(mountpoint: Path) -> str | None:
    """Why ``mountpoint`` is refused for holding entries (a mount would hide them until the
    unmount), or None: empty, or not readable by this user (the mount itself tells then)."""
    try:
        with os.scandir(mountpoint) as entries:
            if next(entries, None) is None:
                return None
    except OSError:
        return None
    return (
        f"mountpoint {mountpoint} is not empty: the drive would hide what is in it until it is "
        f"unmounted; mount on an empty directory, or add --nonempty (fstab: nonempty) to mount over it"
    )


def _stat_field(pid: int, index: int) -> str | None:
    """Field ``index`` of ``/proc/PID/stat`` counted from the state (0; after the command name,
    which may hold spaces and parentheses), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[index].decode("ascii", "replace")
    except (OSError, IndexError):
        return None


def flock_holder(path: Path) -> int | None:
    """The pid of a process holding a flock on ``path`` (from ``/proc/locks``), if any."""
    try:
        st = path.stat()
        lines = Path("/proc/locks").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        try:
            kind, pid = fields[1], int(fields[4])
            major, minor, inode = (int(n, 16) if i < 2 else int(n) for i, n in enumerate(fields[5].split(":")))
        except (IndexError, ValueError):
            continue
        if kind == "FLOCK" and (major, minor, inode) == (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino):
            return pid
    return None


def lock_exclusively(f, grace: float = 0.5) -> bool:
    """Take the exclusive ``flock`` on the open file ``f`` (its descriptor, or an object with
    ``fileno``) unless another process holds it: False then. A holder gone within ``grace``
    seconds does not count: :func:`lock_held`'s probe holds a shared lock for an instant
    (``privifs status`` probes every vault), and a mount or engine starting in that instant was
    refused as "already mounted" / "already using" (hAT F6)."""
    deadline = time.monotonic() + grace
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def lock_held(lock: Path) -> bool:
    """Whether another process holds the ``flock`` on the file ``lock`` (a daemon its vault's,
    an engine its data directory's); False when there is no such file."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (and the shared lock taken, if it was, with it)
    return False


def open_files(pid: int) -> tuple[int, int] | None:
    """How many descriptors process ``pid`` has open and its soft limit of them (``ulimit -n``);
    None if that cannot be read (another user's process, or no such process)."""
    try:
        used = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/limits", errors="replace") as f:
            row = next(line for line in f if line.startswith("Max open files"))
        return used, int(row.split()[3])
    except (OSError, StopIteration, IndexError, ValueError):  # ("unlimited": not a number)
        return None


def process_state(pid: int) -> str | None:
    """The kernel's state letter of process ``pid`` (``R``, ``S``, ``D``, ``T`` stopped, ``t``
    stopped by a debugger, ``Z`` zombie, …), or None if there is no such process."""
    return _stat_field(pid, 0)


# where a privifs child process (a mount's daemon, an engine) runs: it must not keep the user's
# directory busy (that disk could not be unmounted while the mount runs), and no code may come
# from it (``python -m`` puts the working directory first on sys.path: a directory holding a
# ``privifs`` package, such as a checkout of another version, would run instead)
CHILD_CWD = "/"


def child_command(*args: str) -> list[str]:
    """The command line that runs ``privifs ARGS`` in a child process with this interpreter,
    never importing from the working directory (``-P``); start it with ``cwd=CHILD_CWD``, every
    path in ``args`` absolute."""
    return [sys.executable, "-P", "-m", APP, *args]


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: the directories
    that making ``path`` creates (for :func:`remove_made` to take back)."""
    out = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        out.append(p)
    return out


def remove_made(dirs: list[Path]) -> None:
    """Remove the directories :func:`missing_dirs` listed, deepest first, each only if it is
    empty (what anything else put there since stays, with the directories holding it)."""
    for d in dirs:
        try:
            d.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    return process_state(pid) not in (None, "Z", "X")


def process_started(pid: int) -> str | None:
    """When process ``pid`` started, as ``BOOT_ID:TICKS`` (the boot's id and the start time in
    clock ticks since boot): the same pid of another process, also after a reboot, differs."""
    ticks = _stat_field(pid, 19)  # starttime
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        return None
    return None if ticks is None else f"{boot}:{ticks}"


def is_mount_daemon(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` is a ``privifs mount`` (a daemon, background or foreground) and,
    with ``started`` (:func:`process_started` when it registered), the one that registered. A
    mount's registry entry outlives a crash, and after a reboot (a runtime directory on disk)
    its pid may belong to any other process, which status must not tell the user to kill: also
    another drive's daemon (helper hK: "kill -9" of a healthy mount's daemon was suggested)."""
    if started is not None and process_started(pid) != started:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"mount" in args and any(os.path.basename(a) == APP.encode() for a in args)


def pid_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, Ctrl-Z, a debugger): it answers nothing
    until it is continued."""
    return process_state(pid) in ("T", "t")


def write_json(path: Path, obj: object, *, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file renamed over it, so a reader
    sees the old content or the new, never half; no temporary file is left if that fails. The
    content is flushed before the rename: after a power cut the rename alone was on disk, and
    ``path`` was an empty file (helper hN: an engine's --urls-file, which it then refused)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=indent) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:  # a full disk, or the path is a directory
        tmp.unlink(missing_ok=True)
        raise


SMALL_FILE_LIMIT = 1 << 20


def read_small(path: Path, limit: int = SMALL_FILE_LIMIT, *, private: bool = False) -> bytes:
    """The content of a small regular file (a configuration, key, password or passphrase file).
    A FIFO, device or directory is refused instead of read (a FIFO blocked the command forever,
    ``/dev/zero`` filled the memory), so is a file above ``limit``, and with ``private`` (a
    file holding a secret) one that other users may access: OSError with a clear strerror."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            mode = stat.S_IMODE(st.st_mode)
            raise PermissionError(
                errno.EACCES, f"accessible by other users (mode {mode:o}); run 'chmod 600 {path}'", str(path)
            )
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes: not a privifs file", str(path))
        chunks = []
        while chunk := os.read(fd, limit + 1):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
