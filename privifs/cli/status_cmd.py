"""privifs umount and privifs status: talk to a mount's daemon over its control socket, and
show or clean up mounts whose daemon died."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from privifs import paths
from privifs.cli.commands import help_of
from privifs.cli.failures import EXIT_DEAD_MOUNT, EXIT_STAGED, ExitStatus, LocalFileError
from privifs.cli.mounttable import (
    clean_dead_mount,
    dead_mounts,
    is_dead_mount,
    my_mountpoints,
    registered_entry,
    served_by_none,
    staged_left,
    waiting_vaults,
    wedged_daemon,
)
from privifs.cli.options import seconds
from privifs.errors import ConfigError, PrivifsError
from privifs.kernelmounts import is_fuse_mount, mount_options, mount_path, privifs_mounts
from privifs.words import count, printable, verb

EVENTS_GRACE = 30.0  # seconds the event channel may be down (a reconnect) before status names it
ANSWER_TIMEOUT = 30.0  # longest silence of a daemon's control socket during umount's flush
# how long status waits for a daemon's answer: a live daemon answers in milliseconds (its
# control server runs on the FUSE loop, which never blocks); one that stays silent this long is
# shown as not answering rather than holding the command up
STATUS_TIMEOUT = 3.0
PENDING_LISTED = 20  # pending changes status prints by name (the daemon sends the first 50)


def register(sub) -> None:
    u = sub.add_parser(
        "umount",
        help=help_of("umount"),
        description="Upload what is pending (progress on a terminal), then unmount. Exits with "
        "7 if changes could not be uploaded: they stay staged and are uploaded at "
        "the next mount. A mount whose daemon died is cleaned up.",
    )
    u.add_argument("mountpoint", type=Path, help="the directory the drive is mounted at")
    u.add_argument(
        "--timeout",
        type=seconds(0, inclusive=False),
        metavar="SECONDS",
        default=None,
        help="give up waiting for uploads after this many seconds",
    )
    u.set_defaults(func=run_umount)

    s = sub.add_parser(
        "status",
        help=help_of("status"),
        description="Show each privifs mount: pending uploads, cache, last refresh and errors; "
        "a mount whose daemon died, is stopped or does not answer is shown with how to recover "
        "(exit code 8).",
    )
    s.add_argument(
        "mountpoint", type=Path, nargs="?", help="the directory a drive is mounted at (default: every mount of yours)"
    )
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=run_status)


class UploadProgress:
    """``umount``'s progress on a terminal: bytes uploaded of the bytes pending at the start
    (growing if more is written meanwhile), files and deletes left; silent otherwise."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total = 0
        self.shown = False

    def line(self, p: dict) -> str:
        self.total = max(self.total, p["bytes"])
        done = self.total - p["bytes"]
        return (
            f"uploading: {_bytes(done)} of {_bytes(self.total)} "
            f"({100 * done // self.total if self.total else 100}%), {count(p['pending'], 'change')} and "
            f"{count(p['deletes'], 'delete')} left"
        )

    def update(self, p: dict) -> None:
        text = self.line(p)
        if self.stream.isatty():
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_umount(args: argparse.Namespace) -> int:
    from privifs.fs.registry import control_request

    entry = registered_entry(args.mountpoint)
    if entry is None:
        # only a privifs mount whose daemon is gone is detached here: an unregistered live one
        # is another user's (or another HOME's), and another filesystem (sshfs, rclone …) is
        # none of privifs's business; both were detached, lazily when busy
        real = mount_path(args.mountpoint)
        if real in privifs_mounts():
            if not served_by_none(real):
                raise _foreign(args.mountpoint, "umount")
            return _unmount_dead(args.mountpoint, "its daemon had died")
        raise LocalFileError(f"{args.mountpoint} is not a privifs mount")
    if paths.pid_stopped(entry["pid"]):
        raise PrivifsError(
            f"the mount daemon for {args.mountpoint} did not answer (it is stopped: 'kill -CONT "
            f"{entry['pid']}' lets it go on); 'fusermount3 -u {args.mountpoint}' unmounts it anyway"
        )
    _refuse_if_held(args.mountpoint)
    progress = UploadProgress()
    result: dict = {}
    try:
        # a flushing daemon answers every 0.25 s (progress) and its first try to reach an
        # offline vault takes 10 s at most: a silence of ANSWER_TIMEOUT is a daemon that hangs
        looked = time.monotonic()
        for answer in control_request(entry, {"cmd": "flush", "timeout": args.timeout}, timeout=ANSWER_TIMEOUT):
            if "progress" in answer:
                progress.update(answer["progress"])
                _refuse_if_writing(args.mountpoint, answer["progress"].get("writer"))
                if time.monotonic() - looked >= HOLDERS_EVERY:
                    # a program writing one file after another holds one only now and then: the
                    # first look missed it, and the upload followed what it wrote for minutes (hAH F2)
                    _refuse_if_held(args.mountpoint)
                    looked = time.monotonic()
            else:
                result = answer
    except OSError as exc:
        if _ended(entry["pid"]):  # killed or crashed while it uploaded
            return _unmount_dead(args.mountpoint, "its daemon died while it uploaded")
        raise _no_answer(args.mountpoint, entry["pid"], exc) from None
    finally:
        progress.close()
    if not result and _ended(entry["pid"]):  # its answers stopped: it died during the flush
        return _unmount_dead(args.mountpoint, "its daemon died while it uploaded")
    # when the flush gave up, the daemon ends without draining the uploads again (the user was
    # told how long to wait; what is left is uploaded by the next mount)
    try:
        for answer in control_request(entry, {"cmd": "unmount", **({"drain": 0} if result.get("error") else {})}):
            if answer.get("busy"):
                raise LocalFileError(
                    f"{answer['error']} ('fuser -vm {args.mountpoint}' lists them): close them and try again; "
                    "it stays mounted"
                )
    except OSError as exc:
        if _ended(entry["pid"]):  # killed or crashed between the flush and the unmount
            return _unmount_dead(args.mountpoint, "its daemon died while it unmounted")
        raise _no_answer(args.mountpoint, entry["pid"], exc) from None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if not paths.pid_alive(entry["pid"]):
            break
        time.sleep(0.1)
    else:
        raise PrivifsError(f"the mount daemon (pid {entry['pid']}) did not exit; see its log")
    if is_fuse_mount(args.mountpoint):
        if is_dead_mount(args.mountpoint):  # it ended without unmounting: killed while it drained
            return _unmount_dead(args.mountpoint, "its daemon died while it unmounted")
        raise PrivifsError(f"{args.mountpoint} is still mounted (busy?)")
    if result.get("error"):
        raise ExitStatus(
            f"unmounted {args.mountpoint}, but not everything was uploaded: {result['error']}", EXIT_STAGED
        )
    print(f"unmounted {args.mountpoint}")
    return 0


