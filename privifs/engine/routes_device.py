"""Device and storage groups: devices request an identifier, get approved or rejected, carry
meta and a configuration bundle, and can be removed; approved devices can be registered as
storage devices, which then hold a copy of every stored payload of their profile (the copies
themselves are :class:`~privifs.engine.storage.StorageDevices`).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.crypto.keys import generate_identity
from privifs.engine.commands import Outcome, Rejected
from privifs.engine.core import Engine
from privifs.engine.http import ApiError, Form, command_accepted, guarded, invalid, iso, not_found, owned_row, read_form
from privifs.engine.storage import StorageDevices

log = logging.getLogger("privifs.engine.storage")

Spawn = Callable[..., None]  # Engine.spawn: run an async function in the background


def _device_field(form: Form) -> str:
    value = form.get("deviceIdentifier") if form.get("deviceIdentifier") is not None else form.get("deviceId")
    if not value:
        raise invalid("deviceIdentifier", "this field is required")
    return Form._check("deviceIdentifier", value, 128, False)


def owned_device(engine: Engine, profile_id: str, device_id: str) -> sqlite3.Row:
    """The profile's device, or 404 (another profile's device does not exist for this one)."""
    return owned_row(engine.db, "devices", "id", device_id, profile_id)


def approved_device(conn: sqlite3.Connection, device_id: str, profile_id: str) -> None:
    """Inside an applier: reject unless the device is the profile's and approved."""
    row = conn.execute("SELECT state FROM devices WHERE id = ? AND profile_id = ?", (device_id, profile_id)).fetchone()
    if row is None:
        raise Rejected("device.not_found")
    if row["state"] != "approved":
        raise Rejected("device.not_approved")


def device_command(engine: Engine, kind: str, check=None):
    """A handler that submits ``kind`` for the caller's device named in the form (404 if not
    theirs); ``check(form, row)`` may validate more fields and add parameters."""

    async def handler(request: Request) -> Response:
        who = engine.principal(request)
        form = await read_form(request)
        device_id = _device_field(form)
        row = owned_device(engine, who.profile_id, device_id)
        params = {"device": device_id}
        if check is not None:
            params.update(check(form, row))
        cid = await engine.runner.submit(kind, who.profile_id, params)
        return command_accepted(engine.opts, kind, cid)

    return handler


# -- command appliers: run by the command runner inside its transaction; the collaborators before
# ``conn`` are bound where they are registered (privifs/engine/features.py) --------------------
def apply_request(conn, params, profile_id, cid) -> Outcome:
    _, public = generate_identity()
    conn.execute(
        "INSERT INTO devices (id, profile_id, command_id, name, state, public_key, created_at)"
        " VALUES (?, ?, ?, ?, 'pending', ?, ?)",
        ("dev-" + secrets.token_hex(10), profile_id, cid, params["name"], public, time.time()),
    )
    return Outcome()


def apply_state(state: str, conn, params, profile_id, cid) -> Outcome:
    """Approve or reject (``state``) a pending device; doing it again is harmless."""
    row = conn.execute(
        "SELECT state FROM devices WHERE id = ? AND profile_id = ?", (params["device"], profile_id)
    ).fetchone()
    if row is None:
        raise Rejected("device.not_found")
    if row["state"] != "pending" and row["state"] != state:
        raise Rejected(f"device.already_{row['state']}")
    conn.execute("UPDATE devices SET state = ? WHERE id = ?", (state, params["device"]))
    return Outcome()


def apply_meta(conn, params, profile_id, cid) -> Outcome:
    row = conn.execute(
        "SELECT meta FROM devices WHERE id = ? AND profile_id = ?", (params["device"], profile_id)
    ).fetchone()
    if row is None:
        raise Rejected("device.not_found")
    meta = json.loads(row["meta"])
    if params.get("tags") is not None:
        meta["tags"] = params["tags"]
    conn.execute("UPDATE devices SET meta = ? WHERE id = ?", (json.dumps(meta), params["device"]))
    if params.get("name") is not None:
        conn.execute("UPDATE devices SET name = ? WHERE id = ?", (params["name"], params["device"]))
    return Outcome()


def apply_remove(storage: StorageDevices, conn, params, profile_id, cid) -> Outcome:
    cur = conn.execute("DELETE FROM devices WHERE id = ? AND profile_id = ?", (params["device"], profile_id))
    if cur.rowcount == 0:
        raise Rejected("device.not_found")
    out = Outcome()
    out.after_commit.append(lambda: storage.drop(params["device"]))
    return out


def apply_storage_register(storage: StorageDevices, spawn: Spawn, conn, params, profile_id, cid) -> Outcome:
    approved_device(conn, params["device"], profile_id)
    conn.execute("UPDATE devices SET storage = 1, storage_since = ? WHERE id = ?", (time.time(), params["device"]))
    out = Outcome()
    out.after_commit.append(lambda: spawn(storage.backfill, profile_id, params["device"]))
    return out


def apply_storage_remove(storage: StorageDevices, conn, params, profile_id, cid) -> Outcome:
    cur = conn.execute(
        "UPDATE devices SET storage = 0, storage_since = NULL WHERE id = ? AND profile_id = ? AND storage = 1",
        (params["device"], profile_id),
    )
    if cur.rowcount == 0:
        raise Rejected("storage.not_registered")
    out = Outcome()
    out.after_commit.append(lambda: storage.drop(params["device"]))
    return out


