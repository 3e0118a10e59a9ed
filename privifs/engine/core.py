"""The engine's shared state and the helpers every route group uses.

:class:`Engine` owns the database, blob store, options, WebSocket hub and command runner, the
engine's own identity key and the admin secret, and resolves the ``X-DPT-AUTHORIZATION`` header
to a :class:`~privifs.engine.http.Principal`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path

import trio
from starlette.requests import Request

from privifs import paths
from privifs.crypto.keys import generate_identity, identity_public_key, write_secret_file
from privifs.engine.blobs import BlobStore
from privifs.engine.commands import CommandRunner
from privifs.engine.db import Database
from privifs.engine.http import Principal, forbidden, token_hash, unauthorized
from privifs.engine.hub import Hub
from privifs.engine.options import EngineOptions
from privifs.engine.storage import StorageDevices
from privifs.errors import ConfigError

log = logging.getLogger("privifs.engine")


def _is_identity_hex(text: str) -> bool:
    """Whether ``text`` is an identity's private key as the engine writes it (64 hex digits)."""
    try:
        return len(bytes.fromhex(text)) == 32
    except ValueError:
        return False


SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}
# scrypt takes 16 MiB (128 * r * n) and a core for ~50 ms: at most this many at once. On trio's
# default thread limiter (40) a flood of wrong-password logins ran 40 at once: the engine went
# from 94 MB to 725 MB, and the blob reads and writes waited behind them for threads
PASSWORD_THREADS = 2
# a finished command's status stays pollable this long, then goes (three rows per stored file
# were kept for good: 90,000 after 30,000 files, half of a 63 MB database)
COMMAND_KEEP = 7 * 86400.0
COMMAND_SWEEP_BATCH = 5000


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, **SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, salt_hex, digest_hex = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=bytes.fromhex(salt_hex), **SCRYPT)
    return secrets.compare_digest(digest.hex(), digest_hex)


class EngineBusy(Exception):
    pass


