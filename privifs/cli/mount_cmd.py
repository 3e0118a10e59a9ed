"""privifs mount: start the daemon that serves a mount and return once the drive is ready
(--foreground runs it in this process); the daemon's rotated log (MountLog)."""

from __future__ import annotations

import argparse
import errno
import logging
import logging.handlers
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from privifs import paths
from privifs.cli.commands import help_of
from privifs.cli.failures import (
    EXIT_INTERRUPTED,
    LOG_FORMAT,
    DropsUnwritable,
    ExitStatus,
    LocalFileError,
    OneLineFormatter,
    exit_code,
    leaves,
)
from privifs.cli.mounttable import clean_dead_mount, is_dead_mount, registered_entry, served_by_none
from privifs.cli.options import integer, is_utf8, parse_octal, parse_size, seconds
from privifs.config import default_config_path, load
from privifs.errors import ConfigError, PrivifsError
from privifs.kernelmounts import mount_path, privifs_mounts

READY_TIMEOUT = 180.0
STOP_GRACE = 20.0  # seconds a daemon stopped by Ctrl-C is given before SIGTERM, and after it
LOG_MAX_BYTES = 10 * 1024 * 1024
MOUNT_DESCRIPTION = """Mount the vault at MOUNTPOINT and return once the drive is ready, leaving a daemon
serving it (--foreground stays attached and logs to the terminal; otherwise it logs to mount.log
in the vault's state directory). With no configuration, the embedded engine's vault is used: the
one its data already holds, or a new one (privifs says where the key is). A mount left dead by a
killed daemon is cleaned up first."""
LOG_BACKUPS = 3


_OPTIONS: dict[str, argparse.Action] = {}  # dest -> the option's action: what [mount] may set
# dest -> the option's own default; the parser's is None, so that a value given on the command line
# (even one equal to the default) is told apart from one not given (see config_defaults)
_DEFAULTS: dict[str, object] = {}