HOLDERS_LISTED = 3  # how many of the programs keeping a mount busy umount names
HOLDERS_EVERY = 1.0  # seconds between umount's looks for them while it uploads


def _refuse_if_held(mountpoint: Path) -> None:
    """Refuse at once (exit 4, it stays mounted) when programs keep the mount busy, or a mount
    inside it does: the kernel refuses the unmount anyway, and it did so only after the upload,
    which went on for minutes while they wrote (helper hAE F2). What only the kernel still holds
    (a read-ahead in flight after its program closed the file) is no reason to refuse."""
    from privifs.cli.holders import busy

    found = busy(mount_path(mountpoint))
    if found.elsewhere:
        raise LocalFileError(
            f"{mountpoint} is also mounted at {_first_of(found.elsewhere, 'other place')} (a bind mount, a "
            "container's volume): unmount it there first, or it would be left without its daemon ('Transport "
            "endpoint is not connected'); it stays mounted, and uploads what is pending"
        )
    if found.inside:
        raise LocalFileError(
            f"{mountpoint} is busy: {_first_of(found.inside, 'other mount')} is mounted inside it: unmount that "
            "first; it stays mounted, and uploads what is pending"
        )
    if found.held:
        held = found.held
        named = "; ".join(printable(str(h)) for h in held[:HOLDERS_LISTED])
        named += "; …" if len(held) > HOLDERS_LISTED else ""
        raise LocalFileError(
            f"{mountpoint} is busy: {named} ('fuser -vm {mountpoint}' lists them): close them and try "
            "again; it stays mounted, and uploads what is pending"
        )


