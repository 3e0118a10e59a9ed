"""``mount.fuse.privifs``: the helper mount(8) runs for ``mount -t fuse.privifs`` and fstab lines.

mount(8) calls ``/sbin/mount.fuse.privifs SOURCE DIR [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]``. The
helper turns the ``-o`` options into ``privifs mount DIR …`` (which returns once the drive is
ready, leaving its daemon behind) and exits with its status:

=====================================  ==========================================
``ro`` / ``rw``                        ``--read-only`` / default
``allow_other``                        ``--allow-other``
``noexec``                             ``--noexec``
``xattrs``                             ``--xattrs``
``nonempty``                           ``--nonempty``
``config=FILE``                        ``--config FILE`` (or SOURCE, if it is a file)
``cache_size=2G``, ``cache_dir=…``,    the ``privifs mount`` option of the same name
``refresh_interval=…``,
``upload_workers=…``,
``write_back_delay=…``,
``fsync_timeout=…``,
``server_timeout=…``, ``uid=…``,
``gid=…``, ``umask=…``,
``fsync=local``
``_netdev``, ``x-systemd.*``,          for mount(8) and systemd only: ignored here
``x-*``, ``comment=…``, ``defaults``,
``auto``, ``noauto``, ``nofail``,
``user``, ``users``, ``nouser``,
``exec``, ``suid``,
``nosuid``, ``dev``, ``nodev``,
``atime`` family, ``async``
=====================================  ==========================================

SOURCE is the mount's source in ``/proc/mounts``, ``df`` and ``findmnt -S`` (``privifs`` unless
another is given), so several privifs mounts can be told apart by their source. Any other option
is an error (``-s``, sloppy, ignores it instead). ``-o remount,…`` changes what the kernel holds
(the daemon goes on serving; it is asked only whether it runs read-only): ``ro``/``rw``,
``noexec``/``exec``, ``nosymfollow`` and the atime flags (:mod:`privifs.cli.remount`); other
options then stay as they were (unmount and mount again to change them). ``-f`` (fake) checks
the options and mounts nothing. Unmount with ``umount DIR`` (pending uploads are finished by
the daemon after the unmount, or at the next mount) or ``privifs umount DIR`` (waits for them).
"""

from __future__ import annotations

import argparse
import contextlib
import getopt
import io
import os
import sys
from pathlib import Path

VALUED = {
    "cache_size": "--cache-size",
    "cache_dir": "--cache-dir",
    "refresh_interval": "--refresh-interval",
    "upload_workers": "--upload-workers",
    "write_back_delay": "--write-back-delay",
    "fsync_timeout": "--fsync-timeout",
    "server_timeout": "--server-timeout",
    "fsync": "--fsync",
    "uid": "--uid",
    "gid": "--gid",
    "umask": "--umask",
}
USAGE, MOUNT_FAILED = 1, 32  # mount(8)'s exit codes: incorrect invocation, mount failure
FLAGS = {
    "ro": "--read-only",
    "allow_other": "--allow-other",
    "noexec": "--noexec",
    "xattrs": "--xattrs",
    "nonempty": "--nonempty",
}
IGNORED = {
    "rw",
    "_netdev",
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "exec",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "lazytime",
    "nolazytime",
    "diratime",
    "nodiratime",
    "async",
    "sync",
    "default_permissions",
}


class UsageError(Exception):
    pass


def translate(argv: list[str]) -> tuple[list[str], bool]:
    """mount(8)'s helper arguments → (the ``privifs`` arguments, fake)."""
    args, fake, _ = _translate(argv)
    return args, fake


