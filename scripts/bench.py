#!/usr/bin/env python3
"""Benchmark privifs side by side with what its users would pick instead, in one run on one
machine: local disk, pyfuse3's passthrough example (the ceiling of a Python FUSE filesystem),
gocryptfs, rclone mount of a crypt remote over a local directory (``--vfs-cache-mode full``),
and privifs on its embedded engine.

Every contender gets the same workloads (marked n/a where one does not apply), all mounted for
the whole run, each workload on every contender before the next; each figure is the median of
``--runs`` runs (the spread is min–max). Every cold read starts from the same state for all:
the contender's own cache emptied, ``sync``, the kernel's page cache dropped (see :func:`cold`).
Results go to docs/benchmarks.md (table, machine, versions, load) with a chart of privifs against
each contender as ratios (docs/benchmarks.png); ``--quick`` is a smoke test with small sizes
whose report goes to /var/tmp. Run it with ``scripts/bench``. Nothing is left mounted, running or
on disk afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil

from privifs.devkit.mount import isolated_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1024 * 1024
WAIT = 300


def sh(*cmd, check=True, timeout=WAIT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, timeout=timeout, capture_output=True, text=True, **kw)


def drop_caches(control: Path = Path("/proc/sys/vm/drop_caches")) -> None:
    """Sync, then drop the kernel's page cache, dentries and inodes. Cold reads are not measured
    without it: it fails loudly (it needs root) instead of measuring a warm read."""
    os.sync()
    try:
        control.write_text("3\n")
    except OSError as exc:
        raise RuntimeError(f"cannot drop the page cache ({exc}); cold reads need root") from exc


def wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {path} failed: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not mount within {timeout}s")
        time.sleep(0.05)


def force_unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=60)
    if os.path.ismount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=60)


def _reap(proc: subprocess.Popen | None) -> None:
    """Wait for a filesystem process after its unmount; kill it if it does not exit."""
    if proc is not None:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# -- contenders ----------------------------------------------------------------------------------
class Contender:
    name = "?"

    def __init__(self, work: Path):
        self.work = work / self.name
        self.work.mkdir(parents=True)
        self.mnt = self.work / "mnt"
        self.mnt.mkdir()

    def start(self) -> None: ...

    def stop(self) -> None:
        force_unmount(self.mnt)

    def settle(self) -> None:
        """Wait until everything written is durable where this contender keeps it."""
        os.sync()

    def clear_cache(self) -> None:
        """Empty this contender's own cache so the next read is cold (the page cache is dropped
        separately, by :func:`cold`)."""

    def backing(self) -> list[Path]:
        """Where this contender keeps what was written (for the page-cache check of cold reads)."""
        return [self.mnt]

    def pids(self) -> dict[str, int]:
        return {}

    def version(self) -> str:
        return ""


class Local(Contender):
    name = "local disk"

    def version(self) -> str:
        return f"{platform.system()} {platform.release()}"


class Passthrough(Contender):
    name = "pyfuse3 passthrough"

    def __init__(self, work: Path, script: Path):
        super().__init__(work)
        self.script = script
        self.src = self.work / "src"
        self.src.mkdir()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [PY, str(self.script), str(self.src), str(self.mnt)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_mounted(self.mnt, self.proc)

    def stop(self) -> None:
        super().stop()
        _reap(self.proc)

    def pids(self) -> dict[str, int]:
        return {"daemon": self.proc.pid}

    def backing(self) -> list[Path]:
        return [self.src]

    def version(self) -> str:
        import pyfuse3

        return f"pyfuse3 {pyfuse3.__version__ if hasattr(pyfuse3, '__version__') else ''} examples/passthroughfs.py"


class Gocryptfs(Contender):
    name = "gocryptfs"

    def __init__(self, work: Path):
        super().__init__(work)
        self.cipher = self.work / "cipher"
        self.cipher.mkdir()
        self.passfile = self.work / "pass"
        self.passfile.write_text("benchmark-passphrase\n")
        sh("gocryptfs", "-init", "-q", "-passfile", self.passfile, self.cipher)

    def start(self) -> None:
        sh("gocryptfs", "-q", "-passfile", self.passfile, self.cipher, self.mnt)
        wait_mounted(self.mnt)

    def pids(self) -> dict[str, int]:
        for p in psutil.process_iter(["cmdline"]):
            if p.info["cmdline"] and "gocryptfs" in p.info["cmdline"][0] and str(self.mnt) in p.info["cmdline"]:
                return {"daemon": p.pid}
        return {}

    def backing(self) -> list[Path]:
        return [self.cipher]

    def version(self) -> str:
        return sh("gocryptfs", "-version").stdout.split(";")[0].strip()


class Rclone(Contender):
    name = "rclone crypt"

    def __init__(self, work: Path):
        super().__init__(work)
        self.remote = self.work / "remote"
        self.remote.mkdir()
        self.cache = self.work / "cache"
        self.conf = self.work / "rclone.conf"
        obscured = sh("rclone", "obscure", "benchmark-passphrase").stdout.strip()
        self.conf.write_text(
            f"[local]\ntype = local\n\n[crypt]\ntype = crypt\nremote = local:{self.remote}\npassword = {obscured}\n"
        )
        self.proc: subprocess.Popen | None = None
        self.rc_port = _free_port()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "rclone",
                "--config",
                str(self.conf),
                "mount",
                "crypt:",
                str(self.mnt),
                "--vfs-cache-mode",
                "full",
                "--cache-dir",
                str(self.cache),
                "--rc",
                "--rc-no-auth",
                f"--rc-addr=127.0.0.1:{self.rc_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_mounted(self.mnt, self.proc)

    def stop(self) -> None:
        super().stop()
        _reap(self.proc)

    def settle(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            r = sh("rclone", "rc", f"--url=http://127.0.0.1:{self.rc_port}/", "vfs/stats", check=False)
            try:
                cache = json.loads(r.stdout)["diskCache"]
                if cache["uploadsInProgress"] == 0 and cache["uploadsQueued"] == 0:
                    return
            except (ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise RuntimeError("rclone did not finish uploading")

    def clear_cache(self) -> None:
        self.stop()
        shutil.rmtree(self.cache, ignore_errors=True)
        self.start()

    def pids(self) -> dict[str, int]:
        return {"daemon": self.proc.pid}

    def backing(self) -> list[Path]:
        return [self.remote]

    def version(self) -> str:
        return sh("rclone", "version").stdout.splitlines()[0]


class Privifs(Contender):
    name = "privifs"

    def __init__(self, work: Path):
        super().__init__(work)
        self.env = isolated_env(self.work / "home")  # no server configured: the embedded engine
        self.cmd = [PY, "-m", "privifs"]
        self.mount_args: list[str] = []  # extra `privifs mount` options for the next start
        self.cache_dir = Path(self.env["XDG_CACHE_HOME"]) / "privifs"  # the encrypted content cache
        sh(*self.cmd, "init", env=self.env)

    def start(self) -> None:
        sh(*self.cmd, "mount", *self.mount_args, self.mnt, env=self.env)

    def stop(self) -> None:
        if os.path.ismount(self.mnt):
            sh(*self.cmd, "umount", self.mnt, env=self.env, check=False)
        super().stop()

    def _entry(self) -> dict:
        reg = Path(self.env["XDG_RUNTIME_DIR"]) / "privifs" / "mounts"
        for f in reg.glob("*.json"):
            return json.loads(f.read_text())
        raise RuntimeError("privifs is not mounted")

    def settle(self) -> None:
        from privifs.fs.registry import control_request

        answer = list(control_request(self._entry(), {"cmd": "flush", "timeout": WAIT}, timeout=WAIT + 30))
        if not answer[-1].get("done"):
            raise RuntimeError(f"privifs did not finish uploading: {answer[-1]}")

    def clear_cache(self) -> None:
        self.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.start()
        if dir_bytes(self.cache_dir / "vaults") > MiB:  # the sealed index alone is a few KiB
            raise RuntimeError(f"privifs's content cache {self.cache_dir} is not empty after clearing it")

    def backing(self) -> list[Path]:
        return [Path(self.env["XDG_DATA_HOME"]), Path(self.env["XDG_STATE_HOME"]), self.cache_dir]

    def pids(self) -> dict[str, int]:
        pid = self._entry()["pid"]
        out = {"daemon": pid}
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "engine" in cmd and any(self.env["XDG_DATA_HOME"] in c for c in cmd):
                out["engine"] = p.pid
        return out

    def version(self) -> str:
        return f"privifs {__import__('privifs').__version__} (embedded engine)"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- cold reads ---------------------------------------------------------------------------------
def backing_files(c: Contender) -> list[Path]:
    """The files of more than 1 MiB where a contender keeps what was written (the local file, the
    gocryptfs or rclone ciphertext, the privifs engine's blobs): they must not be in the page
    cache when a cold read starts."""
    out = []
    for root in c.backing():
        for d, _, files in os.walk(root):
            for f in files:
                p = Path(d) / f
                try:
                    if p.stat().st_size > MiB:
                        out.append(p)
                except OSError:
                    pass
    return out


def resident_bytes(files: list[Path]) -> int:
    """How many bytes of ``files`` sit in the kernel page cache (util-linux ``fincore``)."""
    if not files or not shutil.which("fincore"):
        return 0
    r = sh("fincore", "-b", "-n", "-o", "RES", *files, check=False)
    return sum(int(x) for x in r.stdout.split() if x.isdigit())


def cold(c: Contender, res: dict) -> None:
    """Make the next read cold, the same way for every contender: the contender's own cache is
    emptied (privifs's content cache, rclone's VFS cache; the mount is restarted for that), all
    that was written is synced, and the kernel's page cache is dropped, which takes the mounted
    file's pages and the backing files (ciphertext, the engine's blobs) with it. Checks it: the
    backing files' pages still resident are recorded (``cold_resident_MiB`` in the JSON), and the
    machine's 1-minute load average at that moment (``cold_load``)."""
    c.clear_cache()
    drop_caches()
    res.setdefault("cold_resident_MiB", []).append(resident_bytes(backing_files(c)) / MiB)
    res.setdefault("cold_load", []).append(os.getloadavg()[0])


