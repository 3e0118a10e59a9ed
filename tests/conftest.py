"""Shared fixtures: a real engine subprocess per test session (options reset after each test)."""
from __future__ import annotations

import pytest

from tests.enginekit import EngineProcess, Wire


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    proc = EngineProcess(tmp_path_factory.mktemp("engine") / "data").start()
    proc.defaults = proc.set_options()
    yield proc
    proc.stop()


@pytest.fixture
def eng(engine):
    """The session engine; any option a test changes is reset afterwards."""
    yield engine
    engine.reset_options(engine.defaults)


@pytest.fixture
async def wire(eng):
    w = Wire(eng.urls)
    yield w
    await w.aclose()