def _refuse_if_writing(mountpoint: Path, writer: dict | None) -> None:
    """Stop at a program that opened a file for writing since the upload began (the daemon says
    which): a loop writing one file after another kept the upload going for minutes, holding a
    file only now and then, so the looks in /proc missed it (helper hAI N1)."""
    if writer:
        from privifs.cli.holders import process_of, program

        pid = process_of(writer["pid"])
        raise LocalFileError(
            f"{mountpoint} is busy: {printable(program(pid))} (pid {pid}) began writing "
            f"'{printable(str(mountpoint).rstrip('/') + writer['path'])}' while it uploaded: stop it and try "
            "again; it stays mounted, and uploads what is pending"
        )


def _first_of(places: list[str], others: str) -> str:
    """The first of ``places``, and how many ``others`` there are besides."""
    return printable(places[0]) + (f" (and {count(len(places) - 1, others)})" if len(places) > 1 else "")


def _foreign(mountpoint: Path, command: str) -> ConfigError:
    """The error for a live privifs mount this user's registry does not hold (``status`` said it
    was "not a privifs mount" while ``umount`` said this), with what its owner, or root, can do:
    ``fusermount3 -u`` works only for the user who mounted it (helper hAD F7)."""
    there = f"'privifs {command} {shlex.quote(str(mountpoint))}'"
    owner = next((o.split("=", 1)[1] for o in mount_options(mount_path(mountpoint)) if o.startswith("user_id=")), None)
    if owner is not None and owner != str(os.getuid()):
        who = f"another user (uid {owner})"
        how = f"that user runs {there}" + (
            f", or root 'umount {shlex.quote(str(mountpoint))}' to unmount it anyway" if command == "umount" else ""
        )
    else:
        who = "this user with another HOME"
        how = f"run {there} with that HOME" + (
            f", or 'fusermount3 -u {shlex.quote(str(mountpoint))}' to unmount it anyway" if command == "umount" else ""
        )
    return ConfigError(f"{mountpoint} is served by a privifs daemon {who} started: {how}")


def _no_answer(mountpoint: str, pid: int, exc: OSError) -> PrivifsError:
    """The error for a daemon whose control socket did not answer ``umount``."""
    return PrivifsError(
        f"the mount daemon for {mountpoint} did not answer ({_silence(pid, exc)}); "
        f"'fusermount3 -u {mountpoint}' unmounts it anyway"
    )


def _ended(pid: int, wait: float = 2.0) -> bool:
    """Whether daemon ``pid`` is gone (a process being killed closes its sockets a moment before
    it is a zombie: waits up to ``wait`` seconds for that)."""
    deadline = time.monotonic() + wait
    while paths.pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _unmount_dead(mountpoint: str, why: str | None) -> int:
    """Detach a mount whose daemon is gone and say what it left staged (uploaded by the next mount)."""
    why = why or "no daemon answered"
    if is_fuse_mount(mountpoint):
        clean_dead_mount(mount_path(mountpoint))
    left = staged_left(mountpoint)
    if left is not None:
        raise ExitStatus(
            f"unmounted {mountpoint} ({why}); {count(left[0], 'file')} it had not uploaded "
            f"{verb(left[0], 'stays', 'stay')} staged in {left[1]}, to be uploaded at the next mount",
            EXIT_STAGED,
        )
    print(f"unmounted {mountpoint} ({why})")
    return 0


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"{time.strftime('%H:%M:%S', time.localtime(ts))} ({time.time() - ts:.0f}s ago)"


