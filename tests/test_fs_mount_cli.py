"""The mount's command line as a user meets it: status, umount, fusermount3 -u, read-only,
the cache limit, shared downloads, authorization renewal during a long mount."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from privifs.fs.sync import PENDING_SHOWN
from privifs.paths import pid_alive
from tests.mountkit import Mount, helper_link_kept, is_mounted, privifs


def test_status_shows_pending_uploads_cache_refresh_and_errors(engine, tmp_path):
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600", "--cache-size", "64M")).mounted() as m:
        # the one read before the mount was ready counts (it was 0); under load another may follow
        # (the safety net's, or one an event from the setup asked for)
        assert m.status()["listings"] >= 1
        (m.dir / "waiting.bin").write_bytes(b"x" * 12345)
        out = privifs(m.env, "status", str(m.dir)).stdout
        assert str(m.dir) in out
        assert "1 change," in out and "/waiting.bin  12345 bytes  content  queued" in out
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


@pytest.mark.slow
def test_umount_waits_for_fusermount3_still_in_the_kernel_instead_of_killing_it(engine, tmp_path):
    """The kernel ends the FUSE connection before it frees the file's cached pages, in the same
    umount2 call: after a read of 20 GB the daemon wound down while fusermount3 was still in the
    kernel, cancelled the wait for it, and trio killed it 5 s later with a RuntimeWarning in the
    log (hS F1). Here a fusermount3 that stays 6 s after unmounting, ignoring SIGTERM, stands in
    for that kernel."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    finished = tmp_path / "fusermount3-finished"
    real = shutil.which("fusermount3")
    (bindir / "fusermount3").write_text(
        "#!/bin/sh\n"
        f'[ "$1" = "-u" ] || exec {real} "$@"\n'
        f'{real} "$@"; rc=$?\n'
        "trap '' TERM\n"
        "sleep 6\n"
        f"touch {finished}\n"
        "exit $rc\n"
    )
    (bindir / "fusermount3").chmod(0o755)
    m = Mount(tmp_path, engine.urls)
    m.env["PATH"] = f"{bindir}:{m.env.get('PATH', os.environ['PATH'])}"
    with m.mounted():
        (m.dir / "f").write_text("x")
        r = m.umount()
        assert "unmounted" in r.stdout and not os.path.ismount(m.dir)
        deadline = time.monotonic() + 30
        while not finished.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert finished.exists(), "fusermount3 was killed"
        assert "ignored SIGTERM" not in m.log() and "RuntimeWarning" not in m.log()


@pytest.mark.slow
def test_umount_does_not_wait_for_a_read_stalled_on_the_server_and_keeps_what_was_closed(engine, tmp_path):
    """A program that read the first part of a big file and closed it leaves the kernel's
    read-ahead of the next part in flight; with the server stalled, ``privifs umount`` waited
    88 s for it (the FUSE loop ends once every request is answered, and the download's idle
    limit is 90 s). Now the unmount abandons the reads in progress (EIO, the program is gone
    anyway); a file closed before the unmount is uploaded as ever."""
    from tests.enginekit import StallingProxy

    with StallingProxy(engine.ports["downstream"]) as proxy:
        m = Mount(tmp_path, {**engine.urls, "downstream": proxy.url}, mount_args=("--write-back-delay", "3600"))
        with m.mounted():
            data = os.urandom(10_000_000)  # three parts of 4 MiB
            (m.dir / "big.bin").write_bytes(data)
            m.wait_idle()
            m.umount()
            shutil.rmtree(m.root / "state")
            shutil.rmtree(m.root / "cache")
            m.mount()
            proxy.stall_after(4 * 2**20 + 65536)  # the manifest and the first part come, then nothing
            first = subprocess.run(
                ["dd", f"if={m.dir / 'big.bin'}", "bs=1M", "count=4"], capture_output=True, timeout=120, check=True
            )
            assert first.stdout == data[: 4 * 2**20]
            (m.dir / "closed.txt").write_text("closed before the unmount")
            r = m.umount()
            assert "unmounted" in r.stdout and not os.path.ismount(m.dir)
            log = m.log()
            assert "a read of /big.bin was abandoned: the mount is being unmounted" in log, log[-3000:]
            assert "sent no data" not in log  # (what the read said after the 90 s it held the unmount)
            assert "ERROR" not in log, log[-3000:]  # (pyfuse3's answer to a kernel no longer waiting: INFO)
            assert "closed.txt" in {t["fileName"] for t in m.tokens()}


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
        assert "closed.txt" in {t["fileName"] for t in m.tokens()}, m.log()[-3000:]
        m.mount()
        assert (m.dir / "closed.txt").read_text() == "closed before fusermount3 -u"


