"""Authorization: log in (username/password or OAuth access + refresh token), renew ahead of
expiry in the background, recover once from a 401, revoke on close.

Every token change is announced to listeners (the event hub re-joins its channel with it).
Renewal is single-flight: concurrent 401s trigger one renewal, and a call that failed with an
already-replaced token just retries with the new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from privifs.client import shapes
from privifs.client.transport import ClientOptions, Transport
from privifs.errors import AuthenticationError, AuthorizationError, PrivifsError, VaultChanged, VaultError

log = logging.getLogger("privifs.client.session")


@dataclass
class PasswordCredentials:
    username: str
    password: str

    def __repr__(self) -> str:
        return f"PasswordCredentials(username={self.username!r}, password=<hidden>)"


@dataclass
class OAuthCredentials:
    access_token: str
    refresh_token: str
    expires_at: float | None = None

    def __repr__(self) -> str:
        return "OAuthCredentials(<hidden>)"


Credentials = PasswordCredentials | OAuthCredentials


class Session:
    def __init__(self, transport: Transport, credentials: Credentials, options: ClientOptions):
        self.transport = transport
        self.credentials = credentials
        self.options = options
        self.token: str | None = None
        self.expires_at: float | None = None
        self.issued_at: float = 0.0
        self._lock = trio.Lock()
        self._listeners: list[Callable[[str], None]] = []
        self.await_command: Callable[[str], Awaitable[object]] | None = None
        # after each new login but the first (the server forgot this session): the check that
        # it is still the same vault (the mount's connector sets it); a failure is kept, and
        # every call of this session fails with it from then on
        self.verify: Callable[[], Awaitable[None]] | None = None
        self.failed: PrivifsError | None = None
        self.renewals = 0
        transport.auth = self

    # -- AuthProvider ----------------------------------------------------------------------
    def current_token(self) -> str | None:
        return self.token

    async def recover(self, failed_token: str | None) -> None:
        """A call was refused with 401 using ``failed_token``: get a working token (once)."""
        if self._lock.statistics().owner is trio.lowlevel.current_task():
            raise AuthorizationError("the server refused a call right after a new login", status=401)
        async with self._lock:
            if self.failed is not None:
                raise self.failed
            if self.token is not None and self.token != failed_token:
                return  # someone renewed meanwhile
            log.info("authorization refused; logging in again")
            await self._relogin_locked()

    async def _relogin_locked(self) -> None:
        """A new login, then :attr:`verify`. If it cannot tell, the next call logs in again; if
        it finds another vault (VaultChanged), no call of this session goes on."""
        await self._login_locked(fresh=True)
        if self.verify is None:
            return
        try:
            await self.verify()
        except PrivifsError as exc:
            self.token = None
            if isinstance(exc, VaultChanged):
                self.failed = exc
            raise

    def on_token_change(self, fn: Callable[[str], None]) -> None:
        self._listeners.append(fn)

    def _set(self, auth: shapes.Authorization) -> None:
        self.token = auth.token
        self.expires_at = auth.expires_at
        self.issued_at = time.time()
        if isinstance(self.credentials, OAuthCredentials):
            self.credentials.access_token = auth.token
            if auth.refresh_token:
                self.credentials.refresh_token = auth.refresh_token
            self.credentials.expires_at = auth.expires_at
        for fn in self._listeners:
            fn(auth.token)

    # -- login and renewal -------------------------------------------------------------------
    async def login(self) -> None:
        async with self._lock:
            await self._login_locked(fresh=False)

    async def _login_locked(self, *, fresh: bool) -> None:
        creds = self.credentials
        if isinstance(creds, PasswordCredentials):
            resp = await self.transport.call(
                "POST",
                "/profile/authenticate",
                data={"username": creds.username, "password": creds.password},
                auth=False,
                idempotent=True,
                expected=(200, 401),
                what="authenticate",
            )
            if resp.status_code == 401:
                raise AuthenticationError(
                    f"the server refused username {creds.username!r} with this password "
                    f"({shapes.error_message(resp)}); check PRIVICORE_USERNAME / PRIVICORE_PASSWORD or the "
                    f"password file",
                    status=401,
                )
            self._set(shapes.authorization(shapes.json_or_text(resp)))
        else:
            if fresh or creds.expires_at is not None and creds.expires_at <= time.time() + 5:
                await self._oauth_refresh_locked()
            else:
                self._set(shapes.Authorization(creds.access_token, creds.expires_at))
        if self.expires_at is None:
            await self._query_expiry()

    async def _oauth_refresh_locked(self) -> None:
        creds = self.credentials
        assert isinstance(creds, OAuthCredentials)
        resp = await self.transport.call(
            "POST",
            "/oauth-application/refresh-access-token",
            data={"refresh_token": creds.refresh_token},
            headers={"Authorization": f"Basic {creds.access_token}"},
            auth=False,
            idempotent=False,
            expected=(200, 401),
            what="refresh the OAuth access token",
        )
        if resp.status_code == 401:
            raise AuthorizationError(
                "the OAuth refresh token was refused (expired, revoked or already used); "
                "log in again with 'privifs init'",
                status=401,
            )
        self._set(shapes.oauth_tokens(shapes.json_or_text(resp)))

    async def _query_expiry(self) -> None:
        try:
            resp = await self.transport.call(
                "POST",
                "/profile/authorization-token/expiry",
                idempotent=True,
                expected=(200, 404, 405),
                what="token expiry",
            )
            if resp.status_code != 200:
                resp = await self.transport.call(
                    "GET", "/profile/retrieve-token-expiry", idempotent=True, what="token expiry"
                )
            body = shapes.json_or_text(resp)
            self.expires_at = shapes.parse_time(body.get("expiresAt")) if isinstance(body, dict) else None
        except VaultError as exc:
            log.warning("could not learn when the authorization token expires: %s", exc)

    async def renew(self) -> None:
        """Renew proactively: reauthorize (sync or async answer), else log in again."""
        async with self._lock:
            self.renewals += 1
            if isinstance(self.credentials, OAuthCredentials):
                await self._oauth_refresh_locked()
                return
            try:
                resp = await self.transport.call(
                    "POST",
                    "/profile/reauthorize-authorization-token",
                    data={"ttl": str(self.options.reauthorize_ttl)},
                    expected=(200, 202),
                    what="reauthorize",
                )
                if resp.status_code == 200:
                    self._set(shapes.authorization(shapes.json_or_text(resp)))
                else:
                    if self.await_command is not None:
                        await self.await_command(shapes.command_id(resp))
                    old = self.expires_at
                    await self._query_expiry()
                    if self.expires_at is None or (old is not None and self.expires_at <= old):
                        raise AuthorizationError("reauthorize did not extend the token")
                    self.issued_at = time.time()
            except PrivifsError as exc:
                if self.failed is not None:
                    raise self.failed from None
                log.info("reauthorize failed (%s); logging in again", exc)
                await self._relogin_locked()

    def seconds_until_renewal(self) -> float:
        if self.expires_at is None:
            return 3600.0
        lifetime = max(1.0, self.expires_at - self.issued_at)
        margin = min(self.options.renew_margin, lifetime * 0.25)
        return max(0.0, self.expires_at - margin - time.time())

    async def keep_fresh(self, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        failures = 0
        while True:
            await trio.sleep(self.seconds_until_renewal() if failures == 0 else min(30.0, 2.0**failures))
            try:
                await self.renew()
                failures = 0
            except PrivifsError as exc:
                failures += 1
                log.warning("could not renew the authorization token: %s", exc)

    async def revoke(self) -> None:
        if self.token is None or isinstance(self.credentials, OAuthCredentials):
            return
        try:
            with trio.move_on_after(5):
                await self.transport.call(
                    "POST", "/profile/revoke-authorization-token", expected=(200, 204, 401), what="revoke"
                )
        except VaultError as exc:
            log.debug("revoking the token failed: %s", exc)
        self.token = None
