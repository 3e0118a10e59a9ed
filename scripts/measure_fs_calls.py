"""Measure the filesystem layer's own CPU per operation, in-process, without FUSE or a vault.

Builds a :class:`~privifs.fs.filesystem.Filesystem` over a real index, staging and read cache in a
temporary directory (a syncer that never runs: nothing is uploaded) and calls it the way the FUSE handlers do:

* ``create``: create + write 4 KiB + release, N files in 50 directories;
* ``read``: the same files made clean (their staged content adopted into the read cache under a
  token, as after an upload), then open + read + release each;
* ``delete``: unlink each;
* ``randread``: 4 KiB reads at random offsets of a cached 64 MiB file through one handle.

Prints the process CPU seconds (user + system, every thread) per operation, which is stable on a
loaded machine, and the wall-clock rate. What FUSE and the kernel add per request is not in these
figures (see ``scripts/measure_hotpaths.py`` for the whole mount). Usage:
``.venv/bin/python scripts/measure_fs_calls.py [--files 5000] [--runs 3]``
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import trio

from privifs.client.vault import Vault
from privifs.crypto.sealed import local_key
from privifs.fs.cache import ContentCache
from privifs.fs.filesystem import Filesystem, MountOptions
from privifs.fs.namespace import ROOT, Index, Namespace
from privifs.fs.staging import Staging
from privifs.fs.sync import Syncer

KiB, MiB = 1024, 1024 * 1024


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread, microsecond resolution
    return r.ru_utime + r.ru_stime


class Bench:
    def __init__(self, work: Path):
        key = local_key(bytes(32))
        self.index = Index(work / "index.sqlite3")
        ns = Namespace(self.index, dir_mode=0o755, file_mode=0o644)
        staging, cache = Staging(work / "staging", key), ContentCache(work / "cache", 1 << 40, key)
        # a write-back that never runs: scheduled uploads just wait in its queue
        vault = Vault(None, bytes(32))  # no server: nothing here reaches it
        sync = Syncer(ns, staging, cache, None, vault)
        self.fs = Filesystem(ns, staging, cache, vault, MountOptions(), sync)
        self.results: dict[str, list[tuple[float, float, float]]] = {}
        self._changes = 0

    def record(self, name: str, ops: int, wall: float, cpu_s: float) -> None:
        """``cpu_s`` and ``wall`` of ``ops`` operations, and the index rows written since the
        last record (SQLite's total_changes)."""
        changes = self.index.conn.total_changes - self._changes
        self.results.setdefault(name, []).append((cpu_s / ops * 1e6, ops / wall, changes / ops))
        self._changes = self.index.conn.total_changes

    def mark(self) -> None:
        self._changes = self.index.conn.total_changes

    async def create(self, n: int, dirs: int = 50) -> list[tuple[int, bytes]]:
        payload = os.urandom(4 * KiB)
        made = []
        self.mark()
        c0, t0 = cpu(), time.perf_counter()
        for d in range(dirs):
            parent = self.fs.mkdir(ROOT, f"d{d:02d}-{time.time_ns()}".encode(), 0o755).st_ino
            for i in range(n // dirs):
                name = f"f{i:04d}".encode()
                info, _ = self.fs.create(parent, name, 0o644, os.O_WRONLY | os.O_CREAT)
                await self.fs.write(info.fh, 0, payload)
                self.fs.release(info.fh)
                made.append((parent, name))
        self.record("create", len(made), time.perf_counter() - t0, cpu() - c0)
        return made

    def make_clean(self, made: list[tuple[int, bytes]]) -> None:
        """What a finished upload leaves: the staged content in the cache under a token."""
        for parent, name in made:
            node = self.fs.ns.child(self.fs.ns.get(parent), name.decode())
            token = f"tok-{node.ino}-{time.time_ns()}"
            staged = node.staged
            staged.sealed.close()
            assert self.fs.cache.adopt(token, staged.path)
            node.staged = node.staged_id = None
            node.content_dirty = 0
            self.fs.ns.set_token(node, token)
            self.index.save(node)

    async def read(self, made: list[tuple[int, bytes]]) -> None:
        self.mark()
        c0, t0 = cpu(), time.perf_counter()
        for parent, name in made:
            node = self.fs.ns.child(self.fs.ns.get(parent), name.decode())
            info = await self.fs.open(node.ino, os.O_RDONLY)
            assert len(await self.fs.read(info.fh, 0, 128 * KiB)) == 4 * KiB
            self.fs.release(info.fh)
        self.record("read", len(made), time.perf_counter() - t0, cpu() - c0)

    def delete(self, made: list[tuple[int, bytes]]) -> None:
        self.mark()
        c0, t0 = cpu(), time.perf_counter()
        for parent, name in made:
            self.fs.unlink(parent, name)
        self.record("delete", len(made), time.perf_counter() - t0, cpu() - c0)

    async def randread(self, ops: int) -> None:
        info, _ = self.fs.create(ROOT, f"rand-{time.time_ns()}".encode(), 0o644, os.O_WRONLY | os.O_CREAT)
        block = os.urandom(MiB)
        for i in range(64):
            await self.fs.write(info.fh, i * MiB, block)
        self.fs.release(info.fh)
        node = next(n for n in self.fs.ns.nodes.values() if n.name.startswith("rand-") and n.staged is not None)
        parent = self.fs.ns.get(node.parent)
        self.make_clean([(parent.ino, node.name.encode())])
        fh = await self.fs.open(node.ino, os.O_RDONLY)
        rng = random.Random(1)
        await self.fs.read(fh.fh, 0, 4 * KiB)
        self.mark()
        c0, t0 = cpu(), time.perf_counter()
        for _ in range(ops):
            await self.fs.read(fh.fh, rng.randrange(16384) * 4 * KiB, 4 * KiB)
        self.record("randread", ops, time.perf_counter() - t0, cpu() - c0)
        self.fs.release(fh.fh)
        self.fs.unlink(parent.ino, node.name.encode())


async def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="privifs-calls-", dir=os.environ.get("BENCH_DIR", "/var/tmp")))
    try:
        b = Bench(work)
        for _ in range(args.runs):
            made = await b.create(args.files)
            b.make_clean(made)
            await b.read(made)
            b.delete(made)
            await b.randread(args.rand_ops)
        import privifs

        print(
            f"privifs from {Path(privifs.__file__).parent}; load average {os.getloadavg()[0]:.2f} "
            f"(figures taken under this load); medians of {args.runs} runs"
        )
        for name, rows in b.results.items():
            us = statistics.median(r[0] for r in rows)
            rate = statistics.median(r[1] for r in rows)
            writes = statistics.median(r[2] for r in rows)
            print(f"{name:9s} CPU {us:7.1f} µs/op   {rate:9,.0f} op/s   index rows written {writes:4.2f}/op")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rand-ops", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    trio.run(run, ap.parse_args())


if __name__ == "__main__":
    main()
