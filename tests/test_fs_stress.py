"""Minutes of everything at once: several processes create, write, append, truncate (by path and
through open descriptors), rename files and directories, unlink and rmdir, and run the
pjdfstest pattern (write to a file whose directory is already gone), with write-backs pending
and the engine injecting faults. The daemon never exits, no background task fails unexpectedly,
every closed byte is there, and a fresh mount of the vault (no index, no cache) shows the same.

``PRIVIFS_STRESS_SECONDS`` sets how long the processes run (default 20)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from tests.mountkit import Mount, is_mounted

SECONDS = float(os.environ.get("PRIVIFS_STRESS_SECONDS", "10"))
PROCESSES = 4


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stress_worker(root: str, seed: int, seconds: float, out: str) -> None:
    """Random operations under ``root``, keeping a model of what must be there afterwards."""
    rng = random.Random(seed)
    base = Path(root)
    base.mkdir()
    files: dict[str, bytearray] = {}
    dirs: set[str] = {""}
    counter = 0
    log: list[str] = []

    def fresh(parent: str) -> str:
        nonlocal counter
        counter += 1
        return f"{parent}/n{counter}".lstrip("/")

    def p(rel: str) -> Path:
        return base / rel

    def payload() -> bytes:
        size = rng.choice([0, 1, 100, 4096, 70_000, rng.randrange(1, 300_000)])
        return rng.randbytes(size)

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        op = rng.choices(
            [
                "create",
                "append",
                "overwrite",
                "truncate",
                "ftruncate",
                "rename",
                "unlink",
                "mkdir",
                "rmdir",
                "rename_dir",
                "ghost",
            ],
            weights=[6, 3, 3, 2, 2, 3, 2, 2, 1, 1, 1],
        )[0]
        log.append(op)
        if op == "create" or not files and op in ("append", "overwrite", "truncate", "ftruncate", "rename", "unlink"):
            rel = fresh(rng.choice(sorted(dirs)))
            data = payload()
            with open(p(rel), "wb") as f:
                f.write(data)
                if rng.random() < 0.15:
                    f.flush()
                    os.fsync(f.fileno())  # waits through the injected 5xx and lost acks
            files[rel] = bytearray(data)
        elif op == "append":
            rel = rng.choice(sorted(files))
            extra = payload()[:50_000]
            with open(p(rel), "ab") as f:
                f.write(extra)
            files[rel] += extra
        elif op == "overwrite":
            rel = rng.choice(sorted(files))
            at = rng.randrange(0, len(files[rel]) + 1)
            extra = rng.randbytes(rng.randrange(1, 20_000))
            with open(p(rel), "r+b") as f:
                f.seek(at)
                f.write(extra)
            cur = files[rel]
            cur[at : at + len(extra)] = extra
        elif op == "truncate":
            rel = rng.choice(sorted(files))
            size = rng.randrange(0, len(files[rel]) + 10_000)
            os.truncate(p(rel), size)
            cur = files[rel]
            files[rel] = cur[:size] + bytearray(max(0, size - len(cur)))
        elif op == "ftruncate":
            rel = rng.choice(sorted(files))
            size = rng.randrange(0, len(files[rel]) + 1)
            fd = os.open(p(rel), os.O_RDWR)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            files[rel] = files[rel][:size]
        elif op == "rename":
            rel = rng.choice(sorted(files))
            if rng.random() < 0.3 and len(files) > 1:
                target = rng.choice([f for f in sorted(files) if f != rel])  # replace another file
            else:
                target = fresh(rng.choice(sorted(dirs)))
            os.rename(p(rel), p(target))
            files[target] = files.pop(rel)
        elif op == "unlink":
            rel = rng.choice(sorted(files))
            os.unlink(p(rel))
            del files[rel]
        elif op == "mkdir":
            rel = fresh(rng.choice(sorted(dirs)))
            os.mkdir(p(rel))
            dirs.add(rel)
        elif op == "rmdir":
            empty = [d for d in dirs if d and not any(x.startswith(d + "/") for x in list(files) + list(dirs))]
            if empty:
                rel = rng.choice(sorted(empty))
                os.rmdir(p(rel))
                dirs.discard(rel)
        elif op == "rename_dir":
            movable = sorted(d for d in dirs if d)
            if movable:
                src = rng.choice(movable)
                targets = sorted(d for d in dirs if d != src and not d.startswith(src + "/"))
                dst = fresh(rng.choice(targets))
                os.rename(p(src), p(dst))

                def moved(x: str) -> str:
                    return dst + x[len(src) :] if x == src or x.startswith(src + "/") else x

                dirs = {moved(d) for d in dirs}
                files = {moved(f): c for f, c in files.items()}
        elif op == "ghost":
            d = fresh("")
            os.mkdir(p(d))
            fd = os.open(p(d) / "g", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                os.write(fd, b"soon gone" * 100)
                os.unlink(p(d) / "g")
                os.rmdir(p(d))
                os.ftruncate(fd, 3)
                os.write(fd, b"written to a removed file")
            finally:
                os.close(fd)
    Path(out).write_text(
        json.dumps({"files": {k: _digest(bytes(v)) for k, v in files.items()}, "dirs": sorted(dirs), "ops": len(log)})
    )


def snapshot(root: Path) -> tuple[dict[str, str], set[str]]:
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            dirs.add(os.path.relpath(os.path.join(dirpath, name), root))
        for name in filenames:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, root)] = _digest(f.read())
    return files, dirs


@pytest.mark.slow
def test_many_processes_racing_with_faults_never_end_the_mount_and_lose_nothing(eng, tmp_path):
    m = Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "0.2", "--upload-workers", "4"))
    with m.mounted():
        pid = m.pid
        eng.set_options(fail_rate=0.05, fail_after_rate=0.02, ack_drop_rate=0.1, seed=7)
        ctx = multiprocessing.get_context("fork")
        procs = [
            ctx.Process(
                target=stress_worker, args=(str(m.dir / f"w{i}"), 1000 + i, SECONDS, str(tmp_path / f"model{i}.json"))
            )
            for i in range(PROCESSES)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + SECONDS + 240
        while any(proc.is_alive() for proc in procs):
            assert time.monotonic() < deadline, "the stress processes hang"
            assert is_mounted(m.dir) and os.path.exists(f"/proc/{pid}"), "the daemon exited:\n" + m.log()[-6000:]
            time.sleep(1)
        for proc in procs:
            proc.join(5)
            assert proc.exitcode == 0, f"a stress process failed (exit {proc.exitcode}); see its traceback above"
        eng.set_options(fail_rate=0, fail_after_rate=0, ack_drop_rate=0)
        expected_files: dict[str, str] = {}
        expected_dirs: set[str] = set()
        ops = 0
        for i in range(PROCESSES):
            model = json.loads((tmp_path / f"model{i}.json").read_text())
            expected_files.update({f"w{i}/{k}": v for k, v in model["files"].items()})
            expected_dirs.update({f"w{i}/{d}".rstrip("/") for d in model["dirs"]})
            ops += model["ops"]
        assert ops > 100
        files, dirs = snapshot(m.dir)
        assert files == expected_files
        assert dirs == expected_dirs
        m.wait_idle(timeout=240)
        status = m.status()
        assert [t for t in status["tasks"] if t["failures"]] == []
        assert os.path.exists(f"/proc/{pid}")
        m.umount()
        log = m.log()
        assert "failed unexpectedly" not in log, log[-6000:]
        # the index matches the vault: a mount with no local state shows the same tree
        shutil.rmtree(m.root / "state")
        shutil.rmtree(m.root / "cache")
        m.mount()
        files, dirs = snapshot(m.dir)
        assert files == expected_files
        assert dirs == expected_dirs
