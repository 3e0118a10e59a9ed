#!/usr/bin/env python3
"""Measure the engine's CPU per small-file upload: the real client chain (reserve, temporary
token, inline exchange, configure-file-meta, risk meta: what a mount's write-back sends for a
new small file) run N times with W in flight against a freshly started engine. Prints uploads
per second and the engine's CPU milliseconds (user + system, from ``/proc/PID/stat``) per upload,
which stays meaningful on a shared, loaded machine where the rate does not. A measurement, not a
test.

    .venv/bin/python scripts/measure_engine_uploads.py [--files 2000] [--workers 8] [--size 4096]
        [--rounds 3] [--profile FILE]

``--profile FILE`` records the engine with py-spy (``--gil``, raw collapsed stacks) during the
last round; FILE must be outside the repository.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import trio

from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.client.provision import new_identity, register_profile
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.devkit.engine import EngineProcess

RISK = {
    "classification": "confidential",
    "label": "privifs",
    "handling": "client-side-encrypted",
    "privifs.type": "file",
    "privifs.mode": "644",
    "privifs.mtime": "1764756000000000000",
    "privifs.uid": "1000",
    "privifs.gid": "1000",
}


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime (fields 14 and 15)


def thread_ticks(pid: int) -> dict[int, int]:
    """Each thread's user + system ticks."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = int(fields[11]) + int(fields[12])
    return out


async def uploads(client, n: int, workers: int, size: int, key: bytes) -> None:
    vault = client.vault(key)
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            meta = FileMeta(f"f{i}", "", f"/bench/d{i % 50}", 0, "")
            token = await vault.put_bytes(os.urandom(size), meta)
            await client.tokens.set_risk(token, RISK)

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)


async def main(args) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        eng = EngineProcess(Path(tmp) / "data").start()
        try:
            pid = eng.proc.pid
            endpoints = Endpoints.from_dict(eng.urls)
            user = f"bench-{uuid.uuid4().hex[:8]}@example.com"
            await register_profile(endpoints, user, "correct-horse-battery", new_identity()[1])
            key = os.urandom(32)
            async with connect(endpoints, PasswordCredentials(user, "correct-horse-battery")) as client:
                await uploads(client, 50, args.workers, args.size, key)  # warm up
                for r in range(args.rounds):
                    spy = None
                    if args.profile and r == args.rounds - 1:
                        spy = subprocess.Popen(  # noqa: ASYNC220 - a measurement script
                            [args.py_spy, "record", "--gil", "--pid", str(pid), "-r", "200", "-f", "raw",
                             "-o", args.profile],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                        await trio.sleep(1)
                    c0, th0, t0 = cpu_ticks(pid), thread_ticks(pid), time.perf_counter()
                    await uploads(client, args.files, args.workers, args.size, key)
                    c1, th1, t1 = cpu_ticks(pid), thread_ticks(pid), time.perf_counter()
                    if spy is not None:
                        spy.send_signal(2)
                        spy.wait(timeout=60)
                    user, system = ((b - a) * 1000 / hz / args.files for a, b in zip(c0, c1, strict=True))
                    print(
                        f"round {r + 1}: {args.files / (t1 - t0):6.0f} uploads/s, engine CPU {user + system:5.2f}"
                        f" ms/upload (user {user:.2f}, system {system:.2f}; load {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
                    per_thread = sorted(
                        ((tid == pid, (n - th0.get(tid, 0)) * 1000 / hz / args.files) for tid, n in th1.items()),
                        reverse=True,
                    )
                    print(
                        "    ms/upload by thread (main first; threads that ended are missing): "
                        + ", ".join(f"{ms:.2f}" for _, ms in per_thread if ms > 0)
                    )
        finally:
            eng.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", help="py-spy raw output of the last round")
    p.add_argument("--py-spy", default="/tmp/spyenv/bin/py-spy")
    trio.run(main, p.parse_args())
