"""The mount's life: connect, check the key, recover, mount, serve, flush, unmount.

Start-up, in order: lock the vault's state directory (one mount per vault and machine), start the
embedded engine if the configuration says so, reopen staged files, then the connector's first
attempt (:mod:`privifs.fs.connector`: log in, read the whole listing, check the AES key against
the vault's key-check token, merge the listing, which also finds uploads cut off by a crash),
mount with pyfuse3, and only then report ready. When the server cannot be reached and this
machine has mounted the vault before, the mount starts offline and the connector catches up in
the background. The write-back workers, the refresher and the control socket run beside
``pyfuse3.main``. When the filesystem is unmounted (``privifs umount``, ``fusermount3 -u``,
``umount``, SIGTERM) the daemon keeps uploading what is pending for a while; anything left stays
staged for the next mount. A signal in that while ends it at once, as a new mount at the same
mountpoint asks (it waits for the daemon to end, then uploads what it left).

The control socket (``control.sock`` in the state directory, mode 0600) takes one JSON line
(``status``, ``flush``, ``refresh``, ``unmount``) and answers JSON lines; ``privifs status`` and
``privifs umount`` use it. ``<runtime>/mounts/<id>.json`` maps a mountpoint to its daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from privifs import paths
from privifs.account import open_account
from privifs.client.vault import Vault
from privifs.config import Config
from privifs.crypto.sealed import local_key
from privifs.errors import ConfigError, LocalStoreError, PrivifsError, single_error
from privifs.fs.cache import ContentCache
from privifs.fs.connector import Connector, VaultLink
from privifs.fs.filesystem import Filesystem, MountOptions
from privifs.fs.fuse_wait import serve_requests
from privifs.fs.namespace import Index, Namespace
from privifs.fs.operations import Operations
from privifs.fs.refresh import Refresher
from privifs.fs.registry import control_socket_path, registered_daemon_runs, registry_path
from privifs.fs.space import MiB, engine_headroom
from privifs.fs.staging import Staging
from privifs.fs.sync import Syncer
from privifs.kernelmounts import privifs_mounts
from privifs.keycheck import check_key
from privifs.memory import trim_memory
from privifs.ratelog import quiet_failed_accepts
from privifs.supervise import Supervisor
from privifs.words import count, verb

log = logging.getLogger("privifs.fs.daemon")

DRAIN_AFTER_UNMOUNT = 60.0
TAKEOVER_WAIT = 30.0  # how long a new mount waits for the daemon of an unmounted drive to end
CONTROL_CHECK = 10.0  # seconds between checks that the control socket and registry entry are still there
UNREACHABLE_GRACE = 10.0
# a flush stops waiting for a server that has answered write-backs only with failures of the
# moment (5xx, 408, 429) for this many times --server-timeout (the time one answer is waited
# for: a minute by default), and a probe fails too: it waited for ever before
FAILING_GRACE = 2
PROBE_TIMEOUT = 10.0  # a flush's one request asking whether a server counted unreachable answers again
# a flush that has seen nothing succeed for this long asks the server once (PROBE_TIMEOUT) and
# gives up if that fails too: a server that accepts connections and never answers (a hung host,
# a network cut without a reset) held 'privifs umount' for 2m25s, two 60 s read time-outs of the
# uploads in flight, past systemd's 90 s stop time-out
SILENT_GRACE = 20.0
PROBE_TOKEN = "dtk-00000000-0000-0000-0000-000000000000"  # asked for by id: no such token
CONTROL_SEND_TIMEOUT = 30.0  # a control client that reads nothing of an answer this long is let go


def control_send_timeout() -> float:
    """:data:`CONTROL_SEND_TIMEOUT`, or ``PRIVIFS_CONTROL_SEND_TIMEOUT`` seconds when that is a
    positive number (the test of this time-out waits it out: a shorter one keeps the suite short)."""
    try:
        value = float(os.environ.get("PRIVIFS_CONTROL_SEND_TIMEOUT", ""))
    except ValueError:
        return CONTROL_SEND_TIMEOUT
    return value if 0 < value < float("inf") else CONTROL_SEND_TIMEOUT


SETTLE_EVERY = 5.0  # seconds between tries to commit what the index owes (Index.kept)


@dataclass
class MountConfig:
    mountpoint: Path
    cache_dir: Path | None = None
    cache_size: int = 2 * 1024**3
    refresh_interval: float = 30.0
    upload_workers: int = 32
    write_back_delay: float = 1.0
    server_timeout: float = 30.0  # the login's answer; then a vault mounted here before starts offline
    allow_other: bool = False
    noexec: bool = False
    nonempty: bool = False  # mount over a directory that is not empty
    state_dir: Path | None = None
    fsname: str = "privifs"  # the mount's source in /proc/mounts (mount(8)'s SOURCE)
    fs: MountOptions = field(default_factory=MountOptions)


class AnswersNobodyWaitsFor(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel no longer waits for an answer (``fuse_reply_*
    failed with No such file or directory``): the request's program was interrupted, or the drive
    was unmounted while the request ran (a read abandoned at the unmount). Nothing failed: one
    INFO line saying so."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "fuse_reply_" in text and "No such file or directory" in text:
            op = text.split("(", 1)[0]
            record.msg, record.args = "%s: nobody waits for its answer any more (interrupted, or unmounted)", (op,)
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


if not any(isinstance(f, AnswersNobodyWaitsFor) for f in logging.getLogger("pyfuse3").filters):
    logging.getLogger("pyfuse3").addFilter(AnswersNobodyWaitsFor())


def _fuse_option_value(value: str) -> str:
    """``value`` escaped for libfuse's option parser (which splits on ``,`` unless escaped by ``\\``)."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


