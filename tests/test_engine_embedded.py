"""The embedded engine comes back by itself: when the engine a mount (or any privifs command)
was handed dies, it is started again on the same ports and data directory, and the URLs the
caller holds work again; stopping it on purpose is not mistaken for a death."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from privifs.embedded import EmbeddedEngine

WAIT = 30


def healthy(api: str) -> bool:
    try:
        return httpx.get(api + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_killed_embedded_engine_is_started_again_on_the_same_ports(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="privifs.embedded")
    engine = EmbeddedEngine(tmp_path / "engine")
    try:
        urls = engine.ensure()
        first = engine.proc.pid
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: engine.restarts == 1 and healthy(urls["api"]))
        assert engine.proc.pid != first
        assert json.loads((tmp_path / "engine" / "urls.json").read_text()) == urls
        assert "was killed by signal 9" in caplog.text and "starting it again" in caplog.text
    finally:
        engine.stop()
    assert engine.proc.poll() is not None
    time.sleep(1.5)  # several watch intervals: a stopped engine stays stopped
    assert engine.restarts == 1 and not healthy(urls["api"])


@pytest.mark.parametrize("command", [False, True], ids=["a mount", "a command"])
def test_an_engine_owned_by_another_process_is_taken_over_when_it_stops(tmp_path, command):
    """The process that started the engine ended (a mount unmounted, a command done): a mount, or a
    command that leaves the restart to the starter for a while first, starts it again."""
    owner = EmbeddedEngine(tmp_path / "engine")
    user = EmbeddedEngine(tmp_path / "engine", defer_to_starter=command)
    try:
        urls = owner.ensure(watch=False)
        assert user.ensure() == urls and user.proc is None  # reused, not started twice
        owner.stop()
        wait_until(lambda: user.restarts == 1 and healthy(urls["api"]))
        assert user.proc is not None and user.proc.poll() is None
    finally:
        owner.stop()
        user.stop()
    assert user.proc.poll() is not None


def test_a_command_leaves_restarting_a_mounts_engine_to_the_mount_and_follows_it(tmp_path):
    """A command beside a mount (privifs verify, token) watched the mount's engine too, and when
    it died both started it again: a command that won the race owned the new engine and took it
    down when it ended, the mount without a server for about 4 s (helper hAW F1). The command
    leaves the restart to the engine's starter for DEFER_TO_STARTER seconds, then follows the
    engine that starter started; it starts one itself only when nobody did."""
    from privifs.embedded import DEFER_TO_STARTER

    mount = EmbeddedEngine(tmp_path / "engine")
    command = EmbeddedEngine(tmp_path / "engine", defer_to_starter=True)
    try:
        urls = mount.ensure(watch=False)  # (its watcher is held back below)
        assert command.ensure() == urls and command.proc is None
        os.kill(mount.proc.pid, signal.SIGKILL)
        wait_until(lambda: command.restarting())
        time.sleep(DEFER_TO_STARTER / 2)
        assert command.proc is None and command.restarts == 0 and not healthy(urls["api"])
        assert mount.ensure() == urls  # the mount starts it again (as its watcher would) …
        wait_until(lambda: healthy(urls["api"]) and not command.restarting())
        time.sleep(DEFER_TO_STARTER)
        assert command.proc is None and mount.proc.poll() is None  # … and owns it: the command never started one
        command.stop()  # the command ends: the mount's engine runs on
        time.sleep(1)
        assert healthy(urls["api"])
        mount.stop()  # nobody else restarts it now: the command left
        wait_until(lambda: not healthy(urls["api"]))
    finally:
        command.stop()
        mount.stop()


def test_an_engine_that_holds_its_data_but_is_stopped_is_named_with_how_to_go_on(tmp_path):
    """'privifs verify' (any command reaching the vault) while the embedded engine another
    process started was stopped (SIGSTOP): it waited for it, tried to start a second one, and
    said "another engine is already using DIR", which hid why."""
    from privifs.engine_process import EngineStartFailed

    owner, user = EmbeddedEngine(tmp_path / "engine"), EmbeddedEngine(tmp_path / "engine")
    try:
        urls = owner.ensure(watch=False)
        pid = owner.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(EngineStartFailed) as caught:
                user.ensure(watch=False)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert f"(pid {pid}) is stopped" in str(caught.value) and f"kill -CONT {pid}" in str(caught.value)
        assert user.ensure(watch=False) == urls
    finally:
        owner.stop()
        user.stop()


def engine_pid(data_dir) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"engine" in args and os.fsencode(str(data_dir)) in args:
                return int(entry)
    return None


@contextlib.contextmanager
def mounted_with_a_stored_file(tmp_path):
    """A mount on its embedded engine with ``before.txt`` in the vault: (mount, the engine's data
    directory, its URLs)."""
    from tests.mountkit import Mount

    m = Mount(tmp_path / "user", None)
    data_dir = tmp_path / "user" / "data" / "privifs" / "engine"
    with m.mounted():
        (m.dir / "before.txt").write_text("written before")
        m.wait_idle(60)
        yield m, data_dir, json.loads((data_dir / "urls.json").read_text())


@pytest.mark.slow
def test_a_mount_restarts_its_dead_embedded_engine_and_keeps_uploading(tmp_path):
    with mounted_with_a_stored_file(tmp_path) as (m, data_dir, urls):
        pid = engine_pid(data_dir)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        (m.dir / "after.txt").write_text("written after the engine died")
        m.wait_idle(90)
        assert healthy(urls["api"]) and engine_pid(data_dir) not in (None, pid)
        assert "starting it again" in m.log()
        names = {t.get("fileName") or t.get("name") for t in m.tokens()}
        assert {"before.txt", "after.txt"} <= names, names
        assert (m.dir / "after.txt").read_text() == "written after the engine died"


def test_a_urls_file_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    from privifs.engine.server import write_urls_file

    target = tmp_path / "urls.json"
    target.mkdir()  # a directory where the file should go
    with pytest.raises(OSError):
        write_urls_file(target, {"api": "http://127.0.0.1:1"})
    assert [p.name for p in tmp_path.iterdir()] == ["urls.json"]
    write_urls_file(tmp_path / "ok.json", {"api": "http://127.0.0.1:1"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.json", "urls.json"]


def kill_and_take_its_lock(pid: int, lock) -> None:
    """Kill the engine ``pid`` and hold its data directory's ``lock`` (an open file): its next
    starts fail until the lock is closed."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT
    while True:  # the dead engine's lock is free once the kernel has closed its files
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            assert time.monotonic() < deadline, "the killed engine kept its lock"
            time.sleep(0.01)