class Engine:
    def __init__(self, data_dir: Path, opts: EngineOptions):
        self.data_dir = data_dir
        paths.private_dir(data_dir)
        self._lock = open(data_dir / "lock", "a+")
        if not paths.lock_exclusively(self._lock):
            self._lock.close()
            raise EngineBusy(f"another engine is already using {data_dir}")
        self.opts = opts
        self.db = Database(data_dir / "engine.sqlite3")
        self.blobs = BlobStore(data_dir)
        self.hub = Hub(opts)
        self.runner = CommandRunner(self.db, self.hub, opts)
        self.admin_secret = self._secret_file(
            "admin-token", lambda: secrets.token_urlsafe(32).encode(), lambda text: len(text) >= 16
        )
        cab_private = self._secret_file(
            "cab-identity.key", lambda: generate_identity()[0].hex().encode(), _is_identity_hex
        )
        self.cab_public_key = identity_public_key(bytes.fromhex(cab_private))
        self.urls: dict[str, str] = {}
        self.nursery: trio.Nursery | None = None
        # what privifs.engine.features.install turns on: async callables run for the engine's
        # lifetime, and ones run once (in the background) when it starts
        self.background: list = []
        self.at_start: list = []
        self._sweep_orphan_blobs()
        self.storage = StorageDevices(self.db, self.blobs, data_dir / "storage")
        self._passwords = trio.CapacityLimiter(PASSWORD_THREADS)

    def spawn(self, fn, *args) -> None:
        """Run ``fn(*args)`` in the background (logged if it fails)."""

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("background task %s failed", getattr(fn, "__name__", fn))

        if self.nursery is not None:
            self.nursery.start_soon(guarded)

    def _secret_file(self, name: str, make, valid) -> str:
        """The secret in the data directory's file ``name``, made by ``make()`` if there is none.
        One that is damaged is refused, not replaced (a secret file is never overwritten): a
        junk identity key ended the engine's start with an internal error, and an empty admin
        token opened the admin routes to any local process that sent no token (helper hX)."""
        path = self.data_dir / name
        if not path.exists():
            write_secret_file(path, make())
        try:
            text = path.read_bytes().decode("ascii").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the engine's {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            text = ""
        if not valid(text):
            raise ConfigError(
                f"the engine's {path} is damaged; restore it from a backup, or move it away and "
                "start the engine again to have a new one made"
            )
        return text

    def _sweep_orphan_blobs(self) -> None:
        """Remove blob files no row references (left by a crash between rename and commit). An
        inline exchange accepted (202) but not applied yet names its blob only in the command's
        parameters: that blob is kept for the command, which is applied after the start."""

        def referenced_blobs(c) -> set[str]:
            found = {
                r[0]
                for r in c.execute(
                    "SELECT blob_id FROM data_tokens UNION SELECT blob_id FROM reservations WHERE blob_id IS NOT NULL"
                )
            }
            for (params,) in c.execute(
                "SELECT params FROM commands WHERE status = 1 AND kind = 'exchange-data-for-token'"
            ):
                blob_id = json.loads(params).get("blob_id")
                if blob_id:
                    found.add(blob_id)
            return found

        referenced = self.db.read(referenced_blobs)
        for sub in self.blobs.blob_dir.iterdir():
            if sub.is_dir():
                for f in sub.iterdir():
                    if f.name not in referenced:
                        f.unlink(missing_ok=True)

    # -- authentication --------------------------------------------------------------------
    def principal_from_token(self, token: str | None) -> tuple[Principal, float]:
        if not token:
            raise unauthorized("missing authorization token")
        th = token_hash(token)
        row = self.db.read(
            lambda c: c.execute(
                "SELECT t.profile_id, t.expires_at, t.revoked, t.kind, p.public_key FROM auth_tokens t"
                " JOIN profiles p ON p.id = t.profile_id WHERE t.token_hash = ?",
                (th,),
            ).fetchone()
        )
        if row is None or row["revoked"]:
            raise unauthorized("invalid token")
        if row["expires_at"] <= time.time():
            raise unauthorized("authorization token expired")
        return Principal(row["profile_id"], th, row["kind"], row["public_key"] is not None), row["expires_at"]

    def principal(self, request: Request, *, require_key: bool = True) -> Principal:
        who, _ = self.principal_from_token(request.headers.get("x-dpt-authorization"))
        if require_key and not who.has_key:
            raise forbidden("profile.public_key_missing: register a public key first")
        return who

    def optional_principal(self, request: Request) -> Principal | None:
        if request.headers.get("x-dpt-authorization") is None:
            return None
        return self.principal(request, require_key=False)

    def issue_token(
        self, conn: sqlite3.Connection, profile_id: str, ttl: float, *, kind: str = "profile", app_id: str | None = None
    ) -> tuple[str, float]:
        token = "T-" + secrets.token_urlsafe(32)
        expires = time.time() + ttl
        conn.execute(
            "INSERT INTO auth_tokens (token_hash, profile_id, expires_at, kind, app_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (token_hash(token), profile_id, expires, kind, app_id, time.time()),
        )
        return token, expires

    async def check_password_async(self, password: str, stored: str) -> bool:
        return await trio.to_thread.run_sync(check_password, password, stored, limiter=self._passwords)

    async def hash_password_async(self, password: str) -> str:
        return await trio.to_thread.run_sync(hash_password, password, limiter=self._passwords)

    # -- housekeeping ----------------------------------------------------------------------
    async def janitor(self, interval: float = 5.0) -> None:
        """Expire unpromoted reservations (and their blobs), used downstream tokens, dead tokens."""
        failing = False
        while True:
            await trio.sleep(interval)
            try:
                await self.sweep()
            except (sqlite3.Error, OSError) as exc:  # a full disk: nothing expired is lost by waiting
                if not failing:
                    log.warning("the janitor cannot write the database (%s); trying again every %gs", exc, interval)
                failing = True
                continue
            if failing:
                log.info("the janitor can write the database again")
            failing = False

    async def sweep(self) -> None:
        now = time.time()
        doomed: list[str] = []

        def work(conn: sqlite3.Connection) -> None:
            rows = conn.execute(
                "SELECT command_id, blob_id FROM reservations WHERE expires_at <= ? AND promoted_token IS NULL", (now,)
            ).fetchall()
            for r in rows:
                if r["blob_id"]:
                    doomed.append(r["blob_id"])
            conn.execute("DELETE FROM reservations WHERE expires_at <= ? AND promoted_token IS NULL", (now,))
            conn.execute(
                "DELETE FROM reservations WHERE promoted_token IS NOT NULL AND expires_at <= ?", (now - 86400,)
            )
            conn.execute("DELETE FROM downstream WHERE expires_at <= ? OR used = 1", (now - 60,))
            conn.execute("DELETE FROM auth_tokens WHERE expires_at <= ?", (now - 86400,))
            # finished commands, a batch per sweep (a first sweep of a long-used vault is no long
            # write); pending ones stay until applied, however old
            conn.execute(
                "DELETE FROM commands WHERE rowid IN (SELECT rowid FROM commands WHERE finished_at <= ? LIMIT ?)",
                (now - COMMAND_KEEP, COMMAND_SWEEP_BATCH),
            )

        await self.db.write(work)
        for blob_id in doomed:
            self.blobs.delete(blob_id)