def _translate(argv: list[str]) -> tuple[list[str], bool, bool]:
    """mount(8)'s helper arguments → (the ``privifs`` arguments, fake, verbose)."""
    try:
        opts, rest = getopt.gnu_getopt(argv, "sfnvo:t:N:")
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    if len(rest) != 2:
        raise UsageError("usage: mount.fuse.privifs SOURCE DIR [-sfnv] [-o OPTIONS]")
    source, mountpoint = rest
    sloppy = any(o == "-s" for o, _ in opts)
    fake = any(o == "-f" for o, _ in opts)
    verbose = any(o == "-v" for o, _ in opts)
    options = [part for o, v in opts if o == "-o" for part in v.split(",") if part]
    config: str | None = source if source not in ("", "none", "privifs") and Path(source).is_file() else None
    mount_args: list[str] = []
    remounting = "remount" in options  # mount -o remount,ro DIR: the kernel's part only (see main)
    for option in options:
        name, eq, value = option.partition("=")
        if remounting:  # an option unknown to a mount is as unknown to a remount (not 'kept')
            if not (sloppy or _remount_knows(name, eq)):
                raise UsageError(f"unknown mount option {option!r} (see 'pydoc privifs.cli.mount_helper')")
        elif name == "config" and eq:
            config = value
        elif name in VALUED and eq:
            mount_args += [VALUED[name], value]
        elif name in FLAGS and not eq:
            mount_args.append(FLAGS[name])
        elif name in IGNORED or name.startswith(("x-", "comment")):
            continue
        elif not sloppy:
            raise UsageError(f"unknown mount option {option!r} (see 'pydoc privifs.cli.mount_helper')")
    if remounting:
        return ["remount", mountpoint, *(o for o in options if o != "remount")], fake, verbose
    head = ["--config", config] if config else []
    if source not in ("", "none", "privifs"):  # shown as the mount's source (/proc/mounts, df, findmnt -S)
        mount_args += ["--fsname", source]
    return [*head, "mount", mountpoint, *mount_args], fake, verbose


def _remount_knows(name: str, eq: str) -> bool:
    """Whether ``name`` (``eq``: given with a value) is an option a remount may be given: one a
    mount takes, a flag the kernel switches, or one of the kernel's own FUSE options mount(8)
    repeats from the mount table."""
    from privifs.cli.remount import FLAG_OPTIONS, KERNEL_OPTIONS

    if eq:
        return name in VALUED or name == "config" or name in KERNEL_OPTIONS or name.startswith(("x-", "comment"))
    return name in ("remount", *FLAGS, *IGNORED, *FLAG_OPTIONS, "default_permissions") or name.startswith(
        ("x-", "comment")
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args, fake, verbose = _translate(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"mount.fuse.privifs: {exc}", file=sys.stderr)
        return USAGE
    if args[0] == "remount":
        return 0 if fake else _remount(args[1], args[2:])
    from privifs.config import default_config_path

    config = Path(args[1]) if args[0] == "--config" else default_config_path()
    if not config.is_file():
        # never let a boot-time mount provision a new, empty vault in place of the configured one
        print(
            f"mount.fuse.privifs: no privifs configuration at {config}; run 'privifs init' first "
            f"or give -o config=FILE",
            file=sys.stderr,
        )
        return MOUNT_FAILED
    if fake:
        return 0
    from privifs.cli import main as privifs_main
    from privifs.cli.failures import EXIT_USAGE

    try:
        # mount(8) and its helpers say nothing on success ('mounted … at DIR' only with -v): scripts
        # and test harnesses that mount compare their output; failures go to stderr, and so does
        # anything else privifs mount says (an OFFLINE start)
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):
                code = privifs_main(args)
        finally:
            for line in said.getvalue().splitlines():
                if verbose:
                    print(line)
                elif not (line.startswith("mounted ") and "OFFLINE" not in line):
                    print(line, file=sys.stderr)
    except SystemExit as exc:  # the command line refused an option value (argparse's exit 2)
        code = exc.code
        if code == EXIT_USAGE:
            return USAGE
    return MOUNT_FAILED if code else 0


def _remount(mountpoint: str, options: list[str]) -> int:
    from privifs.cli.remount import RemountError, remount

    status = _running_status(mountpoint)
    read_only = bool(status["read_only"]) if status is not None and "read_only" in status else None
    try:
        kept = remount(mountpoint, options, daemon_read_only=read_only)
    except RemountError as exc:
        print(f"mount.fuse.privifs: {exc}", file=sys.stderr)
        return MOUNT_FAILED
    kept = [
        o
        for o in kept
        if o.partition("=")[0] not in IGNORED and not o.startswith(("x-", "comment")) and not _as_running(o, status)
    ]
    if kept:
        print(
            f"mount.fuse.privifs: remounted {mountpoint}; a remount changes ro/rw, exec, nosymfollow and atime only, "
            f"so these stay as they were: {','.join(kept)} (unmount and mount again to change them)",
            file=sys.stderr,
        )
    return 0


