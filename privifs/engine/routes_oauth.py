"""OAuth application group, the live flow of the reference's section 5.3: register (the command
id is the application id), single-use configuration retrieval, authorization code requested with
a nonce, code retrieved with Basic client credentials, access token, refresh rotating both
tokens, application list and scope. Access tokens work wherever authorization tokens do."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import sqlite3
import time
from urllib.parse import urlparse

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.engine.commands import Outcome, Rejected
from privifs.engine.core import Engine
from privifs.engine.http import (
    ApiError,
    Form,
    command_accepted,
    guarded,
    invalid,
    iso,
    not_found,
    query_form,
    read_form,
    token_hash,
    unauthorized,
)


def _basic(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    return value.strip()


def _scopes(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        for s in v.replace(" ", ",").split(","):
            if s.strip() and s.strip() not in out:
                out.append(s.strip())
    return out or ["all"]


# -- command appliers: run by the command runner inside its transaction (registered in
# privifs/engine/features.py) ---------------------------------------------------------------------
def apply_register(conn, params, profile_id, cid) -> Outcome:
    conn.execute(
        "INSERT INTO oauth_apps (id, profile_id, name, redirect_uri, scopes, client_id, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            cid,
            profile_id,
            params["name"],
            params["redirect_uri"],
            json.dumps(params["scopes"]),
            "cli-" + secrets.token_hex(12),
            time.time(),
        ),
    )
    return Outcome()


def apply_request_code(conn, params, profile_id, cid) -> Outcome:
    if conn.execute("SELECT 1 FROM oauth_apps WHERE id = ?", (params["app_id"],)).fetchone() is None:
        raise Rejected("oauth.application_not_found")
    return Outcome()


class OAuthApi:
    """The OAuth group's handlers (one method each) and its route table."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.opts = engine.opts
        self.db = engine.db

    def app_by_client(self, client_id: str) -> sqlite3.Row | None:
        return self.db.read(
            lambda c: c.execute("SELECT * FROM oauth_apps WHERE client_id = ?", (client_id,)).fetchone()
        )

    def client_credentials(self, request: Request) -> sqlite3.Row:
        """The app named by ``Authorization: Basic base64(clientId:clientSecret)``; 401 otherwise."""
        value = _basic(request)
        if value is None:
            raise unauthorized("missing client credentials")
        try:
            client_id, sep, secret = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise unauthorized("invalid client credentials") from None
        app = self.app_by_client(client_id) if sep else None
        if (
            app is None
            or app["secret_hash"] is None
            or not secrets.compare_digest(app["secret_hash"], token_hash(secret))
        ):
            raise unauthorized("invalid client credentials")
        return app

    def accepted(self, kind: str, cid: str) -> Response:
        return command_accepted(self.opts, kind, cid, empty=self.opts.oauth_accept_shape == "empty")

    # -- register and configuration ------------------------------------------------------
    async def register(self, request: Request) -> Response:
        who = self.engine.principal(request)
        form = await read_form(request)
        name = form.get("name") if form.get("name") is not None else form.get("title")
        if name is None or not name.strip():
            raise invalid("name", "this field is required")
        Form._check("name", name, 256, False)
        redirect = form.get("redirectUri") if form.get("redirectUri") is not None else form.get("redirect_uri")
        if redirect is None:
            raise invalid("redirectUri", "this field is required")
        Form._check("redirectUri", redirect, 2048, False)
        parsed = urlparse(redirect)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise invalid("redirectUri", "must be an http(s) URL")
        scopes = _scopes(form.getlist("scopes") + form.getlist("scopes[]"))
        cid = await self.engine.runner.submit(
            "oauth-application-register", who.profile_id, {"name": name, "redirect_uri": redirect, "scopes": scopes}
        )
        return self.accepted("oauth-application-register", cid)

    async def configuration(self, request: Request) -> Response:
        who = self.engine.principal(request)
        app_id = request.path_params.get("application_id") or (await read_form(request)).required(
            "applicationId", max_len=256
        )
        app = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM oauth_apps WHERE id = ? AND profile_id = ?", (app_id, who.profile_id)
            ).fetchone()
        )
        if app is None:
            raise not_found()
        secret = "shh-" + secrets.token_urlsafe(32)

        def claim(conn) -> int:
            return conn.execute(
                "UPDATE oauth_apps SET config_retrieved = 1, secret_hash = ? WHERE id = ? AND config_retrieved = 0",
                (token_hash(secret), app_id),
            ).rowcount

        if await self.db.write(claim) == 0:
            raise ApiError(422, "oauth.already_retrieved", {"applicationId": ["oauth.already_retrieved"]})
        return JSONResponse(
            {
                "applicationId": app["id"],
                "clientId": app["client_id"],
                "clientSecret": secret,
                "redirectUri": app["redirect_uri"],
                "scopes": json.loads(app["scopes"]),
            }
        )

    # -- authorization code --------------------------------------------------------------
    async def request_code(self, request: Request) -> Response:
        who = self.engine.principal(request)
        q = query_form(request)
        if request.method == "POST":
            body = await read_form(request)
            for k, v in body.fields.items():
                q.fields.setdefault(k, v)
        client_id = q.get("client_id") or q.get("clientId")
        if not client_id:
            raise invalid("client_id", "this field is required")
        nonce = q.get("nonce") or q.get("state")
        if not nonce:
            raise invalid("nonce", "this field is required")
        Form._check("nonce", nonce, 256, False)
        app = self.app_by_client(client_id[:256])
        if app is None:
            raise not_found()
        scopes = _scopes(q.getlist("scope[]") + q.getlist("scopes") + q.getlist("scope"))

        def also(conn, cid) -> None:
            conn.execute(
                "INSERT INTO oauth_codes (command_id, app_id, profile_id, nonce, scopes, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (cid, app["id"], who.profile_id, nonce, json.dumps(scopes), time.time()),
            )

        try:
            cid = await self.engine.runner.submit(
                "oauth-application-request-authorization-code", who.profile_id, {"app_id": app["id"]}, also
            )
        except sqlite3.IntegrityError:
            raise invalid("nonce", "this nonce was already used for this application") from None
        return self.accepted("oauth-application-request-authorization-code", cid)

    async def retrieve_code(self, request: Request) -> Response:
        app = self.client_credentials(request)
        form = await read_form(request)
        cid = form.required("id", max_len=256)
        nonce = form.required("nonce", max_len=256)
        row = self.db.read(
            lambda c: c.execute(
                "SELECT o.*, m.status FROM oauth_codes o JOIN commands m ON m.id = o.command_id"
                " WHERE o.command_id = ? AND o.app_id = ?",
                (cid, app["id"]),
            ).fetchone()
        )
        if row is None or row["status"] != 2:
            raise not_found()
        if not secrets.compare_digest(row["nonce"], nonce):
            raise invalid("nonce", "does not match the nonce of the authorization request")
        code = secrets.token_urlsafe(32)

        def claim(conn) -> int:
            return conn.execute(
                "UPDATE oauth_codes SET code_hash = ?, code_retrieved = 1 WHERE command_id = ? AND code_retrieved = 0",
                (token_hash(code), cid),
            ).rowcount

        if await self.db.write(claim) == 0:
            raise ApiError(422, "oauth.already_retrieved", {"id": ["oauth.already_retrieved"]})
        return JSONResponse({"authorizationCode": code})

    # -- tokens --------------------------------------------------------------------------
    def token_answer(
        self, app: sqlite3.Row, access: str, access_exp: float, refresh: str, refresh_exp: float, scopes: list[str]
    ) -> Response:
        if self.opts.oauth_shape == "guide":
            return JSONResponse(
                {
                    "accessToken": access,
                    "tokenType": "Bearer",
                    "expiresIn": int(access_exp - time.time()),
                    "refreshToken": refresh,
                    "scope": " ".join(scopes),
                }
            )
        return JSONResponse(
            {
                "clientId": app["client_id"],
                "token": access,
                "refreshToken": refresh,
                "type": "bearer",
                "scope": " ".join(scopes),
                "expiresAt": iso(access_exp),
                "refreshTokenExpiresAt": iso(refresh_exp),
            }
        )

    def issue_pair(self, conn, app: sqlite3.Row, profile_id: str, scopes: list[str]):
        access, access_exp = self.engine.issue_token(
            conn, profile_id, self.opts.oauth_token_ttl, kind="oauth", app_id=app["id"]
        )
        refresh = "R-" + secrets.token_urlsafe(32)
        refresh_exp = time.time() + self.opts.oauth_refresh_ttl
        conn.execute(
            "INSERT INTO oauth_refresh (token_hash, app_id, profile_id, access_hash, scopes, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (token_hash(refresh), app["id"], profile_id, token_hash(access), json.dumps(scopes), refresh_exp),
        )
        return access, access_exp, refresh, refresh_exp

    async def obtain_token(self, request: Request) -> Response:
        form = await read_form(request)
        code = form.get("authorization_code") or form.get("code")
        basic = _basic(request)
        app = None
        try:
            app = self.client_credentials(request)
        except ApiError:
            # the API docs' example sends the authorization code itself as the Basic credential
            if basic is None or code is not None:
                raise
            code = basic
        if not code:
            raise invalid("authorization_code", "this field is required")
        code_h = token_hash(code)

        def work(conn):
            row = conn.execute("SELECT * FROM oauth_codes WHERE code_hash = ?", (code_h,)).fetchone()
            if row is None or row["code_used"] or (app is not None and row["app_id"] != app["id"]):
                return None
            conn.execute("UPDATE oauth_codes SET code_used = 1 WHERE command_id = ?", (row["command_id"],))
            the_app = conn.execute("SELECT * FROM oauth_apps WHERE id = ?", (row["app_id"],)).fetchone()
            scopes = json.loads(row["scopes"])
            return (the_app, scopes, *self.issue_pair(conn, the_app, row["profile_id"], scopes))

        result = await self.db.write(work)
        if result is None:
            raise unauthorized("invalid or already used authorization code")
        return self.token_answer(*result[:1], *result[2:], result[1])

    async def refresh_token(self, request: Request) -> Response:
        form = await read_form(request)
        refresh = form.get("refresh_token") or form.get("refreshToken")
        if not refresh:
            raise invalid("refresh_token", "this field is required")
        basic = _basic(request)
        if basic is None:
            raise unauthorized("missing Basic credentials")
        client_app = None
        try:
            client_app = self.client_credentials(request)
        except ApiError:
            pass
        r_hash = token_hash(refresh)

        def work(conn):
            row = conn.execute("SELECT * FROM oauth_refresh WHERE token_hash = ?", (r_hash,)).fetchone()
            if row is None or row["used"] or row["expires_at"] <= time.time():
                return None
            if client_app is not None:
                if client_app["id"] != row["app_id"]:
                    return None
            elif not secrets.compare_digest(token_hash(basic), row["access_hash"]):
                return None  # the live flow sends the raw current access token as the Basic value
            conn.execute("UPDATE oauth_refresh SET used = 1 WHERE token_hash = ?", (r_hash,))
            conn.execute("UPDATE auth_tokens SET revoked = 1 WHERE token_hash = ?", (row["access_hash"],))
            app = conn.execute("SELECT * FROM oauth_apps WHERE id = ?", (row["app_id"],)).fetchone()
            scopes = json.loads(row["scopes"])
            return (row["access_hash"], app, scopes, *self.issue_pair(conn, app, row["profile_id"], scopes))

        result = await self.db.write(work)
        if result is None:
            raise unauthorized("invalid, expired or already used refresh token")
        old_access, app, scopes = result[:3]
        self.engine.hub.token_changed(old_access, None)
        return self.token_answer(app, *result[3:], scopes)

    async def app_list(self, request: Request) -> Response:
        who = self.engine.principal(request)
        rows = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM oauth_apps WHERE profile_id = ? ORDER BY created_at", (who.profile_id,)
            ).fetchall()
        )
        items = [
            {
                "applicationId": r["id"],
                "name": r["name"],
                "scopes": json.loads(r["scopes"]),
                "redirectUri": r["redirect_uri"],
                "clientId": r["client_id"],
                "createdAt": iso(r["created_at"]),
            }
            for r in rows
        ]
        return JSONResponse({"items": items, "meta": {"count": len(items)}})

    async def scope(self, request: Request) -> Response:
        basic = _basic(request)
        raw = basic if basic is not None else request.headers.get("x-dpt-authorization")
        th = token_hash(raw or "")
        row = self.db.read(
            lambda c: c.execute(
                "SELECT t.app_id, t.expires_at, t.revoked, a.client_id, a.scopes FROM auth_tokens t"
                " JOIN oauth_apps a ON a.id = t.app_id WHERE t.token_hash = ? AND t.kind = 'oauth'",
                (th,),
            ).fetchone()
        )
        if row is None or row["revoked"] or row["expires_at"] <= time.time():
            raise unauthorized("invalid token")
        grant = self.db.read(
            lambda c: c.execute("SELECT scopes FROM oauth_refresh WHERE access_hash = ?", (th,)).fetchone()
        )
        return JSONResponse(
            {
                "applicationId": row["app_id"],
                "clientId": row["client_id"],
                "scope": json.loads(grant["scopes"]) if grant else json.loads(row["scopes"]),
            }
        )

    def routes(self) -> list[Route]:
        g = lambda h: guarded(self.opts, h)  # noqa: E731
        return [
            Route("/profile/oauth-application-register", g(self.register), methods=["POST"]),
            Route("/oauth/register", g(self.register), methods=["POST"]),
            Route("/oauth/register-oauth-application", g(self.register), methods=["POST"]),
            Route("/profile/retrieve-oauth-application-configuration", g(self.configuration), methods=["POST"]),
            Route("/oauth/retrieve-oauth-app-configuration/{application_id}", g(self.configuration), methods=["GET"]),
            Route("/profile/oauth-application-request-authorization-code", g(self.request_code), methods=["GET"]),
            Route("/oauth/request-oauth-app-authorization-code", g(self.request_code), methods=["POST"]),
            Route("/oauth-application/retrieve-authorization-code", g(self.retrieve_code), methods=["POST"]),
            Route("/oauth-application/obtain-access-token", g(self.obtain_token), methods=["POST"]),
            Route("/oauth-application/refresh-access-token", g(self.refresh_token), methods=["POST"]),
            Route("/oauth/refresh-oauth-app-access-token", g(self.refresh_token), methods=["POST"]),
            Route("/profile/retrieve-oauth-application-list", g(self.app_list), methods=["GET"]),
            Route("/oauth/oauth-application-list", g(self.app_list), methods=["GET"]),
            Route("/oauth-application/retrieve-oauth-application-scope", g(self.scope), methods=["GET", "POST"]),
        ]


def routes(engine: Engine) -> list[Route]:
    return OAuthApi(engine).routes()