def _refresh_every(st: dict) -> str:
    """How often the whole vault is listed: --refresh-interval, or longer in a vault so big that
    listing it takes a good share of that (status said "every 30s" where it was every 230s)."""
    every, interval = st.get("refresh_every", st["refresh_interval"]), st["refresh_interval"]
    if every <= interval:
        return f"every {interval:g}s"
    return (
        f"every {every:.0f}s (listing this vault takes {st['listing_seconds']:.1f}s; --refresh-interval "
        f"{interval:g}s; other clients' changes come through the event channel meanwhile)"
    )


def _fsync_line(fsync: dict | None) -> str | None:
    """What fsync means on this mount; with ``--fsync local``, how much is only on this machine."""
    if not fsync:
        return None
    if fsync["mode"] != "local":
        return "  fsync:        vault (returns once the change is in the vault)"
    return (
        f"  fsync:        LOCAL (returns once the change is on this disk): "
        f"{count(fsync['not_in_vault'], 'change')} not in the vault yet "
        f"({fsync['fsynced_not_in_vault']} of them fsynced); losing this machine "
        f"loses them, other clients do not see them yet"
    )


def _remount(mountpoint: str) -> str:
    """The command that brings a dead mount back (meant to be pasted into a shell)."""
    quoted = shlex.quote(mountpoint)
    return f"privifs umount {quoted} && privifs mount {quoted}   (or just: privifs mount {quoted})"


def _dead_status(mountpoint: str, *, hangs: bool = False) -> dict:
    return {
        "mountpoint": mountpoint,
        "dead": True,
        "error": (
            "dead mount: its daemon was killed while the kernel held one of its threads, which keeps the "
            "connection open (every access to the mount hangs); 'privifs mount' ends it as root (else "
            f"'umount -f {shlex.quote(mountpoint)}' as root); changes it had not uploaded stay staged"
            if hangs
            else "dead mount: its daemon crashed or was killed (reads fail with 'Transport endpoint is "
            "not connected'); changes it had not uploaded stay staged"
        ),
        "recover": _remount(mountpoint),
    }


def _silence(pid: int, exc: OSError) -> str:
    """Why a daemon whose process exists gave no answer."""
    if paths.pid_stopped(pid):
        return f"it is stopped (pid {pid})"
    if not paths.pid_alive(pid):
        return f"it ended (pid {pid})"
    return str(exc) or type(exc).__name__


def _silent_status(entry: dict, why: str) -> dict:
    """A mount whose daemon process exists but does not answer: stopped (SIGSTOP, Ctrl-Z, a
    debugger), or hung. Every access to the mount waits meanwhile."""
    pid, mountpoint = entry["pid"], entry["mountpoint"]
    stopped = paths.pid_stopped(pid)
    files = None if stopped else paths.open_files(pid)
    if files is not None and files[0] >= files[1] - 2:  # it cannot take the status request's connection
        return {
            "mountpoint": mountpoint,
            "dead": False,
            "stopped": False,
            "pid": pid,
            "error": f"daemon not answering: it has {files[0]} files open, its limit (ulimit -n {files[1]}; pid "
            f"{pid}); programs on the mount get 'Too many open files' until some are closed",
            "recover": "close files programs hold open on the mount (it answers again then, nothing is lost), "
            "or unmount and mount it again from a shell with a higher 'ulimit -n'",
        }
    return {
        "mountpoint": mountpoint,
        "dead": False,
        "stopped": stopped,
        "pid": pid,
        "error": (
            f"daemon not running: it is stopped (pid {pid}; SIGSTOP, Ctrl-Z or a debugger); every access "
            "to the mount waits until it continues"
            if stopped
            else f"daemon not answering ({why}; pid {pid}): busy or hung; accesses to the mount may hang"
        ),
        "recover": (f"kill -CONT {pid}   (lets it go on)   or: " if stopped else "wait and ask again, or: ")
        + f"kill -9 {pid}; {_remount(mountpoint)}   (its staged changes are kept)",
    }


