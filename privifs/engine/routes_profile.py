"""Profile and public-key groups: register, authenticate, tokens (expiry, reauthorize, revoke),
password change, and the signed Curve25519 public keys (the profile's and the engine's own)."""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import time
import uuid
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.crypto.keys import verify_signed_public_key
from privifs.engine.commands import Outcome, Rejected
from privifs.engine.core import Engine
from privifs.engine.http import (
    ApiError,
    command_accepted,
    guarded,
    invalid,
    iso,
    not_found,
    overloads,
    read_form,
    unauthorized,
)
from privifs.engine.hub import Hub
from privifs.sockowner import is_loopback, server_end_owner

MIN_PASSWORD = 8
DUMMY_HASH = "scrypt$" + "00" * 16 + "$" + "00" * 32

log = logging.getLogger("privifs.engine")


def _new_password(form, name: str) -> str:
    password = form.required(name, max_len=1024)
    if len(password) < MIN_PASSWORD:
        raise invalid(name, f"must be at least {MIN_PASSWORD} characters")
    if len(set(password)) < 4:
        raise invalid(name, "is too predictable (use more different characters)")
    return password


def _public_key(form) -> str:
    key = form.required("publicKey", max_len=400)
    try:
        verify_signed_public_key(key.strip().lower())
    except ValueError as exc:
        raise invalid("publicKey", f"is not a valid signed public key: it {exc}") from None
    return key.strip().lower()


# -- command appliers: run by the command runner inside its transaction; the collaborators before
def _check_registrant(request: Request) -> None:
    """403 unless the request came from a program of this engine's user (or root) on this
    machine (``owner_registers_only``): the owner of its connection's other end, as the kernel
    tells it (:mod:`privifs.sockowner`)."""
    client, server = request.scope.get("client"), request.scope.get("server")
    owner = None
    if client and server and is_loopback(client[0]):
        owner = server_end_owner((server[0], server[1]), (client[0], client[1]))
    if owner in (os.geteuid(), 0):
        return
    who = "a program whose user cannot be told" if owner is None else f"user {owner}"
    # (one line per 10 s and kind: a local user looping over the route filled the owner's log)
    overloads.warn(
        ("registration refused", owner),
        "refused a profile registration from %s: only this engine's owner registers profiles",
        who,
    )
    raise ApiError(403, "profile.registration_closed: only the engine's owner registers profiles on this engine")


# ``conn`` are bound where they are registered (privifs/engine/features.py) --------------------
def apply_register(conn, params, profile_id, cid) -> Outcome:
    conn.execute("UPDATE profiles SET active = 1 WHERE id = ?", (params["profile_id"],))
    return Outcome()


def apply_change_password(conn, params, profile_id, cid) -> Outcome:
    conn.execute("UPDATE profiles SET pw_hash = ? WHERE id = ?", (params["pw_hash"], profile_id))
    return Outcome()


def apply_reauthorize(hub: Hub, conn, params, profile_id, cid) -> Outcome:
    expires = time.time() + int(params["ttl"])
    cur = conn.execute(
        "UPDATE auth_tokens SET expires_at = ? WHERE token_hash = ? AND revoked = 0", (expires, params["token_hash"])
    )
    if cur.rowcount == 0:
        raise Rejected("profile.token_revoked")
    out = Outcome()
    out.after_commit.append(lambda: hub.token_changed(params["token_hash"], expires))
    return out


def apply_public_key(conn, params: dict[str, Any], profile_id, cid) -> Outcome:
    conn.execute("UPDATE profiles SET public_key = ? WHERE id = ?", (params["publicKey"], profile_id))
    return Outcome()


