"""Engine, profile and public-key groups, over real HTTP and WebSocket."""

from __future__ import annotations

import hashlib

import pytest
import trio

from privifs.crypto.keys import SIGNED_KEY_TAG, generate_identity, verify_signed_public_key
from tests.enginekit import command_id


async def test_health_is_public_and_the_token_variant_needs_a_token(wire):
    assert (await wire.get("/health")).json() == {"status": "ok"}
    assert (await wire.get("/utility/check-server-health", token="")).status_code == 401
    await wire.provision()
    assert (await wire.get("/utility/check-server-health")).json() == {"status": "ok"}


async def test_register_then_duplicate_username_is_409(wire):
    creds = await wire.provision()
    r = await wire.post("/profile/register-profile", {"username": creds["username"], "password": "another-pass-1"})
    assert r.status_code == 409


@pytest.mark.parametrize(
    "form,field",
    [
        ({"password": "correct-horse"}, "username"),
        ({"username": "x@example.com"}, "password"),
        ({"username": "x@example.com", "password": "short"}, "password"),
        ({"username": "x@example.com", "password": "aaaaaaaaaaaa"}, "password"),
        ({"username": "", "password": "correct-horse"}, "username"),
    ],
)
async def test_register_validation_names_the_field(wire, form, field):
    r = await wire.post("/profile/register-profile", form)
    assert r.status_code == 422
    assert field in r.json()["errors"]


async def test_with_unkeyed_auth_denied_authenticate_is_401_until_a_public_key_is_registered(eng, wire):
    eng.set_options(unkeyed_auth="deny")  # the guides' variant; the default follows the live service
    r = await wire.post("/profile/register-profile", {"username": "nokey@example.com", "password": "correct-horse"})
    assert await wire.poll(command_id(r)) == "succeeded"
    r = await wire.post("/profile/authenticate", {"username": "nokey@example.com", "password": "correct-horse"})
    assert r.status_code == 401
    assert "public_key" in r.json()["message"]
    _, pub = generate_identity()
    r = await wire.post(
        "/public-key/register-public-key",
        {"username": "nokey@example.com", "password": "correct-horse", "publicKey": pub},
    )
    assert await wire.poll(command_id(r)) == "succeeded"
    r = await wire.post("/profile/authenticate", {"username": "nokey@example.com", "password": "correct-horse"})
    assert r.status_code == 200
    assert r.json()["authorizationToken"] and r.json()["expiresAt"]


async def test_wrong_password_is_401(wire):
    creds = await wire.provision()
    r = await wire.post("/profile/authenticate", {"username": creds["username"], "password": "wrong-password"})
    assert r.status_code == 401
    r = await wire.post("/profile/authenticate", {"username": "nobody@example.com", "password": "wrong-password"})
    assert r.status_code == 401


async def test_live_order_works_by_default(wire):
    """register → authenticate → register key with the token; data calls are 403 until then."""
    r = await wire.post("/profile/register-profile", {"username": "live@example.com", "password": "correct-horse"})
    assert await wire.poll(command_id(r)) == "succeeded"
    r = await wire.post("/profile/authenticate", {"username": "live@example.com", "password": "correct-horse"})
    assert r.status_code == 200
    wire.token = r.json()["authorizationToken"]
    r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
    assert r.status_code == 403
    _, pub = generate_identity()
    async with wire.channel() as ch:
        # the live probe notes that username/password are refused here; only the token and key count
        r = await wire.post("/public-key/register-public-key", {"publicKey": pub})
        assert r.status_code == 202
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
    assert (await wire.get("/public-key/retrieve-public-key")).json() == {"publicKey": pub}
    r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
    assert r.status_code == 202


def _bad_keys() -> list[tuple[str, str]]:
    _, good = generate_identity()
    raw = bytes.fromhex(good)
    wrong_tag = b"\x31\x42\x06\x00" + raw[4:36]
    wrong_tag = wrong_tag + hashlib.blake2b(wrong_tag, digest_size=64).digest()
    bad_hash = raw[:36] + bytes(64)
    return [
        ("short", good[:-2]),
        ("not hex", "zz" * 100),
        ("wrong tag", wrong_tag.hex()),
        ("wrong hash", bad_hash.hex()),
        ("empty", ""),
    ]


@pytest.mark.parametrize("label,key", _bad_keys())
async def test_public_key_format_is_checked(wire, label, key):
    await wire.provision()
    r = await wire.post("/public-key/register-public-key", {"publicKey": key})
    assert r.status_code == 422, label
    assert "publicKey" in r.json()["errors"]


async def test_engine_signed_key_on_both_paths(wire):
    await wire.provision()
    a = (await wire.get("/dptcab/public-key")).json()["publicKey"]
    b = (await wire.get("/public-key/retrieve-cab-public-key")).json()["publicKey"]
    assert a == b
    assert bytes.fromhex(a)[:4] == SIGNED_KEY_TAG
    verify_signed_public_key(a)
    assert (await wire.get("/dptcab/public-key", token="")).status_code == 401