def _failed_status(entry: dict, error: str) -> dict:
    """A mount whose daemon answered the status request with an error (its staging directory
    removed, say): it was shown as "not answering … busy or hung", with kill -9 as the remedy."""
    pid, mountpoint = entry["pid"], entry["mountpoint"]
    return {
        "mountpoint": mountpoint,
        "dead": False,
        "pid": pid,
        "error": f"the daemon (pid {pid}) runs but could not tell its status: {error}",
        "recover": "see its mount.log (in the vault's state directory) for the cause; the mount goes on",
    }


def run_status(args: argparse.Namespace) -> int:
    from privifs.fs.registry import control_request, registered_mounts

    entries = registered_mounts()
    live = {e["mountpoint"] for e in entries}
    kernel = privifs_mounts()
    candidates = [mp for mp in kernel if mp not in live]
    if args.mountpoint is not None:
        wanted = mount_path(args.mountpoint)
        entries = [e for e in entries if e["mountpoint"] == wanted]
        candidates = [mp for mp in candidates if mp == wanted]
    else:  # every dead mount of this user's vaults (not other users')
        mine = my_mountpoints()
        candidates = [mp for mp in candidates if mp in mine]
    # (a mount its killed daemon wedged is told by the vault's lock: a probe of it would hang)
    wedged = [mp for mp in candidates if wedged_daemon(mp) is not None]
    dead = dead_mounts([mp for mp in candidates if mp not in wedged]) + wedged
    waiting = [w for w in waiting_vaults() if args.mountpoint is None or w["mountpoint"] == wanted]
    if args.mountpoint is not None:
        if not entries and not dead and not waiting:
            if candidates:  # a live privifs mount, but not one of this user's daemons
                raise _foreign(args.mountpoint, "status")
            raise LocalFileError(f"{args.mountpoint} is not a privifs mount")
    statuses = []
    silent = failed = False
    for entry in entries:
        if paths.pid_stopped(entry["pid"]):  # its socket would take the request and never answer
            statuses.append(_silent_status(entry, "stopped"))
            silent = True
            continue
        try:
            answers = list(control_request(entry, {"cmd": "status"}, timeout=STATUS_TIMEOUT))
            if answers and "error" in answers[0]:  # it answered, so it is neither stopped nor hung
                statuses.append(_failed_status(entry, str(answers[0]["error"])))
                failed = True
                continue
            st = answers[0]["status"]
            # unmounted by umount(8) or fusermount3 -u: the daemon goes on until what is pending
            # is uploaded (it showed as mounted meanwhile); it registers once mounted (and the
            # table was read after the registry), so a registered mountpoint not in it was unmounted
            if entry["mountpoint"] not in kernel:
                st = {**st, "unmounted": True}
            statuses.append(st)
        except (OSError, IndexError, KeyError, ValueError) as exc:
            if not paths.pid_alive(entry["pid"]):  # it died meanwhile
                if is_dead_mount(entry["mountpoint"]):
                    statuses.append(_dead_status(entry["mountpoint"]))
                    silent = True
                continue
            why = f"no answer within {STATUS_TIMEOUT:g}s" if isinstance(exc, TimeoutError) else str(exc)
            statuses.append(_silent_status(entry, why))
            silent = True
    statuses += [_dead_status(mp, hangs=mp in wedged) for mp in dead]
    # a vault shown already (a dead mount's vault waits too) is not shown twice; one mounted at the
    # same place now is another vault, whose waiting changes stay shown (hAT F8)
    shown = {st.get("state_dir") or st["mountpoint"] for st in statuses}
    dead_at = {st["mountpoint"] for st in statuses if "state_dir" not in st}
    statuses += [w for w in waiting if w["state_dir"] not in shown and w["mountpoint"] not in dead_at]
    if args.mountpoint is not None and not statuses:  # its daemon unmounted it meanwhile
        raise LocalFileError(f"{args.mountpoint} is not a privifs mount")
    code = EXIT_DEAD_MOUNT if dead or silent else 1 if failed else 0
    if args.json:
        print(json.dumps(statuses if args.mountpoint is None else statuses[0], indent=2))
        return code
    if not statuses:
        print("no privifs mounts")
    for st in statuses:
        print_status(st)
    return code