def test_a_file_closed_just_before_the_unmount_is_uploaded_though_its_release_never_came(engine, tmp_path):
    """close(2) does not wait for the daemon (the kernel sends RELEASE in the background), and an
    unmount drops the requests the daemon has not read yet: a file closed just before
    ``fusermount3 -u`` stayed "open for writing" in the daemon, which then exited without
    uploading it (once in a loaded CI run). The daemon is stopped here while the RELEASE waits."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "warm").write_text("the kernel learns that privifs has no FLUSH")
        f = open(m.dir / "closed.txt", "w")
        f.write("closed before the unmount")
        f.flush()
        pid = m.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            f.close()  # no FLUSH: returns at once, its RELEASE queued for the stopped daemon
            # umount(2) itself needs nothing of the daemon (umount(8) would stat the mount first)
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.umount2(str(m.dir).encode(), 0) == 0, os.strerror(ctypes.get_errno())
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 90
        while pid_alive(pid):
            assert time.monotonic() < deadline, "the daemon did not finish after the unmount"
            time.sleep(0.1)
        assert "closed.txt" in {t["fileName"] for t in m.tokens()}, m.log()[-3000:]


def test_read_only_mount_refuses_changes(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        (m.dir / "kept.txt").write_text("readable")
        m.umount()
        m.mount("--read-only")
        assert (m.dir / "kept.txt").read_text() == "readable"
        for action in (
            lambda: (m.dir / "new.txt").write_text("x"),
            lambda: os.unlink(m.dir / "kept.txt"),
            lambda: os.mkdir(m.dir / "d"),
            lambda: os.chmod(m.dir / "kept.txt", 0o600),
        ):
            with pytest.raises(OSError) as info:
                action()
            assert info.value.errno == errno.EROFS


def test_a_mountpoint_that_is_not_empty_is_refused_unless_nonempty_is_given(engine, tmp_path):
    """Mounted over, a directory's files were hidden without a word until the unmount (helper
    hW: a drive mounted at ~/photos by mistake looks as if the photos were gone)."""
    m = Mount(tmp_path, engine.urls)
    try:
        (m.dir / "photo.jpg").write_bytes(b"jpeg")
        r = m.mount(check=False)
        assert r.returncode == 4 and "is not empty" in r.stderr and "--nonempty" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and not is_mounted(m.dir)
        m.mount("--nonempty")
        assert not (m.dir / "photo.jpg").exists()
        m.umount()
        assert (m.dir / "photo.jpg").read_bytes() == b"jpeg"
    finally:
        m.cleanup()


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


@pytest.mark.slow
def test_authorization_is_renewed_while_mounted(eng, tmp_path):
    eng.set_options(token_ttl=3)
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "0")).mounted() as m:
        for i in range(8):
            (m.dir / f"t{i}").write_text(str(i))
            time.sleep(1)
        m.wait_idle()
        assert {f"t{i}" for i in range(8)} <= {t["fileName"] for t in m.tokens()}
        assert m.status()["last_error"] is None


def crash(m: Mount) -> None:
    """Write a file, let it reach the vault, then kill -9 the daemon and wait until it is gone
    (the kernel keeps its dead mount)."""
    (m.dir / "kept.txt").write_text("before the crash")
    m.wait_idle()
    kill_daemon(m)


def kill_daemon(m: Mount) -> None:
    """kill -9 the mount's daemon and wait until it is gone (the kernel keeps its dead mount)."""
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while pid_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_mount_left_dead_by_a_killed_daemon_is_shown_and_mount_cleans_it_up(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        crash(m)
        assert is_mounted(m.dir)  # the kernel keeps the dead mount: ENOTCONN for everything
        r = privifs(m.env, "status", check=False)
        assert r.returncode == 8 and f"{m.dir}: dead mount" in r.stdout
        assert f"privifs mount {m.dir}" in r.stdout and "Traceback" not in r.stderr
        st = json.loads(privifs(m.env, "status", str(m.dir), "--json", check=False).stdout)
        assert st["dead"] is True and st["mountpoint"] == str(m.dir)
        r = m.mount()
        assert "cleaned it up" in r.stderr and "Traceback" not in r.stderr
        assert (m.dir / "kept.txt").read_text() == "before the crash"
        assert privifs(m.env, "status", str(m.dir)).returncode == 0


def threads_waiting_in_the_kernel(pid: int) -> list[str]:
    """The threads of process ``pid`` in uninterruptible sleep (state D), by name."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, IndexError):
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "D":
                out.append((task / "comm").read_text().strip())
    return out


@pytest.mark.slow
def test_a_mount_whose_killed_daemon_cannot_end_is_shown_and_mount_ends_it_and_mounts_again(eng, tmp_path):
    """A kill -9 while the daemon's invalidation thread waited in the kernel for a page lock that
    a read of the same mount held (the read waiting for the daemon's answer): that thread never
    ended, so neither did the process nor the mount's connection; every access to the mount hung
    for good, status said "no privifs mounts" and mount said "already mounted" (helper hAV F4)."""
    x = Mount(tmp_path / "x", eng.urls)
    y = Mount(tmp_path / "y", eng.urls, username=x.username, register=False, key_file=x.key_file)
    reader = None
    try:
        x.mount()
        y.mount()
        (y.dir / "f").write_bytes(os.urandom(2 << 20))
        y.wait_idle()
        x.refresh()
        eng.set_options(stream_bytes_per_second=20_000)  # x's read of f waits for its download
        # (another process: a file of the wedged mount open here would hang every subprocess
        # started meanwhile, in the FLUSH of the child's close_range before its exec)
        reader = subprocess.Popen(["cat", str(x.dir / "f")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(2)
        (y.dir / "f").write_bytes(b"short")  # x's listing follows it: it drops f's cached pages
        y.wait_idle()
        pid = x.pid
        deadline = time.monotonic() + 30
        while not threads_waiting_in_the_kernel(pid):
            assert time.monotonic() < deadline, "the daemon's invalidation never waited in the kernel"
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        assert pid_alive(pid) or threads_waiting_in_the_kernel(pid)  # (a zombie with a thread left)
        r = privifs(x.env, "status", check=False)
        assert r.returncode == 8 and f"{x.dir}: dead mount" in r.stdout and "hangs" in r.stdout
        r = x.mount()
        assert "cleaned it up" in r.stderr and "Traceback" not in r.stderr
        assert reader.wait(30) != 0  # the wedged read failed when the connection ended
        eng.set_options(stream_bytes_per_second=0)
        x.refresh()
        assert (x.dir / "f").read_bytes() == b"short"
    finally:
        eng.set_options(stream_bytes_per_second=0)
        for m in (x, y):
            if is_mounted(m.dir) and m.registry() is None:
                subprocess.run(["umount", "-f", str(m.dir)], capture_output=True, timeout=30)
            m.cleanup()
        if reader is not None and reader.poll() is None:
            reader.kill()


def test_status_into_a_closed_pipe_ends_quietly(engine, tmp_path):
    with Mount(tmp_path, engine.urls).mounted() as m:
        r, w = os.pipe()
        os.close(r)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "privifs", "status"],
                env=m.env,
                stdout=w,
                stderr=subprocess.PIPE,
                text=True,
                timeout=120,
            )
        finally:
            os.close(w)
        assert proc.returncode == 141 and proc.stderr == ""


def umount_started(m: Mount, *args: str) -> subprocess.Popen:
    """``privifs umount`` of ``m`` running in the background, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "privifs", "umount", str(m.dir), *args],
        env=m.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_umount_exits_non_zero_when_changes_stay_staged(eng, tmp_path):
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "stuck.bin").write_bytes(os.urandom(200_000))
        eng.set_options(fail_rate=1.0)  # every request fails: nothing can be uploaded
        umount = umount_started(m, "--timeout", "2")
        try:
            deadline = time.monotonic() + 120
            while is_mounted(m.dir):  # the flush gave up, then the unmount went ahead
                assert time.monotonic() < deadline and umount.poll() is None
                time.sleep(0.1)
            eng.set_options(fail_rate=0.0)  # let the daemon's final drain finish quickly
            out, err = umount.communicate(timeout=150)
        finally:
            if umount.poll() is None:
                umount.kill()
        assert umount.returncode == 7, (out, err)
        assert "staged in" in err and err.count("\n") == 1 and "Traceback" not in err


def test_umount_ends_when_the_server_refuses_every_retry_and_the_change_stays_staged(eng, tmp_path):
    """A server that answers but refuses a change every time (helper hE's blank file name, which
    the vault refused with a 422 at each upload): umount without --timeout waited for it for
    good. Once each pending change was tried again after the flush began and refused again, it
    unmounts with exit 7, and the change is uploaded by a later mount the server accepts."""
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        data = os.urandom(50_000)
        (m.dir / "refused.bin").write_bytes(data)
        eng.set_options(reject="reserve-token-space", reject_reason="policy.rejected")
        try:
            r = m.umount(check=False)  # CMD_TIMEOUT bounds it; before the fix it never returned
        finally:
            eng.set_options(reject="")
        assert r.returncode == 7, (r.stdout, r.stderr)
        assert "refused 1 change " in r.stderr and "kept staged" in r.stderr and "Traceback" not in r.stderr
        assert not is_mounted(m.dir)
        m.mount()
        m.wait_idle()
        assert (m.dir / "refused.bin").read_bytes() == data
        assert ("/", "refused.bin") in [(t["context"], t["fileName"]) for t in m.tokens()]


def test_umount_timeout_bounds_the_whole_command_while_the_server_keeps_failing(eng, tmp_path):
    """umount --timeout gave up on the uploads, then the daemon drained them for up to another
    60 s after the unmount and the command waited for it (--timeout 15 took 57 s against a server
    that accepted connections and never answered), and said '(last error: None)'."""
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        data = os.urandom(200_000)
        (m.dir / "stuck.bin").write_bytes(data)
        eng.set_options(fail_rate=1.0)
        try:
            start = time.monotonic()
            r = m.umount("--timeout", "2", check=False)
            took = time.monotonic() - start
        finally:
            eng.set_options(fail_rate=0.0)
        assert r.returncode == 7, (r.stdout, r.stderr)
        assert "staged in" in r.stderr and "None" not in r.stderr and "Traceback" not in r.stderr
        assert took < 20, f"umount --timeout 2 took {took:.0f}s"
        assert not is_mounted(m.dir)
        m.mount()
        m.wait_idle()
        assert ("/", "stuck.bin") in [(t["context"], t["fileName"]) for t in m.tokens()]
        assert (m.dir / "stuck.bin").read_bytes() == data


def test_umount_of_a_daemon_that_hangs_ends_with_one_line(engine, tmp_path):
    """'privifs umount DIR --timeout 5' of a daemon that did not answer (stopped with SIGSTOP)
    waited on its control socket forever: the flush request had no time limit at all."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        pid = m.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            r = m.umount("--timeout", "5", check=False)
            took = time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)
        assert r.returncode == 1 and "did not answer" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert took < 60, f"umount took {took:.0f}s"
        assert is_mounted(m.dir)  # nothing was done to a daemon that may still be working
        m.umount()


def test_malformed_control_requests_get_an_error_answer_not_a_failed_task(engine, tmp_path):
    """A control request that was JSON but not an object ([1], "x", null), or a flush with a
    timeout that is not a number, was answered 'internal error: AttributeError …' and counted as
    an unexpected failure: 'privifs status' then showed 'task failed: control socket'; so was
    JSON nested past the parser's limit (a RecursionError). An integer too large for a float as
    a flush's timeout was an internal error too, and as an unmount's drain it unmounted and then
    ended the daemon with an internal error, without the drain (helper hX)."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        huge = b"1" + b"0" * 400
        flushes = (b'{"cmd": "flush", "timeout": "abc"}', b'{"cmd": "flush", "timeout": true}')
        flushes += (b'{"cmd": "flush", "timeout": ' + huge + b"}", b'{"cmd": "flush", "timeout": -1}')
        flushes += (b'{"cmd": "unmount", "drain": ' + huge + b"}", b'{"cmd": "unmount", "drain": "x"}')
        for raw in (b"[1]", b'"x"', b"null", *flushes, b"[" * 60_000, b'{"cmd": "status", "x": ' + b"[" * 60_000):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(30)
                s.connect(m.registry()["control"])
                s.sendall(raw + b"\n")
                answer = json.loads(s.makefile("rb").readline())
            assert answer["error"].startswith("bad request"), (raw, answer)
        status = m.status()
        status = status[0] if isinstance(status, list) else status
        control = [t for t in status["tasks"] if t["name"] == "control socket"]
        assert control and control[0]["failures"] == 0, control
        assert is_mounted(m.dir)
        assert m.control({"cmd": "flush", "timeout": 30})[-1] == {"done": True}