def _still_mounted(mountpoint: Path) -> bool:
    """Whether the kernel still has a privifs mount at ``mountpoint``: one that ``privifs
    umount`` (fusermount3 -u) or umount(8) took down already is not unmounted again, which
    libfuse reported in the mount log as "fuse: failed to unmount …: Invalid argument" (hAQ F2)."""
    return str(mountpoint) in privifs_mounts()  # (resolved at the start, as the table spells it)


def _left_staged(pending: int, size: int | None, deletes: int) -> str:
    """What a flush that gives up leaves staged: "N changes (S bytes) and D deletes stay staged"."""
    return (
        count(pending, "change")
        + (f" ({size} bytes)" if size is not None else "")
        + (f" and {count(deletes, 'delete')}" if deletes else "")
        + f" {'stay' if deletes else verb(pending, 'stays', 'stay')} staged"  # (changes and deletes: plural)
    )


class Daemon:
    def __init__(self, cfg: Config, mcfg: MountConfig):
        self.cfg = cfg
        self.mcfg = mcfg
        self.mountpoint = mcfg.mountpoint.resolve()
        self.state_dir = mcfg.state_dir or paths.vault_state_dir(cfg)
        self.cache_dir = mcfg.cache_dir or paths.vault_cache_dir(cfg)
        # the parts of the mount, built in _serve; status and flush read these, not through fs
        self.ns: Namespace | None = None
        self.staging: Staging | None = None
        self.cache: ContentCache | None = None
        self.fs: Filesystem | None = None
        self.syncer: Syncer | None = None
        self.refresher: Refresher | None = None
        self.supervisor = Supervisor()
        self.connector: Connector | None = None
        self.mounted = False
        self._was_mounted = False
        self.account = None  # the open account (its embedded engine, watched), once serving
        self._unmounting = False
        self._drain = DRAIN_AFTER_UNMOUNT  # how long uploads go on after the unmount
        self._draining: trio.CancelScope | None = None  # those uploads, once unmounted

    # -- lifecycle -------------------------------------------------------------------------------
    def _lock(self):
        paths.private_dir(self.state_dir)
        lock = open(self.state_dir / "lock", "a+")
        if not paths.lock_exclusively(lock):
            lock.close()
            other = (
                (self.state_dir / "mountpoint").read_text().strip() if (self.state_dir / "mountpoint").exists() else "?"
            )
            raise LocalStoreError(f"this vault is already mounted (at {other}); unmount it first")
        (self.state_dir / "mountpoint").write_text(str(self.mountpoint) + "\n")
        return lock

    async def _claim_mountpoint(self) -> int:
        """An exclusive lock on the mountpoint directory itself (a descriptor of the directory
        the mount will cover, held until the daemon ends): two mounts started at once on one
        mountpoint, of any user or vault, both passed the 'already a mountpoint' check before
        either had mounted, and stacked; one umount then took both down.

        The daemon of a drive just unmounted here holds it while it finishes its uploads (up to
        :data:`DRAIN_AFTER_UNMOUNT`): ``umount DIR; mount DIR`` failed with "another privifs is
        mounting". That daemon is asked to stop (SIGTERM: what it had not uploaded stays staged,
        and this mount uploads it) and the lock is waited for while nothing is mounted here (a
        daemon past its uploads has left the registry, but still holds it while it ends)."""
        try:
            fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"mountpoint {self.mountpoint} cannot be opened: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            pass
        try:
            signalled = set()
            with trio.move_on_after(TAKEOVER_WAIT):
                # while nothing is mounted here, the holder is a daemon ending (it may have left
                # the registry already: then it is past its uploads) or one about to mount
                while not await trio.to_thread.run_sync(os.path.ismount, self.mountpoint):
                    pid = self._unmounted_predecessor()
                    if pid is not None and pid not in signalled:
                        log.info(
                            "the daemon of the drive unmounted here (pid %d) is still ending; asking it to stop", pid
                        )
                        signalled.add(pid)
                        with contextlib.suppress(OSError):
                            os.kill(pid, signal.SIGTERM)
                    await trio.sleep(0.1)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        return fd
                    except OSError:
                        pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        raise LocalStoreError(f"another privifs is mounting at {self.mountpoint} right now")

    def _unmounted_predecessor(self) -> int | None:
        """The pid of this user's daemon registered for this mountpoint that still runs, if there
        is one; the caller found the drive no longer mounted there (it is finishing its uploads)."""
        entry = self._registry_entry()
        if entry is None or entry.get("pid") == os.getpid() or not registered_daemon_runs(entry):
            return None
        return entry["pid"] if entry.get("mountpoint") == str(self.mountpoint) else None

    async def run(self, ready) -> None:
        if not self.mountpoint.is_dir():
            raise ConfigError(f"mountpoint {self.mountpoint} does not exist or is not a directory")
        claim = await self._claim_mountpoint()
        try:
            await self._run_claimed(ready)
        finally:
            os.close(claim)

    async def _run_claimed(self, ready) -> None:
        if await trio.to_thread.run_sync(os.path.ismount, self.mountpoint):
            raise LocalStoreError(f"{self.mountpoint} is already a mountpoint")
        self._check_local_dirs_outside_the_mount()
        self._check_local_dirs_private()
        self._check_mountpoint_empty()
        made = paths.missing_dirs(self.state_dir), paths.missing_dirs(self.cache_dir)
        # a first mount here: no index, and nothing staged (with the index deleted, the staged
        # files are changes no upload took yet, which the mount shows in /lost+found: a start
        # that failed then must not take them back with what a first mount made)
        first = not (self.state_dir / paths.INDEX_NAME).exists() and not holds_files(self.state_dir / "staging")
        lock = self._lock()
        try:
            with open_account(self.cfg) as account, single_error():
                async with trio.open_nursery() as links:
                    await self._serve(account, links, ready)
                    links.cancel_scope.cancel()
        except BaseException:
            if first and not self._was_mounted:
                self._forget_first_mount(*made)
            raise
        finally:
            lock.close()

    def _local_dirs(self) -> list[tuple[str, Path]]:
        dirs = [("state directory", self.state_dir), ("cache directory", self.cache_dir)]
        if self.cfg.embedded:
            dirs.append(("embedded engine's data directory", paths.embedded_engine_dir()))
        return dirs

    def _check_local_dirs_private(self) -> None:
        """The daemon's own directories must not be another user's to change: in a cache
        directory another user had made, a link they put there made the mount delete (and then
        download into) a directory of the victim's (helper hAD F2)."""
        for what, d in self._local_dirs():
            shared = paths.shared_with_others(d)
            if shared is not None:
                raise ConfigError(
                    f"the {what} {d} cannot be used: {shared.place} {shared.why}, so another user could change what "
                    "privifs keeps there; choose a directory of your own"
                    + (" (--cache-dir)" if what.startswith("cache") else "")
                )

    def _check_local_dirs_outside_the_mount(self) -> None:
        """The daemon's own files (index and staging, cache, the embedded engine's data) must not
        lie under the mountpoint: once mounted, every access to them would be a request to this
        very daemon, which waits for itself, and the first read hangs the mount for good. Nor
        may the mountpoint lie inside them: mounted over the staging directory, the first write
        there hung the writer and the daemon for good (helper hY), and a mount over the cache
        or the engine's data hides their files from the daemon that uses them."""
        for what, d in self._local_dirs():
            real = Path(os.path.abspath(d)).resolve()
            if real == self.mountpoint or self.mountpoint in real.parents:
                raise ConfigError(
                    f"the {what} {d} is inside the mountpoint {self.mountpoint}; choose a directory outside it"
                )
            if real in self.mountpoint.parents:
                raise ConfigError(
                    f"the mountpoint {self.mountpoint} is inside the {what} {d}, which privifs itself uses; "
                    "choose a mountpoint outside it"
                )

    def _check_mountpoint_empty(self) -> None:
        """Mounted over, a directory's files were hidden without a word until the unmount
        (helper hW: a drive mounted at ~/photos by mistake looks as if the photos were gone);
        ``--nonempty`` asks for it."""
        refusal = None if self.mcfg.nonempty else paths.not_empty(self.mountpoint)
        if refusal:
            raise LocalStoreError(refusal)

    def _forget_first_mount(self, made_state: list[Path], made_cache: list[Path]) -> None:
        """Take back what a first mount of this vault here (no index before it) made before it
        failed (a wrong key, a server that cannot be reached, …), so that it leaves no trace of a
        mount: the index, staging, marker and lock, the cache directory if this run made it, and
        the directories this run made once they are empty (a log file kept in one keeps it).
        Runs under the vault's lock; an index that existed before is never touched."""
        index_files = [paths.INDEX_NAME + suffix for suffix in ("", "-wal", "-shm", "-journal", ".reserve")]
        for name in (*index_files, "mountpoint"):
            (self.state_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.state_dir / "staging", ignore_errors=True)
        if made_cache:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        (self.state_dir / "lock").unlink(missing_ok=True)
        paths.remove_made(made_state)
        paths.remove_made(made_cache)

    async def _connect(
        self, account, links: trio.Nursery, link: VaultLink, refresher: Refresher, syncer: Syncer
    ) -> bool:
        """Start the connector (see :mod:`privifs.fs.connector`) and wait for its first attempt: True
        online, False started offline; raises why the mount cannot start."""
        self.connector = Connector(account, link, refresher, syncer, self.state_dir, check_key, self.supervisor)
        syncer.reconnect = self.connector.try_now
        return await links.start(self.connector.run)

    async def _serve(self, account, links: trio.Nursery, ready) -> None:
        self.account = account
        key = account.key
        link = VaultLink(account.client_options(login_timeout=self.mcfg.server_timeout))
        vault = Vault(link, key)
        local = local_key(key)
        opts = self.mcfg.fs
        index = Index(self.state_dir / paths.INDEX_NAME)
        try:
            ns = Namespace(index, dir_mode=opts.dir_mode, file_mode=opts.file_mode)
            staging_dir = self.state_dir / "staging"
            paths.private_dir(staging_dir)
            headroom = self._engine_headroom(staging_dir)
            staging = Staging(staging_dir, local, keep_free=lambda: index.reserve.missing() + headroom)
            try:
                cache = ContentCache(self.cache_dir, self.mcfg.cache_size, local)
            except OSError as exc:  # --cache-dir names a file, or a place that cannot hold one
                raise ConfigError(
                    f"cannot use {self.cache_dir} as the cache directory: {exc.strerror or exc}"
                ) from None
            syncer = Syncer(
                ns,
                staging,
                cache,
                link,
                vault,
                workers=self.mcfg.upload_workers,
                write_back_delay=self.mcfg.write_back_delay,
                supervisor=self.supervisor,
                server_restarting=account.server_restarting,
            )
            if self.cfg.embedded and same_disk(self.cache_dir, paths.embedded_engine_dir()):
                syncer.server_full = cache.give_room
            if same_disk(self.cache_dir, staging.dir):
                # another program took the disk's free space: a write that finds no room has the
                # cache drop copies it can download again (helper hAA: 8 of 10 closed files got
                # ENOSPC beside 118 MiB of cache), not while offline, where they are all there is
                staging.make_room = lambda enough: link.online and cache.evict_until(enough, "a write")
            fs = Filesystem(ns, staging, cache, vault, opts, syncer)
            fs.open_staged_files()
            refresher = Refresher(
                ns,
                link,
                syncer,
                self.mcfg.refresh_interval,
                invalidate=False,
                events=link,
                collect_parts=not opts.read_only,
            )
            self.ns, self.staging, self.cache = ns, staging, cache
            self.fs, self.syncer, self.refresher = fs, syncer, refresher
            online = await self._connect(account, links, link, refresher, syncer)
            options = set(pyfuse3.default_options) | {
                f"fsname={_fuse_option_value(self.mcfg.fsname)}",
                "subtype=privifs",
            }
            if self.mcfg.allow_other:
                options.add("allow_other")
            if self.mcfg.noexec:
                options.add("noexec")
            if opts.read_only:
                options.add("ro")
            pyfuse3.init(Operations(fs), str(self.mountpoint), options)
            self.mounted = self._was_mounted = True
            refresher.invalidate = fs.kernel = fs.page_cache_reads = True
            closed = False
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(syncer.run)
                    await self.supervisor.start(nursery, "refresh", refresher.run)
                    control = await self.supervisor.start(nursery, "control socket", self._control_server)
                    self._register(control)
                    nursery.start_soon(self._signals)
                    nursery.start_soon(self._tune_readahead)
                    self.supervisor.start_soon(nursery, "memory trimming", trim_memory)
                    self.supervisor.start_soon(nursery, "index settling", self._keep_index_settling)
                    ready(
                        f"mounted {self.cfg.server_label()} at {self.mountpoint}"
                        + self._recovered_said()
                        + (
                            ""
                            if online
                            else (
                                " OFFLINE: the server "
                                + ("gives no usable answer" if self.connector.reached else "cannot be reached")
                                + f" ({self.connector.error}); cached files are readable and writes are staged "
                                "until it answers"
                            )
                        )
                    )
                    log.info("mounted at %s", self.mountpoint)
                    try:
                        await serve_requests()
                    finally:
                        self.mounted = False
                        closed = True
                        pyfuse3.close(unmount=_still_mounted(self.mountpoint))
                    left = fs.release_left()
                    if left:
                        log.info("%s the kernel had not released at the unmount: closed now", count(left, "file"))
                    if self._drain > 0:
                        log.info("unmounted %s; finishing pending uploads", self.mountpoint)
                        result = {}
                        with trio.CancelScope() as self._draining:
                            result = await self.flush(None, self._drain)
                        if self._draining.cancelled_caught:
                            log.info(
                                "stopped by a signal; %s for the next mount",
                                _left_staged(len(self.ns.pending()), None, 0),
                            )
                        elif result.get("error"):
                            log.warning("%s", result["error"])
                    else:  # 'privifs umount' has already waited for them and said what stays staged
                        log.info(
                            "unmounted %s; %s for the next mount",
                            self.mountpoint,
                            _left_staged(len(self.ns.pending()), None, 0),
                        )
                    nursery.cancel_scope.cancel()
            finally:
                if not closed:
                    self.mounted = False
                    pyfuse3.close(unmount=_still_mounted(self.mountpoint))
                with contextlib.suppress(OSError):  # (a runtime directory that could not hold it)
                    registry_path(self.mountpoint).unlink(missing_ok=True)
                cache.close()
        finally:
            index.close()

    def _engine_headroom(self, staging_dir: Path) -> int:
        """What staged writes leave free beyond their floor for the embedded engine's uploads on
        the same disk (:func:`privifs.fs.space.engine_headroom`); 0 for a separate server."""
        if not self.cfg.embedded:
            return 0
        from privifs.engine.blobs import room_floor
        from privifs.parts.store import THRESHOLD

        engine_dir = paths.embedded_engine_dir()
        try:
            floor = room_floor(engine_dir)
        except OSError:
            return 0
        largest = THRESHOLD + MiB
        headroom = engine_headroom(staging_dir, engine_dir, floor, largest)
        if headroom:  # (then staging's own floor plus the headroom is the engine's floor and two blobs)
            log.info(
                "staged writes leave %.0f MiB free for the embedded engine on the same disk to take uploads",
                (floor + 2 * largest) / MiB,
            )
        return headroom

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                if self._draining is not None:  # unmounted, finishing uploads: a signal ends that
                    self._draining.cancel()
                    continue
                log.info("signal received: unmounting")
                self.unmount()

    async def _tune_readahead(self) -> None:
        """Ask the kernel to read ahead 1 MiB on this mount (fewer, larger FUSE reads); needs
        root, silently skipped otherwise. The stat runs on a worker thread: this loop must stay
        free to answer the FUSE request it causes."""
        try:
            st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
            bdi = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
            await trio.to_thread.run_sync(bdi.write_text, "1024\n")
        except OSError as exc:
            log.debug("read-ahead left at the kernel default: %s", exc)

    def _recovered_said(self) -> str:
        """What the mount says of files it put in /lost+found at the start (helper hK: only its
        log said so, and the files had gone from where the user wrote them)."""
        recovered = None if self.fs is None else self.fs.recovered()
        if recovered is None:
            return ""
        n, folder = recovered
        return (
            f"; the local index was made anew: {count(n, 'file')} staged here that it no longer names "
            f"{verb(n, 'is', 'are')} in {self.mountpoint}{folder} (their names were the old index's)"
        )

    def unmount(self, drain: float | None = None) -> None:
        """End the FUSE loop; then pending uploads go on for ``drain`` seconds (60 by default; 0
        after a ``privifs umount`` whose flush already gave up on them)."""
        if drain is not None:
            self._drain = drain
        if self.mounted and not self._unmounting:
            self._unmounting = True
            if self.fs is not None:
                self.fs.abandon_reads()  # a read waiting for a stalled download held the FUSE loop 90 s
            pyfuse3.terminate()

    async def detach(self, drain: float | None = None) -> str | None:
        """Unmount as umount(8) does, then end the FUSE loop as :meth:`unmount` does: None when
        done, or why not when the mountpoint is busy (a program has a file, or its working
        directory, in it); the mount then goes on as before. ``pyfuse3.close`` alone detaches
        lazily: the programs' next accesses then fail with ENOTCONN and what they write is lost."""
        if not self.mounted or self._unmounting:
            return None
        drain_before = self._drain
        if drain is not None:
            self._drain = drain  # set first: the FUSE loop ends as soon as the kernel lets go
        why = await self._unmount_kernel()
        if why is not None:
            self._drain = drain_before
            return why
        self.unmount(drain)
        return None

    async def _unmount_kernel(self) -> str | None:
        """``fusermount3 -u`` (not lazy; the kernel's answer to a busy mountpoint is EBUSY): None
        unless it failed because the mountpoint is busy. Any other failure (no fusermount3) is
        logged and left to ``pyfuse3.close``."""
        try:
            # shielded: the kernel ends the FUSE connection first and frees the file's cached
            # pages after, in the same umount2 call, so the mount loop ends and the daemon winds
            # down while fusermount3 is still in the kernel; that cancelled this wait, and trio
            # killed fusermount3 after 5 s (a SIGTERM it cannot act on there): after reading
            # 20 GB an unmount took 6-9 s and logged a RuntimeWarning (hS F1)
            with trio.CancelScope(shield=True), trio.fail_after(60):
                done = await trio.run_process(
                    ["fusermount3", "-u", str(self.mountpoint)], capture_stdout=True, capture_stderr=True, check=False
                )
        except (OSError, trio.TooSlowError) as exc:
            log.warning("fusermount3 -u %s: %s; unmounting with pyfuse3 instead", self.mountpoint, exc)
            return None
        if done.returncode == 0:
            return None
        err = done.stderr.decode(errors="replace").strip()
        if "busy" in err.lower():
            log.info("not unmounting %s: it is busy (%s)", self.mountpoint, err)
            return f"{self.mountpoint} is busy: a program has a file or its working directory in it"
        log.warning("fusermount3 -u %s failed (%s); unmounting with pyfuse3 instead", self.mountpoint, err)
        return None

    def _register(self, control: Path) -> None:
        """Record the mount where 'privifs status' and 'privifs umount' find it; a runtime
        directory that cannot hold it stops the mount with an error naming it (it was a
        NotADirectoryError, exit 1, from the cleanup that followed)."""
        reg = registry_path(self.mountpoint)
        try:
            paths.private_dir(reg.parent)
            paths.write_json(
                reg,
                {
                    "mountpoint": str(self.mountpoint),
                    "pid": os.getpid(),
                    "started": paths.process_started(os.getpid()),
                    "control": str(control),
                    "state_dir": str(self.state_dir),
                    "server": self.cfg.server_label(),
                },
            )
        except OSError as exc:
            raise LocalStoreError(
                f"cannot record the mount in {reg.parent} ({exc.strerror or exc}): the runtime directory "
                f"($XDG_RUNTIME_DIR/privifs, else the state directory's run/) must be a directory this user can write"
            ) from None

    # -- status and flushing -----------------------------------------------------------------------
    def status(self) -> dict:
        syncer, refresher, cache = self.syncer, self.refresher, self.cache
        pending = syncer.pending()
        return {
            "mountpoint": str(self.mountpoint),
            "server": self.cfg.server_label(),
            "pid": os.getpid(),
            "pending": pending.shown,  # the first PENDING_SHOWN: failing, uploading, queued, open
            "pending_count": pending.count,
            "pending_bytes": pending.size,
            "pending_deletes": syncer.tombstone_count(),
            "uploads_done": syncer.uploads,
            "read_only": self.fs.opts.read_only,
            # what the daemon runs with, by the mount helper's option names (a remount compares them)
            "settings": {
                "config": str(self.cfg.path),
                "cache_dir": str(self.cache_dir),
                "cache_size": self.mcfg.cache_size,
                "refresh_interval": self.mcfg.refresh_interval,
                "fsync": self.fs.opts.fsync_mode,
                "upload_workers": self.mcfg.upload_workers,
                "write_back_delay": self.mcfg.write_back_delay,
                "server_timeout": self.mcfg.server_timeout,
                "fsync_timeout": self.fs.opts.fsync_timeout,
                "uid": self.fs.opts.uid,
                "gid": self.fs.opts.gid,
                "umask": f"{self.fs.opts.umask:03o}",
                "xattrs": self.fs.opts.xattrs,
                "nonempty": self.mcfg.nonempty,
            },
            "xattrs": self.fs.opts.xattrs,
            "fsync": {
                "mode": self.fs.opts.fsync_mode,
                "not_in_vault": pending.count,
                "fsynced_not_in_vault": pending.fsynced,
            },
            "cache": {
                "dir": str(self.cache_dir),
                "size": cache.volume(),
                "limit": cache.size_limit,
                "downloads": cache.downloads,
                "unavailable": cache.unavailable,
            },
            "staging": {"dir": str(self.staging.dir), "size": self.staging.usage(), "free": self.staging.free()},
            "recovered": self.fs.recovered(),  # (files, folder): put in /lost+found at the start, still there
            "disk_full": self.fs.last_disk_full,  # the last request the local disk had no room for
            "disk_full_at": self.fs.last_disk_full_at,
            "local_error": self.fs.last_local_error,  # the last request local state failed otherwise
            "local_error_at": self.fs.last_local_error_at,
            "last_refresh": refresher.last_refresh,
            "refresh_interval": refresher.interval,
            "refresh_every": refresher.full_every,  # longer in a big vault (refresh.full_gap)
            "listing_seconds": refresher.listing_seconds,
            "refresh_error": refresher.last_error,
            "parts_error": syncer.parts.reader.sweep_error,
            "listings": refresher.listings,
            "last_error": syncer.last_error,
            "last_error_at": syncer.last_error_at,
            "last_success_at": syncer.last_success_at,
            "read_error": self.fs.last_read_error,
            "index_owed": self.ns.index.owed,
            "index_error": self.ns.index.owed_error,
            "read_error_at": self.fs.last_read_error_at,
            "files": len(self.ns.nodes),
            "tasks": self.supervisor.report(),
            "connection": self.connector.status(),
            "unreachable_since": syncer.unreachable_since,  # connected, but the server stopped answering
            "no_answer_since": refresher.no_answer_since(),  # the listing asked receives nothing (no time-out yet)
            # the embedded engine's pid if it is stopped (SIGSTOP): the client's time-outs tell only
            # after two minutes that the server does not answer, and not why
            "engine_stopped": self.account.server_stopped() if self.account is not None else None,
            "engine_restart_failed": self.account.server_restart_failure() if self.account is not None else None,
        }

    async def flush(self, progress, timeout: float | None) -> dict:
        """Wait until nothing is pending (files still open for writing excepted)."""
        syncer = self.syncer
        stopped = self._engine_stopped()
        if stopped is not None:
            return stopped
        if not await self.connector.try_now(UNREACHABLE_GRACE):
            pending = len(self.ns.pending())
            if pending or syncer.tombstone_count():
                link = self.connector.link
                if link.login_refused_offline:  # it answers: saying "unreachable" sent users looking at the network
                    why, until = f"the server refuses the login ({link.reason})", "it accepts it again"
                else:
                    why, until = f"the server is unreachable (offline: {link.reason})", "it answers"
                return {
                    "error": f"{why}; {_left_staged(pending, None, 0)} in {self.state_dir}, to be uploaded when "
                    f"{until} (or at the next mount)"
                }
            return {"done": True}
        syncer.flushing += 1
        try:
            return await self._flush_wait(progress, timeout)
        finally:
            syncer.flushing -= 1

    async def _flush_wait(self, progress, timeout: float | None) -> dict:
        syncer = self.syncer
        started = trio.current_time()
        started_mono = time.monotonic()
        syncer.retry_all_now()  # each pending change gets one attempt after this at least
        deadline = None if timeout is None else started + timeout
        while True:
            # what a flush waits for: everything pending but files still open for writing
            pending = [n for n in self.ns.pending() if n.uploading or not n.waiting_for_close]
            owed = self._settle_index()
            deletes = syncer.tombstone_count()
            if not pending and not deletes and not owed:
                return {"done": True}
            size = sum(
                n.size - (syncer.sent.get(n.ino, 0) if n.uploading else 0) for n in pending if n.content_dirty
            )  # bytes still to upload
            # what stays staged if the flush gives up: all of it (an attempt that sent its bytes
            # and failed stored none of them; counting them as sent said "15 changes (0 bytes)")
            staged = sum(n.size for n in pending if n.content_dirty)
            if progress is not None:
                # a program that began writing since: umount stops there (it keeps the upload
                # going while it writes, and /proc shows it holding a file only now and then)
                writer = self.fs.last_writer
                began = (
                    {"writer": {"pid": writer[1], "path": self.ns.describe(writer[2])}}
                    if writer and writer[0] >= started
                    else {}
                )
                await progress(
                    {
                        "pending": len(pending),
                        "bytes": size,
                        "deletes": deletes,
                        "uploading": [self.ns.describe(n) for n in pending if n.uploading][:5],
                        **began,
                    }
                )
            stopped = self._engine_stopped(len(pending), staged)
            if stopped is not None:
                return stopped
            since = syncer.unreachable_since
            if since is not None and time.time() - since > UNREACHABLE_GRACE and not await self._server_answers():
                return {
                    "error": f"the server is unreachable ({syncer.last_error}); "
                    f"{_left_staged(len(pending), staged, 0)} in {self.state_dir}, "
                    f"to be uploaded at the next mount"
                }
            failing = syncer.failing_since
            if (
                failing is not None
                and time.time() - failing > FAILING_GRACE * self.mcfg.server_timeout
                and trio.current_time() - started > UNREACHABLE_GRACE
                and not await self._server_answers()
            ):
                return {
                    "error": f"the server keeps failing ({syncer.last_error}); "
                    f"{_left_staged(len(pending), staged, deletes)} in {self.state_dir}, to be "
                    f"uploaded at the next mount (the daemon ends with the unmount)"
                }
            silent = time.monotonic() - max(syncer.answered_at, started_mono)
            if (pending or deletes) and silent > SILENT_GRACE and not await self._server_answers():
                return {
                    "error": f"nothing sent to the server has succeeded for {silent:.0f}s and it did not answer "
                    f"a request within {PROBE_TIMEOUT:.0f}s ({syncer.last_error or 'no request came back'}); "
                    f"{_left_staged(len(pending), staged, deletes)} in {self.state_dir}, to be "
                    f"uploaded at the next mount (the daemon ends with the unmount)"
                }
            refusal = self.connector.link.login_refused(started)
            if refusal is not None and (pending or deletes):
                return {
                    "error": f"the server refuses the login ({refusal}); "
                    f"{_left_staged(len(pending), staged, deletes)} in {self.state_dir}, to be "
                    f"uploaded at the next mount (the daemon ends with the unmount)"
                }
            if not deletes and not owed and syncer.all_failed_locally(pending, started):
                return {
                    "error": f"{count(len(pending), 'change')} cannot be uploaded, and trying again does not help "
                    f"({syncer.last_error}); kept staged in {self.state_dir}. A file whose content is "
                    "damaged reads EIO there: write it again, or remove it; a damaged local index is "
                    "refused with what to do at the next mount"
                }
            if owed and trio.current_time() - started > FAILING_GRACE * self.mcfg.server_timeout:
                # the index cannot record what was done (damaged, or its disk full): it may stay so
                return {
                    "error": f"the local index cannot record the last changes ({self.ns.index.owed_error}); "
                    f"{_left_staged(len(pending), staged, deletes)} in {self.state_dir}, to be "
                    "uploaded once it can (free space on its disk; if it is damaged, see the mount's log)"
                }
            if (
                pending
                and not deletes
                and not owed
                and syncer.failing_again(pending, started, FAILING_GRACE * self.mcfg.server_timeout)
                and await self._server_answers()
            ):  # one file the server fails every time, while everything else went through
                return {
                    "error": f"the server keeps failing {count(len(pending), 'change')} ({syncer.last_error}); "
                    f"{_left_staged(len(pending), staged, deletes)} in {self.state_dir}, to be "
                    f"uploaded once the server takes uploads again (or at the next mount)"
                }
            if pending and not deletes and not owed and syncer.refused_since(pending, started):
                # retried since the flush began and refused again: waiting longer changes nothing
                return {
                    "error": f"the server refused {count(len(pending), 'change')} ({syncer.last_error}); kept "
                    f"staged in {self.state_dir}, to be tried again at the next mount"
                }
            if deadline is not None and trio.current_time() > deadline:
                uploading = sum(1 for n in pending if n.uploading)
                why = (
                    f"last error: {syncer.last_error}"
                    if syncer.last_error
                    else f"{uploading} still uploading, none has failed yet: the server is slow or not answering"
                )
                if owed:
                    why += f"; the local index cannot record the last changes: {self.ns.index.owed_error}"
                return {
                    "error": f"{count(len(pending), 'change')} still pending after {timeout:.0f}s "
                    f"({why}); kept staged in {self.state_dir}"
                }
            await trio.sleep(0.25)

    def _engine_stopped(self, pending: int | None = None, size: int | None = None) -> dict | None:
        """The flush's answer while the embedded engine is stopped (SIGSTOP): it would answer
        nothing, and a flush (``privifs umount``) waited for two read time-outs, over two
        minutes, to say only that the server was unreachable. None while it runs."""
        pid = self.account.server_stopped() if self.account is not None else None
        if pid is None:
            return None
        if pending is None:
            pending = len(self.ns.pending())
        deletes = self.syncer.tombstone_count()
        if not pending and not deletes:
            return {"done": True}
        return {
            "error": f"the embedded engine (pid {pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) and answers "
            f"nothing; {_left_staged(pending, size, deletes)} in {self.state_dir}, to be "
            f"uploaded once it runs again ('kill -CONT {pid}') or at the next mount"
        }

    async def _server_answers(self) -> bool:
        """Whether the server answers one request now (a listing page asked for a token that
        does not exist); if it does, the syncer stops counting it unreachable. A write-back
        that failed while the server was away leaves it counted so until a listing or an
        upload succeeds, and the first upload after an outage may take long."""
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                async for _ in self.connector.link.list(token=PROBE_TOKEN, per_page=1):
                    break  # (one page, whatever a server that ignores the filter sends)
            except PrivifsError as exc:
                log.debug("the server does not answer yet: %s", exc)
                return False
            self.syncer.answered()
            return True
        return False

    def _settle_index(self) -> int:
        """Try to commit what the index owes (see :meth:`Index.kept`); how much it still owes."""
        index = self.ns.index
        if index.owed:
            try:
                index.settle()
            except PrivifsError as exc:
                log.debug("the index still cannot record its last changes: %s", exc)
        return index.owed

    async def _keep_index_settling(self) -> None:
        """What the index owes is committed with the next change anyway; this commits it when no
        change comes (every :data:`SETTLE_EVERY` seconds while it owes any), and makes the
        index's disk reserve again once the disk has room (it was made again only every 1,500
        commits, so a disk that filled again soon found none)."""
        index = self.ns.index
        while True:
            await trio.sleep(SETTLE_EVERY)
            self._settle_index()
            if index.reserve.given_back:
                index.reserve.ensure()

    # -- control socket ----------------------------------------------------------------------------
    async def _control_server(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the control socket, and keep it and the mount's registry entry where 'privifs
        status' and 'privifs umount' look: either removed while mounted (a cleaner of /tmp or of
        the runtime directory, a logout that removes /run/user/UID, by hand) made a healthy
        daemon "not answering … kill -9", or its mount "not a privifs mount" (helper hX). Each is
        made again within :data:`CONTROL_CHECK` seconds; a socket replaced keeps serving, unnamed."""
        path = control_socket_path(self.state_dir)
        made = None
        try:
            async with trio.open_nursery() as nursery:
                made = await self._control_listener(path, nursery)
                task_status.started(path)
                while True:
                    await trio.sleep(CONTROL_CHECK)
                    if _file_id(path) != made:
                        log.warning("the control socket %s was removed while mounted; made again", path)
                        made = await self._control_listener(path, nursery)
                    if self.mounted and not self._registered():
                        log.warning("the mount's entry in the runtime directory was removed; made again")
                        try:
                            self._register(path)
                        except LocalStoreError as exc:
                            log.warning("%s", exc)
        finally:
            if _file_id(path) == made:
                path.unlink(missing_ok=True)

    async def _control_listener(self, path: Path, nursery: trio.Nursery) -> tuple[int, int] | None:
        """Bind the control socket at ``path`` (0600) and serve it in ``nursery``; its file's identity."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
        quiet_failed_accepts()  # out of descriptors: a line a minute, not a traceback every 0.1 s
        nursery.start_soon(trio.serve_listeners, self._control_client, [trio.SocketListener(sock)])
        return _file_id(path)

    def _registry_entry(self) -> dict | None:
        """This mountpoint's entry in the runtime directory (None: missing or unreadable)."""
        try:
            entry = json.loads(registry_path(self.mountpoint).read_text())
        except (OSError, ValueError):
            return None
        return entry if isinstance(entry, dict) else None

    def _registered(self) -> bool:
        """Whether the runtime directory's entry for this mount names this daemon."""
        entry = self._registry_entry()
        return entry is not None and entry.get("pid") == os.getpid()

    async def _control_client(self, stream: trio.SocketStream) -> None:
        async def send(obj: dict) -> None:
            # a client that asked for a flush and read none of its progress lines blocked this
            # handler once the socket's buffer was full: the flush (and syncer.flushing, which
            # hurries retries, and the connection's descriptor) stayed for as long as it was
            # connected. A line it takes nothing of for CONTROL_SEND_TIMEOUT ends the request
            limit = control_send_timeout()
            with trio.move_on_after(limit) as waited:
                await stream.send_all(json.dumps(obj).encode() + b"\n")
            if waited.cancelled_caught:
                log.info("control socket: the client read nothing for %gs; request ended", limit)
                raise trio.ClosedResourceError("the control client does not read")

        try:
            buf = b""
            with trio.move_on_after(10):
                while b"\n" not in buf and len(buf) < 65536:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    buf += data
            try:
                request = json.loads(buf.split(b"\n")[0] or b"{}")
            except (ValueError, RecursionError):  # not JSON, or nested past the parser's limit
                await send({"error": "bad request"})
                return
            if not isinstance(request, dict):
                await send({"error": "bad request: expected a JSON object"})
                return
            try:
                timeout, drain = (request_seconds(request, key) for key in ("timeout", "drain"))
            except ValueError as exc:
                await send({"error": f"bad request: {exc}"})
                return
            cmd = request.get("cmd")
            if cmd == "status":
                await send({"status": self.status()})
            elif cmd == "flush":
                result = await self.flush(lambda p: send({"progress": p}), timeout)
                await send(result)
            elif cmd == "refresh":
                await self.refresher.refresh_once()
                await self.refresher.told_kernel()
                await send({"done": True})
            elif cmd == "unmount":
                busy = await self.detach(drain)
                await send({"error": busy, "busy": True} if busy else {"done": True})
            else:
                await send({"error": f"unknown command {cmd!r}"})
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the control socket
            if not isinstance(exc, PrivifsError):
                self.supervisor.failed("control socket", exc, "request failed unexpectedly")
            try:
                await send({"error": str(exc) if isinstance(exc, PrivifsError) else f"internal error: {exc!r}"})
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        finally:
            await stream.aclose()


def _file_id(path: Path) -> tuple[int, int] | None:
    """The device and inode of ``path`` (None if there is none)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def request_seconds(request: dict, key: str) -> float | None:
    """A control request's number of seconds under ``key`` (None if absent): a finite number of
    at least 0, or ValueError. An integer too large for a float (``"drain": 10**400``) reached
    the clock's arithmetic: an internal error, and after an unmount the daemon ended without
    the drain it was asked for."""
    value = request.get(key)
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        seconds = float(value)
    except (TypeError, OverflowError):
        raise ValueError(f"{key} must be a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{key} must be a finite number of seconds, at least 0")
    return seconds


def holds_files(directory: Path) -> bool:
    """Whether ``directory`` holds a file (not counting its subdirectories; False if it does not exist)."""
    try:
        with os.scandir(directory) as entries:
            return any(e.is_file(follow_symlinks=False) for e in entries)
    except OSError:
        return False


def same_disk(a: Path, b: Path) -> bool:
    """Whether the directories ``a`` and ``b`` are on one filesystem (False if either is missing)."""
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False
