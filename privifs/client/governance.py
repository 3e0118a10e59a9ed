"""Devices, storage devices, verified authenticators, voting and policies (reference sections
4.6–4.11), for applications that administer a profile. Every asynchronous command waits for its
outcome like the data-token operations do; every answer shape the reference records is read.

``cast_vote`` and ``list_pools`` use the local engine's extension endpoints (the reference
documents no HTTP endpoint through which an authenticator votes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from privifs.client import shapes
from privifs.client.connect import Client
from privifs.errors import NotFoundError, ProtocolError


@dataclass
class Device:
    identifier: str
    name: str
    state: str
    roles: list[str]
    meta: dict[str, Any]

    @classmethod
    def from_record(cls, r: dict) -> Device:
        ident = r.get("deviceIdentifier") or r.get("deviceId") or r.get("id")
        if not isinstance(ident, str):
            raise ProtocolError("a device record carries no identifier")
        roles = r.get("roles") or ([r["type"]] if r.get("type") not in (None, "device") else [])
        return cls(
            ident,
            str(r.get("name", "")),
            str(r.get("approvalState", r.get("state", ""))),
            list(roles),
            dict(r.get("meta") or {}),
        )


async def _command(client: Client, method: str, path: str, what: str, **kw) -> str:
    resp = await client.transport.call(method, path, expected=(202, 200), what=what, **kw)
    cid = shapes.command_id(resp)
    await client.commands.wait(cid, what=what)
    return cid


async def _read(client: Client, method: str, path: str, what: str, **kw):
    """An idempotent call's parsed answer."""
    return shapes.json_or_text(await client.transport.call(method, path, idempotent=True, what=what, **kw))


def _items(body) -> list:
    """A listing's records, whether wrapped in ``{"items": [...]}`` or bare."""
    return list((body.get("items") if isinstance(body, dict) else body) or [])


# -- devices ---------------------------------------------------------------------------------------
async def request_device(client: Client, name: str) -> str:
    """Register a new device; returns its device identifier."""
    cid = await _command(
        client, "POST", "/device/request-unique-identifier", "request device identifier", data={"deviceName": name}
    )
    body = await _read(
        client, "POST", "/device/retrieve-unique-identifier", "retrieve device identifier", data={"id": cid}
    )
    if isinstance(body, str) and body:
        return body
    if isinstance(body, dict):
        for k in ("deviceIdentifier", "deviceId", "id"):
            if isinstance(body.get(k), str):
                return body[k]
    raise ProtocolError("the device identifier answer carries no identifier")


def _device_form(device: str, **extra: str) -> dict:
    return {"deviceIdentifier": device, **extra}


async def approve_device(client: Client, device: str) -> None:
    await _command(client, "POST", "/device/approve-device", "approve device", data=_device_form(device))


async def reject_device(client: Client, device: str) -> None:
    await _command(client, "POST", "/device/reject-device", "reject device", data=_device_form(device))


async def configure_device(client: Client, device: str, *, name: str | None = None, tags: str | None = None) -> None:
    form = _device_form(device)
    if name is not None:
        form["name"] = name
    if tags is not None:
        form["tags"] = tags
    await _command(client, "POST", "/device/configure-meta", "configure device meta", data=form)


async def remove_device(client: Client, device: str) -> None:
    await _command(client, "POST", "/device/remove", "remove device", data=_device_form(device))


async def list_devices(client: Client) -> list[Device]:
    body = await _read(client, "GET", "/device/retrieve-profile-devices", "list devices")
    return [Device.from_record(r) for r in _items(body)]


async def device_configuration(client: Client, device: str) -> dict:
    return await _read(
        client,
        "POST",
        "/device/download-device-configuration",
        "download device configuration",
        data=_device_form(device),
    )


# -- storage -------------------------------------------------------------------------------------------
async def register_storage(client: Client, device: str) -> None:
    await _command(client, "POST", "/storage/register", "register storage device", data=_device_form(device))


async def remove_storage(client: Client, device: str) -> None:
    await _command(client, "POST", "/storage/remove", "remove storage device", data=_device_form(device))


async def list_storage(client: Client) -> list[dict]:
    return _items(await _read(client, "GET", "/storage/list-storage-devices", "list storage devices"))


# -- authenticators and voting ---------------------------------------------------------------------------
async def register_authenticator(client: Client, device: str) -> None:
    await _command(
        client, "POST", "/verified-authenticator/register", "register authenticator", data=_device_form(device)
    )


async def register_voting_configuration(
    client: Client, name: str, *, strategy: str = "unanimous", time_limit: int = 60, devices: list[str] | None = None
) -> None:
    await _command(
        client,
        "POST",
        "/verified-authenticator/voting-configuration/register",
        "register voting configuration",
        json={"name": name, "strategy": strategy, "timeLimit": time_limit, "deviceIdentifiers": devices or []},
    )


async def pool_status(client: Client, pool_id: str) -> dict:
    return await _read(client, "GET", f"/voting/check-pool-status/{pool_id}", "check pool status")


async def list_pools(client: Client, status: str | None = None) -> list[dict]:
    return _items(
        await _read(
            client, "GET", "/voting/list-pools", "list voting pools", params={"status": status} if status else None
        )
    )


async def cast_vote(client: Client, pool_id: str, device: str, approve: bool) -> str:
    resp = await client.transport.call(
        "POST",
        "/voting/cast-vote",
        what="cast vote",
        data={"poolId": pool_id, "deviceIdentifier": device, "decision": "approve" if approve else "reject"},
    )
    return shapes.json_or_text(resp)["status"]


# -- policies --------------------------------------------------------------------------------------------
async def policy_templates(client: Client) -> dict:
    return await _read(client, "GET", "/policy/list-policy-templates", "list policy templates")


async def register_policy(
    client: Client, name: str, template_id: str, event_ids: list[str], voting_configuration: str, configuration: dict
) -> str:
    """Register a policy and return its id (looked up by name; the lookup can lag, so retried)."""
    await _command(
        client,
        "POST",
        "/policy/register",
        "register policy",
        json={
            "name": name,
            "policyTemplateId": template_id,
            "applyingEventIds": event_ids,
            "votingConfigurationId": voting_configuration,
            "configuration": configuration,
        },
    )
    for attempt in range(5):
        try:
            return (await _read(client, "GET", f"/policy/retrieve-policy/{name}", "retrieve policy"))["id"]
        except NotFoundError:
            await trio.sleep(1.0)  # eventually consistent on the live service
    raise NotFoundError(f"policy {name!r} was registered but cannot be found", status=404)


async def activate_policy(client: Client, policy_id: str) -> None:
    await _command(client, "POST", "/policy/activate", "activate policy", data={"policyId": policy_id})


async def deactivate_policy(client: Client, policy_id: str) -> None:
    await _command(client, "POST", "/policy/deactivate", "deactivate policy", data={"policyId": policy_id})