def test_bad_option_values_are_refused_with_one_line(tmp_path):
    m = Mount(tmp_path, None)  # the embedded engine: nothing is set up before the options are checked
    bad = [
        ("--refresh-interval", "0"),
        ("--refresh-interval", "-5"),
        ("--refresh-interval", "nan"),
        ("--cache-size", "0"),
        ("--cache-size", "lots"),
        ("--upload-workers", "0"),
        ("--upload-workers", "1000"),
        ("--write-back-delay", "-1"),
        ("--fsync-timeout", "0"),
        ("--umask", "999"),
        ("--uid", "-3"),
    ]
    try:
        for option, value in bad:
            r = m.mount(option, value, check=False)
            assert r.returncode == 2 and r.stderr.count("\n") == 1, (option, value, r.stderr)
            assert option in r.stderr and "Traceback" not in r.stderr
            assert not is_mounted(m.dir)
        r = privifs(m.env, "umount", str(m.dir), "--timeout", "-1", check=False)
        assert r.returncode == 2 and "--timeout" in r.stderr
        r = privifs(m.env, "engine", "--api-port", "70000", check=False)
        assert r.returncode == 2 and "--api-port" in r.stderr
        for setting in ("no_such_option=1", "token_ttl", "token_ttl=-5"):  # exit 3 (configuration) before
            r = privifs(m.env, "engine", "--set", setting, check=False)
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--set" in r.stderr, (setting, r.stderr)
        assert not (tmp_path / "config").exists()
    finally:
        m.cleanup()


@contextlib.contextmanager
def mount_log(tmp_path, name: str, **options):
    """A logger writing only to a :class:`MountLog` at ``tmp_path/mount.log`` (the daemon's stray
    output to ``tmp_path/stray``); yields the logger and the handler, closed afterwards."""
    import logging

    from privifs.cli.mount_cmd import MountLog

    out_fd = os.open(tmp_path / "stray", os.O_WRONLY | os.O_CREAT, 0o600)
    handler = MountLog(tmp_path / "mount.log", fds=(out_fd,), **options)
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        handler.close()
        os.close(out_fd)


def test_mount_log_rotates_and_the_daemon_output_follows_it(tmp_path):
    log_path = tmp_path / "mount.log"
    with mount_log(tmp_path, "test.mountlog", max_bytes=4096, backups=2) as (logger, handler):
        for i in range(300):
            logger.warning("line %d %s", i, "x" * 40)
        os.write(handler.fds[0], b"stray output after rotation\n")
    files = sorted(p.name for p in tmp_path.glob("mount.log*"))
    assert files == ["mount.log", "mount.log.1", "mount.log.2"]
    assert all(p.stat().st_size <= 4096 + 100 for p in tmp_path.glob("mount.log*"))
    assert "stray output after rotation" in log_path.read_text()
    assert "line 299" in log_path.read_text()


def test_a_file_name_with_a_line_break_cannot_write_a_line_of_its_own_into_the_mount_log(tmp_path):
    """A token another machine named ``x\\n<timestamp> INFO privifs.fs.daemon: …`` (helper hM:
    a foreign token whose read failed) wrote that second part into mount.log as a line of its
    own, looking like the daemon's. Line breaks in messages are now written as ``\\n``; a
    traceback still follows on its own lines."""
    log_path = tmp_path / "mount.log"
    forged = "2026-12-05 12:00:00,000 INFO privifs.fs.daemon: mounted at /elsewhere"
    with mount_log(tmp_path, "test.mountlog.oneline") as (logger, _):
        logger.error("%s: cannot fetch the content", "/peer/x\n" + forged + "\r")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("a bug")
        logger.error("%s: integrity failure", "/esc/bad\x1b]0;TITLE\x07\x1b[32mgreen.txt")
    lines = log_path.read_text().splitlines()
    assert not any(line.startswith(forged) for line in lines), lines
    assert "/peer/x\\n" + forged + "\\r: cannot fetch the content" in lines[0]
    assert lines[1].endswith("a bug") and lines[2] == "Traceback (most recent call last):"
    # nor can a name's escape sequences act on a terminal showing the log (helper hAH F7)
    assert "\x1b" not in log_path.read_text() and "/esc/bad\\x1b]0;TITLE\\x07\\x1b[32mgreen.txt" in lines[-1]


def test_umount_progress_counts_bytes():
    from privifs.cli.status_cmd import UploadProgress

    p = UploadProgress()
    assert (
        p.line({"pending": 2, "bytes": 3 * 2**30, "deletes": 0})
        == "uploading: 0 bytes of 3.0 GiB (0%), 2 changes and 0 deletes left"
    )
    assert (
        p.line({"pending": 1, "bytes": 2**30, "deletes": 1})
        == "uploading: 2.0 GiB of 3.0 GiB (66%), 1 change and 1 delete left"
    )