def _say(text: str) -> None:
    """One line of status, made safe for the terminal: paths, errors and names in it may be
    another application's (a token name with an escape sequence, helper hAH F7)."""
    print(printable(text))


def print_status(st: dict) -> None:
    """One mount's status as ``privifs status`` shows it."""
    if st.get("waiting"):  # a vault not mounted, its last mount's changes not in the vault
        changes, deletes = st["pending_count"], st["pending_deletes"]
        what = [count(n, word) for n, word in ((changes, "change"), (deletes, "delete")) if n]
        _say(
            f"{st['mountpoint']}: not mounted; "
            + " and ".join(what)
            + f" of its last mount {verb(changes + deletes, 'is', 'are')} not in the vault yet, kept staged in "
            f"{st['state_dir']}; they are uploaded when the vault is mounted again"
        )
        _say(f"  recover: privifs mount {shlex.quote(st['mountpoint'])}")
        return
    if "error" in st:
        _say(f"{st['mountpoint']}: {st['error']}")
        if st.get("recover"):
            _say(f"  recover: {st['recover']}")
        return
    _say(f"{st['mountpoint']}  ({st['server']}; daemon pid {st['pid']})")
    if st.get("unmounted"):
        changes = st.get("pending_count", len(st["pending"]))
        _say(
            f"  UNMOUNTED: {st['mountpoint']} is no longer mounted (umount or fusermount3 -u); the daemon is "
            + (
                f"finishing {count(changes, 'pending change')}"
                + (f" and {count(st['pending_deletes'], 'delete')}" if st["pending_deletes"] else "")
                + " in the background, then exits (what it cannot upload stays staged for the next mount)"
                if changes or st["pending_deletes"]
                else "ending"
            )
        )
    conn = st.get("connection") or {}
    if st.get("engine_stopped"):
        pid = st["engine_stopped"]
        _say(
            f"  ENGINE STOPPED: the embedded engine (pid {pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) "
            f"and answers nothing; uploads and uncached reads wait. Recover: kill -CONT {pid}   "
            f"(or kill -9 {pid}: the mount starts it again)"
        )
    if st.get("engine_restart_failed"):
        since, why = st["engine_restart_failed"]
        _say(
            f"  ENGINE DOWN since {_ago(since)}: the embedded engine died and cannot be started again ({why}); "
            f"uploads and uncached reads wait. If another program took its port, stop it; 'privifs umount' "
            f"and 'privifs mount' start it on free ports"
        )
    if conn and not conn.get("online"):
        _say(
            f"  OFFLINE since {_ago(conn.get('offline_since'))}: {conn.get('offline_reason')}; cached files "
            f"are readable, writes are staged; reconnecting in the background"
        )
    elif st.get("unreachable_since"):
        _say(
            f"  UNREACHABLE since {_ago(st['unreachable_since'])}: the server stopped answering; cached "
            f"files are readable, writes are staged and uploaded as soon as it answers"
        )
    elif st.get("no_answer_since") and not st.get("engine_stopped"):
        _say(
            f"  NO ANSWER since {_ago(st['no_answer_since'])}: the server has sent nothing for the listing "
            f"asked (the network or the server may be down; its time-out says more within two minutes); "
            f"cached files are readable, writes are staged and uploaded as soon as it answers"
        )
    events = conn.get("events") or {}
    if (
        conn.get("online")
        and not st.get("unreachable_since")  # (the whole server is gone, not just its WebSocket)
        and events.get("down_since")
        and time.time() - events["down_since"] > EVENTS_GRACE
    ):
        _say(
            f"  EVENTS DOWN since {_ago(events['down_since'])}: the event WebSocket cannot be joined "
            f"({events.get('down_reason')}); uploads go on (acknowledgements are polled), but the "
            f"vault sends downloads over it: files not in the cache fail with EIO; other clients' "
            f"changes show at the next listing"
        )
    changes = st.get("pending_count", len(st["pending"]))  # (a daemon before it sent every change)
    _say(
        f"  pending:      {count(changes, 'change')}, {st['pending_bytes'] / 2**20:.1f} MiB to upload, "
        f"{count(st['pending_deletes'], 'delete')}"
    )
    fsync_line = _fsync_line(st.get("fsync"))
    if fsync_line:
        _say(fsync_line)
    if "xattrs" in st:  # (a daemon before --xattrs does not say)
        _say("  xattrs:       " + ("stored (--xattrs)" if st["xattrs"] else "off (EOPNOTSUPP; --xattrs stores them)"))
    for p in st["pending"][:PENDING_LISTED]:
        _say(f"    {p['path']}  {p['size']} bytes  {p['kind']}  {p['state']}")
    if changes > PENDING_LISTED:
        _say(f"    … and {changes - PENDING_LISTED} more")
    _say(
        f"  cache:        {st['cache']['size'] / 2**20:.1f} MiB of {st['cache']['limit'] / 2**20:.0f} MiB"
        f" ({st['cache']['dir']})"
    )
    if st["cache"].get("unavailable"):
        _say(f"    UNAVAILABLE: {st['cache']['unavailable']}; files are read through memory, not cached")
    free = st["staging"].get("free")
    _say(
        f"  staging:      {st['staging']['size'] / 2**20:.1f} MiB ({st['staging']['dir']})"
        + (f"; {free / 2**20:.0f} MiB free on its disk" if free is not None else "")
    )
    if st.get("recovered"):
        n, folder = st["recovered"]
        _say(
            f"  lost+found:   {count(n, 'file')} staged here that the local index (made anew at the start) no "
            f"longer named, in {st['mountpoint'].rstrip('/')}{folder}: move them where they belong"
        )
    if st.get("disk_full"):
        _say(
            f"  disk full:    {st['disk_full']} at {_ago(st['disk_full_at'])} (ENOSPC: the disk of the "
            "staging, cache or state directory had no room; the last such request, shown until a write "
            "succeeds: see the free space above)"
        )
    if st.get("local_error"):
        _say(f"  local error:  {st['local_error']} at {_ago(st['local_error_at'])}")
    _say(
        f"  last refresh: {_ago(st['last_refresh'])}, {_refresh_every(st)}"
        + (f"; failed: {st['refresh_error']}" if st["refresh_error"] else "")
    )
    if st.get("parts_error"):
        _say(f"  parts sweep:  stopped: {st['parts_error']}")
    since = st.get("last_success_at")  # (a daemon before it does not say)
    _say(
        f"  last error:   {st['last_error'] or 'none'}"
        + (f" at {_ago(st['last_error_at'])}" if st["last_error"] else "")
        + (
            "; write-back has succeeded since"
            if st["last_error"] and since and st["last_error_at"] and since > st["last_error_at"]
            else ""
        )
    )
    if st.get("index_owed"):
        _say(
            f"  index:        {count(st['index_owed'], 'change')} shown but not yet recorded on disk "
            f"({st['index_error']}); retried every few seconds"
        )
    if st.get("read_error"):
        _say(f"  fetch failed: {st['read_error']} at {_ago(st['read_error_at'])}")  # for a read or a write
    for task in st.get("tasks", []):
        if task["failures"]:
            _say(
                f"  task failed:  {task['name']}: {task['failures']} unexpected failures, last at "
                f"{_ago(task['last_error_at'])}: {task['last_error']} (restarted; see mount.log)"
            )