class DeviceApi:
    """The device and storage groups' handlers (one method each) and their route table."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.opts = engine.opts
        self.db = engine.db
        self.storage = engine.storage

    def record(self, row: sqlite3.Row) -> dict:
        roles = [r for r, on in (("storage", row["storage"]), ("authenticator", row["authenticator"])) if on]
        return {
            "deviceIdentifier": row["id"],
            "name": row["name"],
            "type": roles[0] if roles else "device",
            "roles": roles,
            "approvalState": row["state"],
            "meta": json.loads(row["meta"]),
            "createdAt": iso(row["created_at"]),
        }

    # -- devices -------------------------------------------------------------------------------
    async def request_identifier(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        name = form.required("deviceName", max_len=256)
        cid = await self.engine.runner.submit("request-unique-identifier", who.profile_id, {"name": name})
        return command_accepted(self.opts, "request-unique-identifier", cid)

    async def retrieve_identifier(self, request: Request) -> Response:
        who = self.engine.principal(request)
        cid = request.path_params.get("command_id") or (await read_form(request)).required("id", max_len=256)
        row = self.db.read(
            lambda c: c.execute(
                "SELECT id FROM devices WHERE command_id = ? AND profile_id = ?", (cid, who.profile_id)
            ).fetchone()
        )
        if row is None:
            raise not_found()
        if self.opts.device_id_shape == "string":
            return JSONResponse(row["id"])
        if self.opts.device_id_shape == "guide" or "command_id" in request.path_params:
            return JSONResponse({"deviceId": row["id"]})
        return JSONResponse({"deviceIdentifier": row["id"]})

    async def list_devices(self, request: Request) -> Response:
        who = self.engine.principal(request)
        rows = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM devices WHERE profile_id = ? ORDER BY created_at", (who.profile_id,)
            ).fetchall()
        )
        return JSONResponse([self.record(r) for r in rows])

    def meta_params(self, form: Form, row) -> dict:
        name = form.get("name") if form.get("name") is not None else form.get("displayName")
        tags = form.get("tags")
        if name is None and tags is None:
            raise invalid("name", "name (or displayName) or tags is required")
        if name is not None:
            Form._check("name", name, 256, False)
        if tags is not None:
            Form._check("tags", tags, 1024, True)
        return {"name": name, "tags": tags}

    async def download_configuration(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        row = owned_device(self.engine, who.profile_id, _device_field(form))
        if row["state"] != "approved":
            raise ApiError(422, "device.not_approved", {"deviceIdentifier": ["the device is not approved"]})
        # the engine has no message bus: the bundle says where this device's copies live instead
        password = secrets.token_urlsafe(24)
        return JSONResponse(
            {
                "deviceIdentifier": row["id"],
                "publicKey": row["public_key"],
                "amqp": {
                    "host": "127.0.0.1",
                    "port": None,
                    "vhost": f"/privicore/{who.profile_id}",
                    "username": row["id"],
                    "password": password,
                    "routingKey": f"device.{row['id']}",
                },
                "storage": {"kind": "local-directory", "path": str(self.storage.device_dir(row["id"]))},
            }
        )

    # -- storage ---------------------------------------------------------------------------------
    async def list_storage(self, request: Request) -> Response:
        who = self.engine.principal(request)
        rows = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM devices WHERE profile_id = ? AND storage = 1 ORDER BY storage_since", (who.profile_id,)
            ).fetchall()
        )
        out = []
        for r in rows:
            d = self.storage.device_dir(r["id"])
            copies = sum(1 for f in d.iterdir() if not f.name.startswith(".")) if d.exists() else 0
            out.append({**self.record(r), "registeredAt": iso(r["storage_since"]), "copies": copies})
        return JSONResponse(out)

    def routes(self) -> list[Route]:
        g = lambda h: guarded(self.opts, h)  # noqa: E731
        return [
            Route("/device/request-unique-identifier", g(self.request_identifier), methods=["POST"]),
            Route("/device/request-device-id", g(self.request_identifier), methods=["POST"]),
            Route("/device/retrieve-unique-identifier", g(self.retrieve_identifier), methods=["POST"]),
            Route("/device/retrieve-device-id/{command_id}", g(self.retrieve_identifier), methods=["GET"]),
            Route("/device/retrieve-profile-devices", g(self.list_devices), methods=["GET"]),
            Route(
                "/device/configure-meta",
                g(device_command(self.engine, "configure-device-meta", self.meta_params)),
                methods=["POST"],
            ),
            Route(
                "/device/configure-device-meta",
                g(device_command(self.engine, "configure-device-meta", self.meta_params)),
                methods=["POST"],
            ),
            Route("/device/approve-device", g(device_command(self.engine, "approve-device")), methods=["POST"]),
            Route("/device/reject-device", g(device_command(self.engine, "reject-device")), methods=["POST"]),
            Route("/device/download-device-configuration", g(self.download_configuration), methods=["POST"]),
            Route("/device/remove", g(device_command(self.engine, "remove-device")), methods=["POST"]),
            Route("/device/remove-device", g(device_command(self.engine, "remove-device")), methods=["POST"]),
            Route("/storage/register", g(device_command(self.engine, "register-storage-device")), methods=["POST"]),
            Route(
                "/storage/register-storage-device",
                g(device_command(self.engine, "register-storage-device")),
                methods=["POST"],
            ),
            Route("/storage/list-storage-devices", g(self.list_storage), methods=["GET"]),
            Route("/storage/remove", g(device_command(self.engine, "remove-storage-device")), methods=["POST"]),
            Route("/storage/remove-storage", g(device_command(self.engine, "remove-storage-device")), methods=["POST"]),
        ]


def routes(engine: Engine) -> list[Route]:
    return DeviceApi(engine).routes()