def test_version_and_help_have_no_markup():
    import argparse

    from privifs.cli import build_parser

    out = subprocess.run([sys.executable, "-m", "privifs", "--version"], capture_output=True, text=True).stdout
    assert out.startswith("privifs ") and out.strip().split()[1][0].isdigit()

    def parsers(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    seen = {}
    for name, parser in parsers(build_parser(), "privifs"):
        text = parser.format_help()
        seen[name] = text
        assert parser.description, name
        assert "``" not in text and ":mod:" not in text and ":func:" not in text, name
    assert {
        "privifs token ls",
        "privifs token put",
        "privifs backup",
        "privifs restore",
        "privifs umount",
        "privifs status",
        "privifs init",
        "privifs engine",
    } <= set(seen)


def test_scripts_up_takes_a_leading_option_as_a_mount_option(tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    m = Mount(tmp_path, None)
    try:
        with helper_link_kept():  # scripts/up runs scripts/install
            r = subprocess.run(
                [str(repo / "scripts" / "up"), "--bogus-option"],
                env=m.env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=300,
            )
        assert r.returncode == 2 and "unrecognized arguments: --bogus-option" in r.stderr
        assert not (tmp_path / "--bogus-option").exists() and not (repo / "--bogus-option").exists()
        assert (tmp_path / "home" / "privifs").is_dir() and not is_mounted(tmp_path / "home" / "privifs")
    finally:
        m.cleanup()


def test_scripts_up_on_a_mount_left_dead_by_a_killed_daemon_mounts_it_again(engine, tmp_path):
    # a dead FUSE mount cannot be stat'ed (ENOTCONN): scripts/up's 'mkdir -p' failed on it
    # ("mkdir: cannot stat ...: Transport endpoint is not connected", exit 1) instead of letting
    # 'privifs mount' clean it up as it does after a crash or an unclean shutdown
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    with Mount(tmp_path, engine.urls).mounted() as m, helper_link_kept():  # scripts/up runs scripts/install
        crash(m)
        r = subprocess.run(
            [str(repo / "scripts" / "up"), str(m.dir)],
            env=m.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert "cleaned it up" in r.stderr and "Traceback" not in r.stderr
        assert (m.dir / "kept.txt").read_text() == "before the crash"
        # the commands it prints work from wherever the user is (they were relative to the checkout)
        status = next(line.split()[:3] for line in r.stdout.splitlines() if " status " in line)
        assert status[0] == str(repo / ".venv" / "bin" / "privifs"), r.stdout
        assert subprocess.run(status, env=m.env, cwd="/", capture_output=True, timeout=60).returncode == 0


def test_a_mount_started_without_a_runtime_dir_is_seen_and_unmounted_from_a_session_with_one(engine, tmp_path):
    # a mount started at boot (fstab, mount -t fuse.privifs, cron: no XDG_RUNTIME_DIR) registered in
    # the state directory, and a login shell (XDG_RUNTIME_DIR=/run/user/UID) looked only in its
    # runtime directory: 'privifs status' said "no privifs mounts", 'privifs umount DIR' that DIR
    # was "served by a privifs daemon this user did not start"
    m = Mount(tmp_path, engine.urls)
    boot = {k: v for k, v in m.env.items() if k != "XDG_RUNTIME_DIR"}
    try:
        privifs(boot, "mount", str(m.dir))
        (m.dir / "kept.txt").write_text("at boot")
        r = privifs(m.env, "status", check=False)
        assert r.returncode == 0 and str(m.dir) in r.stdout, r.stdout + r.stderr
        r = privifs(m.env, "umount", str(m.dir), check=False)
        assert r.returncode == 0 and not is_mounted(m.dir), r.stderr
        m.mount()
        assert (m.dir / "kept.txt").read_text() == "at boot"
    finally:
        if is_mounted(m.dir) and m.registry() is None:
            privifs(boot, "umount", str(m.dir), check=False)
        m.cleanup()


def test_umount_of_a_dead_mount_cleans_it_up_and_says_what_stays_staged(engine, tmp_path):
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "unsent.txt").write_text("staged when the daemon died")
        kill_daemon(m)
        r = m.umount(check=False)
        assert r.returncode == 7 and "1 file it had not uploaded stays staged" in r.stderr
        assert r.stderr.count("\n") == 1 and not is_mounted(m.dir)
        m.mount()
        assert (m.dir / "unsent.txt").read_text() == "staged when the daemon died"
        m.wait_idle()
        assert "unsent.txt" in {t["fileName"] for t in m.tokens()}
        assert m.umount().returncode == 0


def test_umount_whose_daemon_is_killed_while_it_uploads_cleans_up_and_says_what_stays_staged(eng, tmp_path):
    """The daemon dies during umount's flush (kill -9, a crash, the OOM killer): umount
    detaches the dead mount and says what stays staged (exit 7), as for a mount found dead; it
    said "privifs: error: Connection refused" (exit 4) and left the dead mount behind."""
    content = os.urandom(6 * 1024 * 1024)
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        eng.set_options(stream_bytes_per_second=1024 * 1024)  # the upload takes about 6 s
        try:
            (m.dir / "slow.bin").write_bytes(content)
            pid = m.pid
            umount = subprocess.Popen(
                [sys.executable, "-m", "privifs", "umount", str(m.dir)],
                env=m.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60  # the flush is under way (2 s were too few on a busy machine)
            while not any(p["state"] == "uploading" for p in m.status()["pending"]):
                assert time.monotonic() < deadline and umount.poll() is None, "umount's flush never began"
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            out, err = umount.communicate(timeout=60)
        finally:
            eng.set_options(stream_bytes_per_second=0)
        assert umount.returncode == 7, (out, err)
        assert "its daemon died while it uploaded" in err and "1 file it had not uploaded stays staged" in err, err
        assert err.count("\n") == 1 and not is_mounted(m.dir)
        m.mount()
        assert (m.dir / "slow.bin").read_bytes() == content
        m.wait_idle()
        assert m.umount().returncode == 0


def test_flush_progress_counts_the_bytes_of_an_upload_in_flight(eng, tmp_path):
    """umount's progress: a big upload's remaining bytes go down while it streams, not only
    when it ends."""
    size = 24 * 1024 * 1024  # well beyond what socket buffers absorb
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        eng.set_options(stream_bytes_per_second=8 * 1024 * 1024)  # before the write: any upload is slow
        (m.dir / "big.bin").write_bytes(os.urandom(size))
        answers = m.control({"cmd": "flush", "timeout": 120}, timeout=180)
        eng.set_options(stream_bytes_per_second=0)
        assert answers[-1].get("done"), answers[-1]
        remaining = [a["progress"]["bytes"] for a in answers if "progress" in a]
        assert remaining and remaining[0] <= size
        assert any(0 < b < size for b in remaining), remaining
        assert remaining == sorted(remaining, reverse=True)


def test_mount_right_after_a_killed_daemon_cleans_up_while_the_kernel_still_caches_the_root(engine, tmp_path):
    """The kernel answers stat() of a dead mount's root from its attribute cache for up to
    attr_timeout (5 s) after the daemon died: mount must still see the mount is dead."""
    with Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "unsent.txt").write_text("staged when the daemon died")
        os.stat(m.dir)  # the root's attributes are now cached by the kernel
        kill_daemon(m)
        os.stat(m.dir)  # still answered from the cache: the daemon is gone
        m.mount()
        assert (m.dir / "unsent.txt").read_text() == "staged when the daemon died"


def test_status_of_a_stopped_daemon_says_so_at_once_with_how_to_recover(engine, tmp_path):
    """'privifs status' of a mount whose daemon was stopped (SIGSTOP) waited 30 s on its control
    socket, then said 'daemon not answering (timed out)' and exited 0; and once the kernel no
    longer had the root's attributes cached, status, umount and mount all hung for ever in
    resolving the mountpoint's path (a stat of the stopped mount)."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        pid = m.pid
        (m.dir / "new.txt").write_text("a create drops the kernel's cached attributes of the root")
        os.kill(pid, signal.SIGSTOP)
        try:
            r = privifs(m.env, "status", str(m.dir), check=False, timeout=20)
            every = privifs(m.env, "status", check=False, timeout=20)
            st = json.loads(privifs(m.env, "status", str(m.dir), "--json", check=False, timeout=20).stdout)
            umount = privifs(m.env, "umount", str(m.dir), check=False, timeout=20)
            mount = privifs(m.env, "mount", str(m.dir), check=False, timeout=20)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert umount.returncode == 1 and f"it is stopped: 'kill -CONT {pid}'" in umount.stderr, umount.stderr
        assert mount.returncode == 4 and "already mounted" in mount.stderr, mount.stderr  # (README: a local directory)
        assert r.returncode == 8 and every.returncode == 8, (r, every)
        assert f"{m.dir}: daemon not running: it is stopped (pid {pid}" in r.stdout, r.stdout
        assert f"kill -CONT {pid}" in r.stdout and f"privifs mount {m.dir}" in r.stdout
        assert "stopped" in every.stdout and "Traceback" not in r.stderr + every.stderr
        assert st["stopped"] is True and st["pid"] == pid and not st["dead"]
        assert privifs(m.env, "status", str(m.dir)).returncode == 0  # going on again
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        twice = privifs(m.env, "mount", str(elsewhere), check=False, timeout=60)
        assert twice.returncode == 4 and f"this vault is already mounted (at {m.dir})" in twice.stderr, twice.stderr


def test_the_daemon_and_its_engine_run_from_the_root_and_import_nothing_from_the_working_directory(tmp_path):
    """'privifs mount' started its daemon (and the daemon its embedded engine) as 'python -m
    privifs' in the user's working directory: a directory holding a 'privifs' package (a checkout
    of another version) ran instead of the installed one, and the daemon kept that directory busy."""
    from pathlib import Path

    from tests.test_engine_embedded import engine_pid

    m = Mount(tmp_path / "user", None)
    work = tmp_path / "work"
    (work / "privifs").mkdir(parents=True)
    (work / "privifs" / "__init__.py").write_text("raise SystemExit('imported from the working directory')\n")
    try:
        r = subprocess.run(
            [str(Path(sys.executable).parent / "privifs"), "mount", str(m.dir)],
            cwd=work,
            env=m.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        (m.dir / "f.txt").write_text("served by the installed privifs")
        m.wait_idle()
        assert (m.dir / "f.txt").read_text() == "served by the installed privifs"
        engine = engine_pid(m.root / "data" / "privifs" / "engine")
        assert engine is not None
        for pid in (m.pid, engine):
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
    finally:
        m.cleanup()


@pytest.mark.parametrize("other_is", ["any process", "another drive's daemon"])
def test_a_registry_entry_whose_pid_is_another_process_now_is_dropped_not_shown(tmp_path, other_is):
    """A mount's registry entry outlives a crashed daemon, and (with no XDG_RUNTIME_DIR) a reboot:
    once its pid belonged to another process, 'privifs status' showed that mount as hung or
    stopped and told the user to 'kill -9' the unrelated process; also when that process was the
    daemon of another drive, healthy (helper hK): the entry says when its daemon started."""
    m = Mount(tmp_path / "user", None)
    mounts = m.root / "run" / "privifs" / "mounts"
    mounts.mkdir(parents=True, exist_ok=True)
    if other_is == "any process":
        other = subprocess.Popen(["sleep", "300"])
    else:  # what the registry takes for a mount daemon: 'privifs' and 'mount' on its command line
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "privifs", "mount"])
    try:
        os.kill(other.pid, signal.SIGSTOP)  # stopped, as a job suspended with Ctrl-Z
        stale = mounts / "stale.json"
        stale.write_text(
            json.dumps(
                {
                    "mountpoint": str(m.dir),
                    "pid": other.pid,
                    "started": "a boot before:12345",
                    "control": str(tmp_path / "gone.sock"),
                    "state_dir": str(tmp_path),
                    "server": "the embedded engine",
                }
            )
        )
        r = privifs(m.env, "status", check=False)
        assert r.returncode == 0 and "no privifs mounts" in r.stdout and str(other.pid) not in r.stdout, r.stdout
        assert not stale.exists()
    finally:
        other.kill()
        other.wait()


def mount_under_open_files_limit(m: Mount, soft: int, hard: int) -> None:
    """Mount ``m`` (write-back held back an hour) with ``privifs mount`` started under a limit of
    ``soft``/``hard`` open files, which its daemon inherits."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    r = subprocess.run(
        [sys.executable, "-m", "privifs", "mount", str(m.dir), "--write-back-delay", "3600"],
        env=m.env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )
    assert r.returncode == 0, r.stderr


def daemon_open_files_limit(m: Mount) -> int:
    with open(f"/proc/{m.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.slow
def test_a_thousand_unuploaded_files_fit_under_a_soft_limit_of_1024_open_files(tmp_path):
    """The daemon kept each staged (unuploaded) file open: started under the usual soft limit
    of 1024 open files, every create past about a thousand pending files failed with EIO and
    the control socket stopped answering. The daemon and its engine raise the soft limit to the
    hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard limit of open files is {hard}")
    m = Mount(tmp_path / "user", None)
    try:
        mount_under_open_files_limit(m, 1024, hard)
        for i in range(1200):
            (m.dir / f"f{i}").write_text(f"pending {i}\n")
        st = m.status()
        assert st["pending_count"] == 1200 and len(st["pending"]) == PENDING_SHOWN  # (a status names 50)
        assert st["pending_bytes"] == sum(len(f"pending {i}\n") for i in range(1200))
        shown = privifs(m.env, "status", str(m.dir)).stdout
        assert "pending:      1200 changes" in shown and "… and 1180 more" in shown, shown
        assert (m.dir / "f1199").read_text() == "pending 1199\n"
        assert daemon_open_files_limit(m) > 1024
    finally:
        m.cleanup()


@pytest.mark.slow
def test_more_unuploaded_files_than_open_files_allowed_are_written_kept_and_mounted_again(tmp_path):
    """The daemon kept each staged (unuploaded) file open until its upload, so the open-files
    limit bounded how many files could wait: an untar of some 20,000 files with uploads held
    back (a server unreachable, or slower than the untar) under this machine's hard limit of
    20,000 failed every further create with EIO, the control socket stopped answering, and
    after a kill -9 the vault could not be mounted again ('cannot record the mount ... Too many
    open files'). A staged file no open file or upload uses is now closed until its next use.
    Here the daemon's hard limit is 256 and 400 files wait."""
    m = Mount(tmp_path / "user", None)

    def all_there() -> None:
        for i in range(400):
            assert (m.dir / "d" / f"f{i}").read_text() == f"pending {i}\n" * (i % 7 + 1)

    try:
        mount_under_open_files_limit(m, 256, 256)
        (m.dir / "d").mkdir()
        for i in range(400):
            (m.dir / "d" / f"f{i}").write_text(f"pending {i}\n" * (i % 7 + 1))
        os.truncate(m.dir / "d" / "f0", 3)  # (a truncate by path stages without an open file)
        (m.dir / "d" / "f0").write_text("pending 0\n")
        sizes = sum(len(f"pending {i}\n") * (i % 7 + 1) for i in range(400))
        assert m.status()["pending_bytes"] == sizes  # every file waits (and the control socket answers)
        all_there()
        assert daemon_open_files_limit(m) == 256
        m.kill9()
        mount_under_open_files_limit(m, 256, 256)  # the start reattaches every staged file
        all_there()
        assert "unmounted" in m.umount().stdout  # (exit 0: every file uploaded)
    finally:
        m.cleanup()


def test_umount_of_a_busy_mount_refuses_and_leaves_it_working(engine, tmp_path):
    """'privifs umount DIR' while a program still had a file open detached the mount lazily: the
    program's next write and its close failed with ENOTCONN and what it wrote then was lost. Like
    umount(8), it now refuses (exit 4, the mount stays and keeps working) until nothing holds it."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        fd = os.open(m.dir / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"before\n")
            r = m.umount("--timeout", "30", check=False)
            assert r.returncode == 4 and "busy" in r.stderr, (r.stdout, r.stderr)
            assert is_mounted(m.dir) and pid_alive(m.pid)
            os.write(fd, b"after\n")
        finally:
            os.close(fd)
        assert privifs(m.env, "status", str(m.dir)).returncode == 0
        assert "unmounted" in m.umount().stdout and not is_mounted(m.dir)
        m.mount()
        assert (m.dir / "open.txt").read_bytes() == b"before\nafter\n"


def test_umount_while_programs_hold_files_open_says_busy_before_uploading(eng, tmp_path):
    """While programs kept writing, 'privifs umount' uploaded for minutes and said nothing, then
    learnt the mount was busy (helper hAE F2). It now looks first and names the programs and what
    they hold; what is pending keeps uploading, and nothing is lost."""
    with Mount(tmp_path, eng.urls).mounted() as m:
        eng.set_options(stream_bytes_per_second=20_000)  # the pending file takes minutes to upload
        (m.dir / "slow.bin").write_bytes(os.urandom(2 << 20))
        (m.dir / "sub").mkdir()
        fd = os.open(m.dir / "sub" / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        inside = subprocess.Popen(["sleep", "120"], cwd=m.dir / "sub")
        try:
            os.write(fd, b"still writing\n")
            r = privifs(m.env, "umount", str(m.dir), "--timeout", "600", check=False, timeout=60)
            assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
            assert f"(pid {os.getpid()}) has open '{m.dir}/sub/open.txt'" in r.stderr, r.stderr
            assert f"sleep (pid {inside.pid}) works in '{m.dir}/sub'" in r.stderr and "('fuser -vm" in r.stderr
            assert is_mounted(m.dir) and m.status()["pending_count"] >= 1
        finally:
            os.close(fd)
            inside.kill()
            inside.wait(10)
        eng.set_options(stream_bytes_per_second=0)
        assert "unmounted" in m.umount().stdout
        m.mount()
        assert (m.dir / "sub" / "open.txt").read_bytes() == b"still writing\n"
        assert len((m.dir / "slow.bin").read_bytes()) == 2 << 20


@contextlib.contextmanager
def umount_uploading_slowly(eng, m: Mount):
    """``privifs umount`` of ``m`` started while a file of 2 MiB takes minutes to upload; yields
    it once its first look for busy programs is over (nothing held then)."""
    eng.set_options(stream_bytes_per_second=20_000)
    (m.dir / "slow.bin").write_bytes(os.urandom(2 << 20))
    umount = umount_started(m, "--timeout", "600")
    try:
        time.sleep(2)
        yield umount
    finally:
        umount.kill()
        eng.set_options(stream_bytes_per_second=0)


def test_umount_looks_again_while_it_uploads_and_stops_at_a_program_that_came_in(eng, tmp_path):
    """A program that came into the drive after umount's first look (here: its working directory)
    kept it busy: umount uploaded for minutes and only then heard so. It looks again every second
    while it uploads (helper hAH F2)."""
    with Mount(tmp_path, eng.urls).mounted() as m:
        with umount_uploading_slowly(eng, m) as umount:
            came = subprocess.Popen(["sleep", "120"], cwd=m.dir)
            try:
                out, err = umount.communicate(timeout=60)
            finally:
                came.kill()
                came.wait(10)
        assert umount.returncode == 4 and f"sleep (pid {came.pid}) works in '{m.dir}'" in err, (out, err)
        assert "unmounted" in m.umount().stdout


def test_umount_stops_at_a_program_that_began_writing_one_file_after_another_while_it_uploaded(eng, tmp_path):
    """A loop writing one small file after another holds each for a moment only: looks in /proc
    every second missed it in 3 of 5 runs, and umount uploaded what it wrote for minutes (helper
    hAI N1). The daemon says which program opened a file for writing since the upload began."""
    with Mount(tmp_path, eng.urls).mounted() as m:
        stop = threading.Event()

        def writer() -> None:
            for i in itertools.count():
                if stop.wait(0.3):
                    return
                (m.dir / f"log-{i}.txt").write_text("a line\n")  # (open for a moment only)

        with umount_uploading_slowly(eng, m) as umount:
            thread = threading.Thread(target=writer)
            thread.start()
            try:
                out, err = umount.communicate(timeout=60)
            finally:
                stop.set()
                thread.join(10)
        assert umount.returncode == 4 and f"(pid {os.getpid()}) began writing '{m.dir}/log-" in err, (out, err)
        assert "unmounted" in m.umount().stdout


def test_a_program_in_the_directory_under_the_mountpoint_does_not_keep_the_mount_busy(engine, tmp_path):
    """A shell that was in the directory before the drive was mounted there is not in the mount
    (the kernel unmounts): umount called it busy, for as long as that shell lived (helper hAH F3)."""
    m = Mount(tmp_path, engine.urls)
    below = subprocess.Popen(["sleep", "120"], cwd=m.dir)
    try:
        m.mount()
        (m.dir / "f.txt").write_text("kept")
        assert "unmounted" in m.umount().stdout and not is_mounted(m.dir)
        m.mount()
        assert (m.dir / "f.txt").read_text() == "kept"
        m.umount()
    finally:
        below.kill()
        below.wait(10)
        m.cleanup()


def test_umount_of_a_mount_with_another_mounted_inside_says_so_at_once(engine, tmp_path):
    """A tmpfs mounted inside the drive keeps it busy: umount uploaded first, then blamed a
    program and named none (helper hAH F5)."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        (m.dir / "inner").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(m.dir / "inner")], check=True, timeout=30)
        try:
            r = m.umount(check=False)
            assert r.returncode == 4 and f"busy: {m.dir}/inner is mounted inside it: unmount that first" in r.stderr
        finally:
            subprocess.run(["umount", str(m.dir / "inner")], check=True, timeout=30)


def test_umount_of_a_drive_also_bound_elsewhere_refuses_rather_than_leave_that_place_dead(engine, tmp_path):
    """With a bind copy of the drive elsewhere (what `docker -v ~/drive:/data` makes) the kernel let
    the drive go, the daemon ended, and the copy answered ENOTCONN: what was written there next
    was lost (helper hAH F4)."""
    copy = tmp_path / "copy"
    copy.mkdir()
    with Mount(tmp_path / "m", engine.urls).mounted() as m:
        subprocess.run(["mount", "--bind", str(m.dir), str(copy)], check=True, timeout=30)
        try:
            r = m.umount(check=False)
            assert r.returncode == 4 and f"is also mounted at {copy} (a bind mount" in r.stderr, r.stderr
            (copy / "through-the-copy.txt").write_text("kept")
        finally:
            subprocess.run(["umount", str(copy)], check=True, timeout=30)
        assert "unmounted" in m.umount().stdout
        m.mount()
        assert (m.dir / "through-the-copy.txt").read_text() == "kept"


def test_a_mount_the_drive_was_mounted_over_does_not_keep_it_busy(engine, tmp_path):
    """Mounted with --nonempty over a directory holding a mount: that mount is under the drive,
    not on it, and the kernel unmounts the drive; umount called it 'mounted inside' for good
    (helper hAI N3)."""
    m = Mount(tmp_path, engine.urls)
    (m.dir / "under").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(m.dir / "under")], check=True, timeout=30)
    try:
        m.mount("--nonempty")
        assert "unmounted" in m.umount().stdout and not is_mounted(m.dir)
    finally:
        m.cleanup()
        subprocess.run(["umount", str(m.dir / "under")], check=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="making shared mounts needs root")
def test_a_copy_the_kernel_made_under_a_shared_mount_goes_with_the_drive_and_is_no_reason_to_refuse(engine, tmp_path):
    """Under a shared mount (shared:N, as systemd makes /) the kernel puts a copy of the drive at
    the same place under each peer, and unmounts those copies with it: umount refused for good,
    'also mounted at' the peer's copy (helper hAI N2). A copy the user bound stays refused."""
    top, peer = tmp_path / "top", tmp_path / "peer"
    top.mkdir()
    peer.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(top)], check=True, timeout=30)
    try:
        subprocess.run(["mount", "--make-shared", str(top)], check=True, timeout=30)
        subprocess.run(["mount", "--bind", str(top), str(peer)], check=True, timeout=30)  # a peer of it
        m = Mount(top / "user", engine.urls)
        try:
            m.mount()
            assert is_mounted(peer / "user" / "mnt")  # (the kernel's copy)
            assert "unmounted" in m.umount().stdout
            assert not is_mounted(m.dir) and not is_mounted(peer / "user" / "mnt")
        finally:
            m.cleanup()
    finally:
        subprocess.run(["umount", "-R", str(peer)], check=False, timeout=30)
        subprocess.run(["umount", "-R", str(top)], check=False, timeout=30)


