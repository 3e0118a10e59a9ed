#!/usr/bin/env python3
"""Benchmark privifs side by side with what its users would pick instead, in one run on one
machine: local disk, pyfuse3's passthrough example (the ceiling of a Python FUSE filesystem),
gocryptfs, rclone mount of a crypt remote over a local directory (``--vfs-cache-mode full``),
and privifs on its embedded engine.

Every contender gets the same workloads; each figure is the median of ``--runs`` runs (the
spread is min–max). Results go to docs/benchmarks.md (table, machine, versions) with a chart of
privifs against each contender as ratios (docs/benchmarks.png). Run it with ``scripts/bench``.
Nothing is left mounted, running or on disk afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil

from privifs.devkit.measure import PeakRss
from privifs.devkit.mount import isolated_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1024 * 1024
WAIT = 300


def sh(*cmd, check=True, timeout=WAIT, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, timeout=timeout, capture_output=True, text=True, **kw)


def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


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
        """Make the next read cold (the page cache is dropped separately)."""

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
        self.proc = subprocess.Popen([PY, str(self.script), str(self.src), str(self.mnt)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_mounted(self.mnt, self.proc)

    def stop(self) -> None:
        super().stop()
        _reap(self.proc)

    def pids(self) -> dict[str, int]:
        return {"daemon": self.proc.pid}

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
        self.conf.write_text(f"[local]\ntype = local\n\n[crypt]\ntype = crypt\nremote = local:{self.remote}\n"
                             f"password = {obscured}\n")
        self.proc: subprocess.Popen | None = None
        self.rc_port = _free_port()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["rclone", "--config", str(self.conf), "mount", "crypt:", str(self.mnt), "--vfs-cache-mode", "full",
             "--cache-dir", str(self.cache), "--rc", "--rc-no-auth", f"--rc-addr=127.0.0.1:{self.rc_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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

    def version(self) -> str:
        return sh("rclone", "version").stdout.splitlines()[0]


class Privifs(Contender):
    name = "privifs"

    def __init__(self, work: Path):
        super().__init__(work)
        self.env = isolated_env(self.work / "home")  # no server configured: the embedded engine
        self.cmd = [PY, "-m", "privifs"]
        sh(*self.cmd, "init", env=self.env)

    def start(self) -> None:
        sh(*self.cmd, "mount", self.mnt, env=self.env)

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
        from privifs.fs.daemon import control_request
        answer = list(control_request(self._entry(), {"cmd": "flush", "timeout": WAIT}, timeout=WAIT + 30))
        if not answer[-1].get("done"):
            raise RuntimeError(f"privifs did not finish uploading: {answer[-1]}")

    def clear_cache(self) -> None:
        self.stop()
        shutil.rmtree(Path(self.env["XDG_CACHE_HOME"]) / "privifs", ignore_errors=True)
        self.start()

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


# -- workloads ----------------------------------------------------------------------------------
def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def write_big(path: Path, mib: int, block: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        for i in range(mib):
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


def fio_randread(path: Path, seconds: int) -> float:
    r = sh("fio", "--name=randread", f"--filename={path}", "--rw=randread", "--bs=4k", "--size=256M",
           "--ioengine=psync", f"--runtime={seconds}", "--time_based", "--output-format=json", timeout=seconds + 120)
    return json.loads(r.stdout)["jobs"][0]["read"]["iops"]


def run_contender(c: Contender, args, tarball: Path, results: dict) -> None:
    res = results.setdefault(c.name, {})
    block = os.urandom(MiB)
    durable_fsync = c.name in ("local disk", "pyfuse3 passthrough", "gocryptfs")

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    c.start()
    try:
        gib = args.big_mib
        for run in range(args.runs):
            target = c.mnt / f"big{run}.bin"
            with PeakRss(c.pids()) as rss_in:
                t = timed(lambda: (write_big(target, gib, block, durable_fsync), c.settle()))
                add("write_MBps", gib * MiB / t / 1e6)
            c.clear_cache()
            drop_caches()
            with PeakRss(c.pids()) as rss_out:
                t = timed(lambda: read_all(target))
                add("cold_read_MBps", gib * MiB / t / 1e6)
            for name in rss_in.peak:
                add(f"rss_{name}_MiB", max(rss_in.peak[name], rss_out.peak.get(name, 0)) / MiB)
            t = timed(lambda: read_all(target))
            add("warm_read_MBps", gib * MiB / t / 1e6)
            target.unlink()
            c.settle()
        rand = c.mnt / "rand.bin"
        write_big(rand, 256, block, False)
        c.settle()
        read_all(rand)
        for run in range(args.runs):
            add("randread_4k_iops", fio_randread(rand, args.fio_seconds))
        rand.unlink()
        c.settle()
        for run in range(args.runs):
            root = c.mnt / f"small{run}"
            root.mkdir()
            n = args.small_files
            add("small_create_fps", n / timed(lambda: small_files(root, n, 50)))
            add("small_ls_lR_fps", n / timed(lambda: ls_lr(root)))
            add("small_read_fps", n / timed(lambda: read_small(root)))
            c.settle()
            add("small_delete_fps", n / timed(lambda: delete_small(root)))
            root.rmdir()
            c.settle()
        for run in range(args.runs):
            dest = c.mnt / f"untar{run}"  # a fresh tree per run; all go with the contender
            dest.mkdir()
            add("untar_s", timed(lambda: sh("tar", "-xf", tarball, "-C", dest)))
            git = lambda: (sh("git", "init", "-q", dest), sh("git", "-C", dest, "add", "-A"),  # noqa: E731
                           sh("git", "-C", dest, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q",
                              "-m", "bench"))
            add("git_add_commit_s", timed(git))
            c.settle()
    finally:
        c.stop()


def summarise(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


METRICS = [
    ("write_MBps", "1 GiB write to durable", "MB/s", True),
    ("cold_read_MBps", "1 GiB cold read", "MB/s", True),
    ("warm_read_MBps", "1 GiB warm read", "MB/s", True),
    ("randread_4k_iops", "4 KiB random reads (cached 256 MiB)", "IOPS", True),
    ("small_create_fps", "5,000 × 4 KiB: create", "files/s", True),
    ("small_ls_lR_fps", "5,000 × 4 KiB: ls -lR", "files/s", True),
    ("small_read_fps", "5,000 × 4 KiB: read all", "files/s", True),
    ("small_delete_fps", "5,000 × 4 KiB: delete", "files/s", True),
    ("untar_s", "untar Python stdlib", "s", False),
    ("git_add_commit_s", "git add -A && commit", "s", False),
    ("rss_daemon_MiB", "daemon peak RSS, 1 GiB in and out", "MiB", False),
    ("rss_engine_MiB", "engine peak RSS, 1 GiB in and out", "MiB", False),
]


PASS, RCLONE = "pyfuse3 passthrough", "rclone crypt"
# The targets: (what, metric, contender, kind, bound). "ratio": privifs / contender >= bound
# (higher is better); "time": privifs / contender <= bound; "rss": privifs <= bound and <= contender.
TARGETS = [
    ("1 GiB write to durable ≥ rclone crypt", "write_MBps", RCLONE, "ratio", 1.0),
    ("1 GiB cold read ≥ rclone crypt", "cold_read_MBps", RCLONE, "ratio", 1.0),
    ("warm read ≥ 80 % of passthrough", "warm_read_MBps", PASS, "ratio", 0.8),
    ("4 KiB random reads ≥ 80 % of passthrough", "randread_4k_iops", PASS, "ratio", 0.8),
    ("small files: create ≥ rclone crypt", "small_create_fps", RCLONE, "ratio", 1.0),
    ("small files: ls -lR ≥ 2× rclone crypt", "small_ls_lR_fps", RCLONE, "ratio", 2.0),
    ("small files: read all ≥ rclone crypt", "small_read_fps", RCLONE, "ratio", 1.0),
    ("small files: delete ≥ rclone crypt", "small_delete_fps", RCLONE, "ratio", 1.0),
    ("untar ≤ 1.5× passthrough time", "untar_s", PASS, "time", 1.5),
    ("git add + commit ≤ 1.5× passthrough time", "git_add_commit_s", PASS, "time", 1.5),
    ("daemon peak RSS < 200 MiB and ≤ rclone crypt", "rss_daemon_MiB", RCLONE, "rss", 200.0),
    ("engine peak RSS < 150 MiB", "rss_engine_MiB", None, "rss", 150.0),
]


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"


def targets_table(results: dict) -> str:
    """Each target of the issue, judged on the medians of this run."""
    rows = ["| target | measured (privifs vs contender, medians) | |", "|---|---|---|"]
    units = {key: unit for key, _, unit, _ in METRICS}
    for what, key, other, kind, bound in TARGETS:
        mine = results.get("privifs", {}).get(key)
        theirs = results.get(other, {}).get(key) if other else None
        if not mine or (other and not theirs):
            rows.append(f"| {what} | not measured in this run | – |")
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
        else:
            met = m < bound and (o is None or m <= o)
            text = f"{_num(m)} {unit}" + (f" vs {_num(o)} {unit}" if o is not None else "")
        rows.append(f"| {what} | {text} | {'met' if met else '**missed**'} |")
    return "\n".join(rows)


def report(results: dict, versions: dict, args, started: float, elapsed: float, out_md: Path, out_png: Path,
           command: str = "") -> str:
    command = command or " ".join(["scripts/bench", *sys.argv[1:]])
    names = list(results)
    lines = ["| workload | unit | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key, label, unit, _ in METRICS:
        cells = []
        for n in names:
            vals = results[n].get(key)
            if not vals:
                cells.append("–")
                continue
            med, lo, hi = summarise(vals)
            fmt = (lambda v: f"{v:,.0f}") if med >= 100 else (lambda v: f"{v:.2f}")  # one format per cell
            cells.append(f"{fmt(med)} ({fmt(lo)}–{fmt(hi)})" if len(vals) > 1 else fmt(med))
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    _chart(results, out_png)
    cpu = platform.processor() or _cpu_model()
    mem = psutil.virtual_memory().total / 2**30
    machine = (f"{psutil.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
               f"Python {platform.python_version()}")
    md = [
        "# Benchmarks", "",
        "Produced by `scripts/bench` (the numbers below are replaced on every run; the text around them",
        "is kept in scripts/bench.py). Each figure is the median of "
        f"{args.runs} runs, with min–max in brackets; all contenders ran in the same run, on the same machine.",
        "", f"* run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, {elapsed / 60:.1f} minutes in all",
        f"* machine: {machine}",
        "* versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()),
        f"* command: `{command}`",
        "", "## Results", "", table, "",
        "![privifs against each contender (ratio; above 1 means privifs is better)](benchmarks.png)", "",
        "## Targets", "",
        "Judged on the medians above (privifs against the named contender, same run, same machine); the",
        f"raw figures of every run are in `{out_md.with_suffix('.json').name}`.", "",
        targets_table(results), "",
    ]
    out_md.write_text("\n".join(md) + "\n" + _notes())
    return table


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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "privifs" not in results:
        return
    others = [n for n in results if n != "privifs"]
    labels, series = [], {n: [] for n in others}
    for key, label, _, higher_better in METRICS:
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
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def make_tarball(work: Path) -> Path:
    import sysconfig
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tarball = work / "stdlib.tar"
    with tarfile.open(tarball, "w") as tf:
        tf.add(stdlib, arcname="stdlib", filter=lambda ti: None if "__pycache__" in ti.name or "site-packages" in ti.name
               else ti)
    return tarball


def passthrough_script(work: Path) -> Path:
    import pyfuse3
    version = getattr(pyfuse3, "__version__", None) or __import__("importlib.metadata").metadata.version("pyfuse3")
    sh(PY, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"pyfuse3=={version}", "-d", work)
    sdist = next(work.glob("pyfuse3-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("examples/passthroughfs.py"))
        member.name = "passthroughfs.py"
        tf.extract(member, work)
    return work / "passthroughfs.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--small-files", type=int, default=5000)
    ap.add_argument("--fio-seconds", type=int, default=5)
    ap.add_argument("--only", action="append", help="run only these contenders (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--report-from", type=Path, metavar="JSON",
                    help="only rewrite the report from raw figures saved by an earlier run (docs/benchmarks.json)")
    args = ap.parse_args()
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        args.runs = saved["runs"]
        print(report(saved["results"], saved["versions"], args, saved["started"], saved["elapsed_s"], args.out,
                     args.out.with_suffix(".png"), saved["command"]))
        return
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the cleanup below still unmounts all.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="privifs-bench-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    contenders: list[Contender] = []
    results: dict = {}
    versions: dict = {}
    try:
        tarball = make_tarball(work)
        script = passthrough_script(work)
        makers = [("local disk", lambda: Local(work)), ("pyfuse3 passthrough", lambda: Passthrough(work, script)),
                  ("gocryptfs", lambda: Gocryptfs(work)), ("rclone crypt", lambda: Rclone(work)),
                  ("privifs", lambda: Privifs(work))]
        for name, make in makers:
            if args.only and name not in args.only:
                continue
            c = make()
            contenders.append(c)
            versions[name] = c.version()
            print(f"== {name}", flush=True)
            t = time.time()
            run_contender(c, args, tarball, results)
            print(f"   done in {time.time() - t:.0f}s", flush=True)
            (work / "results.json").write_text(json.dumps(results))
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
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": " ".join(["scripts/bench", *sys.argv[1:]]), "runs": args.runs, "started": started,
         "elapsed_s": elapsed, "versions": versions, "results": results}, indent=1) + "\n")
    table = report(results, versions, args, started, elapsed, args.out, args.out.with_suffix(".png"))
    print(table)
    print(f"\nwritten to {args.out} and {args.out.with_suffix('.png')} in {(time.time() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
