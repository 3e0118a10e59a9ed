"""Engine, device and storage groups over real HTTP and WebSocket: the device life cycle, its
error cases, and storage devices holding byte-identical copies of every stored payload."""

from __future__ import annotations

import os

import pytest
import trio

from tests.enginekit import Wire, command_id


async def new_device(wire, ch, name="laptop") -> str:
    r = await wire.post("/device/request-unique-identifier", {"deviceName": name})
    assert r.status_code == 202, r.text
    cid = command_id(r)
    assert (await ch.wait_for("X-DPT-CAB-ID", cid))["command_status"] == 2
    r = await wire.post("/device/retrieve-unique-identifier", {"id": cid})
    assert r.status_code == 200, r.text
    device = r.json()["deviceIdentifier"]
    alt = await wire.get(f"/device/retrieve-device-id/{cid}")
    assert alt.json() == {"deviceId": device}
    return device


async def run(wire, ch, path, form) -> dict:
    r = await wire.post(path, form)
    assert r.status_code == 202, r.text
    return await ch.wait_for("X-DPT-CAB-ID", command_id(r))


async def test_device_life_cycle(wire):
    await wire.provision()
    async with wire.channel() as ch:
        dev = await new_device(wire, ch)
        devices = (await wire.get("/device/retrieve-profile-devices")).json()
        assert devices[0]["deviceIdentifier"] == dev and devices[0]["approvalState"] == "pending"
        r = await wire.post("/device/download-device-configuration", {"deviceIdentifier": dev})
        assert r.status_code == 422  # not approved yet
        assert (
            await run(
                wire, ch, "/device/configure-meta", {"deviceIdentifier": dev, "name": "work laptop", "tags": "office"}
            )
        )["command_status"] == 2
        assert (await run(wire, ch, "/device/approve-device", {"deviceIdentifier": dev}))["command_status"] == 2
        d = (await wire.get("/device/retrieve-profile-devices")).json()[0]
        assert (d["name"], d["approvalState"], d["meta"]) == ("work laptop", "approved", {"tags": "office"})
        config = (await wire.post("/device/download-device-configuration", {"deviceIdentifier": dev})).json()
        assert config["deviceIdentifier"] == dev and config["amqp"]["routingKey"] and config["publicKey"]
        ack = await run(wire, ch, "/device/reject-device", {"deviceIdentifier": dev})
        assert ack["command_status"] == 3 and ack["body"] == "device.already_approved"
        other = await new_device(wire, ch, "phone")
        assert (await run(wire, ch, "/device/reject-device", {"deviceId": other}))["command_status"] == 2
        assert (await run(wire, ch, "/device/remove", {"deviceIdentifier": dev}))["command_status"] == 2
        remaining = (await wire.get("/device/retrieve-profile-devices")).json()
        assert [x["deviceIdentifier"] for x in remaining] == [other] and remaining[0]["approvalState"] == "rejected"
        assert (await wire.post("/device/approve-device", {"deviceIdentifier": dev})).status_code == 404


@pytest.mark.parametrize("shape,key", [("string", None), ("guide", "deviceId")])
async def test_device_identifier_shapes(eng, wire, shape, key):
    eng.set_options(device_id_shape=shape)
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/device/request-unique-identifier", {"deviceName": "x"})
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        body = (await wire.post("/device/retrieve-unique-identifier", {"id": command_id(r)})).json()
        assert body.startswith("dev-") if key is None else body[key].startswith("dev-")


async def test_device_errors(wire):
    await wire.provision()
    for path in (
        "/device/approve-device",
        "/device/reject-device",
        "/device/remove",
        "/storage/register",
        "/device/configure-meta",
        "/device/download-device-configuration",
    ):
        r = await wire.post(path, {})
        assert r.status_code == 422 and "deviceIdentifier" in r.json()["errors"], path
        r = await wire.post(path, {"deviceIdentifier": "dev-unknown", "name": "n"})
        assert r.status_code == 404, path
    r = await wire.post("/device/request-unique-identifier", {})
    assert r.status_code == 422 and "deviceName" in r.json()["errors"]
    assert (await wire.post("/device/retrieve-unique-identifier", {"id": "nope"})).status_code == 404
    assert (await wire.get("/device/retrieve-profile-devices", token="")).status_code == 401


async def test_storage_devices_hold_copies_until_removed(eng, wire):
    await wire.provision()
    async with wire.channel() as ch:
        dev = await new_device(wire, ch, "nas")
        ack = await run(wire, ch, "/storage/register", {"deviceIdentifier": dev})
        assert ack["command_status"] == 3 and ack["body"] == "device.not_approved"
        before = os.urandom(3000)
        t0 = await wire.store(ch, before)  # stored before the device exists: back-filled
        await run(wire, ch, "/device/approve-device", {"deviceIdentifier": dev})
        assert (await run(wire, ch, "/storage/register", {"deviceIdentifier": dev}))["command_status"] == 2
        payloads = {t0: before}
        for n in (10, 200_000):
            data = os.urandom(n)
            payloads[await wire.store(ch, data, streamed=n > 1000)] = data
        storage_dir = eng.data_dir / "storage" / dev
        with trio.fail_after(10):
            while {f.name for f in storage_dir.iterdir() if not f.name.startswith(".")} != set(payloads):
                await trio.sleep(0.05)
        for token, data in payloads.items():
            assert (storage_dir / token).read_bytes() == data
        listed = (await wire.get("/storage/list-storage-devices")).json()
        assert listed[0]["deviceIdentifier"] == dev and listed[0]["copies"] == 3
        r = await wire.post("/data-token/delete-data", {"token": t0})
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        assert not (storage_dir / t0).exists()
        assert (await run(wire, ch, "/storage/remove", {"deviceIdentifier": dev}))["command_status"] == 2
        assert not storage_dir.exists()
        assert (await wire.get("/storage/list-storage-devices")).json() == []
        ack = await run(wire, ch, "/storage/remove", {"deviceIdentifier": dev})
        assert ack["command_status"] == 3 and ack["body"] == "storage.not_registered"


async def test_another_profiles_devices_are_invisible(eng, wire):
    await wire.provision()
    async with wire.channel() as ch:
        dev = await new_device(wire, ch)
    other = Wire(eng.urls)
    try:
        await other.provision()
        assert (await other.get("/device/retrieve-profile-devices")).json() == []
        for path in ("/device/approve-device", "/storage/register", "/device/remove"):
            assert (await other.post(path, {"deviceIdentifier": dev})).status_code == 404
    finally:
        await other.aclose()
