"""The client needs only what a user knows: the upstream and downstream URLs (and the WebSocket
URL) follow from the API URL's host and the documented ports when not configured, a full URL in
the temporary token's ``stream`` field is used as is, and ``validate_urls`` (called by
``privifs init``) names every URL that has the wrong scheme or where nothing answers."""

from __future__ import annotations

import os
import uuid

import pytest

from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.client.provision import new_identity, register_profile
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.client.urls import complete, validate_urls
from privifs.errors import ConfigError, ServerUnreachable
from tests.enginekit import EngineProcess

KEY = bytes(range(32))
PASSWORD = "correct-horse-battery"


def meta(name: str) -> FileMeta:
    return FileMeta(file_name=name, extension="bin", context="/urls", size=0, path=f"/urls/{name}")


def test_missing_urls_follow_from_the_api_host_and_the_documented_ports():
    assert complete({"api": "https://vault.example.com:9009/", "ws": "wss://ws.example.com"}) == {
        "api": "https://vault.example.com:9009",
        "ws": "wss://ws.example.com",
        "upstream": "https://vault.example.com:8010",
        "downstream": "https://vault.example.com:8011",
    }
    assert complete({"api": "http://[::1]:8009"}) == {
        "api": "http://[::1]:8009",
        "ws": "ws://[::1]:8083",
        "upstream": "http://[::1]:8010",
        "downstream": "http://[::1]:8011",
    }
    given = {"api": "http://a:1", "ws": "ws://b:2", "upstream": "http://c:3", "downstream": "http://d:4"}
    assert complete(given) == given
    assert Endpoints.from_dict({"api": "http://h:9009"}).upstream == "http://h:8010"


async def test_validate_urls_names_each_wrong_scheme():
    with pytest.raises(ConfigError) as err:
        await validate_urls({"api": "ftp://h:1", "ws": "http://h:2", "upstream": "ws://h:3", "downstream": "https://"})
    text = str(err.value)
    for setting in ("PRIVICORE_API_URL", "PRIVICORE_WS_URL", "PRIVICORE_UPSTREAM_URL", "PRIVICORE_DOWNSTREAM_URL"):
        assert setting in text, text
    assert "must start with http:// or https://" in text and "names no host" in text
    # an unclosed IPv6 host made urlsplit raise: 'internal error: ValueError: Invalid IPv6 URL'
    with pytest.raises(ConfigError, match=r"PRIVICORE_API_URL='http://\[::1' is not a valid URL"):
        await validate_urls({"api": "http://[::1"})
    # and in a configuration: 'internal error: InvalidURL: Invalid port' from httpx
    with pytest.raises(ConfigError, match=r"the server URL 'http://\[::1' is not valid"):
        async with connect(Endpoints.from_dict({"api": "http://[::1"}), PasswordCredentials("u", "p")):
            pass


async def test_validate_urls_accepts_a_running_engine_and_names_what_does_not_answer(eng):
    assert await validate_urls(eng.urls) == eng.urls
    dead = "http://127.0.0.1:9"
    with pytest.raises(ConfigError) as err:
        await validate_urls({**eng.urls, "upstream": dead, "ws": eng.urls["api"].replace("http", "ws", 1)})
    text = str(err.value)
    assert f"nothing answers at the upstream URL {dead} (PRIVICORE_UPSTREAM_URL)" in text, text
    assert "no WebSocket server answers" in text and "PRIVICORE_WS_URL" in text, text
    assert "PRIVICORE_API_URL" not in text and "PRIVICORE_DOWNSTREAM_URL" not in text
    # nothing answering at all is a server that cannot be reached (exit 5), not a configuration error
    with pytest.raises(ServerUnreachable) as err:
        await validate_urls({**eng.urls, "upstream": dead, "ws": dead.replace("http", "ws", 1)})
    assert f"PRIVICORE_UPSTREAM_URL={dead}" in str(err.value) and "PRIVICORE_API_URL" not in str(err.value)


async def test_a_full_upstream_url_from_the_server_is_used_without_a_configured_one(eng, account):
    eng.set_options(stream_shape="url")
    endpoints, creds = account
    bare = Endpoints(api=endpoints.api, ws=endpoints.ws, upstream=None, downstream=endpoints.downstream)
    async with connect(bare, creds) as client:
        vault = client.vault(KEY)
        data = os.urandom(300_000)  # over the inline limit: must go upstream
        assert await vault.get_bytes(await vault.put_bytes(data, meta("full-url.bin"))) == data


async def test_with_only_the_api_and_websocket_urls_large_files_go_up_and_come_back(tmp_path):
    ports = {"api": 0, "ws": 0, "upstream": 8010, "downstream": 8011}
    engine = EngineProcess(tmp_path / "data", ports=ports)
    try:
        engine.start()
    except RuntimeError as exc:
        if "in use" in str(exc):
            pytest.skip(f"the documented stream ports are taken on this machine: {exc}")
        raise
    try:
        known = Endpoints.from_dict({"api": engine.urls["api"], "ws": engine.urls["ws"]})
        assert (known.upstream, known.downstream) == ("http://127.0.0.1:8010", "http://127.0.0.1:8011")
        username = f"urls-{uuid.uuid4().hex[:8]}@example.com"
        _, public = new_identity()
        await register_profile(known, username, PASSWORD, public)
        async with connect(known, PasswordCredentials(username, PASSWORD)) as client:
            vault = client.vault(KEY)
            data = os.urandom(300_000)
            assert await vault.get_bytes(await vault.put_bytes(data, meta("derived.bin"))) == data
    finally:
        engine.stop()
        engine.kill()


def test_init_refuses_a_wrong_url_with_a_message_naming_it(eng, tmp_path):
    from tests.mountkit import isolated_env, privifs

    env = isolated_env(
        tmp_path,
        PRIVICORE_API_URL=eng.urls["api"],
        PRIVICORE_WS_URL=eng.urls["ws"],
        PRIVICORE_UPSTREAM_URL="ftp://127.0.0.1:8010",
        PRIVICORE_DOWNSTREAM_URL=eng.urls["downstream"],
        PRIVICORE_USERNAME=f"init-{uuid.uuid4().hex[:8]}@example.com",
        PRIVICORE_PASSWORD=PASSWORD,
    )
    r = privifs(env, "init", "--register", check=False)
    assert r.returncode == 3 and "PRIVICORE_UPSTREAM_URL='ftp://127.0.0.1:8010' must start with http://" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "config" / "privifs" / "config.toml").exists()
