"""The mount's command line as a user meets it: status, umount, fusermount3 -u, read-only,
the cache limit, shared downloads, authorization renewal during a long mount."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading
import time

import pytest

from tests.mountkit import Mount, privifs


def test_status_shows_pending_uploads_cache_refresh_and_errors(engine, tmp_path):
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600", "--cache-size", "64M")).mounted() as m:
        (m.dir / "waiting.bin").write_bytes(b"x" * 12345)
        out = privifs(m.env, "status", str(m.dir)).stdout
        assert str(m.dir) in out
        assert "1 changes" in out and "/waiting.bin  12345 bytes  content  queued" in out
        assert "of 64 MiB" in out and "last refresh:" in out and "last error:   none" in out
        everything = privifs(m.env, "status").stdout
        assert str(m.dir) in everything


def test_umount_uploads_pending_files_first(engine, tmp_path):
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        for i in range(5):
            (m.dir / f"f{i}").write_bytes(os.urandom(50_000))
        r = m.umount()
        assert "unmounted" in r.stdout and not os.path.ismount(m.dir)
        assert {t["fileName"] for t in m.tokens()} >= {f"f{i}" for i in range(5)}


def test_fusermount_unmount_loses_nothing(engine, tmp_path):
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "closed.txt").write_text("closed before fusermount3 -u")
        pid = m.pid
        subprocess.run(["fusermount3", "-u", str(m.dir)], check=True, timeout=60)
        deadline = time.monotonic() + 90
        from privifs.paths import pid_alive
        while pid_alive(pid):
            assert time.monotonic() < deadline, "the daemon did not finish after fusermount3 -u"
            time.sleep(0.1)
        assert "closed.txt" in {t["fileName"] for t in m.tokens()}
        m.mount()
        assert (m.dir / "closed.txt").read_text() == "closed before fusermount3 -u"


def test_read_only_mount_refuses_changes(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        (m.dir / "kept.txt").write_text("readable")
        m.umount()
        m.mount("--read-only")
        assert (m.dir / "kept.txt").read_text() == "readable"
        for action in (lambda: (m.dir / "new.txt").write_text("x"), lambda: os.unlink(m.dir / "kept.txt"),
                       lambda: os.mkdir(m.dir / "d"), lambda: os.chmod(m.dir / "kept.txt", 0o600)):
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno == errno.EROFS


def test_cache_limit_evicts_least_recently_used_and_rereads_from_the_vault(engine, tmp_path):
    with Mount(tmp_path, engine.urls, mount_args=("--cache-size", "1M")).mounted() as m:
        datas = {f"f{i}": os.urandom(400_000) for i in range(6)}
        for name, data in datas.items():
            (m.dir / name).write_bytes(data)
        m.wait_idle()
        for _ in range(2):
            for name, data in datas.items():
                assert (m.dir / name).read_bytes() == data
                # a new open: the kernel keeps its page cache, so drop it to reach the daemon
                subprocess.run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=False)
        st = m.status()
        assert st["cache"]["size"] <= 1024 * 1024
        assert st["cache"]["downloads"] >= 6


def test_concurrent_readers_of_an_uncached_file_share_one_download(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        data = os.urandom(8 * 1024 * 1024)
        (m.dir / "shared.bin").write_bytes(data)
        m.umount()
        shutil.rmtree(m.root / "cache")
        m.mount()
        results = []

        def reader() -> None:
            with open(m.dir / "shared.bin", "rb") as f:
                results.append(f.read())

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 6 and all(r == data for r in results)
        assert m.status()["cache"]["downloads"] == 1


def test_authorization_is_renewed_while_mounted(eng, tmp_path):
    eng.set_options(token_ttl=3)
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "0")).mounted() as m:
        for i in range(8):
            (m.dir / f"t{i}").write_text(str(i))
            time.sleep(1)
        m.wait_idle()
        assert {f"t{i}" for i in range(8)} <= {t["fileName"] for t in m.tokens()}
        assert m.status()["last_error"] is None