# -- workloads ----------------------------------------------------------------------------------
def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def write_big(path: Path, mib: int, block: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def read_all(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            n += len(chunk)
    return n


def read_at(path: Path, offset: int, size: int) -> int:
    """Open ``path`` and read ``size`` bytes from ``offset`` (as a program seeking into a file)."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while n < size and (chunk := f.read(size - n)):
            n += len(chunk)
    return n


def small_files(root: Path, count: int, dirs: int) -> None:
    payload = os.urandom(4096)
    for d in range(dirs):
        sub = root / f"d{d:02d}"
        sub.mkdir()
        for i in range(count // dirs):
            with open(sub / f"f{i:04d}", "wb") as f:
                f.write(payload)


def read_small(root: Path) -> None:
    for sub in sorted(root.iterdir()):
        for f in sub.iterdir():
            with open(f, "rb") as fh:
                fh.read()


def delete_small(root: Path) -> None:
    for sub in list(root.iterdir()):
        for f in list(sub.iterdir()):
            f.unlink()
        sub.rmdir()


def ls_lr(root: Path) -> None:
    sh("ls", "-lR", root)


def fio_randread(path: Path, seconds: int, size_mib: int) -> float:
    r = sh(
        "fio",
        "--name=randread",
        f"--filename={path}",
        "--rw=randread",
        "--bs=4k",
        f"--size={size_mib}M",
        "--ioengine=psync",
        f"--runtime={seconds}",
        "--time_based",
        "--output-format=json",
        timeout=seconds + 120,
    )
    return json.loads(r.stdout)["jobs"][0]["read"]["iops"]


def dir_bytes(root: Path) -> int:
    """Disk space used under ``root`` (allocated blocks), 0 if it does not exist. Each file is
    counted once, as ``du`` does: a file renamed from one directory to another while the walk
    runs (a download entering the cache) would otherwise be counted in both."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for d, _, files in os.walk(root):
        for f in files:
            try:
                st = os.lstat(os.path.join(d, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def proc_rchar(pid: int | None) -> int:
    """Bytes a process has read through read()/sendfile so far (the engine reading its blobs)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except (OSError, TypeError):
        pass
    return 0


class DirPeak:
    """Peak size of a directory while the block runs, sampled every 0.1 s."""

    def __init__(self, root: Path):
        self.root, self.peak = root, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, dir_bytes(self.root))
            if self._stop.wait(0.1):
                return

    def __enter__(self) -> DirPeak:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, dir_bytes(self.root))


class RssWatch:
    """Peak RSS of a contender's processes (daemon, engine) over its whole run, sampled every
    0.1 s; the processes are looked up again every second, since a cold read restarts them."""

    def __init__(self, c: Contender):
        self.c = c
        self.peak: dict[str, int] = {}
        self.phase = "start"  # the workload running (set by run_all)
        self.phase_peak: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        procs: dict[str, psutil.Process] = {}
        looked = 0.0
        while not self._stop.is_set():
            if time.monotonic() - looked > 1.0:
                looked = time.monotonic()
                try:
                    procs = {name: psutil.Process(pid) for name, pid in self.c.pids().items()}
                except Exception:  # noqa: BLE001 - not mounted at this instant (a restart)
                    pass
            for name, p in procs.items():
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak.get(name, 0), rss)
                key = (name, self.phase)
                self.phase_peak[key] = max(self.phase_peak.get(key, 0), rss)
            self._stop.wait(0.1)

    def __enter__(self) -> RssWatch:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


class Ctx:
    """What a workload needs: the options, sizes, the tarball, and where its figures go."""

    def __init__(self, c: Contender, args, tarball: Path, res: dict):
        self.c, self.args, self.tarball, self.res = c, args, tarball, res
        self.block = os.urandom(MiB)
        self.durable_fsync = c.name in ("local disk", "pyfuse3 passthrough", "gocryptfs")

    def add(self, key: str, value: float) -> None:
        self.res.setdefault(key, []).append(value)

    def last(self, run: int) -> bool:
        """Whether ``run`` is the workload's last on this contender (time to clean up)."""
        return run == self.args.runs - 1

    def na(self, *keys: str, why: str) -> None:
        """Record that these figures do not apply to this contender (shown as n/a), and why."""
        for key in keys:
            self.res.setdefault("n/a", {})[key] = why


WORKLOADS: dict[str, object] = {}


def workload(name: str):
    def register(fn):
        WORKLOADS[name] = fn
        return fn

    return register


@workload("big")
def w_big(x: Ctx, run: int) -> None:
    """1 GiB written until durable, read cold, read warm."""
    c, mib = x.c, x.args.big_mib
    target = c.mnt / f"big{run}.bin"
    t = timed(lambda: (write_big(target, mib, x.block, x.durable_fsync), c.settle()))
    x.add("write_MBps", mib * MiB / t / 1e6)
    cold(c, x.res)
    t = timed(lambda: read_all(target))
    x.add("cold_read_MBps", mib * MiB / t / 1e6)
    t = timed(lambda: read_all(target))
    x.add("warm_read_MBps", mib * MiB / t / 1e6)
    target.unlink()
    c.settle()


@workload("seek")
def w_seek(x: Ctx, run: int) -> None:
    """A cold 2 GiB file: time to its first byte, and to 1 MiB read from its middle."""
    c, mib = x.c, x.args.huge_mib
    target = c.mnt / "huge.bin"
    if run == 0:
        write_big(target, mib, x.block, x.durable_fsync)
        c.settle()
    cold(c, x.res)
    x.add("first_byte_s", timed(lambda: read_at(target, 0, 1)))
    cold(c, x.res)
    x.add("middle_1MiB_s", timed(lambda: read_at(target, mib * MiB // 2, MiB)))
    if x.last(run):
        target.unlink()
        c.settle()


def remount(c: Privifs, *mount_args: str) -> None:
    """Restart privifs's mount with these extra options (none: as at the start)."""
    c.mount_args = list(mount_args)
    c.stop()
    c.start()


@workload("cache")
def w_cache(x: Ctx, run: int) -> None:
    """privifs only: a file bigger than ``--cache-size`` read twice. The cache directory's peak
    size during the reads, and how much the engine served (its blob reads) on each read."""
    c = x.c
    if not isinstance(c, Privifs):
        x.na(
            "cache_read_MBps",
            "cache_peak_MiB",
            "cache_first_fetch_MiB",
            "cache_second_fetch_MiB",
            why="privifs's --cache-size only",
        )
        return
    mib = x.args.cache_file_mib
    target = c.mnt / "cached.bin"
    if run == 0:
        remount(c, "--cache-size", x.args.cache_size)
        write_big(target, mib, x.block, False)
        c.settle()
    cold(c, x.res)
    engine = c.pids().get("engine")
    with DirPeak(c.cache_dir) as peak:
        before = proc_rchar(engine)
        t = timed(lambda: read_all(target))
        first = proc_rchar(engine) - before
        drop_caches()  # the kernel's pages of the file go; privifs's cache stays
        before = proc_rchar(engine)
        read_all(target)
        second = proc_rchar(engine) - before
    x.add("cache_read_MBps", mib * MiB / t / 1e6)
    x.add("cache_peak_MiB", peak.peak / MiB)
    x.add("cache_first_fetch_MiB", first / MiB)
    x.add("cache_second_fetch_MiB", second / MiB)
    if x.last(run):
        target.unlink()
        c.settle()
        remount(c)


def has_fsync_local(mount_help: str) -> bool:
    """Whether ``privifs mount --help`` offers ``--fsync`` with a ``local`` mode (in the option's
    own paragraph, from "  --fsync …" to the next option; ``--fsync-timeout`` does not count)."""
    m = re.search(r"^\s+--fsync(?![-\w]).*?(?=^\s+-|\Z)", mount_help, re.M | re.S)
    return m is not None and re.search(r"\blocal\b", m.group(0)) is not None


def fsync_local_supported() -> bool:
    """Whether this privifs has the opt-in ``--fsync local`` mount option."""
    return has_fsync_local(sh(PY, "-m", "privifs", "mount", "--help", check=False).stdout)


def build_db(db: Path, mib: int) -> None:
    """A SQLite database of about ``mib`` MiB (64 KiB rows), committed in one transaction."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA journal_mode=DELETE")
        conn.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, data BLOB)")
        conn.execute("CREATE TABLE small (id INTEGER PRIMARY KEY, at REAL, note TEXT)")
        with conn:
            conn.executemany("INSERT INTO big (data) VALUES (?)", ((os.urandom(65536),) for _ in range(mib * 16)))
    finally:
        conn.close()


def small_commits(db: Path, journal: str, seconds: float) -> float:
    """Commits per second of one small row each (``synchronous=FULL``), for ``seconds`` (at least
    three commits)."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute(f"PRAGMA journal_mode={journal}")
        conn.execute("PRAGMA synchronous=FULL")
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO small (at, note) VALUES (?, ?)", (time.time(), "x" * 100))
            conn.execute("COMMIT")
            n += 1
        elapsed = time.perf_counter() - t0
        conn.execute("PRAGMA journal_mode=DELETE")
        return n / elapsed
    finally:
        conn.close()


def _sqlite_pass(x: Ctx, suffix: str) -> None:
    """One database built, small commits with each journal, the database removed."""
    c = x.c
    db = c.mnt / "bench.db"
    build_db(db, x.args.sqlite_mib)
    c.settle()
    for journal in ("delete", "wal"):
        key = f"sqlite_{journal}{suffix}_cps"
        if key in x.res.get("n/a", {}):
            continue  # failed on an earlier run
        try:
            x.add(key, small_commits(db, journal, x.args.commit_seconds))
        except sqlite3.Error as exc:
            x.na(key, why=f"SQLite failed: {exc}")
            print(f"   sqlite {journal}{suffix} on {c.name}: {exc}", flush=True)
    for f in c.mnt.glob("bench.db*"):
        f.unlink()
    c.settle()


@workload("sqlite")
def w_sqlite(x: Ctx, run: int) -> None:
    """Small commits on a 100 MiB SQLite database, rollback journal and WAL, synchronous=FULL;
    privifs also with ``--fsync local`` when it has that option."""
    c = x.c
    _sqlite_pass(x, "")
    keys = ("sqlite_delete_local_cps", "sqlite_wal_local_cps")
    if not isinstance(c, Privifs):
        x.na(*keys, why="privifs's --fsync local only")
    elif not fsync_local_supported():
        x.na(*keys, why="this privifs has no --fsync local mount option")
        if run == 0:
            print("   privifs has no --fsync local option: skipped", flush=True)
    else:
        remount(c, "--fsync", "local")
        try:
            _sqlite_pass(x, "_local")
        finally:
            remount(c)


@workload("drain")
def w_drain(x: Ctx, run: int) -> None:
    """5,000 small files created, then waited for until durable where the contender keeps them
    (privifs: its daemon reports nothing pending, i.e. all are in the vault)."""
    c, n = x.c, x.args.drain_files
    root = c.mnt / f"drain{run}"
    root.mkdir()
    c.settle()
    t0 = time.perf_counter()
    small_files(root, n, 50)
    created = time.perf_counter() - t0
    c.settle()
    total = time.perf_counter() - t0
    x.add("drain_fps", n / total)
    x.add("drain_create_s", created)
    x.add("drain_settle_s", total - created)
    delete_small(root)
    root.rmdir()
    c.settle()


@workload("randread")
def w_randread(x: Ctx, run: int) -> None:
    """4 KiB random reads in a file already read once (fio, psync)."""
    c, mib = x.c, x.args.fio_mib
    rand = c.mnt / "rand.bin"
    if run == 0:
        write_big(rand, mib, x.block, False)
        c.settle()
    read_all(rand)
    x.add("randread_4k_iops", fio_randread(rand, x.args.fio_seconds, mib))
    if x.last(run):
        rand.unlink()
        c.settle()


@workload("small")
def w_small(x: Ctx, run: int) -> None:
    """5,000 × 4 KiB files: create, ls -lR, read all, delete."""
    c, n = x.c, x.args.small_files
    root = c.mnt / f"small{run}"
    root.mkdir()
    x.add("small_create_fps", n / timed(lambda: small_files(root, n, 50)))
    x.add("small_ls_lR_fps", n / timed(lambda: ls_lr(root)))
    x.add("small_read_fps", n / timed(lambda: read_small(root)))
    c.settle()
    x.add("small_delete_fps", n / timed(lambda: delete_small(root)))
    root.rmdir()
    c.settle()


@workload("untar")
def w_untar(x: Ctx, run: int) -> None:
    """Untar the Python standard library, then git add -A && commit in it."""
    c = x.c
    dest = c.mnt / f"untar{run}"  # a fresh tree per run; all go with the contender
    dest.mkdir()
    x.add("untar_s", timed(lambda: sh("tar", "-xf", x.tarball, "-C", dest)))

    def git() -> None:
        sh("git", "init", "-q", dest)
        sh("git", "-C", dest, "add", "-A")
        sh("git", "-C", dest, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "bench")

    x.add("git_add_commit_s", timed(git))
    c.settle()


def run_all(contenders: list[Contender], args, tarball: Path, results: dict, save: Path) -> None:
    """Each workload's runs taken in turns: run 1 on every contender, then run 2 on every
    contender, and so on, before the next workload. All contenders stay mounted for the whole
    run, so a change in the machine's load (it is shared) lands on all of them alike rather than
    on whichever ran last."""
    watches = []
    try:
        for c in contenders:
            c.start()
            watches.append(RssWatch(c).__enter__())
        for name in args.only:
            print(f"== {name}", flush=True)
            ctxs = [Ctx(c, args, tarball, results.setdefault(c.name, {})) for c in contenders]
            for watch in watches:
                watch.phase = name
            for run in range(args.runs):
                for x in ctxs:
                    t = time.time()
                    WORKLOADS[name](x, run)
                    print(f"   run {run + 1}, {x.c.name}: {time.time() - t:.0f}s", flush=True)
                    save.write_text(json.dumps(results))
    finally:
        for c, watch in zip(contenders, watches, strict=False):
            watch.__exit__(None, None, None)
            for role, peak in watch.peak.items():
                results.setdefault(c.name, {}).setdefault(f"rss_{role}_MiB", []).append(peak / MiB)
            for (role, phase), peak in watch.phase_peak.items():  # in the JSON: where each peak was
                results.setdefault(c.name, {})[f"rss_{role}_MiB_during_{phase}"] = [peak / MiB]


def summarise(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


METRICS = [
    ("write_MBps", "1 GiB write to durable", "MB/s", True),
    ("cold_read_MBps", "1 GiB cold read", "MB/s", True),
    ("warm_read_MBps", "1 GiB warm read", "MB/s", True),
    ("first_byte_s", "first byte of a cold 2 GiB file", "s", False),
    ("middle_1MiB_s", "1 MiB from the middle of a cold 2 GiB file", "s", False),
    ("cache_read_MBps", "4 GiB cold read, --cache-size 1G", "MB/s", True),
    ("cache_peak_MiB", "… cache directory at its largest", "MiB", False),
    ("cache_first_fetch_MiB", "… engine served, first read", "MiB", False),
    ("cache_second_fetch_MiB", "… engine served, second read", "MiB", False),
    ("sqlite_delete_cps", "SQLite 100 MiB, rollback journal: commits", "1/s", True),
    ("sqlite_wal_cps", "SQLite 100 MiB, WAL: commits", "1/s", True),
    ("sqlite_delete_local_cps", "… rollback journal, --fsync local", "1/s", True),
    ("sqlite_wal_local_cps", "… WAL, --fsync local", "1/s", True),
    ("drain_fps", "5,000 × 4 KiB created until durable", "files/s", True),
    ("drain_settle_s", "… of which waiting after the last create", "s", False),
    ("randread_4k_iops", "4 KiB random reads (cached 256 MiB)", "IOPS", True),
    ("small_create_fps", "5,000 × 4 KiB: create", "files/s", True),
    ("small_ls_lR_fps", "5,000 × 4 KiB: ls -lR", "files/s", True),
    ("small_read_fps", "5,000 × 4 KiB: read all", "files/s", True),
    ("small_delete_fps", "5,000 × 4 KiB: delete", "files/s", True),
    ("untar_s", "untar Python stdlib", "s", False),
    ("git_add_commit_s", "git add -A && commit", "s", False),
    ("rss_daemon_MiB", "daemon peak RSS, whole run", "MiB", False),
    ("rss_engine_MiB", "engine peak RSS, whole run", "MiB", False),
    ("cold_load", "1-min load average at the cold reads", "", False),
]
# rows that describe a run rather than compare the contenders: not in the chart
NOT_CHARTED = {"drain_settle_s", "cache_first_fetch_MiB", "cache_second_fetch_MiB", "cold_load"}


LOCAL, GOCRYPTFS, RCLONE = "local disk", "gocryptfs", "rclone crypt"
# Issue 15's targets: (what, metric, contender, kind, bound, the contender's metric if another).
# "ratio": privifs / contender >= bound (higher is better); "time": privifs / contender <= bound;
# "le" / "ge": privifs <= / >= bound; "rss": privifs < bound and <= contender.
TARGETS = [
    ("first byte, cold 2 GiB file ≤ 0.3 s", "first_byte_s", None, "le", 0.3),
    ("1 MiB from the middle of a cold 2 GiB file ≤ 0.3 s", "middle_1MiB_s", None, "le", 0.3),
    ("1 GiB cold sequential read ≥ gocryptfs", "cold_read_MBps", GOCRYPTFS, "ratio", 1.0),
    ("1 GiB write until durable in the vault ≥ gocryptfs", "write_MBps", GOCRYPTFS, "ratio", 1.0),
    ("4 GiB file read with --cache-size 1G: cache ≤ 1 GiB", "cache_peak_MiB", None, "le", 1024.0),
    (
        "small commits, 100 MiB SQLite db (rollback journal), default fsync ≥ 10/s",
        "sqlite_delete_cps",
        None,
        "ge",
        10.0,
    ),
    (
        "same with --fsync local ≥ 50 % of local disk",
        "sqlite_delete_local_cps",
        LOCAL,
        "ratio",
        0.5,
        "sqlite_delete_cps",
    ),
    ("5,000 small files created, then drained to the vault ≥ 400 files/s", "drain_fps", None, "ge", 400.0),
    ("untar ≤ gocryptfs", "untar_s", GOCRYPTFS, "time", 1.0),
    ("git add + commit ≤ gocryptfs", "git_add_commit_s", GOCRYPTFS, "time", 1.0),
    ("4 KiB random reads, cached ≥ gocryptfs", "randread_4k_iops", GOCRYPTFS, "ratio", 1.0),
    ("5,000 small creates ≥ gocryptfs", "small_create_fps", GOCRYPTFS, "ratio", 1.0),
    ("5,000 small reads ≥ gocryptfs", "small_read_fps", GOCRYPTFS, "ratio", 1.0),
    ("5,000 small deletes ≥ gocryptfs", "small_delete_fps", GOCRYPTFS, "ratio", 1.0),
    ("daemon peak RSS < 200 MiB throughout", "rss_daemon_MiB", None, "rss", 200.0),
    ("engine peak RSS < 150 MiB", "rss_engine_MiB", None, "rss", 150.0),
]


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 0.01 else f"{v:.4f}"


def targets_table(results: dict) -> str:
    """Each target of the issue, judged on the medians of this run."""
    rows = ["| target | measured (privifs vs contender, medians) | |", "|---|---|---|"]
    units = {key: unit for key, _, unit, _ in METRICS}
    for what, key, other, kind, bound, *rest in TARGETS:
        other_key = rest[0] if rest else key
        mine = results.get("privifs", {}).get(key)
        theirs = results.get(other, {}).get(other_key) if other else None
        if not mine or (other and not theirs):
            why = results.get("privifs", {}).get("n/a", {}).get(key)
            rows.append(f"| {what} | {'not measured: ' + why if why else 'not measured in this run'} | – |")
            continue
        m = statistics.median(mine)
        o = statistics.median(theirs) if theirs else None
        unit = units[key]
        if kind == "ratio":
            ratio = m / o
            met, text = ratio >= bound, f"{_num(m)} vs {_num(o)} {unit}: **{ratio:.2f}×**"
        elif kind == "time":
            ratio = m / o
            met, text = ratio <= bound, f"{_num(m)} vs {_num(o)} {unit}: **{ratio:.2f}×** the time"
        elif kind in ("le", "ge"):
            met = m <= bound if kind == "le" else m >= bound
            text = f"{_num(m)} {unit}"
        else:
            met = m < bound and (o is None or m <= o)
            text = f"{_num(m)} {unit}" + (f" vs {_num(o)} {unit}" if o is not None else "")
        rows.append(f"| {what} | {text} | {'met' if met else '**missed**'} |")
    return "\n".join(rows)


def report(
    results: dict,
    versions: dict,
    args,
    started: float,
    elapsed: float,
    out_md: Path,
    out_png: Path,
    command: str = "",
    conditions: list[str] | None = None,
    machine: str = "",
) -> str:
    command = command or " ".join(["scripts/bench", *sys.argv[1:]])
    names = list(results)
    lines = ["| workload | unit | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key, label, unit, _ in METRICS:
        if not any(key in results[n] or key in results[n].get("n/a", {}) for n in names):
            continue  # a workload this run did not include (see the Targets table)
        cells = []
        for n in names:
            vals = results[n].get(key)
            if not vals:
                cells.append("n/a" if key in results[n].get("n/a", {}) else "–")
                continue
            med, lo, hi = summarise(vals)
            digits = 0 if med >= 100 else 2 if med >= 0.01 or med == 0 else 4
            fmt = lambda v, d=digits: f"{v:,.{d}f}"  # noqa: E731 - one format per cell
            cells.append(f"{fmt(med)} ({fmt(lo)}–{fmt(hi)})" if len(vals) > 1 else fmt(med))
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    _chart(results, out_png)
    machine = machine or this_machine()
    md = [
        "# Benchmarks",
        "",
        "Produced by `scripts/bench` (the numbers below are replaced on every run; the text around them",
        "is kept in scripts/bench.py). Each figure is the median of "
        f"{args.runs} runs, with min–max in brackets; all contenders ran in the same run, on the same machine.",
        "",
        f"* run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {elapsed / 60:.1f} minutes in all",
        f"* machine: {machine}",
        "* versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()),
        f"* command: `{command}`",
        *(conditions or []),
        "",
        "## Results",
        "",
        "n/a: the workload does not apply to that contender (the reason is in the JSON); –: not measured;",
        "workloads this run did not include have no row.",
        "",
        table,
        "",
        "![privifs against each contender (ratio; above 1 means privifs is better)](benchmarks.png)",
        "",
        "## Targets",
        "",
        "Issue 15's targets, judged on the medians above (privifs against the named contender, same run,",
        f"same machine); the raw figures of every run are in `{out_md.with_suffix('.json').name}`.",
        "",
        targets_table(results),
        "",
    ]
    out_md.write_text("\n".join(md) + "\n" + _notes())
    return table


def this_machine() -> str:
    cpu = platform.processor() or _cpu_model()
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{psutil.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def _saved_machine(saved: dict, out_md: Path) -> str:
    """The machine a saved run ran on: from its JSON, or (older JSON) from the report it made."""
    if saved.get("machine"):
        return saved["machine"]
    if out_md.exists():
        for line in out_md.read_text().splitlines():
            if line.startswith("* machine: "):
                return line.removeprefix("* machine: ")
    return "not recorded"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _notes() -> str:
    notes = ROOT / "docs" / "benchmarks-notes.md"
    return notes.read_text() if notes.exists() else ""


def _chart(results: dict, out_png: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("   no chart: matplotlib is not installed (scripts/bench installs it)", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "privifs" not in results:
        return
    others = [n for n in results if n != "privifs"]
    labels, series = [], {n: [] for n in others}
    for key, label, _, higher_better in METRICS:
        if key in NOT_CHARTED:
            continue
        mine = results["privifs"].get(key)
        if not mine or not any(results[n].get(key) for n in others):
            continue
        labels.append(label)
        m = statistics.median(mine)
        for n in others:
            vals = results[n].get(key)
            if not vals:
                series[n].append(float("nan"))
                continue
            o = statistics.median(vals)
            series[n].append((m / o) if higher_better else (o / m if m else float("nan")))
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(labels) + 1.5))
    height = 0.8 / max(1, len(others))
    for i, n in enumerate(others):
        ax.barh([y + i * height for y in range(len(labels))], series[n], height=height, label=f"vs {n}")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks([y + height * (len(others) - 1) / 2 for y in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("privifs / contender (higher is better for privifs; log scale)")
    if others:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def make_tarball(work: Path, quick: bool = False) -> Path:
    """The Python standard library as a tar (with --quick, four of its packages)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tarball = work / "stdlib.tar"

    def skip(ti):
        return None if "__pycache__" in ti.name or "site-packages" in ti.name else ti

    with tarfile.open(tarball, "w") as tf:
        for part in ("email", "json", "asyncio", "unittest") if quick else ("",):
            tf.add(stdlib / part, arcname=f"stdlib/{part}".rstrip("/"), filter=skip)
    return tarball


def passthrough_script(work: Path) -> Path:
    import pyfuse3

    version = getattr(pyfuse3, "__version__", None) or __import__("importlib.metadata").metadata.version("pyfuse3")
    sh(PY, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "pyfuse3", f"pyfuse3=={version}", "-d", work)
    sdist = next(work.glob("pyfuse3-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("examples/passthroughfs.py"))
        member.name = "passthroughfs.py"
        tf.extract(member, work)
    return work / "passthroughfs.py"


QUICK = {
    "runs": 1,
    "big_mib": 64,
    "huge_mib": 128,
    "cache_file_mib": 192,
    "cache_size": "64M",
    "sqlite_mib": 8,
    "commit_seconds": 2.0,
    "small_files": 300,
    "drain_files": 300,
    "fio_seconds": 2,
    "fio_mib": 32,
}
FULL = {
    "runs": 3,
    "big_mib": 1024,
    "huge_mib": 2048,
    "cache_file_mib": 4096,
    "cache_size": "1G",
    "sqlite_mib": 100,
    "commit_seconds": 10.0,
    "small_files": 5000,
    "drain_files": 5000,
    "fio_seconds": 5,
    "fio_mib": 256,
}
CONTENDERS = ["local disk", "pyfuse3 passthrough", "gocryptfs", "rclone crypt", "privifs"]


def _names(values: list[str] | None, known: list[str], what: str) -> list[str]:
    """Comma-separated (and repeatable) names, each checked against ``known``, in ``known``'s order."""
    if not values:
        return list(known)
    asked = {n.strip() for v in values for n in v.split(",") if n.strip()}
    unknown = asked - set(known)
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(sorted(unknown))} (known: {', '.join(known)})")
    return [n for n in known if n in asked]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        default=bool(os.environ.get("BENCH_QUICK")),
        help="small sizes and one run (also BENCH_QUICK=1): a smoke test in a few minutes; the report "
        "goes to /var/tmp/privifs-bench-quick.md unless --out is given",
    )
    ap.add_argument(
        "--only", action="append", metavar="WORKLOAD,...", help=f"run only these workloads (of: {', '.join(WORKLOADS)})"
    )
    ap.add_argument(
        "--contender",
        action="append",
        metavar="NAME,...",
        help=f"run only these contenders (of: {', '.join(CONTENDERS)})",
    )
    for key, value in FULL.items():
        ap.add_argument(
            "--" + key.replace("_", "-"),
            type=type(value),
            default=None,
            help=f"default {value} ({QUICK[key]} with --quick)",
        )
    ap.add_argument("--out", type=Path, default=None, help="the report (default docs/benchmarks.md)")
    ap.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="only rewrite the report from raw figures saved by an earlier run (docs/benchmarks.json)",
    )
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = _names(args.only, list(WORKLOADS), "workload")
    args.contender = _names(args.contender, CONTENDERS, "contender")
    if args.out is None:
        args.out = Path("/var/tmp/privifs-bench-quick.md") if args.quick else ROOT / "docs" / "benchmarks.md"
    return args


def conditions(args, load_start: tuple, load_end: tuple) -> list[str]:
    """What a reader needs to judge the figures: the sizes, quick or full, and how busy the machine was."""
    sizes = (
        f"* sizes: big file {args.big_mib} MiB, seek file {args.huge_mib} MiB, {args.cache_file_mib} MiB file "
        f"with --cache-size {args.cache_size}, SQLite {args.sqlite_mib} MiB for {args.commit_seconds:g} s per "
        f"mode, {args.small_files} small files, {args.drain_files} drained, fio {args.fio_mib} MiB for "
        f"{args.fio_seconds} s; workloads: {', '.join(args.only)}"
    )
    load = (
        f"* load average (1, 5, 15 min) at the start: {', '.join(f'{v:.2f}' for v in load_start)}; "
        f"at the end: {', '.join(f'{v:.2f}' for v in load_end)}"
    )
    out = [sizes, load]
    if args.quick:
        out.append(
            "* **--quick: a smoke test with small sizes and one run; not comparable to a full run and "
            "not to be quoted as a benchmark.**"
        )
    return out


def main() -> None:
    args = parse_args()
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        args.runs = saved["runs"]
        legacy = [
            "* these figures come from the script as it was before issue 15's workloads were added: those "
            "workloads have no row (their targets say not measured), the RSS rows cover only the 1 GiB write "
            "and read, the contenders ran one after another and the load was not recorded"
        ]
        print(
            report(
                saved["results"],
                saved["versions"],
                args,
                saved["started"],
                saved["elapsed_s"],
                args.out,
                args.out.with_suffix(".png"),
                saved["command"],
                saved.get("conditions", legacy),
                _saved_machine(saved, args.out),
            )
        )
        return
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the cleanup below still unmounts all.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="privifs-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    contenders: list[Contender] = []
    results: dict = {}
    versions: dict = {}
    try:
        tarball = make_tarball(work, args.quick)
        makers = {
            "local disk": lambda: Local(work),
            "pyfuse3 passthrough": lambda: Passthrough(work, script),
            "gocryptfs": lambda: Gocryptfs(work),
            "rclone crypt": lambda: Rclone(work),
            "privifs": lambda: Privifs(work),
        }
        script = passthrough_script(work) if "pyfuse3 passthrough" in args.contender else None
        for name in args.contender:
            c = makers[name]()
            contenders.append(c)
            versions[name] = c.version()
        run_all(contenders, args, tarball, results, work / "results.json")
    finally:
        for c in contenders:
            try:
                c.stop()
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                print(f"cleanup of {c.name}: {exc}", file=sys.stderr)
            force_unmount(c.mnt)
        subprocess.run(["pkill", "-f", f"data-dir {work}"], check=False)
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - started
    command = " ".join(["scripts/bench", *sys.argv[1:]])
    conds = conditions(args, load_start, os.getloadavg())
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": command,
                "runs": args.runs,
                "started": started,
                "elapsed_s": elapsed,
                "versions": versions,
                "conditions": conds,
                "machine": this_machine(),
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )
    table = report(results, versions, args, started, elapsed, args.out, args.out.with_suffix(".png"), command, conds)
    print(table)
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')} in {(time.time() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
