"""From a configuration to a working connection: endpoints (starting the embedded engine when
needed), credentials, and the AES key (checked against the configured key fingerprint); and
which profiles an embedded engine's data already holds."""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from privifs import paths
from privifs.client.session import Credentials, OAuthCredentials, PasswordCredentials
from privifs.client.transport import ClientOptions, Endpoints
from privifs.config import Config
from privifs.crypto.keys import key_id, load_aes_key
from privifs.embedded import EmbeddedEngine
from privifs.engine.db import opened_on_a_full_disk
from privifs.errors import ConfigError, DiskFullError, KeyFileError, PrivifsError, WrongKeyError
from privifs.fs.space import open_error


@dataclass
class Account:
    endpoints: Endpoints
    credentials: Credentials
    key: bytes
    engine: EmbeddedEngine | None = None  # the embedded engine this account's server is, watched

    def server_restarting(self) -> bool:
        """Whether the server is the embedded engine and it is being started again after it died."""
        return self.engine is not None and self.engine.restarting()

    def server_restart_failure(self) -> tuple[float, str] | None:
        """(since when, why) the embedded engine, dead, could not be started again; None otherwise."""
        return self.engine.restart_failure if self.engine is not None else None

    def server_stopped(self) -> int | None:
        """The pid of the embedded engine if it is stopped (SIGSTOP): it answers nothing."""
        return self.engine.stopped_pid() if self.engine is not None else None

    def client_options(self, **settings) -> ClientOptions:
        """Client options for this account's server: connections to an embedded engine are
        checked to reach a program of this user before anything is sent (client/peers.py)."""
        return ClientOptions(server_uid=os.geteuid() if self.engine is not None else None, **settings)

    def __repr__(self) -> str:
        return f"Account({self.endpoints.api!r}, <credentials and key hidden>)"


def credentials(cfg: Config) -> Credentials:
    if cfg.oauth_file is not None:
        try:
            data = json.loads(paths.read_small(cfg.oauth_file))
            return OAuthCredentials(data["accessToken"], data["refreshToken"], data.get("expiresAt"))
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ConfigError(f"cannot read the OAuth token file {cfg.oauth_file}: {exc}") from None
    if not cfg.username:
        raise ConfigError(f"no username in {cfg.path}; run 'privifs init'")
    return PasswordCredentials(cfg.username, cfg.password(), reread=cfg.password)


def aes_key(cfg: Config) -> bytes:
    if cfg.aes_key_file is None:
        raise KeyFileError(f"no AES key file is configured in {cfg.path}; run 'privifs init'")
    key = load_aes_key(cfg.aes_key_file)
    if cfg.key_id and key_id(key) != cfg.key_id:
        raise WrongKeyError(
            f"the AES key in {cfg.aes_key_file} is not the key this configuration was created "
            f"with (fingerprint {key_id(key)}, expected {cfg.key_id}); restore the right key file"
        )
    return key


@contextmanager
def open_account(cfg: Config, *, command: bool = False):
    """Yield an :class:`Account`; an embedded engine started for it stops afterwards. ``command``:
    for a command that ends soon, which leaves restarting a mount's engine to the mount."""
    key = aes_key(cfg)
    creds = credentials(cfg)
    engine = None
    if cfg.embedded:
        data_dir = paths.embedded_engine_dir()
        if cfg.username not in embedded_usernames(data_dir):
            elsewhere = cfg.path is not None and paths.config_dir() not in Path(cfg.path).absolute().parents
            raise ConfigError(
                f"the embedded engine's data in {data_dir} does not hold this vault (profile "
                f"{cfg.username}): "
                + (
                    # mount(8) runs its helper without HOME: an fstab line's config= of another home
                    # (helper hK) was told to restore a vault that was there all along
                    f"{cfg.path} is not in this home's configuration ({paths.config_dir()}); if it was made "
                    f"with another HOME, its vault is in that home's data: mount it with that HOME (mount(8), "
                    f"so an fstab line, runs privifs with the home /etc/passwd names). Otherwise restore it "
                    if elsewhere
                    else "restore it "
                )
                + "('privifs restore FILE') or copy it back; privifs does not start an empty vault in its place"
            )
        engine = EmbeddedEngine(data_dir, defer_to_starter=command)
        urls = engine.ensure()
    else:
        if not cfg.api:
            raise ConfigError(f"no server URL in {cfg.path}; run 'privifs init'")
        urls = cfg.endpoints()
    account = Account(Endpoints.from_dict(urls), creds, key, engine)
    if engine is not None:
        engine.on_moved = account.endpoints.move_to
    try:
        yield account
    finally:
        if engine is not None:
            engine.stop()


def _unreadable(db: Path, exc: sqlite3.Error) -> PrivifsError:
    """Why the engine's database cannot be read: a full disk (SQLite calls it a "disk I/O error"
    when it cannot make its WAL files) says so and what to do, anything else names the error."""
    error = open_error(db.parent, "the embedded engine's database", exc)
    if isinstance(error, DiskFullError):
        return error
    return ConfigError(f"cannot read the embedded engine's database {db}: {exc}")


def embedded_usernames(data_dir: Path | None = None) -> list[str]:
    """The profiles an embedded engine's data directory already holds (none for a new one).

    Read straight from its database, so privifs can tell a restored vault from a fresh start
    before starting the engine; an unreadable database is a reason to stop, not to start over."""
    return list(embedded_profiles(data_dir))


def embedded_profiles(data_dir: Path | None = None) -> dict[str, bool]:
    """:func:`embedded_usernames`, each with whether its public key is registered (a first
    ``init`` killed between registering the profile and its key leaves one without)."""
    db = (data_dir or paths.embedded_engine_dir()) / "engine.sqlite3"
    if not db.exists():
        return {}

    def read() -> list:
        conn = sqlite3.connect(db, timeout=10)
        try:
            return conn.execute(
                "SELECT username, coalesce(public_key, '') != '' FROM profiles ORDER BY created_at"
            ).fetchall()
        finally:
            conn.close()

    try:
        rows = opened_on_a_full_disk(read, db.parent)  # (SQLite makes its WAL files in the reserve's room)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return {}
        raise _unreadable(db, exc) from None
    except sqlite3.Error as exc:
        raise _unreadable(db, exc) from None
    return {r[0]: bool(r[1]) for r in rows}