def register(sub) -> None:
    p = sub.add_parser("mount", help=help_of("mount"), description=MOUNT_DESCRIPTION)
    p.add_argument("mountpoint", type=Path, help="an existing directory")
    p.add_argument("--foreground", action="store_true", help="stay attached and log to the terminal")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="where the encrypted read cache lives")
    p.add_argument(
        "--cache-size",
        type=parse_size,
        metavar="SIZE",
        default=parse_size("2G"),
        help="read cache limit, everything in its directory counted, e.g. 500M or 2G (default 2G)",
    )
    p.add_argument(
        "--refresh-interval",
        type=seconds(0.1),
        metavar="SECONDS",
        default=30.0,
        help="seconds between listing refreshes, at least 0.1 (default 30)",
    )
    p.add_argument(
        "--uid", type=integer(0), metavar="UID", default=os.getuid(), help="owner shown for files (default: you)"
    )
    p.add_argument(
        "--gid", type=integer(0), metavar="GID", default=os.getgid(), help="group shown for files (default: yours)"
    )
    p.add_argument(
        "--umask",
        type=parse_octal,
        metavar="MASK",
        default=0o022,
        help="octal umask for files without stored modes (default 022)",
    )
    p.add_argument("--read-only", action="store_true", help="mount read-only")
    p.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    p.add_argument("--noexec", action="store_true", help="no program on the mount can be executed")
    p.add_argument(
        "--nonempty",
        action="store_true",
        help="mount over a directory that is not empty (what is in it is hidden until the unmount)",
    )
    p.add_argument(
        "--xattrs",
        action="store_true",
        help="store extended attributes (user.*, trusted.*, security.*), encrypted; off by default, as "
        "with them the kernel asks the mount before every write (small writes take 40-60%% longer)",
    )
    p.add_argument(
        "--upload-workers",
        type=integer(1, 64),
        metavar="N",
        default=32,
        help="parallel uploads, 1 to 64 (default 32; at most 8 of them files over 256 KiB)",
    )
    p.add_argument(
        "--write-back-delay",
        type=seconds(0),
        metavar="SECONDS",
        default=1.0,
        help="seconds after the last close before a file is uploaded (default 1; fsync skips it)",
    )
    p.add_argument(
        "--fsync-timeout",
        type=seconds(0, inclusive=False),
        metavar="SECONDS",
        default=300.0,
        help="seconds fsync waits for the vault before failing with EIO (default 300)",
    )
    p.add_argument(
        "--server-timeout",
        type=seconds(1),
        metavar="SECONDS",
        default=30.0,
        help="seconds to wait for a server that accepts connections but does not answer: then a vault "
        "mounted here before starts offline, another fails; 'privifs umount' waits twice this for a "
        "server answering only with errors (default 30)",
    )
    p.add_argument(
        "--fsync",
        choices=("vault", "local"),
        default="vault",
        dest="fsync_mode",
        help="vault (default): fsync returns once the change is in the vault; local: once it is "
        "durable on this disk, the upload follows (a lost machine loses it until then)",
    )
    p.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    # the source mount(8) was given (mount.fuse.privifs SOURCE DIR): the mount's name in /proc/mounts
    p.add_argument("--fsname", default="privifs", help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", type=Path, help=argparse.SUPPRESS)
    p.set_defaults(func=run_mount)
    _OPTIONS.clear()
    _OPTIONS.update(
        (a.dest, a)
        for a in p._actions
        if a.option_strings and a.help != argparse.SUPPRESS and a.dest not in ("help", "foreground")
    )
    _DEFAULTS.clear()
    for action in _OPTIONS.values():
        _DEFAULTS[action.dest], action.default = action.default, None


def config_defaults(args: argparse.Namespace, section: dict, cfg_path: Path) -> None:
    """The configuration's ``[mount]`` values (``cache_size = "5G"``, ``fsync = "local"``,
    ``allow_other = true``, …) for the options the command line did not give, then the options'
    own defaults for the rest; a name or value the option would refuse is a ConfigError (they were
    ignored without a word before)."""
    for key, value in section.items():
        name = str(key).replace("-", "_")
        action = _OPTIONS.get("fsync_mode" if name == "fsync" else name)
        if action is None:
            known = ", ".join(sorted("fsync" if d == "fsync_mode" else d for d in _OPTIONS))
            raise ConfigError(f"{cfg_path}: [mount] has no setting {key!r} (it takes: {known})")
        if getattr(args, action.dest) is not None:
            continue  # the command line wins
        where = f"{cfg_path}: [mount] {key} = {value!r}"
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: must be true or false")
            setattr(args, action.dest, value)
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: must be a string or a number")
        text = str(value)
        if action.choices is not None and text not in action.choices:
            raise ConfigError(f"{where}: must be one of {', '.join(action.choices)}")
        try:
            setattr(args, action.dest, action.type(text) if action.type is not None else text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    for dest, default in _DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)


# -- mount ---------------------------------------------------------------------------------------
def _ensure_config(args: argparse.Namespace) -> Path:
    cfg_path = args.config or default_config_path()
    if cfg_path.exists():
        return cfg_path
    if os.environ.get("PRIVICORE_API_URL"):
        raise ConfigError(
            "no configuration yet: run 'privifs init' (it reads PRIVICORE_API_URL and the credentials) before mounting"
        )
    from privifs.cli import init_cmd

    with init_cmd.setup_lock(cfg_path):
        if cfg_path.exists():  # another first mount (or an init) made it meanwhile: that vault
            return cfg_path
        print("no configuration yet: setting up the embedded engine's vault", file=sys.stderr)
        init_args = argparse.Namespace(config=cfg_path, register=False, password_file=None, key_file=None, force=False)
        init_cmd.set_up(init_args)
    return cfg_path


def _mount_config(args: argparse.Namespace):
    from privifs.fs.daemon import MountConfig
    from privifs.fs.filesystem import MountOptions

    return MountConfig(
        mountpoint=args.mountpoint,
        cache_dir=args.cache_dir,
        cache_size=args.cache_size,
        refresh_interval=args.refresh_interval,
        upload_workers=args.upload_workers,
        write_back_delay=args.write_back_delay,
        server_timeout=args.server_timeout,
        allow_other=args.allow_other,
        noexec=args.noexec,
        nonempty=args.nonempty,
        state_dir=args.state_dir,
        fsname=args.fsname,
        fs=MountOptions(
            uid=args.uid,
            gid=args.gid,
            umask=args.umask,
            read_only=args.read_only,
            fsync_timeout=args.fsync_timeout,
            fsync_mode=args.fsync_mode,
            xattrs=args.xattrs,
        ),
    )


def _check_mountpoint(mountpoint: Path) -> None:
    """A usable, unmounted directory; a mount left dead by a killed daemon is cleaned up first
    (whether it is empty the daemon tells, after it checked its own directories are not in it)."""
    real = mount_path(mountpoint)
    if not is_utf8(real):  # the mountpoint is recorded in text files (the vault's marker, the mount registry)
        raise ConfigError(
            f"the mountpoint {os.fsencode(real)!r} is not valid UTF-8; mount on a directory whose path is"
        )
    if real in privifs_mounts():
        if registered_entry(mountpoint) is not None or not served_by_none(real):
            raise LocalFileError(f"{mountpoint} is already mounted (see 'privifs status {mountpoint}')")
        clean_dead_mount(real)
        print(
            f"privifs: {mountpoint} was left mounted by a daemon that died; cleaned it up (its staged "
            f"changes are kept, and uploaded once the vault is mounted)",
            file=sys.stderr,
        )
    elif is_dead_mount(real):
        raise ConfigError(
            f"{mountpoint} is a dead mount of another filesystem; unmount it first "
            f"('fusermount3 -u {mountpoint}' or 'umount -l {mountpoint}')"
        )
    if not mountpoint.is_dir():
        raise LocalFileError(f"mountpoint {mountpoint} does not exist or is not a directory")


def run_mount(args: argparse.Namespace) -> int:
    try:
        _check_mountpoint(args.mountpoint)
    except PrivifsError as exc:
        # the daemon started by 'privifs mount' checks again (another mount may have come first
        # meanwhile): its parent waits for the answer on the ready pipe, not for its exit status
        _tell_parent(args, f"{exit_code(exc)} {exc}")
        raise
    if not args.nonempty and not (args.config or default_config_path()).exists():
        # a first mount: refused before it sets up a vault (the daemon checks again, after its
        # own directories, which may be in a mountpoint it was given)
        refusal = paths.not_empty(args.mountpoint)
        if refusal:
            raise LocalFileError(refusal)
    cfg_path = _ensure_config(args)
    cfg = load(cfg_path)
    config_defaults(args, cfg.mount, cfg_path)
    if args.foreground:
        return _run_daemon(args, cfg_path)
    state = (args.state_dir or paths.vault_state_dir(cfg)).absolute()
    made = paths.missing_dirs(state)
    paths.private_dir(state)
    log_path = state / "mount.log"
    r, w = os.pipe()
    cmd = paths.child_command(
        "--config",
        str(cfg_path.absolute()),
        *(["--debug"] if args.debug else []),
        "mount",
        "--foreground",
        "--ready-fd",
        str(w),
        "--log-file",
        str(log_path),
        *_forward(args),
    )
    with open(log_path, "ab") as logf:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            pass_fds=(w,),
            start_new_session=True,
            cwd=paths.CHILD_CWD,
        )
    os.close(w)
    try:
        return _await_daemon(args, proc, r, log_path, made)
    except KeyboardInterrupt:
        _stop_daemon(proc, args.mountpoint, log_path, made)
        raise