async def test_profile_id_and_change_password(wire):
    creds = await wire.provision()
    pid = (await wire.get("/profile/retrieve-profile-id")).json()["profileId"]
    assert pid.startswith("prf-")
    r = await wire.post(
        "/profile/change-password", {"currentPassword": "not-it-at-all", "newPassword": "new-secret-99"}
    )
    assert r.status_code == 422 and "currentPassword" in r.json()["errors"]
    r = await wire.post(
        "/profile/change-password", {"currentPassword": creds["password"], "newPassword": "new-secret-99"}
    )
    assert r.status_code == 202
    assert await wire.poll(command_id(r)) == "succeeded"
    # existing tokens stay valid; the old password no longer works
    assert (await wire.get("/profile/retrieve-profile-id")).status_code == 200
    old = await wire.post("/profile/authenticate", {"username": creds["username"], "password": creds["password"]})
    new = await wire.post("/profile/authenticate", {"username": creds["username"], "password": "new-secret-99"})
    assert (old.status_code, new.status_code) == (401, 200)


async def test_token_expiry_on_both_paths(wire):
    await wire.provision()
    a = (await wire.post("/profile/authorization-token/expiry")).json()["expiresAt"]
    b = (await wire.get("/profile/retrieve-token-expiry")).json()["expiresAt"]
    assert a == b


async def test_reauthorize_returns_a_new_token_and_checks_ttl(wire):
    await wire.provision()
    r = await wire.post("/profile/reauthorize-authorization-token", {"ttl": "86400"})
    assert r.status_code == 200
    new = r.json()["authorizationToken"]
    assert new != wire.token
    assert (await wire.get("/profile/retrieve-profile-id", token=new)).status_code == 200
    for bad in ("0", "abc", str(10**9)):
        r = await wire.post("/profile/reauthorize-authorization-token", {"ttl": bad})
        assert r.status_code == 422 and "ttl" in r.json()["errors"]


async def test_reauthorize_async_variant_extends_the_token(eng, wire):
    eng.set_options(reauthorize_mode="async", token_ttl=60)
    await wire.provision()
    before = (await wire.post("/profile/authorization-token/expiry")).json()["expiresAt"]
    async with wire.channel() as ch:
        r = await wire.post("/profile/reauthorize-authorization-token", {"ttl": "7200"})
        assert r.status_code == 202
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
    after = (await wire.post("/profile/authorization-token/expiry")).json()["expiresAt"]
    assert after > before


async def test_revoke_kills_the_token_and_its_channel(wire):
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/profile/revoke-authorization-token")
        assert r.status_code == 200
        with trio.fail_after(5):
            while not ch.closed:
                await trio.sleep(0.05)
    assert (await wire.get("/profile/retrieve-profile-id")).status_code == 401


async def test_short_token_lifetime_expires(eng, wire):
    eng.set_options(token_ttl=1)
    await wire.provision()
    assert (await wire.get("/profile/retrieve-profile-id")).status_code == 200
    await trio.sleep(1.2)
    r = await wire.get("/profile/retrieve-profile-id")
    assert r.status_code == 401 and "expired" in r.json()["message"]


async def test_missing_or_garbage_authorization_is_401(wire):
    for path in ("/profile/retrieve-profile-id", "/public-key/retrieve-public-key", "/data-token/list-data-tokens"):
        assert (await wire.get(path, token="")).status_code == 401
        assert (await wire.get(path, token="T-garbage")).status_code == 401
    for path in (
        "/data-token/reserve-token-space",
        "/data-token/request-data",
        "/data-token/delete-data",
        "/profile/change-password",
    ):
        assert (await wire.post(path, {"token": "x"}, token="")).status_code == 401


async def test_join_channel_with_bad_token_is_refused(wire):
    import json

    from trio_websocket import open_websocket_url

    async with open_websocket_url(wire.urls["ws"]) as ws:
        await ws.send_message(
            json.dumps({"action": "joinChannel", "correlationId": "c1", "data": {"authorizationToken": "T-nope"}})
        )
        answer = json.loads(await ws.get_message())
    assert answer["status"] == 401 and answer["correlationId"] == "c1"


async def test_join_echoes_correlation_id(wire):
    import json

    from trio_websocket import open_websocket_url

    await wire.provision()
    async with open_websocket_url(wire.urls["ws"]) as ws:
        await ws.send_message("not json")
        await ws.send_message(
            json.dumps({"action": "joinChannel", "data": {"authorizationToken": wire.token, "correlationId": "abc"}})
        )
        answer = json.loads(await ws.get_message())
    assert answer["status"] == 200 and answer["correlationId"] == "abc"
    assert answer["data"]["channelId"] and answer["data"]["message"]


def test_password_hashing_runs_on_few_threads_whatever_the_logins_in_flight(tmp_path, monkeypatch):
    """Each scrypt takes 16 MiB and a core; on trio's default thread limiter a flood of 60
    connections sending wrong passwords ran 40 at once (helper hM): the engine grew from 94 MB to
    725 MB and its blob reads and writes queued behind them for threads. Now at most
    PASSWORD_THREADS run at once, however many logins are in flight."""
    import threading
    import time

    from privifs.engine import core
    from privifs.engine.options import EngineOptions

    lock = threading.Lock()
    running = most = 0

    def slow_scrypt(password: str, stored: str = "") -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(core, "check_password", slow_scrypt)
    monkeypatch.setattr(core, "hash_password", slow_scrypt)
    engine = core.Engine(tmp_path / "data", EngineOptions())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(engine.check_password_async, "wrong", "stored")
                nursery.start_soon(engine.hash_password_async, f"new-{i}")

    try:
        trio.run(main)
    finally:
        engine.db.close()
    assert 1 <= most <= core.PASSWORD_THREADS
