"""A default engine behaves as the live service is recorded to ([P] in the reference): the live
account order works without any setting (and the guides' order still does), a policy on a
voting configuration with no voter decides at once, policy templates have the shape the probe
reads, and ordinary client behaviour (leaving mid-request, reusing a stream authorization while
still sending) leaves no traceback in the log."""

from __future__ import annotations

import os
import socket

import httpx
import pytest

from privifs.crypto.keys import generate_identity
from tests.enginekit import command_id

PASSWORD = "correct-horse-battery"


async def live_account(wire) -> str:
    """register → authenticate, the live order, with no key yet; returns the username."""
    username = f"live-{os.urandom(5).hex()}@example.com"
    r = await wire.post("/profile/register-profile", {"username": username, "password": PASSWORD})
    assert r.status_code == 202, r.text
    assert await wire.poll(command_id(r)) == "succeeded"
    r = await wire.post("/profile/authenticate", {"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text  # before any key: the live order
    wire.token = r.json()["authorizationToken"]
    return username


async def run(wire, ch, path: str, **kw) -> dict:
    r = await wire.post(path, **kw)
    assert r.status_code == 202, (path, r.status_code, r.text)
    return await ch.wait_for("X-DPT-CAB-ID", command_id(r))


async def test_the_live_order_end_to_end_under_a_policy_on_a_voting_configuration_without_devices(wire):
    await live_account(wire)
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
        assert r.status_code == 403  # a profile without a key cannot touch data yet
        _, pub = generate_identity()
        assert (await run(wire, ch, "/public-key/register-public-key", data={"publicKey": pub}))["command_status"] == 2
        # the probe's governance set-up: unanimous among the listed devices — none
        vc = await run(
            wire,
            ch,
            "/verified-authenticator/voting-configuration/register",
            json={"name": "nobody", "strategy": "unanimous", "timeLimit": 60, "deviceIdentifiers": []},
        )
        assert vc["command_status"] == 2
        templates = (await wire.get("/policy/list-policy-templates")).json()
        template = next(iter(templates))
        events = list(templates[template]["events"])
        assert (
            await run(
                wire,
                ch,
                "/policy/register",
                json={
                    "name": "everything",
                    "policyTemplateId": template,
                    "applyingEventIds": events,
                    "votingConfigurationId": "nobody",
                    "configuration": {"why": "live order test"},
                },
            )
        )["command_status"] == 2
        policy = (await wire.get("/policy/retrieve-policy/everything")).json()
        assert (await run(wire, ch, "/policy/activate", data={"policyId": policy["id"]}))["command_status"] == 2
        assert (await wire.get("/policy/retrieve-policy/everything")).json()["active"] is True

        small, large = b"inline payload", os.urandom(200_000)
        tokens = {
            await wire.store(ch, small, file_name="small.txt"),
            await wire.store(ch, large, file_name="large.bin", streamed=True),
        }
        listed = (await wire.get("/data-token/list-data-tokens", params={"filters[context]": "tests"})).json()
        assert {i["token"] for i in listed["items"]} == tokens
        by_name = {i["fileName"]: i["token"] for i in listed["items"]}
        assert await wire.retrieve(ch, by_name["small.txt"]) == small
        assert await wire.retrieve(ch, by_name["large.bin"]) == large
        for token in tokens:
            done = await run(wire, ch, "/data-token/delete-data", data={"token": token})
            assert done["command_status"] == 2, done
        assert (await wire.get("/data-token/list-data-tokens")).json()["items"] == []
        assert (await wire.get("/voting/list-pools")).json()["items"] == []  # nothing was ever held
        held = [e for e in ch.events if (e.get("data") or {}).get("command_status") == 1]
        assert held == []


@pytest.mark.parametrize("strategy", ["unanimous", "majority", "any"])
async def test_a_vote_among_nobody_decides_at_once(wire, strategy):
    await wire.provision()
    async with wire.channel() as ch:
        await run(
            wire,
            ch,
            "/verified-authenticator/voting-configuration/register",
            json={"name": "empty", "strategy": strategy, "timeLimit": 3600, "deviceIdentifiers": []},
        )
        templates = (await wire.get("/policy/list-policy-templates")).json()
        template = next(iter(templates))
        first = next(iter(templates[template]["events"]))
        await run(
            wire,
            ch,
            "/policy/register",
            json={
                "name": "first-event",
                "policyTemplateId": template,
                "applyingEventIds": [first],
                "votingConfigurationId": "empty",
                "configuration": {"k": "v"},
            },
        )
        policy = (await wire.get("/policy/retrieve-policy/first-event")).json()
        await run(wire, ch, "/policy/activate", data={"policyId": policy["id"]})
        r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
        reserve = command_id(r)
        assert (await ch.wait_for("X-DPT-CAB-ID", reserve, timeout=10))["command_status"] == 2
        r = await wire.get(f"/data-token/retrieve-temporary-data-token/{reserve}")
        assert r.status_code == 200 and r.json()["token"]


async def test_the_guides_order_still_works_on_a_default_engine(wire):
    username = f"guide-{os.urandom(5).hex()}@example.com"
    r = await wire.post("/profile/register-profile", {"username": username, "password": PASSWORD})
    assert await wire.poll(command_id(r)) == "succeeded"
    _, pub = generate_identity()
    r = await wire.post(
        "/public-key/register-public-key", {"username": username, "password": PASSWORD, "publicKey": pub}, token=""
    )
    assert await wire.poll(command_id(r)) == "succeeded"
    r = await wire.post("/profile/authenticate", {"username": username, "password": PASSWORD})
    assert r.status_code == 200
    wire.token = r.json()["authorizationToken"]
    assert (await wire.get("/public-key/retrieve-public-key")).json() == {"publicKey": pub}


async def test_policy_templates_are_keyed_by_id_with_event_ids_as_keys(wire):
    """[P] reads an object keyed by template id whose ``events`` keys are the event ids it sends."""
    await wire.provision()
    templates = (await wire.get("/policy/list-policy-templates")).json()
    assert isinstance(templates, dict) and templates
    for template in templates.values():
        assert template["name"] and template["description"]
        events = template["events"]
        assert list(events) == sorted(events, key=int)  # ids in order; the first is data.reserve
        assert list(events.values()) == ["data.reserve", "data.exchange", "data.request", "data.update", "data.delete"]


def test_a_client_leaving_mid_request_is_logged_without_a_traceback(eng):
    start = len(eng.log())
    host, port = eng.urls["api"].split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /profile/authenticate HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nContent-Length: 5000\r\n\r\nusername=someone"
        )
    assert httpx.get(eng.urls["api"] + "/health", timeout=5).status_code == 200
    log = eng.log()[start:]
    assert "disconnected before its request was complete" in log
    assert "Traceback" not in log and "ClientDisconnect" not in log


async def test_a_reused_upstream_authorization_is_refused_with_403_while_the_client_sends(eng, wire):
    await wire.provision()
    start = len(eng.log())
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "5"})
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
        tmp = (await wire.get(f"/data-token/retrieve-temporary-data-token/{command_id(r)}")).json()
        url = f"{eng.urls['upstream']}/?{tmp['stream']}"
        async with httpx.AsyncClient(timeout=60) as up:
            assert (await up.post(url, content=b"first upload")).status_code == 200
            for _ in range(3):
                r = await up.post(url, content=os.urandom(8 * 1024 * 1024))
                assert r.status_code == 403, r.text
    log = eng.log()[start:]
    assert "Traceback" not in log and "BusyResourceError" not in log, log[-2000:]


async def test_a_voting_configuration_whose_devices_were_all_removed_decides_at_once(wire):
    """Its listed voters are gone: nobody is left to vote, so nothing may wait for them."""
    from tests.test_engine_voting import authenticators, gate_deletes

    await wire.provision()
    async with wire.channel() as ch:
        (phone,) = await authenticators(wire, ch, 1)
        await gate_deletes(wire, ch, [phone], time_limit=3600)
        assert (await run(wire, ch, "/device/remove", data={"deviceIdentifier": phone}))["command_status"] == 2
        token = await wire.store(ch, b"no voter left")
        done = await run(wire, ch, "/data-token/delete-data", data={"token": token})
        assert done["command_status"] == 2, done
        assert (await wire.get("/voting/list-pools")).json()["items"] == []
