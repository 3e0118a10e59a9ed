"""Engine, verified authenticators, voting and policies over real HTTP and WebSocket: a command
gated by an active policy stays at status 1 until its pool is approved (then applied), and ends
with status 3 when a vote rejects it, the time limit passes, or the pool is cancelled."""

from __future__ import annotations

import json

import trio

from tests.enginekit import command_id
from tests.test_engine_devices import new_device, run

TEMPLATE = "tpl-data-governance"


async def authenticators(wire, ch, n: int) -> list[str]:
    devices = []
    for i in range(n):
        dev = await new_device(wire, ch, f"phone{i}")
        assert (await run(wire, ch, "/verified-authenticator/register", {"deviceIdentifier": dev}))[
            "body"
        ] == "device.not_approved"
        await run(wire, ch, "/device/approve-device", {"deviceIdentifier": dev})
        assert (await run(wire, ch, "/verified-authenticator/register", {"deviceIdentifier": dev}))[
            "command_status"
        ] == 2
        devices.append(dev)
    return devices


async def gate_deletes(wire, ch, devices, *, strategy="unanimous", time_limit=60, name="vc") -> str:
    r = await wire.post(
        "/verified-authenticator/voting-configuration/register",
        json={"name": name, "strategy": strategy, "timeLimit": time_limit, "deviceIdentifiers": devices},
    )
    assert r.status_code == 202, r.text
    assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
    templates = (await wire.get("/policy/list-policy-templates")).json()
    delete_event = next(k for k, v in templates[TEMPLATE]["events"].items() if v == "data.delete")
    r = await wire.post(
        "/policy/register",
        json={
            "name": f"hold-deletes-{name}",
            "policyTemplateId": TEMPLATE,
            "applyingEventIds": [delete_event],
            "votingConfigurationId": name,
            "configuration": {"reason": "tests"},
        },
    )
    assert r.status_code == 202, r.text
    await ch.wait_for("X-DPT-CAB-ID", command_id(r))
    policy = (await wire.get(f"/policy/retrieve-policy/hold-deletes-{name}")).json()
    assert policy["active"] is False
    assert (await run(wire, ch, "/policy/activate", {"policyId": policy["id"]}))["command_status"] == 2
    return policy["id"]


async def held_delete(wire, ch) -> tuple[str, str, str]:
    token = await wire.store(ch, b"guarded")
    r = await wire.post("/data-token/delete-data", {"token": token})
    cid = command_id(r)
    ballot = await ch.wait_for("VOTING-BALLOT", (await pool_of(wire, cid))["poolId"])
    assert ballot["commandId"] == cid
    assert (await wire.http.post(f"/request-status/{cid}", json={})).json() == "started"
    return token, cid, ballot["poolId"]


async def pool_of(wire, cid: str) -> dict:
    with trio.fail_after(10):
        while True:
            pools = (await wire.get("/voting/list-pools")).json()["items"]
            for p in pools:
                if p["commandId"] == cid:
                    return p
            await trio.sleep(0.05)


async def vote(wire, pool_id, device, decision) -> str:
    r = await wire.post("/voting/cast-vote", {"poolId": pool_id, "deviceIdentifier": device, "decision": decision})
    assert r.status_code == 200, r.text
    return r.json()["status"]


async def test_approved_vote_applies_the_held_command(wire):
    await wire.provision()
    async with wire.channel() as ch:
        a, b = await authenticators(wire, ch, 2)
        await gate_deletes(wire, ch, [a, b])
        token, cid, pool = await held_delete(wire, ch)
        assert await vote(wire, pool, a, "approve") == "open"
        status = (await wire.get(f"/voting/check-pool-status/{pool}")).json()
        assert (status["status"], status["approvals"], status["required"]) == ("open", 1, 2)
        assert await vote(wire, pool, b, "approve") == "approved"
        assert (await ch.wait_for("X-DPT-CAB-ID", cid))["command_status"] == 2
        assert await wire.poll(cid) == "succeeded"
        assert (await wire.post("/data-token/request-data", {"token": token})).status_code == 404


async def test_rejected_vote_rejects_the_command(wire):
    await wire.provision()
    async with wire.channel() as ch:
        a, b = await authenticators(wire, ch, 2)
        await gate_deletes(wire, ch, [a, b], strategy="majority")
        token, cid, pool = await held_delete(wire, ch)
        assert await vote(wire, pool, a, "reject") == "rejected"  # 2 needed, only 1 voter left
        ack = await ch.wait_for("X-DPT-CAB-ID", cid, timeout=5)  # the outcome, after the status-1 ack
        assert ack["command_status"] == 3 and ack["body"] == "voting.rejected"
        assert await wire.poll(cid) == "rejected"
        assert await wire.retrieve(ch, token) == b"guarded"
        r = await wire.post("/voting/cast-vote", {"poolId": pool, "deviceIdentifier": b, "decision": "approve"})
        assert r.status_code == 409