@pytest.mark.slow
def test_fsync_waits_while_the_mount_starts_its_dead_embedded_engine_again(tmp_path):
    """An fsync while the embedded engine was being started again after it died failed with EIO
    (the engine's port refused connections: 'cannot reach the server') although the engine came
    back seconds later. Here its restarts fail for a while (another process holds its data
    directory's lock, as a slow start would); fsync waits for it and returns 0. Its attempts
    meanwhile keep to their retry time: they went one after another (6,594 in 6 s, most of a
    core, a log line each: helper hL3)."""
    from tests.mountkit import Mount

    m = Mount(tmp_path / "user", None)
    data_dir = tmp_path / "user" / "data" / "privifs" / "engine"
    with m.mounted():
        pid = engine_pid(data_dir)
        assert pid is not None
        fd = os.open(m.dir / "synced.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        data = os.urandom(100_000)
        os.write(fd, data)
        lock = open(data_dir / "lock", "a+")
        try:
            kill_and_take_its_lock(pid, lock)
            # the engine's next start succeeds once the lock is let go, after the client's own
            # retries of a refused connection (a few seconds) are used up
            threading.Timer(10, lock.close).start()
            os.fsync(fd)
        finally:
            os.close(fd)
            lock.close()
        assert "could not restart the embedded engine" in m.log()
        assert "fsync failed" not in m.log()
        attempts = [line for line in m.log().splitlines() if "/synced.bin" in line and "retrying in" in line]
        assert len(attempts) <= 15, f"{len(attempts)} write-back attempts while the fsync waited about 10 s"
        assert "synced.bin" in {t.get("fileName") for t in m.tokens()}
        assert (m.dir / "synced.bin").read_bytes() == data


@pytest.mark.slow
def test_status_says_why_a_dead_embedded_engine_cannot_be_started_again_until_it_is(tmp_path):
    """The embedded engine died and its starts kept failing (here another process holds its
    data directory's lock; helper hL3: another program on its port): status said only that the
    server stopped answering. It names the engine and why, until a start succeeds."""
    from tests.mountkit import Mount, privifs

    m = Mount(tmp_path / "user", None)
    data_dir = tmp_path / "user" / "data" / "privifs" / "engine"
    with m.mounted():
        lock = open(data_dir / "lock", "a+")
        try:
            kill_and_take_its_lock(engine_pid(data_dir), lock)
            deadline = time.monotonic() + 30
            while not (down := m.status().get("engine_restart_failed")):
                assert time.monotonic() < deadline, "status never said the engine cannot be started again"
                time.sleep(0.5)
            text = privifs(m.env, "status", str(m.dir), check=False).stdout
            assert "ENGINE DOWN since" in text and "cannot be started again" in text, text
            assert down[1] in text
        finally:
            lock.close()  # its next start succeeds
        deadline = time.monotonic() + 60
        while m.status().get("engine_restart_failed"):
            assert time.monotonic() < deadline, "status still says the engine is down"
            time.sleep(0.5)
        assert "ENGINE DOWN" not in privifs(m.env, "status", str(m.dir), check=False).stdout


def test_the_embedded_engine_comes_back_on_its_ports_of_last_time(tmp_path, caplog):
    """Other machines reach this vault through the embedded engine's URLs: an unmount and mount
    here (a new engine process) gave it new ports, and every other machine stayed offline until
    its configuration was edited by hand (found by hM). Ports taken meanwhile: new ones."""
    caplog.set_level(logging.INFO, logger="privifs.embedded")
    first = EmbeddedEngine(tmp_path / "engine")
    urls = first.ensure(watch=False)
    first.stop()
    again = EmbeddedEngine(tmp_path / "engine")
    try:
        assert again.ensure(watch=False) == urls and healthy(urls["api"])
    finally:
        again.stop()
    port = int(urls["api"].rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        third = EmbeddedEngine(tmp_path / "engine")
        try:
            moved = third.ensure(watch=False)
            assert moved["api"] != urls["api"] and healthy(moved["api"])
            assert "its ports of last time are not free" in caplog.text
        finally:
            third.stop()
    fourth = EmbeddedEngine(tmp_path / "engine")
    try:
        assert fourth.ensure(watch=False) == moved  # the ports it took are the ones kept now
    finally:
        fourth.stop()


@contextlib.contextmanager
def engine_stopped(user_root):
    """The embedded engine of the mount whose user directories are under ``user_root`` stopped
    (SIGSTOP) for the block; yields its pid, continued afterwards (if it still runs)."""
    pid = engine_pid(user_root / "data" / "privifs" / "engine")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):  # (it ends with the mount's daemon)
            os.kill(pid, signal.SIGCONT)


def test_a_stopped_embedded_engine_is_named_by_status_and_the_mount_log_at_once(tmp_path):
    """An embedded engine stopped with SIGSTOP accepts connections and answers nothing: the
    mount said nothing about it for two minutes (two 60 s read time-outs), and then only that
    'the server stopped answering'. Now `privifs status` names it stopped, with its pid and how
    to go on, and the mount's log says so; continued, it uploads what waited."""
    from tests.mountkit import Mount, privifs

    m = Mount(tmp_path / "user", None)
    with m.mounted():
        with engine_stopped(tmp_path / "user") as pid:
            (m.dir / "while-stopped.txt").write_text("written while the engine was stopped")
            wait_until(lambda: m.status().get("engine_stopped") == pid)
            shown = privifs(m.env, "status", str(m.dir)).stdout
            assert f"ENGINE STOPPED: the embedded engine (pid {pid}) is stopped" in shown, shown
            assert f"kill -CONT {pid}" in shown
            # the header's pid is the daemon's, and says so: it read "(the embedded engine, pid N)"
            # with the daemon's pid, two lines above the engine's own
            assert f"(the embedded engine; daemon pid {m.status()['pid']})" in shown, shown
            wait_until(lambda: f"the embedded engine (pid {pid}) is stopped" in m.log())
        wait_until(lambda: m.status().get("engine_stopped") is None)
        m.wait_idle(90)
        assert "while-stopped.txt" in {t.get("fileName") or t.get("name") for t in m.tokens()}
        assert "ENGINE STOPPED" not in privifs(m.env, "status", str(m.dir)).stdout


@pytest.mark.slow
def test_umount_while_the_embedded_engine_is_stopped_says_so_and_keeps_the_changes(tmp_path):
    """`privifs umount` while the embedded engine was stopped (SIGSTOP) waited 2m42s (two 60 s
    read time-outs and a probe) to say only that the server was unreachable. It now says at once
    that the engine is stopped and how to go on; the change stays staged and the next mount
    uploads it."""
    from tests.mountkit import Mount

    m = Mount(tmp_path / "user", None)
    with m.mounted():
        with engine_stopped(tmp_path / "user") as pid:
            (m.dir / "staged.txt").write_text("kept across the stop")
            r = m.umount(check=False)
        assert r.returncode == 7, (r.returncode, r.stderr)
        assert f"the embedded engine (pid {pid}) is stopped" in r.stderr and f"kill -CONT {pid}" in r.stderr
        m.mount()
        m.wait_idle(90)
        assert "staged.txt" in {t.get("fileName") or t.get("name") for t in m.tokens()}
        assert (m.dir / "staged.txt").read_text() == "kept across the stop"


# Run as another user: binds 127.0.0.1:PORT as soon as it is free, keeps every byte sent to it,
# and prints them (hex) once its standard input closes.
SQUATTER = r"""
import select, socket, sys, time
port = int(sys.argv[1])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as the engine: past TIME_WAIT)
deadline = time.monotonic() + 20
while True:
    try:
        listener.bind(("127.0.0.1", port))
        break
    except OSError:
        if time.monotonic() > deadline:
            print("never bound", flush=True)
            sys.exit(1)
        time.sleep(0.001)
listener.listen()
print("bound", flush=True)
received, conns = b"", []
while True:
    ready, _, _ = select.select([sys.stdin, listener] + conns, [], [], 60)
    if sys.stdin in ready or not ready:
        break
    for r in ready:
        if r is listener:
            conns.append(listener.accept()[0])
        elif chunk := r.recv(65536):
            received += chunk
        else:
            conns.remove(r)
print(received.hex(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="running a program as another user needs root")
def test_a_mount_whose_dead_engine_had_its_port_taken_moves_it_to_new_ports_and_sends_the_taker_nothing(
    tmp_path,
):
    """Another user's program bound the embedded engine's port while it was down: the watcher
    started it on the same ports for ever (failing), the mount stayed offline, and it sent the
    program its token, then its password (helper hAD F1). Now the engine takes new ports, the
    mount follows them, and the program gets no byte."""
    import subprocess

    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else None
    if python is None:
        pytest.skip("no Python another user can run")
    with mounted_with_a_stored_file(tmp_path) as (m, data_dir, urls):
        api_port = int(urls["api"].rsplit(":", 1)[1])
        squatter = subprocess.Popen(
            [python, "-c", SQUATTER, str(api_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=65534,
        )
        try:
            os.kill(engine_pid(data_dir), signal.SIGKILL)
            assert squatter.stdout.readline().strip() == b"bound"
            (m.dir / "after.txt").write_text("written after the engine died")
            m.wait_idle(90)
            moved = json.loads((data_dir / "urls.json").read_text())
            assert moved["api"] != urls["api"] and healthy(moved["api"])
            assert "taken by another program; starting it on new ports" in m.log()
            assert "after.txt" in {t.get("fileName") for t in m.tokens()}
            assert (m.dir / "after.txt").read_text() == "written after the engine died"
        finally:
            out, _ = squatter.communicate(timeout=30)
        assert out.strip() == b"", "the program on the engine's old port was sent something"


@pytest.mark.slow
def test_a_watcher_adopts_the_engine_another_process_started_again_on_new_ports(tmp_path):
    """A process's engine died while another process held the data directory (a slow start),
    and that other process then started the engine on new ports (its old API port was taken).
    The watcher found it running at other URLs than its own and tried to start a second one on
    the locked data directory, failing for good (helper hAE: ENGINE DOWN in status while the
    engine ran). It adopts the running engine and its URLs."""
    user = EmbeddedEngine(tmp_path / "engine")
    moved: list[dict] = []
    user.on_moved = moved.append
    other = EmbeddedEngine(tmp_path / "engine")
    squat = socket.socket()
    squat.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        urls = user.ensure()
        with open(tmp_path / "engine" / "lock", "a+") as lock:
            kill_and_take_its_lock(user.proc.pid, lock)
            squat.bind(("127.0.0.1", int(urls["api"].rsplit(":", 1)[1])))
            squat.listen()
            wait_until(lambda: user.restart_failure is not None)  # its start fails meanwhile
            user._lock.acquire()  # (its next attempt waits until the other process started it)
        try:
            new = other.ensure(watch=False)  # on new ports: the old API port is taken
        finally:
            user._lock.release()
        assert new["api"] != urls["api"] and healthy(new["api"])
        # (its next attempt comes after its back-off, which its failed starts made longer)
        wait_until(lambda: user.urls == new and user.restart_failure is None, timeout=90)
        assert moved == [new] and user.proc is None  # adopted, not started twice
    finally:
        squat.close()
        other.stop()
        user.stop()
