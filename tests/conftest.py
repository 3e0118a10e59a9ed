"""Shared fixtures: a real engine subprocess per test session (options reset after each test)."""

from __future__ import annotations

import pytest

from tests.enginekit import EngineProcess, Wire
from tests.fskit import kit, module_account  # noqa: F401 - fixtures of the in-process fs tests, shared here


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow (7 s or more on the 2-core machine; most wait for a real time-out)
    run first, each in its file's order: scripts/test hands the workers one test at a time, so
    the longest start at once and the run does not end on one worker still in a 40 s test while
    the others are idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture
async def account(eng):
    """A freshly provisioned profile on the session engine: (endpoints, credentials)."""
    import uuid

    from privifs.client.provision import new_identity, register_profile
    from privifs.client.session import PasswordCredentials
    from privifs.client.transport import Endpoints

    endpoints = Endpoints.from_dict(eng.urls)
    username = f"client-{uuid.uuid4().hex[:10]}@example.com"
    _, public = new_identity()
    await register_profile(endpoints, username, "correct-horse-battery", public)
    return endpoints, PasswordCredentials(username, "correct-horse-battery")


@pytest.fixture
def user(eng, tmp_path):
    """A CLI user initialised with ``privifs init --register`` against the session engine, in an
    isolated home under ``tmp_path``: the environment to run ``privifs`` commands with."""
    import uuid

    from tests.mountkit import isolated_env
    from tests.mountkit import privifs as run

    env = isolated_env(
        tmp_path,
        PRIVICORE_API_URL=eng.urls["api"],
        PRIVICORE_WS_URL=eng.urls["ws"],
        PRIVICORE_UPSTREAM_URL=eng.urls["upstream"],
        PRIVICORE_DOWNSTREAM_URL=eng.urls["downstream"],
        PRIVICORE_USERNAME=f"cli-{uuid.uuid4().hex[:8]}@example.com",
        PRIVICORE_PASSWORD="correct-horse-battery",
    )
    run(env, "init", "--register")
    return env
