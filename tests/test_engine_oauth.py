"""Engine, OAuth application group: the live flow of the reference's section 5.3."""

from __future__ import annotations

import base64
import uuid

import pytest

from tests.enginekit import command_id


def basic(client_id: str, secret: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def register_app(wire, ch, **form) -> tuple[str, dict]:
    r = await wire.post(
        "/profile/oauth-application-register",
        {"name": "privifs", "redirectUri": "https://app.example/cb", "scopes": "data-token:read", **form},
    )
    assert r.status_code == 202, r.text
    app_id = command_id(r)
    assert (await ch.wait_for("X-DPT-CAB-ID", app_id))["command_status"] == 2
    r = await wire.post("/profile/retrieve-oauth-application-configuration", {"applicationId": app_id})
    assert r.status_code == 200, r.text
    return app_id, r.json()


async def code_flow(wire, ch, config) -> dict:
    nonce = "n-" + uuid.uuid4().hex
    r = await wire.get(
        "/profile/oauth-application-request-authorization-code",
        params={"client_id": config["clientId"], "nonce": nonce, "scope[]": "all"},
    )
    assert r.status_code == 202, r.text
    cid = command_id(r)
    assert (await ch.wait_for("X-DPT-CAB-ID", cid))["command_status"] == 2
    creds = basic(config["clientId"], config["clientSecret"])
    r = await wire.http.post(
        "/oauth-application/retrieve-authorization-code", data={"id": cid, "nonce": nonce}, headers=creds
    )
    assert r.status_code == 200, r.text
    code = r.json()["authorizationCode"]
    r = await wire.http.post("/oauth-application/obtain-access-token", data={"authorization_code": code}, headers=creds)
    assert r.status_code == 200, r.text
    again = await wire.http.post(
        "/oauth-application/obtain-access-token", data={"authorization_code": code}, headers=creds
    )
    assert again.status_code == 401  # codes are single-use
    return r.json()


async def test_full_code_flow_refresh_and_access_token_use(wire):
    await wire.provision()
    async with wire.channel() as ch:
        app_id, config = await register_app(wire, ch)
        assert config["applicationId"] == app_id and config["scopes"] == ["data-token:read"]
        r = await wire.post("/profile/retrieve-oauth-application-configuration", {"applicationId": app_id})
        assert r.status_code == 422 and "oauth.already_retrieved" in r.text
        tokens = await code_flow(wire, ch, config)
        assert set(tokens) >= {
            "clientId",
            "token",
            "refreshToken",
            "type",
            "scope",
            "expiresAt",
            "refreshTokenExpiresAt",
        }
        access = tokens["token"]
        # an access token works wherever an authorization token does, WebSocket included
        profile_token, wire.token = wire.token, access
        async with wire.channel() as ch2:
            stored = await wire.store(ch2, b"via oauth")
            assert await wire.retrieve(ch2, stored) == b"via oauth"
        wire.token = profile_token
        assert (await wire.get("/profile/retrieve-profile-id", token=access)).status_code == 200
        scope = await wire.http.get(
            "/oauth-application/retrieve-oauth-application-scope", headers={"Authorization": f"Basic {access}"}
        )
        assert scope.status_code == 200 and scope.json()["scope"] == ["all"]
        # refresh with Basic <raw access token>: both tokens rotate
        r = await wire.http.post(
            "/oauth-application/refresh-access-token",
            data={"refresh_token": tokens["refreshToken"]},
            headers={"Authorization": f"Basic {access}"},
        )
        assert r.status_code == 200, r.text
        new = r.json()
        assert new["token"] != access and new["refreshToken"] != tokens["refreshToken"]
        assert (await wire.get("/profile/retrieve-profile-id", token=access)).status_code == 401
        assert (await wire.get("/profile/retrieve-profile-id", token=new["token"])).status_code == 200
        r = await wire.http.post(
            "/oauth-application/refresh-access-token",
            data={"refresh_token": tokens["refreshToken"]},
            headers={"Authorization": f"Basic {new['token']}"},
        )
        assert r.status_code == 401
        apps = (await wire.get("/profile/retrieve-oauth-application-list")).json()
        assert apps["meta"]["count"] == 1 and apps["items"][0]["applicationId"] == app_id


async def test_guide_shapes_and_api_register_names(eng, wire):
    eng.set_options(oauth_shape="guide", oauth_accept_shape="empty")
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post(
            "/profile/oauth-application-register", {"title": "legacy", "redirect_uri": "https://app.example/cb"}
        )
        assert r.status_code == 202 and r.content == b""
        app_id = r.headers["x-dpt-cab-id"]
        await ch.wait_for("X-DPT-CAB-ID", app_id)
        config = (
            await wire.post("/profile/retrieve-oauth-application-configuration", {"applicationId": app_id})
        ).json()
        tokens = await code_flow(wire, ch, config)
        assert set(tokens) == {"accessToken", "tokenType", "expiresIn", "refreshToken", "scope"}
        r = await wire.http.post(
            "/oauth-application/refresh-access-token",
            data={"grantType": "refresh_token", "refreshToken": tokens["refreshToken"]},
            headers=basic(config["clientId"], config["clientSecret"]),
        )
        assert r.status_code == 200 and r.json()["accessToken"] != tokens["accessToken"]


async def test_oauth_errors(wire):
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/profile/oauth-application-register", {"name": "x", "redirectUri": "not a url"})
        assert r.status_code == 422 and "redirectUri" in r.json()["errors"]
        r = await wire.post("/profile/oauth-application-register", {"redirectUri": "https://a.example/cb"})
        assert r.status_code == 422 and "name" in r.json()["errors"]
        _, config = await register_app(wire, ch)
        params = {"client_id": config["clientId"], "nonce": "same-nonce", "scope[]": "all"}
        r = await wire.get("/profile/oauth-application-request-authorization-code", params=params)
        assert r.status_code == 202
        cid = command_id(r)
        await ch.wait_for("X-DPT-CAB-ID", cid)
        r = await wire.get("/profile/oauth-application-request-authorization-code", params=params)
        assert r.status_code == 422 and "nonce" in r.json()["errors"]
        r = await wire.get(
            "/profile/oauth-application-request-authorization-code", params={"client_id": "cli-unknown", "nonce": "n"}
        )
        assert r.status_code == 404
        wrong = basic(config["clientId"], "wrong-secret")
        r = await wire.http.post(
            "/oauth-application/retrieve-authorization-code", data={"id": cid, "nonce": "same-nonce"}, headers=wrong
        )
        assert r.status_code == 401
        right = basic(config["clientId"], config["clientSecret"])
        r = await wire.http.post(
            "/oauth-application/retrieve-authorization-code", data={"id": cid, "nonce": "other"}, headers=right
        )
        assert r.status_code == 422
        r = await wire.http.post(
            "/oauth-application/obtain-access-token", data={"authorization_code": "bogus"}, headers=right
        )
        assert r.status_code == 401
        r = await wire.http.post(
            "/oauth-application/refresh-access-token",
            data={"refresh_token": "bogus"},
            headers={"Authorization": "Basic whatever"},
        )
        assert r.status_code == 401


@pytest.mark.parametrize(
    "path", ["/oauth-application/obtain-access-token", "/oauth-application/retrieve-authorization-code"]
)
async def test_token_endpoints_need_client_credentials(wire, path):
    r = await wire.http.post(path, data={"authorization_code": "x", "id": "y", "nonce": "z"})
    assert r.status_code in (401, 422)
