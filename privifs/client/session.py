"""Authorization: log in (username/password or OAuth access + refresh token), renew ahead of
expiry in the background, recover once from a 401, revoke on close.

Every token change is announced to listeners (the event hub re-joins its channel with it).
Renewal is single-flight: concurrent 401s trigger one renewal, and a call that failed with an
already-replaced token just retries with the new one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from privifs.client import shapes
from privifs.client.transport import ClientOptions, Transport
from privifs.errors import AuthenticationError, AuthorizationError, PrivifsError, VaultChanged, VaultError

log = logging.getLogger("privifs.client.session")

# a login the server refused is not sent again within this long (every call of a mount meeting an
# expired token would send it, and a server may lock an account that keeps sending a wrong
# password), unless the password read again (``PasswordCredentials.reread``) changed
LOGIN_RETRY = 30.0


@dataclass
class PasswordCredentials:
    username: str
    password: str
    # reads the password again (its file): after a refused login, a password changed there is
    # tried at once, so a mount goes on once the file holds the password changed elsewhere
    reread: Callable[[], str] | None = field(default=None, compare=False)

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
        # the last login the server refused (until one succeeds), when the server said so, and
        # when a call last met that refusal (trio time; ``privifs umount`` stops waiting on it)
        self.refusal: AuthenticationError | None = None
        self._refused_by_server = -math.inf
        self.refused_at: float | None = None
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
            if (
                self.refusal is not None
                and trio.current_time() - self._refused_by_server < LOGIN_RETRY
                and not self._password_changed()
            ):
                self.refused_at = trio.current_time()
                raise AuthenticationError(str(self.refusal), status=401)
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

    def _password_changed(self) -> bool:
        """Read the password again; True (and used from now on) if it is not the one refused."""
        creds = self.credentials
        if not isinstance(creds, PasswordCredentials) or creds.reread is None:
            return False
        try:
            password = creds.reread()
        except PrivifsError as exc:
            log.warning("could not read the password again: %s", exc)
            return False
        if password == creds.password:
            return False
        log.warning("the password file changed; logging in with the new password")
        creds.password = password
        return True

    def _set(self, auth: shapes.Authorization) -> None:
        self.refusal = None
        self.refused_at = None
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
                if self._password_changed():
                    await self._login_locked(fresh=fresh)
                    return
                self.refusal = AuthenticationError(
                    f"the server refused username {creds.username!r} with this password "
                    f"({shapes.error_message(resp)}); check PRIVICORE_USERNAME / PRIVICORE_PASSWORD or the "
                    f"password file",
                    status=401,
                )
                self._refused_by_server = self.refused_at = trio.current_time()
                raise AuthenticationError(str(self.refusal), status=401)
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
