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