async def test_time_limit_and_cancel_end_the_command(wire):
    await wire.provision()
    async with wire.channel() as ch:
        (a,) = await authenticators(wire, ch, 1)
        policy = await gate_deletes(wire, ch, [a], time_limit=1, name="quick")
        token, cid, pool = await held_delete(wire, ch)
        assert await wire.poll(cid) == "rejected"  # polls until the 1 s time limit settles it
        obj = (await wire.get(f"/utility/request-command-id-status/{cid}")).json()
        assert obj["body"] == "voting.time_limit_exceeded"
        assert (await wire.get(f"/voting/check-pool-status/{pool}")).json()["status"] == "expired"
        token2 = await wire.store(ch, b"again")
        r = await wire.post("/data-token/delete-data", {"token": token2})
        cid2 = command_id(r)
        pool2 = (await pool_of(wire, cid2))["poolId"]
        r = await wire.post("/voting/cancel-pool", {"poolId": pool2})
        assert r.json()["status"] == "cancelled"
        assert (await wire.get(f"/utility/request-command-id-status/{cid2}")).json()["body"] == "voting.cancelled"
        # deactivated: deletes go straight through again
        assert (await run(wire, ch, "/policy/deactivate", {"policyId": policy}))["command_status"] == 2
        r = await wire.post("/data-token/delete-data", {"token": token2})
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2


async def test_voting_and_policy_errors(wire):
    await wire.provision()
    async with wire.channel() as ch:
        (a,) = await authenticators(wire, ch, 1)
        outsider = await new_device(wire, ch, "outsider")
        for body, field in (
            ({"strategy": "unanimous"}, "name"),
            ({"name": "x", "strategy": "dictator"}, "strategy"),
            ({"name": "x", "timeLimit": "soon"}, "timeLimit"),
            ({"name": "x", "deviceIdentifiers": [outsider]}, "deviceIdentifiers"),
        ):
            r = await wire.post("/verified-authenticator/voting-configuration/register", json=body)
            assert r.status_code == 422 and field in r.json()["errors"], body
        for raw in (b'{"name": "x", "timeLimit": 1e400}', b'{"name": "x", "timeLimit": -1e400}'):  # floats: infinity
            r = await wire.post(
                "/verified-authenticator/voting-configuration/register",
                content=raw,
                headers={"Content-Type": "application/json"},
            )
            assert r.status_code == 422, (raw, r.status_code)
        r = await wire.post(
            "/verified-authenticator/voting-configuration/register", json={"name": "dup", "deviceIdentifiers": [a]}
        )
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        r = await wire.post(
            "/verified-authenticator/voting-configuration/register", json={"name": "dup", "deviceIdentifiers": [a]}
        )
        ack = await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        assert ack["command_status"] == 3 and ack["body"] == "voting_configuration.name_taken"
        good = {
            "name": "p",
            "policyTemplateId": TEMPLATE,
            "applyingEventIds": ["5"],
            "votingConfigurationId": "dup",
            "configuration": {"k": "v"},
        }
        for change, field in (
            ({"policyTemplateId": "tpl-nope"}, "policyTemplateId"),
            ({"policyTemplateId": [TEMPLATE]}, "policyTemplateId"),  # unhashable: answered 500, a traceback
            ({"policyTemplateId": {"a": 1}}, "policyTemplateId"),
            ({"applyingEventIds": ["99"]}, "applyingEventIds"),
            ({"configuration": {}}, "configuration"),
            ({"votingConfigurationId": "missing"}, "votingConfigurationId"),
        ):
            r = await wire.post("/policy/register", json={**good, **change})
            assert r.status_code == 422 and field in r.json()["errors"], change
        for number in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):  # stored, it made retrieve-policy a 500
            body = (
                json.dumps({**good, "name": "nan", "configuration": {"k": 0}})
                .encode()
                .replace(b'"k": 0', b'"k": ' + number)
            )
            r = await wire.post("/policy/register", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (number, r.status_code)
        assert (await wire.get("/policy/retrieve-policy/nan")).status_code == 404
        assert (await wire.get("/policy/retrieve-policy/none")).status_code == 404
        assert (await wire.post("/policy/activate", {"policyId": "pol-none"})).status_code == 404
        assert (await wire.get("/voting/check-pool-status/pool-none")).status_code == 404
        r = await wire.post("/voting/cast-vote", {"poolId": "pool-none", "deviceIdentifier": a, "decision": "approve"})
        assert r.status_code == 404
        await gate_deletes(wire, ch, [a], name="errs")
        token, cid, pool = await held_delete(wire, ch)
        r = await wire.post("/voting/cast-vote", {"poolId": pool, "deviceIdentifier": outsider, "decision": "approve"})
        assert r.status_code == 422
        r = await wire.post("/voting/cast-vote", {"poolId": pool, "deviceIdentifier": a, "decision": "maybe"})
        assert r.status_code == 422


async def test_a_held_command_survives_an_engine_restart(tmp_path):
    from tests.enginekit import EngineProcess, Wire

    eng = EngineProcess(tmp_path / "data").start()
    try:
        wire = Wire(eng.urls)
        creds = await wire.provision()
        async with wire.channel() as ch:
            (a,) = await authenticators(wire, ch, 1)
            await gate_deletes(wire, ch, [a])
            token, cid, pool = await held_delete(wire, ch)
        await wire.aclose()
        eng.kill()
        eng.start()
        wire = Wire(eng.urls)
        r = await wire.post("/profile/authenticate", {"username": creds["username"], "password": creds["password"]})
        wire.token = r.json()["authorizationToken"]
        assert (await wire.http.post(f"/request-status/{cid}", json={})).json() == "started"
        assert await vote(wire, pool, a, "approve") == "approved"
        assert await wire.poll(cid) == "succeeded"
        await wire.aclose()
    finally:
        eng.stop()
