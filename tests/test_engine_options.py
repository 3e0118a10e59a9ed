"""Engine options: every alternative wire shape of the reference's section 9 and every fault
injection switch, each observed over the real sockets."""

from __future__ import annotations

import os

import httpx
import pytest
import trio

from tests.enginekit import command_id


@pytest.mark.parametrize("shape,expected", [("object", dict), ("string", str), ("array", list)])
async def test_command_id_shapes(eng, wire, shape, expected):
    await wire.provision()
    eng.set_options(command_id_shape=shape)
    r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
    assert r.status_code == 202
    assert isinstance(r.json(), expected)
    assert r.headers["x-dpt-cab-id"] == command_id(r)
    assert await wire.poll(command_id(r)) == "succeeded"


async def test_command_id_shape_per_endpoint(eng, wire):
    eng.set_options(**{"command_id_shape.register-profile": "string"})
    await wire.provision()
    r = await wire.post("/profile/register-profile", {"username": "shape@example.com", "password": "correct-horse"})
    assert isinstance(r.json(), str)
    r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
    assert isinstance(r.json(), dict)


async def test_stream_as_full_url_and_guide_temporary_token(eng, wire):
    eng.set_options(stream_shape="url", temporary_token_shape="guide")
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        body = (await wire.get(f"/data-token/retrieve-temporary-data-token/{command_id(r)}")).json()
        assert set(body) == {"token", "stream"}
        assert body["stream"].startswith(eng.urls["upstream"] + "/?auth=")
        token = await wire.store(ch, os.urandom(70_000), streamed=True)
        assert token.startswith("dtk-")


async def test_temporary_token_as_bare_string(eng, wire):
    eng.set_options(temporary_token_shape="string")
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"tiny", streamed=False)
        assert await wire.retrieve(ch, token) == b"tiny"


async def test_configure_file_meta_bare_string(eng, wire):
    eng.set_options(file_meta_shape="string")
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"abc")
    assert token.startswith("dtk-")


async def test_request_data_nested_layout(eng, wire):
    eng.set_options(request_data_layout="nested")
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"nested!")
        r = await wire.post("/data-token/request-data", {"token": token})
        d = await ch.wait_for("X-DPT-CAB-REQUEST-ID", r.headers["x-dpt-cab-request-id"])
        assert "output_type" not in d and d["body"]["output_type"] == 0
        assert await wire.retrieve(ch, token) == b"nested!"


async def test_emit_started_sends_status_1_before_the_outcome(eng, wire):
    eng.set_options(emit_started=True)
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        cid = command_id(r)
        with trio.fail_after(5):
            while len(ch.seen("X-DPT-CAB-ID", cid)) < 2:
                await trio.sleep(0.02)
        assert [m["command_status"] for m in ch.seen("X-DPT-CAB-ID", cid)] == [1, 2]


async def test_latency_is_added(eng, wire):
    eng.set_options(latency_ms=300)
    t = trio.current_time()
    await wire.get("/health")
    assert trio.current_time() - t >= 0.3


async def test_fail_rate_answers_503_without_side_effects(eng, wire):
    await wire.provision()
    eng.set_options(fail_rate=1.0)
    r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
    assert r.status_code == 503
    eng.set_options(fail_rate=0.0)
    listing = await wire.get("/data-token/list-data-tokens")
    assert listing.status_code == 200


async def test_fail_after_rate_loses_the_answer_but_applies_the_command(eng, wire):
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"x")
        eng.set_options(fail_after_rate=1.0)
        r = await wire.post("/data-token/delete-data", {"token": token})
        assert r.status_code == 502
        eng.set_options(fail_after_rate=0.0)
        with trio.fail_after(5):
            while (await wire.post("/data-token/request-data", {"token": token})).status_code != 404:
                await trio.sleep(0.05)


async def test_dropped_acks_still_leave_the_status_pollable(eng, wire):
    await wire.provision()
    eng.set_options(ack_drop_rate=1.0)
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        cid = command_id(r)
        assert await wire.poll(cid) == "succeeded"
        await trio.sleep(0.2)
        assert ch.seen("X-DPT-CAB-ID", cid) == []


async def test_delayed_acks(eng, wire):
    await wire.provision()
    eng.set_options(ack_delay_ms=500)
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        cid = command_id(r)
        assert await wire.poll(cid) == "succeeded"
        assert ch.seen("X-DPT-CAB-ID", cid) == []
        await ch.wait_for("X-DPT-CAB-ID", cid, timeout=5)


async def test_websocket_disconnects(eng, wire):
    await wire.provision()
    async with wire.channel() as ch:
        assert eng.admin("disconnect-websockets")["disconnected"] >= 1
        with trio.fail_after(5):
            while not ch.closed:
                await trio.sleep(0.02)
    eng.set_options(ws_drop_rate=1.0)
    async with wire.channel() as ch:
        await wire.post("/data-token/reserve-token-space", {"context": "c"})
        with trio.fail_after(5):
            while not ch.closed:
                await trio.sleep(0.02)


def test_bad_option_values_are_refused(eng):
    for bad in ({"command_id_shape": "xml"}, {"fail_rate": 2}, {"reject": "no-such-kind"}, {"nope": 1}):
        r = httpx.post(eng.urls["api"] + "/_engine/options", json=bad, headers={"X-Engine-Admin": eng.admin_secret})
        assert r.status_code == 422, bad
    r = httpx.get(eng.urls["api"] + "/_engine/options")
    assert r.status_code == 401


def test_an_option_that_is_not_a_finite_number_is_refused_and_the_engine_keeps_answering(eng):
    """``latency_ms=nan`` was taken: every API answer became a 500 (a NaN deadline) and the
    options could be read no more (JSON has no NaN), until the engine was restarted."""
    admin = {"X-Engine-Admin": eng.admin_secret}
    for bad in ({"latency_ms": "nan"}, {"token_ttl": "inf"}, {"ack_delay_ms": "-inf"}, {"downstream_ttl": "1e400"}):
        r = httpx.post(eng.urls["api"] + "/_engine/options", json=bad, headers=admin, timeout=10)
        assert r.status_code == 422, bad
        assert "finite" in r.json()["message"]
    r = httpx.get(eng.urls["api"] + "/_engine/options", headers=admin, timeout=10)
    assert r.status_code == 200
    assert r.json()["latency_ms"] == 0
    assert httpx.get(eng.urls["api"] + "/health", timeout=10).status_code == 200
