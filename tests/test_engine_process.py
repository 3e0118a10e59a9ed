"""The one engine starter (privifs.engine_process), shared by the embedded engine and the tests."""

from __future__ import annotations

import pytest

from privifs.devkit.engine import EngineProcess as DevEngine
from privifs.embedded import EmbeddedEngine
from privifs.engine_process import EngineProcess, EngineStartFailed
from privifs.errors import ServerUnreachable


def test_an_engine_that_cannot_start_says_so_with_its_log(tmp_path):
    first = EngineProcess(tmp_path / "data", log_path=tmp_path / "first.log").start()
    try:
        second = EngineProcess(tmp_path / "data", log_path=tmp_path / "second.log")
        with pytest.raises(EngineStartFailed) as exc:
            second.start()
        assert isinstance(exc.value, ServerUnreachable)
        assert "exited at start" in str(exc.value) and str(tmp_path / "second.log") in str(exc.value)
        assert "already" in exc.value.log_tail
        # the reason is in the one line a user sees ('privifs mount' said only "exited at start
        # (code 1); see …/engine.log")
        assert "another engine is already using" in str(exc.value)
        assert first.running() and not second.running()
    finally:
        assert first.stop() == 0


def test_the_embedded_engine_and_the_tests_engine_are_started_by_the_same_code(tmp_path):
    embedded = EmbeddedEngine(tmp_path / "embedded")
    urls = embedded.ensure(watch=False)
    try:
        assert isinstance(embedded.process, EngineProcess) and embedded.proc is embedded.process.proc
        assert embedded.process.urls == urls and set(embedded.process.ports) == set(urls)
    finally:
        embedded.stop()
    assert embedded.proc.poll() is not None
    assert issubclass(DevEngine, EngineProcess)


@pytest.mark.parametrize(
    "name, junk",
    [
        ("admin-token", b""),
        ("admin-token", b"\xff\xfe junk"),
        ("cab-identity.key", b"12ab"),
        ("cab-identity.key", b"zz" * 32),
    ],
)
def test_an_engine_whose_secret_file_is_damaged_refuses_to_start_and_says_which(tmp_path, name, junk):
    """A junk identity key ended the engine's start with 'internal error: ValueError … (please
    report it)', and an empty admin token let any local process that sent no token set the
    engine's fault options (helper hX). Either is refused now, naming the file, which is kept."""
    data = tmp_path / "data"
    EngineProcess(data, log_path=tmp_path / "first.log").start().stop()
    (data / name).write_bytes(junk)
    with pytest.raises(EngineStartFailed) as exc:
        EngineProcess(data, log_path=tmp_path / "second.log").start()
    assert "is damaged" in str(exc.value) and name in str(exc.value), exc.value
    assert "internal error" not in exc.value.log_tail
    assert (data / name).read_bytes() == junk


def test_an_engine_whose_port_is_taken_names_the_port_and_leaves_no_new_data_directory(tmp_path):
    """The engine said "could not start: [Errno 98] Address already in use", naming neither the port nor
    the server, and the new data directory it had made stayed behind (hAO F9)."""
    import socket
    import subprocess
    import sys

    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    data = tmp_path / "new" / "engine"
    try:
        r = subprocess.run(
            [sys.executable, "-m", "privifs", "engine", "--data-dir", str(data), "--ws-port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert r.returncode == 1 and f"the ws server cannot listen on 127.0.0.1 port {port}" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "new").exists()


def test_a_start_that_loses_the_race_for_a_new_data_directory_leaves_the_winners_data(tmp_path, monkeypatch, capsys):
    """Two starts on one new data directory at the same moment: the one that found it missing
    and then failed ("another engine is already using …") removed the whole directory of the
    engine that made it first and was serving (hAT F1)."""
    import argparse

    from privifs import paths
    from privifs.cli import engine_cmd

    data = tmp_path / "new" / "engine"
    looked = paths.missing_dirs(data)  # the loser looked before the winner made the directory
    winner = EngineProcess(data, log_path=tmp_path / "winner.log").start()
    try:
        monkeypatch.setattr(paths, "missing_dirs", lambda p: list(looked))
        monkeypatch.setattr("privifs.memory.bound_allocator", lambda: None)
        monkeypatch.setattr("privifs.limits.raise_limits", lambda: None)
        ports = dict(api_port=0, ws_port=0, upstream_port=0, downstream_port=0)
        args = argparse.Namespace(settings=[], urls_file=None, data_dir=data, host="127.0.0.1", **ports)
        assert engine_cmd.run(args) == 1
        assert "another engine is already using" in capsys.readouterr().err
        assert (data / "engine.sqlite3").exists() and (data / "lock").exists() and winner.running()
    finally:
        assert winner.stop() == 0
    assert (data / "engine.sqlite3").exists()


def test_an_engine_starting_while_status_probes_its_lock_starts_and_a_held_lock_still_refuses(tmp_path):
    """``privifs status`` probes every vault's and engine's lock with a shared lock held for an
    instant; a mount or engine taking its lock in that instant was refused as "already using"
    (hAT F6). A probe's lock is waited out; a lock that stays held still refuses."""
    import fcntl
    import threading

    from privifs.engine.core import Engine, EngineBusy
    from privifs.engine.options import EngineOptions

    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    probe = open(data / "lock", "a+")
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # as paths.lock_held does
    threading.Timer(0.1, probe.close).start()
    engine = Engine(data, EngineOptions())
    engine.db.close()
    engine._lock.close()

    holder = open(data / "lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_SH | fcntl.LOCK_NB)
    try:
        with pytest.raises(EngineBusy, match="another engine is already using"):
            Engine(data, EngineOptions())
    finally:
        holder.close()