def _as_running(option: str, status: dict | None) -> bool:
    """Whether the daemon already runs with ``option`` as given (its status's ``settings``, by
    option name): nothing for a remount to say it leaves as it was. mount(8) repeats an fstab
    line's options at every remount (README's line: ``cache_size=2G,config=…``), and each was
    named as "staying as it was" (helper hAN F1: xfstests' generic/294 and 452 failed on that
    line). A value is compared as the mount reads it, the daemon's read the same way."""
    from privifs.cli.options import parse_octal, parse_size

    settings = status.get("settings") if status is not None else None
    name, eq, value = option.partition("=")
    if not isinstance(settings, dict) or name not in settings:
        return False
    running = settings[name]
    if not eq:
        return name in FLAGS and running is True
    read = {
        "config": os.path.realpath,
        "cache_dir": os.path.realpath,
        "cache_size": parse_size,
        "fsync": str,
        "refresh_interval": float,
        "upload_workers": int,
        "write_back_delay": float,
        "server_timeout": float,
        "fsync_timeout": float,
        "uid": int,
        "gid": int,
        "umask": parse_octal,
    }.get(name)
    try:
        return read is not None and read(value) == read(str(running))
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        return False


def _running_status(mountpoint: str) -> dict | None:
    """The status of the daemon serving ``mountpoint``; None if it cannot be asked.

    mount(8) runs its helper without ``HOME`` (util-linux drops it from the environment), so
    the registry the helper reads is that of the home directory /etc/passwd names: a daemon
    started with another ``HOME`` (a container's, a test's) is not in it, and ``mount -o
    remount,rw`` of its read-only drive was done (the kernel said rw, every write EROFS). Such a
    daemon is then found through ``/proc``: the control sockets privifs mount daemons listen
    on, each asked which mountpoint it serves."""
    from privifs.cli.mounttable import registered_entry
    from privifs.kernelmounts import mount_path

    try:
        entry = registered_entry(Path(mountpoint))
    except (OSError, ValueError):
        entry = None
    real = mount_path(mountpoint)
    candidates = [entry["control"]] if entry is not None else _daemon_control_sockets(real)
    for control in candidates:
        status = _daemon_status(control)
        if status is not None and status.get("mountpoint") == real:
            return status
    return None


def _daemon_status(control: str) -> dict | None:
    from privifs.fs.registry import control_request

    try:
        for answer in control_request({"control": control}, {"cmd": "status"}, timeout=10):
            status = answer.get("status") if isinstance(answer, dict) else None
            if isinstance(status, dict):
                return status
    except (OSError, ValueError):
        pass
    return None


def _daemon_control_sockets(mountpoint: str) -> list[str]:
    """The listening Unix sockets named ``*.sock`` of every ``privifs mount`` process, those
    of a process given ``mountpoint`` on its command line first (each may take the control
    request's timeout to answer)."""
    import os

    from privifs.paths import is_mount_daemon

    try:
        with open("/proc/net/unix", errors="surrogateescape") as f:
            next(f, None)
            rows = [line.rstrip("\n").split(None, 7) for line in f]
    except OSError:
        return []
    bound = {row[6]: row[7] for row in rows if len(row) == 8 and row[7].endswith(".sock")}
    found: list[tuple[bool, str]] = []
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        if pid == os.getpid() or not is_mount_daemon(pid):
            continue
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                named = os.fsencode(mountpoint) in f.read().split(b"\0")
        except OSError:
            continue
        for link in links:
            path = bound.get(link.removeprefix("socket:[").removesuffix("]")) if link.startswith("socket:[") else None
            if path:
                found.append((not named, path))
    return list(dict.fromkeys(path for _, path in sorted(found)))


if __name__ == "__main__":
    sys.exit(main())