def test_a_cache_or_state_directory_inside_the_mountpoint_is_refused_not_a_hang(tmp_path):
    """A cache (or index and staging) under the mountpoint would be reached through the mount
    itself: the daemon waited for its own FUSE request and the first read hung for good."""
    m = Mount(tmp_path, None)
    try:
        for option, inside in (("--cache-dir", m.dir / "cache"), ("--state-dir", m.dir / "sub" / "state")):
            r = m.mount(option, str(inside), check=False)
            errors = [line for line in r.stderr.splitlines() if "error" in line]
            assert r.returncode == 3 and len(errors) == 1, (option, r.returncode, r.stderr)
            assert "inside the mountpoint" in errors[0] and "Traceback" not in r.stderr
            assert not is_mounted(m.dir)
        with m.mounted("--cache-dir", str(tmp_path / "elsewhere")):
            (m.dir / "f").write_bytes(b"fine")
            assert (m.dir / "f").read_bytes() == b"fine"
    finally:
        m.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's directory needs root")
def test_a_cache_directory_another_user_may_change_is_refused_and_nothing_is_deleted(tmp_path):
    """Another user made the cache directory (in /tmp, say) and put an ``incoming`` link in it to
    a directory of the victim's: the mount deleted the victim's files there (helper hAD F2). A
    directory any user may write is refused the same way."""
    m = Mount(tmp_path, None)
    victim = tmp_path / "Documents"
    victim.mkdir()
    (victim / "thesis.txt").write_bytes(b"years of work")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    (theirs / "incoming").symlink_to(victim)
    os.chown(theirs, 65534, 65534)
    everyone = tmp_path / "everyone"
    everyone.mkdir()
    everyone.chmod(0o777)
    try:
        for cache, why in ((theirs, "belongs to another user (uid 65534)"), (everyone, "writable by every user")):
            r = m.mount("--cache-dir", str(cache), check=False)
            errors = [line for line in r.stderr.splitlines() if "error" in line]
            assert r.returncode == 3 and len(errors) == 1, (cache, r.returncode, r.stderr)
            assert why in errors[0] and "--cache-dir" in errors[0] and "Traceback" not in r.stderr
            assert not is_mounted(m.dir)
        assert (victim / "thesis.txt").read_bytes() == b"years of work"
        assert os.listdir(everyone) == []
    finally:
        m.cleanup()