def _await_daemon(args: argparse.Namespace, proc: subprocess.Popen, r: int, log_path: Path, made: list[Path]) -> int:
    """Wait for the daemon started at ``proc`` to say on the ready pipe ``r`` that it mounted."""
    message = b""
    deadline = time.monotonic() + READY_TIMEOUT
    with os.fdopen(r, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if ready:
                chunk = pipe.read1(4096)
                if not chunk:
                    break
                message += chunk
            elif proc.poll() is not None:
                break
    text = message.decode(errors="replace").strip()
    if text.startswith("ok "):
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # mounted: a Ctrl-C now would not undo it, nor be said
        print(text[3:])
        return 0
    if not text:
        try:  # the pipe closed: the daemon is ending (give it a moment to say how), or it hangs
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None and not text:
        proc.terminate()
        raise PrivifsError(f"the mount did not become ready within {READY_TIMEOUT:.0f}s; see {log_path}")
    if text.startswith("error "):
        code, _, message_text = text[6:].partition(" ")
        if code.isdigit() and made:  # said in full: a first mount that failed leaves no state behind
            _forget_log(proc, log_path, made)
        raise ExitStatus(message_text, int(code)) if code.isdigit() else PrivifsError(text[6:])
    raise PrivifsError(f"the mount daemon failed; see {log_path}")


def _stop_daemon(proc: subprocess.Popen, mountpoint: Path, log_path: Path, made: list[Path]) -> None:
    """Ctrl-C while the daemon was starting: it runs in a session of its own (so that closing the
    terminal leaves a mount up), so the interrupt did not reach it, and the drive mounted after
    'privifs mount' had said "interrupted". It is sent SIGINT now, which stops it at every stage:
    before it serves the mount (it logs out, stops the embedded engine it started, and a first
    mount takes back what it made) and once mounted (it unmounts). SIGTERM follows if it has not
    ended after STOP_GRACE seconds (a drain of changes staged before is then left for the next
    mount). A daemon that still does not end is said to go on in the background."""
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    try:
        proc.send_signal(signal.SIGINT)
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (None, STOP_GRACE)):
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                if sig is not None:
                    proc.send_signal(sig)
        if proc.poll() is None:
            raise ExitStatus(
                f"interrupted, but the mount daemon (pid {proc.pid}) did not stop within {2 * STOP_GRACE:.0f}s: "
                f"it goes on in the background ('privifs status {mountpoint}'; 'privifs umount {mountpoint}' "
                f"once it is mounted, or 'kill {proc.pid}'; see {log_path})",
                EXIT_INTERRUPTED,
            )
        real = mount_path(mountpoint)
        if real in privifs_mounts() and is_dead_mount(real):  # killed by the SIGTERM while mounted
            clean_dead_mount(real)
        if made:
            _forget_log(proc, log_path, made)
    finally:
        signal.signal(signal.SIGINT, before)


