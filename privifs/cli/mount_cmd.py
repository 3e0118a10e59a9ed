"""``privifs mount``, ``privifs umount`` and ``privifs status``.

``mount`` returns once the drive is ready and leaves a daemon serving it (``--foreground`` stays
attached and logs to the terminal). With no configuration it provisions a profile and key on the
embedded engine first, and says where the key is.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from privifs import paths
from privifs.config import default_config_path, load
from privifs.errors import ConfigError, PrivifsError

READY_TIMEOUT = 180.0
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 2G)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def parse_octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser("mount", help="mount the vault as a drive", description=__doc__)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("--foreground", action="store_true", help="stay attached and log to the terminal")
    p.add_argument("--cache-dir", type=Path, help="where the encrypted read cache lives")
    p.add_argument("--cache-size", type=parse_size, default=parse_size("2G"), help="read cache limit (default 2G)")
    p.add_argument("--refresh-interval", type=float, default=30.0,
                   help="seconds between listing refreshes (default 30)")
    p.add_argument("--uid", type=int, default=os.getuid(), help="owner shown for files (default: you)")
    p.add_argument("--gid", type=int, default=os.getgid(), help="group shown for files (default: yours)")
    p.add_argument("--umask", type=parse_octal, default=0o022, help="umask for files without stored modes")
    p.add_argument("--read-only", action="store_true", help="mount read-only")
    p.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    p.add_argument("--upload-workers", type=int, default=4, help="parallel uploads (default 4)")
    p.add_argument("--write-back-delay", type=float, default=1.0,
                   help="seconds after the last close before a file is uploaded (default 1; fsync skips it)")
    p.add_argument("--fsync-timeout", type=float, default=300.0,
                   help="seconds fsync waits for the vault before failing with EIO (default 300)")
    p.add_argument("--state-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=run_mount)

    u = sub.add_parser("umount", help="upload what is pending and unmount")
    u.add_argument("mountpoint", type=Path)
    u.add_argument("--timeout", type=float, default=None, help="give up waiting for uploads after this many seconds")
    u.set_defaults(func=run_umount)

    s = sub.add_parser("status", help="pending uploads, cache, last refresh and errors of mounts")
    s.add_argument("mountpoint", type=Path, nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_status)


# -- mount ---------------------------------------------------------------------------------------
def _ensure_config(args: argparse.Namespace) -> Path:
    cfg_path = args.config or default_config_path()
    if cfg_path.exists():
        return cfg_path
    if os.environ.get("PRIVICORE_API_URL"):
        raise ConfigError("no configuration yet: run 'privifs init' (it reads PRIVICORE_API_URL and the "
                          "credentials) before mounting")
    from privifs.cli import init_cmd
    print("no configuration yet: provisioning a profile and key on the embedded engine", file=sys.stderr)
    init_args = argparse.Namespace(config=cfg_path, register=True, password_file=None, key_file=None, force=False)
    init_cmd.run(init_args)
    return cfg_path


def _mount_config(args: argparse.Namespace):
    from privifs.fs.daemon import MountConfig
    from privifs.fs.filesystem import MountOptions

    return MountConfig(
        mountpoint=args.mountpoint, cache_dir=args.cache_dir, cache_size=args.cache_size,
        refresh_interval=args.refresh_interval, upload_workers=max(1, args.upload_workers),
        write_back_delay=max(0.0, args.write_back_delay),
        allow_other=args.allow_other, state_dir=args.state_dir,
        fs=MountOptions(uid=args.uid, gid=args.gid, umask=args.umask, read_only=args.read_only,
                        fsync_timeout=args.fsync_timeout))


def run_mount(args: argparse.Namespace) -> int:
    cfg_path = _ensure_config(args)
    if not args.mountpoint.is_dir():
        raise ConfigError(f"mountpoint {args.mountpoint} does not exist or is not a directory")
    if args.foreground:
        return _run_daemon(args, cfg_path)
    cfg = load(cfg_path)
    from privifs.fs.daemon import default_state_dir
    state = args.state_dir or default_state_dir(cfg)
    paths.private_dir(state)
    log_path = state / "mount.log"
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "privifs", "--config", str(cfg_path)] + (["--debug"] if args.debug else []) + [
        "mount", "--foreground", "--ready-fd", str(w)] + _forward(args)
    with open(log_path, "ab") as logf:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(w,),
                                start_new_session=True)
    os.close(w)
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
        print(text[3:])
        return 0
    if proc.poll() is None and not text:
        proc.terminate()
        raise PrivifsError(f"the mount did not become ready within {READY_TIMEOUT:.0f}s; see {log_path}")
    raise PrivifsError((text[6:] if text.startswith("error ") else f"the mount daemon failed; see {log_path}"))


def _forward(args: argparse.Namespace) -> list[str]:
    out = [str(args.mountpoint.resolve()), "--cache-size", str(args.cache_size),
           "--refresh-interval", str(args.refresh_interval), "--uid", str(args.uid), "--gid", str(args.gid),
           "--umask", f"{args.umask:o}", "--upload-workers", str(args.upload_workers),
           "--write-back-delay", str(args.write_back_delay),
           "--fsync-timeout", str(args.fsync_timeout)]
    if args.cache_dir:
        out += ["--cache-dir", str(args.cache_dir.resolve())]
    if args.state_dir:
        out += ["--state-dir", str(args.state_dir.resolve())]
    if args.read_only:
        out.append("--read-only")
    if args.allow_other:
        out.append("--allow-other")
    return out


def _run_daemon(args: argparse.Namespace, cfg_path: Path) -> int:
    import trio

    from privifs.fs.daemon import Daemon

    cfg = load(cfg_path)
    daemon = Daemon(cfg, _mount_config(args))
    signalled = False

    def ready(message: str) -> None:
        nonlocal signalled
        signalled = True
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ok " + message.encode())
            os.close(args.ready_fd)
        else:
            print(f"{message} (Ctrl-C unmounts)", flush=True)

    try:
        trio.run(daemon.run, ready)
    except BaseException as exc:
        if not signalled and args.ready_fd is not None:
            from privifs.errors import first_privifs_error
            inner = exc if isinstance(exc, PrivifsError) else (
                first_privifs_error(exc) if isinstance(exc, BaseExceptionGroup) else None)
            text = str(inner) if inner is not None else f"the mount failed: {exc!r}"
            try:
                os.write(args.ready_fd, b"error " + text.encode())
            except OSError:
                pass
        raise
    return 0


# -- umount and status ---------------------------------------------------------------------------
def _entry(mountpoint: Path) -> dict | None:
    from privifs.fs.daemon import registered_mounts

    real = str(mountpoint.resolve())
    for entry in registered_mounts():
        if entry["mountpoint"] == real:
            return entry
    return None


def _is_fuse_mount(path: Path) -> bool:
    real = str(path.resolve())
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == real and "fuse" in line.split()[2] for line in f)
    except OSError:
        return False


def run_umount(args: argparse.Namespace) -> int:
    from privifs.fs.daemon import control_request

    entry = _entry(args.mountpoint)
    if entry is None:
        if _is_fuse_mount(args.mountpoint):
            subprocess.run(["fusermount3", "-u", str(args.mountpoint)], check=True, timeout=60)
            print(f"unmounted {args.mountpoint} (no daemon answered; pending changes stay staged)")
            return 0
        raise PrivifsError(f"{args.mountpoint} is not a privifs mount")
    bar = None
    result: dict = {}
    try:
        for answer in control_request(entry, {"cmd": "flush", "timeout": args.timeout}, timeout=None):
            if "progress" in answer:
                p = answer["progress"]
                if sys.stderr.isatty():
                    if bar is None:
                        from rich.console import Console
                        bar = Console(stderr=True)
                    bar.print(f"uploading: {p['pending']} pending ({p['bytes'] / 2**20:.1f} MiB), "
                              f"{p['deletes']} deletes", end="\r")
            else:
                result = answer
    except OSError as exc:
        raise PrivifsError(f"the mount daemon for {args.mountpoint} did not answer ({exc})") from None
    if bar is not None:
        bar.print(" " * 60, end="\r")
    if result.get("error"):
        print(f"privifs: warning: {result['error']}", file=sys.stderr)
    list(control_request(entry, {"cmd": "unmount"}))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not paths.pid_alive(entry["pid"]):
            break
        time.sleep(0.1)
    else:
        raise PrivifsError(f"the mount daemon (pid {entry['pid']}) did not exit; see its log")
    if _is_fuse_mount(args.mountpoint):
        raise PrivifsError(f"{args.mountpoint} is still mounted (busy?)")
    print(f"unmounted {args.mountpoint}")
    return 0


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"{time.strftime('%H:%M:%S', time.localtime(ts))} ({time.time() - ts:.0f}s ago)"


def run_status(args: argparse.Namespace) -> int:
    from privifs.fs.daemon import control_request, registered_mounts

    entries = registered_mounts()
    if args.mountpoint is not None:
        entries = [e for e in entries if e["mountpoint"] == str(args.mountpoint.resolve())]
        if not entries:
            raise PrivifsError(f"{args.mountpoint} is not a privifs mount")
    statuses = []
    for entry in entries:
        try:
            answers = list(control_request(entry, {"cmd": "status"}))
            statuses.append(answers[0]["status"])
        except (OSError, IndexError, KeyError) as exc:
            statuses.append({"mountpoint": entry["mountpoint"], "error": f"daemon not answering ({exc})"})
    if args.json:
        print(json.dumps(statuses if args.mountpoint is None else statuses[0], indent=2))
        return 0
    if not statuses:
        print("no privifs mounts")
    for st in statuses:
        if "error" in st:
            print(f"{st['mountpoint']}: {st['error']}")
            continue
        print(f"{st['mountpoint']}  ({st['server']}, pid {st['pid']})")
        conn = st.get("connection") or {}
        if conn and not conn.get("online"):
            print(f"  OFFLINE since {_ago(conn.get('offline_since'))}: {conn.get('offline_reason')}; cached files "
                  f"are readable, writes are staged; reconnecting in the background")
        print(f"  pending:      {len(st['pending'])} changes, {st['pending_bytes'] / 2**20:.1f} MiB to upload, "
              f"{st['pending_deletes']} deletes")
        for p in st["pending"][:20]:
            print(f"    {p['path']}  {p['size']} bytes  {p['kind']}  {p['state']}")
        if len(st["pending"]) > 20:
            print(f"    … and {len(st['pending']) - 20} more")
        print(f"  cache:        {st['cache']['size'] / 2**20:.1f} MiB of {st['cache']['limit'] / 2**20:.0f} MiB"
              f" ({st['cache']['dir']})")
        print(f"  staging:      {st['staging']['size'] / 2**20:.1f} MiB ({st['staging']['dir']})")
        print(f"  last refresh: {_ago(st['last_refresh'])}, every {st['refresh_interval']:.0f}s"
              + (f"; failed: {st['refresh_error']}" if st["refresh_error"] else ""))
        print(f"  last error:   {st['last_error'] or 'none'}"
              + (f" at {_ago(st['last_error_at'])}" if st["last_error"] else ""))
        for task in st.get("tasks", []):
            if task["failures"]:
                print(f"  task failed:  {task['name']}: {task['failures']} unexpected failures, last at "
                      f"{_ago(task['last_error_at'])}: {task['last_error']} (restarted; see mount.log)")
    return 0