def test_a_mountpoint_inside_the_state_or_cache_directory_is_refused_not_a_hang(engine, tmp_path):
    """Mounted over its own staging directory, the vault's first write there hung the writer
    and the daemon for good (helper hY); the other direction was already refused (above)."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        (m.dir / "f").write_bytes(b"kept")
    state = next((m.root / "state").glob("privifs/vaults/*"))
    cache = next((m.root / "cache").glob("privifs/vaults/*"))
    try:
        for inside in (state / "staging", cache / "incoming", state):
            r = privifs(m.env, "mount", str(inside), check=False)
            assert r.returncode == 3 and "is inside the" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert not is_mounted(inside)
        with m.mounted():
            assert (m.dir / "f").read_bytes() == b"kept"
    finally:
        m.cleanup()


_OTHER_FS = """
import stat, sys, pyfuse3, trio
class Ops(pyfuse3.Operations):
    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        e.st_ino, e.st_mode, e.st_nlink = inode, stat.S_IFDIR | 0o755, 2
        return e
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        return s
pyfuse3.init(Ops(), sys.argv[1], set(pyfuse3.default_options) | {"fsname=other", "subtype=other"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
"""


def test_umount_leaves_alone_a_live_mount_it_did_not_start_and_other_filesystems(tmp_path):
    """``privifs umount`` of a mountpoint missing from this user's registry detached whatever FUSE
    mount was there, lazily when busy: another HOME's live privifs mount, or an sshfs. And
    ``privifs status`` of that live mount says what umount says (it said "not a privifs mount")."""
    a, b = Mount(tmp_path / "a", None), Mount(tmp_path / "b", None)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", _OTHER_FS, str(other_dir)])
    try:
        a.mount()
        deadline = time.monotonic() + 30
        while not is_mounted(other_dir):
            assert time.monotonic() < deadline and other.poll() is None
            time.sleep(0.1)
        r = privifs(b.env, "umount", str(a.dir), check=False)
        assert r.returncode == 3 and "Traceback" not in r.stderr, r
        assert (
            f"served by a privifs daemon this user with another HOME started: run 'privifs umount {a.dir}' "
            f"with that HOME, or 'fusermount3 -u {a.dir}' to unmount it anyway" in r.stderr
        ), r.stderr
        assert is_mounted(a.dir) and a.status()
        r = privifs(b.env, "status", str(a.dir), check=False)  # it said "not a privifs mount"
        assert r.returncode == 3 and r.stderr.count("\n") == 1, r
        assert f"another HOME started: run 'privifs status {a.dir}' with that HOME" in r.stderr, r.stderr
        r = privifs(b.env, "umount", str(other_dir), check=False)
        assert r.returncode == 4 and "not a privifs mount" in r.stderr, r  # (README: a local directory)
        assert is_mounted(other_dir) and other.poll() is None
    finally:
        a.cleanup()
        b.cleanup()
        other.terminate()
        other.wait(timeout=30)
        if is_mounted(other_dir):
            subprocess.run(["fusermount3", "-u", "-z", str(other_dir)], check=False, timeout=30)


def test_two_mounts_started_at_once_on_one_mountpoint_do_not_stack(engine, tmp_path):
    """Two 'privifs mount' of one mountpoint at the same moment (two users, two vaults) both
    passed the 'already a mountpoint' check before either had mounted: both returned 0, the
    mounts stacked, and one umount took both down. The daemon now locks the directory first."""
    users = [Mount(tmp_path / name, engine.urls) for name in ("a", "b")]
    shared = tmp_path / "shared"
    shared.mkdir()
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "privifs", "mount", str(shared)],
                env=m.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for m in users
        ]
        results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
        codes = sorted(code for code, _ in results)
        assert codes == [0, 4], results  # (README: 4, a local file or directory)
        refused = next(err for code, err in results if code != 0)
        # which check refuses it depends on how far the first got: all say so in one line
        assert any(w in refused for w in ("mounting at", "already a mountpoint", "already mounted")), refused
        assert "Traceback" not in refused and refused.count("\n") == 1, refused
        with open("/proc/self/mounts") as f:
            assert sum(line.split()[1] == str(shared) for line in f) == 1
    finally:
        for m in users:
            privifs(m.env, "umount", str(shared), "--timeout", "30", check=False, timeout=90)
            m.cleanup()


def test_a_cache_dir_that_is_a_file_is_one_clear_line(engine, tmp_path):
    """It was 'the mount failed (FileExistsError: …)', exit 1."""
    m = Mount(tmp_path, engine.urls)
    (tmp_path / "a-file").write_text("")
    try:
        r = m.mount("--cache-dir", str(tmp_path / "a-file"), check=False)
        assert r.returncode == 3 and r.stderr.count("\n") == 1, r.stderr
        assert f"cannot use {tmp_path / 'a-file'} as the cache directory: File exists" in r.stderr, r.stderr
        assert not is_mounted(m.dir)
    finally:
        m.cleanup()


def test_a_runtime_directory_that_is_a_file_stops_the_mount_with_one_line_naming_it(engine, tmp_path):
    """$XDG_RUNTIME_DIR pointing at a file (or anything that cannot hold the mount's record):
    the cleanup after the failed record masked its error, and mount said 'the mount failed
    (NotADirectoryError: …)' with exit 1 (the vault refused). Now exit 4, naming the directory."""
    m = Mount(tmp_path, engine.urls)
    not_a_dir = tmp_path / "runtime-file"
    not_a_dir.write_text("")
    env = dict(m.env, XDG_RUNTIME_DIR=str(not_a_dir))
    r = privifs(env, "mount", str(m.dir), check=False)
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "NotADirectoryError" not in r.stderr
    assert f"cannot record the mount in {not_a_dir / 'privifs' / 'mounts'} (Not a directory)" in r.stderr
    assert not is_mounted(m.dir)
    m.mount()  # with a usable runtime directory, it mounts
    m.umount()


def test_a_daemon_whose_mount_command_was_killed_before_it_was_ready_keeps_serving(engine, tmp_path):
    # kill -9 of 'privifs mount' while the daemon it started was still getting ready (a first mount
    # takes seconds): the daemon's "ok" then met a closed pipe, BrokenPipeError ended the mount it
    # had just made and logged a traceback. The mount is up and registered: it serves on.
    m = Mount(tmp_path, engine.urls)
    r, w = os.pipe()
    os.close(r)  # the waiting command is gone
    cmd = [sys.executable, "-m", "privifs", "mount", str(m.dir), "--foreground", "--ready-fd", str(w)]
    proc = subprocess.Popen(
        cmd, env=m.env, pass_fds=(w,), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    os.close(w)
    try:
        deadline = time.monotonic() + 120
        while m.registry() is None:
            assert proc.poll() is None, proc.communicate(timeout=30)[0].decode()
            assert time.monotonic() < deadline, "the daemon did not mount"
            time.sleep(0.1)
        (m.dir / "after.txt").write_text("served")
        assert proc.poll() is None
        m.umount()
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 0 and "Traceback" not in out, out
        m.mount()
        assert (m.dir / "after.txt").read_text() == "served"
    finally:
        m.cleanup()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_a_control_client_that_reads_nothing_of_a_flush_is_let_go(eng, tmp_path):
    """A client that sent ``flush`` and read none of its progress lines (four a second, each
    naming up to five files being uploaded) blocked the daemon's handler once the socket's buffer
    was full: the flush, and its descriptor, stayed for as long as the client was connected. A
    line the client takes nothing of for CONTROL_SEND_TIMEOUT ends the request and closes it."""
    limit = 5.0  # (the default, 30 s, is the same path waited out longer)
    mount = Mount(tmp_path, eng.urls)
    mount.env["PRIVIFS_CONTROL_SEND_TIMEOUT"] = str(limit)
    with mount.mounted() as m:
        eng.set_options(stream_bytes_per_second=1000)  # the uploads go on for minutes
        deep = m.dir.joinpath(*(f"{i:02d}" + "d" * 198 for i in range(16)))  # progress lines of ~16 KiB
        deep.mkdir(parents=True)
        for i in range(5):
            (deep / f"f{i}.bin").write_bytes(os.urandom(100_000))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(m.registry()["control"])
            s.sendall(b'{"cmd": "flush"}\n')
            # reading nothing, past the buffer's fill and the limit, until the daemon says it let go
            deadline = time.monotonic() + limit + 60
            while f"the client read nothing for {limit:g}s" not in m.log():
                assert time.monotonic() < deadline, m.log()[-2000:]
                time.sleep(0.5)
            s.settimeout(60)
            received, deadline = b"", time.monotonic() + 60  # what was buffered, then the end
            while time.monotonic() < deadline and (piece := s.recv(1 << 20)):
                received += piece
        lines = received.splitlines()
        assert not piece, "the daemon is still sending progress lines to a client that stopped reading"
        assert lines and all("progress" in json.loads(line) for line in lines), lines[-1:]
        assert f"the client read nothing for {limit:g}s" in m.log(), m.log()[-2000:]
        eng.set_options(stream_bytes_per_second=0)
        status = m.status()
        status = status[0] if isinstance(status, list) else status
        control = [t for t in status["tasks"] if t["name"] == "control socket"]
        assert control and control[0]["failures"] == 0, control


def test_a_log_that_cannot_be_written_shows_no_traceback_and_later_says_how_many_records_went(tmp_path, capsys):
    """On a full disk logging's default printed "--- Logging error ---" and a traceback to
    stderr, which for the daemon (and the embedded engine) is the log file itself (helper hK).
    A record that cannot be written is dropped and counted; the next one written says so."""
    log_path = tmp_path / "mount.log"
    full = open("/dev/full", "w")  # every write fails with ENOSPC, as on a full disk
    try:
        with mount_log(tmp_path, "test.mountlog.full") as (logger, handler):
            handler.stream, kept = full, handler.stream
            logger.warning("lost one")
            logger.warning("lost two")
            handler.stream = kept
            logger.warning("written again")
    finally:
        with contextlib.suppress(OSError):
            full.close()
    assert capsys.readouterr().err == ""
    lines = log_path.read_text().splitlines()
    assert len(lines) == 2 and lines[0].endswith("written again"), lines
    assert "2 log records before this one were lost" in lines[1]


def test_status_after_the_systems_umount_says_unmounted_and_what_the_daemon_still_uploads(eng, tmp_path):
    """After umount(8) (or fusermount3 -u) with uploads pending the daemon goes on uploading them,
    and 'privifs status' showed the drive as if it were still mounted."""
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "3600")).mounted() as m:
        (m.dir / "pending.bin").write_bytes(os.urandom(100_000))
        pid = m.pid
        eng.set_options(fail_rate=1.0)  # nothing can be uploaded: the daemon keeps trying
        try:
            subprocess.run(["umount", str(m.dir)], check=True, timeout=60)
            assert not is_mounted(m.dir) and pid_alive(pid)
            r = privifs(m.env, "status", str(m.dir))
            assert "UNMOUNTED" in r.stdout and "finishing 1 pending change in the background" in r.stdout, r.stdout
            assert m.status()["unmounted"] is True
            assert f"{m.dir}  (" in privifs(m.env, "status").stdout  # and in the list of every mount
        finally:
            eng.set_options(fail_rate=0.0)
        deadline = time.monotonic() + 120
        while pid_alive(pid):
            assert time.monotonic() < deadline, "the daemon did not finish after umount"
            time.sleep(0.1)
        assert "pending.bin" in {t["fileName"] for t in m.tokens()}


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="stands in for a user without access to /dev/fuse with a mount namespace (root, unshare, setpriv)",
)
@pytest.mark.parametrize(
    "device, says",
    [
        (None, "cannot open /dev/fuse: permission denied"),
        ("/dev/null", "the mount was refused (fuse: "),  # opens, but the kernel will not mount it
    ],
)
def test_a_user_without_access_to_dev_fuse_is_told_so_in_one_line(engine, tmp_path, device, says):
    """A user who may not open /dev/fuse got "the mount failed (RuntimeError: fuse_session_mount
    failed)", filed in cli.log as an internal error. Here /dev/fuse is, in a mount namespace of the
    command's own, a file of another user's that nobody may open, and the command runs without the
    capabilities that let root open it all the same; or /dev/null, which libfuse opens and the
    kernel refuses to mount: the reason libfuse gave (on the daemon's stderr, its log) is said."""
    m = Mount(tmp_path, engine.urls)
    if device is None:
        device = tmp_path / "no-fuse-device"
        device.touch()
        os.chown(device, 65534, 65534)
        device.chmod(0)
    script = (
        f"mount --bind {device} /dev/fuse && exec setpriv --bounding-set=-dac_override,-dac_read_search "
        f"{sys.executable} -m privifs mount {m.dir}"
    )
    try:
        r = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            env=m.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 4, (r.returncode, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
        assert "RuntimeError" not in r.stderr and "internal error" not in r.stderr
        assert not is_mounted(m.dir) and m.registry() is None
        assert not list((tmp_path / "state").glob("privifs/cli.log*")), "filed as an internal error"
    finally:
        m.cleanup()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_ctrl_c_during_mount_stops_the_daemon_being_started_and_mounts_nothing(eng, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) during 'privifs mount' printed
    "privifs: interrupted" and exited 130, but the daemon, in a session of its own, went on and the
    drive mounted anyway. Here the server takes the daemon's login and does not answer (so it is
    caught starting); the daemon must be gone when the command has ended, and stay unmounted once
    the server answers again."""
    from tests.enginekit import StallingProxy

    with StallingProxy(eng.ports["api"]) as proxy:
        m = Mount(tmp_path, eng.urls)
        proxy.stall_after(0)
        m.env["PRIVICORE_API_URL"] = proxy.url
        config = tmp_path / "config" / "privifs" / "config.toml"
        config.write_text(config.read_text().replace(eng.urls["api"], proxy.url))
        cmd = [sys.executable, "-m", "privifs", "mount", str(m.dir), "--server-timeout", "120"]
        mount = subprocess.Popen(cmd, env=m.env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not (daemons := _children(mount.pid)) or len(proxy._socks) < 2:  # (the login's connection)
                assert time.monotonic() < deadline and mount.poll() is None, mount.stderr.read()
                time.sleep(0.1)
            os.killpg(mount.pid, signal.SIGINT)  # as the terminal's Ctrl-C does
            err = mount.communicate(timeout=90)[1]
            assert mount.returncode == 130 and err == "privifs: interrupted\n", (mount.returncode, err)
            assert not any(pid_alive(p) for p in daemons), "the daemon goes on after the command ended"
            proxy.stall_after(None)  # the server answers again: nothing may mount now
            time.sleep(2)
            assert not is_mounted(m.dir) and m.registry() is None
        finally:
            if mount.poll() is None:
                mount.kill()
            m.cleanup()


@pytest.mark.slow
def test_a_control_socket_or_registry_entry_removed_while_mounted_is_made_again(engine, tmp_path):
    """Removed while mounted (a /tmp cleaner, a logout removing the runtime directory, by hand),
    the control socket made 'privifs status' call a healthy daemon "not answering … kill -9",
    and the registry entry made it "not a privifs mount" (helper hX). Both come back."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        control = Path(m.registry()["control"])
        entries = list((m.root / "run").glob("privifs/mounts/*.json"))
        assert control.exists() and len(entries) == 1
        control.unlink()
        entries[0].unlink()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (control.exists() and entries[0].exists()):
            time.sleep(0.5)
        assert control.exists() and entries[0].exists()
        (m.dir / "f").write_text("after")
        r = privifs(m.env, "status", str(m.dir), check=False)
        assert r.returncode == 0 and str(m.dir) in r.stdout, (r.stdout, r.stderr)
        assert "unmounted" in m.umount().stdout
        m.mount()
        assert (m.dir / "f").read_text() == "after"


def test_a_program_polling_the_tree_does_not_hold_a_closed_file_from_the_vault(engine, tmp_path):
    """Lookups, getattrs and listings only look: write-back waited for a quiet moment (or for 30 s)
    while `ls -lR` or `find` polled the mount, and so did every other machine (helper hAJ)."""
    with Mount(tmp_path, engine.urls).mounted() as m:
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                for root, _, files in os.walk(m.dir):
                    for f in files:
                        with contextlib.suppress(FileNotFoundError):
                            os.stat(os.path.join(root, f))

        poller = threading.Thread(target=poll)
        poller.start()
        try:
            (m.dir / "polled.txt").write_text("uploaded while polled")
            deadline = time.monotonic() + 15  # (the write-back held it for 30 s)
            while m.status()["pending_count"]:
                assert time.monotonic() < deadline, m.status()["pending"]
                time.sleep(0.2)
        finally:
            stop.set()
            poller.join(timeout=30)
        assert "polled.txt" in [t["fileName"] for t in m.tokens()]


def test_a_clean_umount_leaves_no_unmount_failure_in_the_mount_log(engine, tmp_path):
    """After 'privifs umount' (fusermount3 -u) the daemon unmounted again on its way out, which
    libfuse logged as "fuse: failed to unmount …: Invalid argument" (hAQ F2: 3 of 13 unmounts)."""
    m = Mount(tmp_path, engine.urls)
    try:
        for i in range(3):
            m.mount()
            (m.dir / f"f{i}.txt").write_text("x")
            m.umount()
            assert not is_mounted(m.dir)
        assert "failed to unmount" not in m.log(), m.log()
        assert m.log().count("unmounted ") >= 3
    finally:
        m.cleanup()


@pytest.mark.skipif(os.getuid() != 0, reason="mounts a tmpfs")
def test_a_mount_anywhere_whose_path_is_not_utf8_breaks_no_command_and_no_unmount(engine, tmp_path):
    """The kernel writes a mount's path in /proc/mounts as its bytes; one mount of any user at a
    path that is not UTF-8 made status, mount and umount end in "internal error" for everyone,
    and the daemon's end of an unmount raise before its last uploads (hAT F3)."""
    odd = os.fsencode(tmp_path) + b"/odd-\xe9"
    os.mkdir(odd)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", odd], check=True, timeout=30)
    try:
        m = Mount(tmp_path, engine.urls, mount_args=("--write-back-delay", "3600"))
        m.mount()
        (m.dir / "kept.txt").write_text("uploaded at the unmount")
        shown = privifs(m.env, "status")
        assert str(m.dir) in shown.stdout and "internal error" not in shown.stderr
        assert "unmounted" in m.umount().stdout and not os.path.ismount(m.dir)
        assert "kept.txt" in {t["fileName"] for t in m.tokens()}
        assert "Traceback" not in m.log() and "UnicodeDecodeError" not in m.log()
    finally:
        subprocess.run(["umount", "-l", odd], timeout=30)