def _forget_log(proc: subprocess.Popen, log_path: Path, made: list[Path]) -> None:
    """Remove the log of a daemon that failed to mount with an error it reported in full, and
    the state directories made for it, once the daemon has ended (it takes back what it made
    itself; see ``Daemon._forget_first_mount``). A daemon that does not end keeps them."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        return
    for f in log_path.parent.glob(log_path.name + "*"):
        f.unlink(missing_ok=True)
    paths.remove_made(made)


def _forward(args: argparse.Namespace) -> list[str]:
    out = [
        str(args.mountpoint.resolve()),
        "--cache-size",
        str(args.cache_size),
        "--refresh-interval",
        str(args.refresh_interval),
        "--uid",
        str(args.uid),
        "--gid",
        str(args.gid),
        "--umask",
        f"{args.umask:o}",
        "--upload-workers",
        str(args.upload_workers),
        "--write-back-delay",
        str(args.write_back_delay),
        "--fsync-timeout",
        str(args.fsync_timeout),
        "--server-timeout",
        str(args.server_timeout),
        "--fsync",
        args.fsync_mode,
    ]
    if args.cache_dir:
        out += ["--cache-dir", str(args.cache_dir.resolve())]
    if args.state_dir:
        out += ["--state-dir", str(args.state_dir.resolve())]
    if args.fsname != "privifs":
        out += ["--fsname", args.fsname]
    if args.read_only:
        out.append("--read-only")
    if args.allow_other:
        out.append("--allow-other")
    if args.noexec:
        out.append("--noexec")
    if args.nonempty:
        out.append("--nonempty")
    if args.xattrs:
        out.append("--xattrs")
    return out


class MountLog(DropsUnwritable, logging.handlers.RotatingFileHandler):
    """The daemon's log, rotated at ``max_bytes`` (``mount.log.1`` …); ``fds`` (the daemon's
    stdout and stderr) follow the current file, so stray output is rotated with it."""

    def __init__(
        self, path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS, fds: tuple[int, ...] = (1, 2)
    ):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups)
        self.setFormatter(OneLineFormatter(LOG_FORMAT))
        self.fds = fds
        self._follow()

    def _follow(self) -> None:
        if self.stream is not None:
            os.chmod(self.baseFilename, 0o600)
            for fd in self.fds:
                os.dup2(self.stream.fileno(), fd)

    def doRollover(self) -> None:
        super().doRollover()
        self._follow()


def _log_to_file(path: Path) -> None:
    handler = MountLog(path)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


def _size(path: Path | None) -> int:
    try:
        return os.stat(path).st_size if path is not None else 0
    except OSError:
        return 0


def _tell_parent(args: argparse.Namespace, text: str) -> None:
    """Why the mount failed, for the 'privifs mount' that started this daemon (if one did)."""
    if args.ready_fd is None:
        return
    try:
        os.write(args.ready_fd, b"error " + text.encode())
    except OSError:
        pass


FUSE_DEVICE = "/dev/fuse"


def _fuse_device_error(exc: OSError) -> LocalFileError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return LocalFileError(
            f"cannot open {FUSE_DEVICE}: permission denied; mounting needs read and write access to it (usually "
            f"'crw-rw-rw-'; an administrator can run 'chmod 666 {FUSE_DEVICE}' or give you a group that has it)"
        )
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return LocalFileError(
            f"cannot open {FUSE_DEVICE}: there is no FUSE device (load the kernel module: 'modprobe fuse'; "
            f"in a container, pass the device in, e.g. 'docker run --device {FUSE_DEVICE}')"
        )
    return LocalFileError(f"cannot open {FUSE_DEVICE}: {exc.strerror or exc}")


def check_fuse_device() -> None:
    """The FUSE device can be opened, as fusermount3 opens it (with the user's own rights): a user
    without access to it got "the mount failed (RuntimeError: fuse_session_mount failed)", filed in
    cli.log as an internal error, after the daemon had logged in to the server."""
    try:
        os.close(os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise _fuse_device_error(exc) from None


def _fuse_refusal(exc: BaseException, log_file: Path | None, log_start: int) -> LocalFileError | None:
    """The error for pyfuse3's "fuse_session_mount failed" (libfuse or fusermount3 refused the
    mount: a mountpoint not yours, allow_other not allowed in /etc/fuse.conf …), with the reason
    they wrote to stderr, which is the log file (from ``log_start`` on); None for anything else."""

    if not any(isinstance(e, RuntimeError) and "fuse_session_mount" in str(e) for e in leaves(exc)):
        return None
    reason = None
    if log_file is not None:
        try:
            with open(log_file, "rb") as f:
                f.seek(log_start)
                lines = f.read(1 << 20).decode(errors="replace").splitlines()
            said = [line.strip() for line in lines if line.startswith(("fuse:", "fusermount"))]
            reason = said[-1] if said else None
        except OSError:
            pass
    where = f" ({reason})" if reason else (f"; see {log_file}" if log_file else " (the reason is above)")
    return LocalFileError(f"the mount was refused{where}")


def _run_daemon(args: argparse.Namespace, cfg_path: Path) -> int:
    import trio

    from privifs.fs.daemon import Daemon
    from privifs.limits import raise_limits
    from privifs.memory import bound_allocator

    if args.log_file is not None:
        _log_to_file(args.log_file)
    log_start = _size(args.log_file)
    try:
        check_fuse_device()  # before logging in to the server, and said in one line
    except LocalFileError as exc:
        _tell_parent(args, f"{exit_code(exc)} {exc}")
        raise
    bound_allocator()
    raise_limits()
    cfg = load(cfg_path)
    daemon = Daemon(cfg, _mount_config(args))
    signalled = False

    def ready(message: str) -> None:
        nonlocal signalled
        signalled = True
        if args.ready_fd is not None:
            try:
                os.write(args.ready_fd, b"ok " + message.encode())
            except OSError:  # the 'privifs mount' waiting for this was killed: the mount is up all the same
                logging.getLogger("privifs.cli").info("the command that started this mount is gone; %s", message)
            finally:
                os.close(args.ready_fd)
        else:
            print(f"{message} (Ctrl-C unmounts)", flush=True)

    try:
        trio.run(daemon.run, ready)
    except BaseException as exc:
        from privifs.errors import first_privifs_error

        inner = (
            exc
            if isinstance(exc, PrivifsError)
            else (first_privifs_error(exc) if isinstance(exc, BaseExceptionGroup) else None)
        )
        refused = _fuse_refusal(exc, args.log_file, log_start) if inner is None else None
        if refused is not None:
            if not signalled:
                _tell_parent(args, f"{exit_code(refused)} {refused}")
            raise refused from None
        if inner is None and not isinstance(exc, KeyboardInterrupt):
            logging.getLogger("privifs.cli").exception("the mount daemon failed")  # the traceback, in its log
        if not signalled:
            if inner is not None:
                _tell_parent(args, f"{exit_code(inner)} {inner}")
            else:
                _tell_parent(args, f"the mount failed ({type(exc).__name__}: {exc}); see {args.log_file or 'its log'}")
        raise
    return 0
