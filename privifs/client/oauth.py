"""The OAuth application code flow of the reference's section 5.3, for applications acting on
behalf of a profile: register, fetch the one-time configuration, request and retrieve an
authorization code, exchange it for an access and refresh token."""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

from privifs.client import shapes
from privifs.client.connect import Client
from privifs.client.session import OAuthCredentials


@dataclass
class OAuthApp:
    application_id: str
    client_id: str
    client_secret: str

    def __repr__(self) -> str:
        return f"OAuthApp({self.application_id!r}, client_id={self.client_id!r}, secret=<hidden>)"

    def basic(self) -> dict[str, str]:
        raw = f"{self.client_id}:{self.client_secret}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


async def register_app(client: Client, name: str, redirect_uri: str, scopes: str = "all") -> OAuthApp:
    t = client.transport
    resp = await t.call(
        "POST",
        "/profile/oauth-application-register",
        data={"name": name, "redirectUri": redirect_uri, "scopes": scopes},
        expected=(202, 200),
        what="register OAuth application",
    )
    app_id = shapes.command_id(resp)
    await client.commands.wait(app_id, what="register OAuth application")
    resp = await t.call(
        "POST",
        "/profile/retrieve-oauth-application-configuration",
        data={"applicationId": app_id},
        what="retrieve OAuth configuration",
    )
    body = shapes.json_or_text(resp)
    return OAuthApp(app_id, body["clientId"], body["clientSecret"])


async def authorize(client: Client, app: OAuthApp, scopes: tuple[str, ...] = ("all",)) -> OAuthCredentials:
    """Run the code flow as ``client``'s profile; returns credentials for :func:`connect`."""
    t = client.transport
    nonce = secrets.token_urlsafe(16)
    resp = await t.call(
        "GET",
        "/profile/oauth-application-request-authorization-code",
        params=[("client_id", app.client_id), ("nonce", nonce)] + [("scope[]", s) for s in scopes],
        expected=(202, 200),
        what="request authorization code",
    )
    cid = shapes.command_id(resp)
    await client.commands.wait(cid, what="request authorization code")
    resp = await t.call(
        "POST",
        "/oauth-application/retrieve-authorization-code",
        data={"id": cid, "nonce": nonce},
        headers=app.basic(),
        auth=False,
        what="retrieve authorization code",
    )
    code = shapes.json_or_text(resp)["authorizationCode"]
    resp = await t.call(
        "POST",
        "/oauth-application/obtain-access-token",
        data={"authorization_code": code},
        headers=app.basic(),
        auth=False,
        what="obtain access token",
    )
    tokens = shapes.oauth_tokens(shapes.json_or_text(resp))
    return OAuthCredentials(tokens.token, tokens.refresh_token or "", tokens.expires_at)
