"""The client library's device, storage, authenticator, voting and policy operations against a
real engine, and a store that a vote holds past the client's wait (resumed, not re-asked)."""

from __future__ import annotations

import os

import pytest

from privifs.client import governance as gov
from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.client.transport import ClientOptions
from privifs.errors import CommandPending, CommandRejected

KEY = bytes(range(32))


async def test_devices_and_storage(account, eng):
    async with connect(*account) as client:
        dev = await gov.request_device(client, "nas")
        assert [d.identifier for d in await gov.list_devices(client)] == [dev]
        await gov.configure_device(client, dev, name="home nas", tags="basement")
        await gov.approve_device(client, dev)
        devices = await gov.list_devices(client)
        assert (devices[0].name, devices[0].state, devices[0].meta) == ("home nas", "approved", {"tags": "basement"})
        assert (await gov.device_configuration(client, dev))["deviceIdentifier"] == dev
        await gov.register_storage(client, dev)
        token = await client.vault(KEY).put_bytes(b"fanned out", FileMeta("f", "", "/", 0, "/f"))
        assert [s["deviceIdentifier"] for s in await gov.list_storage(client)] == [dev]
        await gov.remove_storage(client, dev)
        assert await gov.list_storage(client) == []
        other = await gov.request_device(client, "stranger")
        await gov.reject_device(client, other)
        with pytest.raises(CommandRejected) as info:
            await gov.register_storage(client, other)
        assert info.value.reason == "device.not_approved"
        await gov.remove_device(client, dev)
        assert [d.identifier for d in await gov.list_devices(client)] == [other]
        assert token


async def test_a_vote_longer_than_the_wait_is_resumed_not_reissued(account, eng):
    async with connect(*account, ClientOptions(ack_timeout=1.0)) as client:
        dev = await gov.request_device(client, "phone")
        await gov.approve_device(client, dev)
        await gov.register_authenticator(client, dev)
        await gov.register_voting_configuration(client, "slow", devices=[dev])
        policy = await gov.register_policy(client, "hold", "tpl-data-governance", ["1"], "slow", {"a": "b"})
        await gov.activate_policy(client, policy)
        vault = client.vault(KEY)
        data = os.urandom(2000)
        with pytest.raises(CommandPending):
            await vault.put_bytes(data, FileMeta("held", "", "/", 0, "/held"))
        with pytest.raises(CommandPending):  # the same reservation is still held: no second vote
            await vault.put_bytes(data, FileMeta("held", "", "/", 0, "/held"))
        pools = await gov.list_pools(client)
        assert len(pools) == 1
        assert (await gov.pool_status(client, pools[0]["poolId"]))["status"] == "open"
        assert await gov.cast_vote(client, pools[0]["poolId"], dev, True) == "approved"
        await client.commands.wait(pools[0]["commandId"], timeout=10)  # applied once released
        token = await vault.put_bytes(data, FileMeta("held", "", "/", 0, "/held"))
        assert await vault.get_bytes(token) == data
        assert len(await gov.list_pools(client)) == 1
