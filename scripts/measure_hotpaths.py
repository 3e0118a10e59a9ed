"""Measure the per-request hot paths of a mount: throughput and the daemon's CPU per operation.

Mounts privifs on its embedded engine in a temporary directory (an isolated user, as
``scripts/bench`` does) and runs the issue's micro-workloads one after the other:

* ``randread``: 4 KiB random reads of a cached file after dropping the file's pages from the
  kernel's page cache (what ``fio --rw=randread`` does before it starts: ``invalidate=1``);
* ``create`` / ``read`` / ``delete``: N small (4 KiB) files in 50 directories;
* ``untar`` / ``git``: the Python standard library unpacked, then ``git add -A && commit``.

For each it prints operations per second and the daemon's CPU seconds (user + system) per
operation, which stays meaningful on a shared, loaded machine where wall-clock rates do not.
Background write-back is part of the daemon's CPU, as in real use; ``--write-back-delay``
defaults to the mount's default. A measurement, not a test. Usage:
``.venv/bin/python scripts/measure_hotpaths.py [--only randread,create,...] [--files 5000]
[--rand-mib 256] [--rand-ops 20000] [--profile create=/tmp/create.txt] [-- MOUNT_ARGS]``

The daemon is started with ``python -m privifs`` from the current directory, which comes first
on its ``sys.path``: to measure another checkout, run this from that checkout's directory with it
on ``PYTHONPATH`` (the first line printed names the one this process imported).

``--profile WORKLOAD=FILE`` records the daemon with py-spy (``pip install py-spy`` into the
venv) during that workload and writes a flame graph (``.svg``) or raw collapsed stacks
(``.txt``) to FILE, which must be outside the repository.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
from bench import delete_small, read_small, small_files

from privifs.devkit.mount import isolated_env, privifs

WORKLOADS = ("randread", "create", "read", "delete", "untar", "git")
KiB = 1024
MiB = 1024 * KiB


class Mounted:
    """One privifs mount on the embedded engine, as a fresh user."""

    def __init__(self, work: Path, mount_args: list[str]):
        self.work = work
        self.mnt = work / "mnt"
        self.mnt.mkdir()
        self.env = isolated_env(work / "home")
        self.mount_args = mount_args
        privifs(self.env, "init")

    def __enter__(self) -> Mounted:
        privifs(self.env, "mount", str(self.mnt), *self.mount_args)
        return self

    def __exit__(self, *exc) -> None:
        if os.path.ismount(self.mnt):
            privifs(self.env, "umount", str(self.mnt), "--timeout", "120", check=False, timeout=300)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False, timeout=60)

    def entry(self) -> dict:
        import json

        for f in (Path(self.env["XDG_RUNTIME_DIR"]) / "privifs" / "mounts").glob("*.json"):
            return json.loads(f.read_text())
        raise RuntimeError("privifs is not mounted")

    @property
    def daemon(self) -> psutil.Process:
        return psutil.Process(self.entry()["pid"])

    def settle(self, timeout: float = 600) -> None:
        from privifs.fs.registry import control_request

        answer = list(control_request(self.entry(), {"cmd": "flush", "timeout": timeout}, timeout=timeout + 30))
        if not answer[-1].get("done"):
            raise RuntimeError(f"privifs did not finish uploading: {answer[-1]}")


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def report(name: str, ops: int, wall: float, cpu_s: float, unit: str = "op") -> None:
    print(
        f"{name:10s} {ops:7d} {unit}s  {wall:7.2f} s  {ops / wall:9,.0f} {unit}/s   "
        f"daemon CPU {cpu_s:6.2f} s = {cpu_s / ops * 1e6:7.1f} µs/{unit}",
        flush=True,
    )


PROFILE: dict[str, str] = {}  # workload -> py-spy output file


def measure(name: str, m: Mounted, fn, ops: int, unit: str = "op") -> None:
    proc = m.daemon
    with Profiler(PROFILE.get(name), proc.pid):
        c0, t0 = cpu(proc), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        c1 = cpu(proc)
    report(name, ops, wall, c1 - c0, unit)


# -- workloads ---------------------------------------------------------------------------------
def randread(path: Path, ops: int) -> None:
    size = path.stat().st_size
    pages = size // (4 * KiB)
    rng = random.Random(1)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # as fio's invalidate=1
        for _ in range(ops):
            os.pread(fd, 4 * KiB, rng.randrange(pages) * 4 * KiB)
    finally:
        os.close(fd)


def make_tarball(work: Path) -> tuple[Path, int]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tarball = work / "stdlib.tar"
    with tarfile.open(tarball, "w") as tf:
        tf.add(
            stdlib,
            arcname="stdlib",
            filter=lambda ti: None if "__pycache__" in ti.name or "site-packages" in ti.name else ti,
        )
    with tarfile.open(tarball) as tf:
        members = sum(1 for _ in tf)
    return tarball, members


def sh(*cmd) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=900)


class Profiler:
    """py-spy recording the daemon while the block runs (nothing when no output is asked)."""

    def __init__(self, out: str | None, pid: int):
        self.out, self.pid, self.proc = out, pid, None

    def __enter__(self) -> Profiler:
        if self.out:
            spy = Path(sys.executable).parent / "py-spy"
            fmt = "raw" if self.out.endswith(".txt") else "flamegraph"
            self.proc = subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(self.pid),
                    "--rate",
                    "1000",
                    "--format",
                    fmt,
                    "--output",
                    self.out,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            print(f"profile written to {self.out}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rand-mib", type=int, default=256)
    ap.add_argument("--rand-ops", type=int, default=20000)
    ap.add_argument(
        "--profile",
        metavar="WORKLOAD=FILE",
        action="append",
        default=[],
        help="record the daemon with py-spy during WORKLOAD into FILE (.svg flame graph or .txt raw)",
    )
    ap.add_argument("mount_args", nargs="*", help="extra arguments for privifs mount (after --)")
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w]
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    for spec in args.profile:
        workload, _, out = spec.partition("=")
        if workload not in WORKLOADS or not out:
            ap.error(f"--profile takes WORKLOAD=FILE, not {spec!r}")
        if Path(out).resolve().is_relative_to(Path(__file__).resolve().parent.parent):
            ap.error("write the profile outside the repository (e.g. /tmp)")
        PROFILE[workload] = out
    work = Path(tempfile.mkdtemp(prefix="privifs-hot-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    load = os.getloadavg()[0]
    import privifs as code

    print(
        f"privifs from {Path(code.__file__).parent}; load average {load:.2f} on {os.cpu_count()} CPUs "
        "(figures taken under this load)",
        flush=True,
    )
    try:
        with Mounted(work, args.mount_args) as m:
            if "randread" in only:
                rand = m.mnt / "rand.bin"
                block = os.urandom(MiB)
                with open(rand, "wb") as f:
                    for _ in range(args.rand_mib):
                        f.write(block)
                m.settle()
                with open(rand, "rb", buffering=0) as f:  # into privifs's cache
                    while f.read(MiB):
                        pass
                measure("randread", m, lambda: randread(rand, args.rand_ops), args.rand_ops)
                rand.unlink()
                m.settle()
            root = m.mnt / "small"
            n = args.files
            if {"create", "read", "delete"} & set(only):
                root.mkdir()
                measure("create", m, lambda: small_files(root, n, 50), n, "file")
                m.settle()
                if "read" in only:
                    measure("read", m, lambda: read_small(root), n, "file")
                if "delete" in only:
                    measure("delete", m, lambda: delete_small(root), n, "file")
                    root.rmdir()
                m.settle()
            if {"untar", "git"} & set(only):
                tarball, members = make_tarball(work)
                dest = m.mnt / "untar"
                dest.mkdir()
                measure("untar", m, lambda: sh("tar", "-xf", tarball, "-C", dest), members, "entry")
                if "git" in only:

                    def git() -> None:
                        sh("git", "init", "-q", dest)
                        sh("git", "-C", dest, "add", "-A")
                        sh("git", "-C", dest, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "m")

                    measure("git", m, git, members, "entry")
                m.settle()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
