"""Provisioning: register a profile and its signed Curve25519 public key.

The live order (register → authenticate → register the key with the token) is tried first; when
authenticate refuses a fresh profile (the guides' order), the key is registered with username and
password and no token, then authenticate is tried again (reference section 5.1). A taken username that this password
opens and that has no public key yet (an earlier registration stopped before its key) gets the
key now, so a failed 'init --register' can simply be run again.
"""

from __future__ import annotations

import logging

from privifs.client import shapes
from privifs.client.events import Commands, EventHub
from privifs.client.session import PasswordCredentials, Session
from privifs.client.transport import ClientOptions, Endpoints, Transport
from privifs.crypto.keys import generate_identity
from privifs.errors import AuthenticationError, ConflictError

log = logging.getLogger("privifs.client.provision")


async def register_profile(
    endpoints: Endpoints, username: str, password: str, public_key: str, options: ClientOptions | None = None
) -> str:
    """Create a profile with ``public_key``; returns which order worked (``live`` or ``guide``)."""
    options = options or ClientOptions()
    transport = Transport(endpoints, options)
    session = Session(transport, PasswordCredentials(username, password), options)
    commands = Commands(transport, EventHub(None, session, options), options)  # polling only
    try:
        resp = await transport.call(
            "POST",
            "/profile/register-profile",
            data={"username": username, "password": password},
            auth=False,
            expected=(202, 200, 409),
            what="register profile",
        )
        if resp.status_code == 409:
            keyless = await _keyless(transport, session)
            if keyless is None:
                raise ConflictError(f"the username {username!r} is already taken on this server", status=409)
            if not keyless:
                raise ConflictError(
                    f"the username {username!r} is already registered on this server, and this password "
                    "opens it (an earlier 'init --register' that failed after registering it?): run "
                    "'privifs init' without --register to use it",
                    status=409,
                )
            # ours, registered by an earlier run that stopped before its key (its answer was lost,
            # the run was killed): finish it, or the profile is unusable and the name taken for good
            log.info("profile %s exists without a public key: registering the key now", username)
            order = "live"
        else:
            await commands.wait(shapes.command_id(resp), what="register profile")
            try:
                await session.login()
                order = "live"
            except AuthenticationError:
                session.token = None
                order = "guide"
        if order == "live":
            resp = await transport.call(
                "POST",
                "/public-key/register-public-key",
                data={"publicKey": public_key},
                expected=(202, 200),
                what="register public key",
            )
        else:
            resp = await transport.call(
                "POST",
                "/public-key/register-public-key",
                data={"username": username, "password": password, "publicKey": public_key},
                auth=False,
                expected=(202, 200),
                what="register public key",
            )
        if resp.status_code == 202 or resp.content.strip():
            try:
                cid = shapes.command_id(resp)
            except Exception:  # noqa: BLE001 - a 200 without an id is a synchronous success
                cid = None
            if cid:
                await commands.wait(cid, what="register public key")
        if order == "guide":
            await session.login()  # proves the profile is usable now
        await session.revoke()
        return order
    finally:
        await transport.aclose()


async def _keyless(transport: Transport, session: Session) -> bool | None:
    """Whether a taken username, which this password opens, has no public key yet (``None``: the
    password does not open it). Only the live order can tell (authenticate works before the key,
    and the key is looked up with the token); a server of the guides' order refuses to
    authenticate a keyless profile, so there it stays "already taken"."""
    try:
        await session.login()
    except AuthenticationError:
        session.token = None
        return None
    resp = await transport.call(
        "GET", "/public-key/retrieve-public-key", idempotent=True, expected=(200, 404), what="retrieve public key"
    )
    return resp.status_code == 404


def new_identity() -> tuple[bytes, str]:
    """A fresh X25519 identity: (private key, signed public key hex)."""
    return generate_identity()