class ProfileApi:
    """The profile and public-key groups' handlers (one method each) and their route table."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.opts = engine.opts
        self.db = engine.db

    async def register_profile(self, request: Request) -> Response:
        if self.opts.owner_registers_only:
            _check_registrant(request)
        form = await read_form(request)
        username = form.required("username", max_len=254).strip()
        password = _new_password(form, "password")
        if self.db.read(lambda c: c.execute("SELECT 1 FROM profiles WHERE username = ?", (username,)).fetchone()):
            raise ApiError(409, "username already taken")
        pw_hash = await self.engine.hash_password_async(password)
        profile_id = "prf-" + uuid.uuid4().hex[:26].upper()

        def also(conn: sqlite3.Connection, cid: str) -> None:
            conn.execute(
                "INSERT INTO profiles (id, username, pw_hash, active, created_at) VALUES (?, ?, ?, 0, ?)",
                (profile_id, username, pw_hash, time.time()),
            )

        try:
            cid = await self.engine.runner.submit("register-profile", None, {"profile_id": profile_id}, also)
        except sqlite3.IntegrityError:
            raise ApiError(409, "username already taken") from None
        return command_accepted(self.opts, "register-profile", cid)

    async def _credentials(self, form) -> sqlite3.Row:
        username = form.required("username", max_len=254).strip()
        password = form.required("password", max_len=1024)
        row = self.db.read(
            lambda c: c.execute("SELECT * FROM profiles WHERE username = ? AND active = 1", (username,)).fetchone()
        )
        ok = await self.engine.check_password_async(password, row["pw_hash"] if row else DUMMY_HASH)
        if row is None or not ok:
            raise unauthorized("invalid credentials")
        return row

    async def authenticate(self, request: Request) -> Response:
        row = await self._credentials(await read_form(request))
        if row["public_key"] is None and self.opts.unkeyed_auth == "deny":
            raise unauthorized("profile.public_key_missing: register a public key before authenticating")
        token, expires = await self.db.write(lambda c: self.engine.issue_token(c, row["id"], self.opts.token_ttl))
        return JSONResponse({"authorizationToken": token, "expiresAt": iso(expires)})

    async def retrieve_profile_id(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        return JSONResponse({"profileId": who.profile_id})

    async def change_password(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        form = await read_form(request)
        current = form.required("currentPassword", max_len=1024)
        new = _new_password(form, "newPassword")
        row = self.db.read(
            lambda c: c.execute("SELECT pw_hash FROM profiles WHERE id = ?", (who.profile_id,)).fetchone()
        )
        if not await self.engine.check_password_async(current, row["pw_hash"]):
            raise invalid("currentPassword", "does not match the current password")
        new_hash = await self.engine.hash_password_async(new)
        cid = await self.engine.runner.submit("change-password", who.profile_id, {"pw_hash": new_hash})
        return command_accepted(self.opts, "change-password", cid)

    async def reauthorize(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        form = await read_form(request)
        ttl = form.integer("ttl", minimum=1, maximum=self.opts.max_reauthorize_ttl)
        if self.opts.reauthorize_mode == "async":
            cid = await self.engine.runner.submit(
                "reauthorize-authorization-token", who.profile_id, {"token_hash": who.token_hash, "ttl": ttl}
            )
            return command_accepted(self.opts, "reauthorize-authorization-token", cid)
        token, expires = await self.db.write(lambda c: self.engine.issue_token(c, who.profile_id, ttl, kind=who.kind))
        return JSONResponse({"authorizationToken": token, "expiresAt": iso(expires)})

    async def revoke(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        await self.db.write(
            lambda c: c.execute("UPDATE auth_tokens SET revoked = 1 WHERE token_hash = ?", (who.token_hash,))
        )
        self.engine.hub.token_changed(who.token_hash, None)
        return JSONResponse({"revoked": True})

    async def expiry(self, request: Request) -> Response:
        _, expires = self.engine.principal_from_token(request.headers.get("x-dpt-authorization"))
        return JSONResponse({"expiresAt": iso(expires)})

    async def qr_token(self, request: Request) -> Response:
        self.engine.principal(request, require_key=False)
        return JSONResponse({"qrToken": secrets.token_urlsafe(24), "expiresAt": iso(time.time() + 120)})

    async def register_public_key(self, request: Request) -> Response:
        form = await read_form(request)
        if request.headers.get("x-dpt-authorization") is not None:
            who = self.engine.principal(request, require_key=False)
            profile = who.profile_id
        else:
            profile = (await self._credentials(form))["id"]
        key = _public_key(form)
        cid = await self.engine.runner.submit("register-public-key", profile, {"publicKey": key})
        return command_accepted(self.opts, "register-public-key", cid)

    async def retrieve_public_key(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        row = self.db.read(
            lambda c: c.execute("SELECT public_key FROM profiles WHERE id = ?", (who.profile_id,)).fetchone()
        )
        if row is None or row["public_key"] is None:
            raise not_found()
        return JSONResponse({"publicKey": row["public_key"]})

    async def cab_public_key(self, request: Request) -> Response:
        self.engine.principal(request, require_key=False)
        return JSONResponse({"publicKey": self.engine.cab_public_key})

    def routes(self) -> list[Route]:
        g = partial(guarded, self.opts)
        return [
            Route("/profile/register-profile", g(self.register_profile), methods=["POST"]),
            Route("/profile/authenticate", g(self.authenticate), methods=["POST"]),
            Route("/profile/retrieve-profile-id", g(self.retrieve_profile_id), methods=["GET"]),
            Route("/profile/change-password", g(self.change_password), methods=["POST"]),
            Route("/profile/reauthorize-authorization-token", g(self.reauthorize), methods=["POST"]),
            Route("/profile/revoke-authorization-token", g(self.revoke), methods=["POST"]),
            Route("/profile/authorization-token/expiry", g(self.expiry), methods=["POST"]),
            Route("/profile/retrieve-token-expiry", g(self.expiry), methods=["GET"]),
            Route("/profile/generate-token-qr", g(self.qr_token), methods=["POST"]),
            Route("/profile/generate-qr-token-for-authorization", g(self.qr_token), methods=["POST"]),
            Route("/public-key/register-public-key", g(self.register_public_key), methods=["POST"]),
            Route("/public-key/retrieve-public-key", g(self.retrieve_public_key), methods=["GET"]),
            Route("/dptcab/public-key", g(self.cab_public_key), methods=["GET"]),
            Route("/public-key/retrieve-cab-public-key", g(self.cab_public_key), methods=["GET"]),
        ]


def routes(engine: Engine) -> list[Route]:
    return ProfileApi(engine).routes()
