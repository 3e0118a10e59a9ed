"""From a configuration to a working connection: endpoints (starting the embedded engine when
needed), credentials, and the AES key (checked against the configured key fingerprint)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

from privifs.client.session import Credentials, OAuthCredentials, PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.config import Config
from privifs.crypto.keys import key_id, load_aes_key
from privifs.embedded import EmbeddedEngine
from privifs.errors import ConfigError, KeyFileError, WrongKeyError


@dataclass
class Account:
    endpoints: Endpoints
    credentials: Credentials
    key: bytes

    def __repr__(self) -> str:
        return f"Account({self.endpoints.api!r}, <credentials and key hidden>)"


def credentials(cfg: Config) -> Credentials:
    if cfg.oauth_file is not None:
        try:
            data = json.loads(cfg.oauth_file.read_text())
            return OAuthCredentials(data["accessToken"], data["refreshToken"], data.get("expiresAt"))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read the OAuth token file {cfg.oauth_file}: {exc}") from None
    if not cfg.username:
        raise ConfigError(f"no username in {cfg.path}; run 'privifs init'")
    return PasswordCredentials(cfg.username, cfg.password())


def aes_key(cfg: Config) -> bytes:
    if cfg.aes_key_file is None:
        raise KeyFileError(f"no AES key file is configured in {cfg.path}; run 'privifs init'")
    key = load_aes_key(cfg.aes_key_file)
    if cfg.key_id and key_id(key) != cfg.key_id:
        raise WrongKeyError(f"the AES key in {cfg.aes_key_file} is not the key this configuration was created "
                            f"with (fingerprint {key_id(key)}, expected {cfg.key_id}); restore the right key file")
    return key


@contextmanager
def open_account(cfg: Config):
    """Yield an :class:`Account`; an embedded engine started for it stops afterwards."""
    key = aes_key(cfg)
    creds = credentials(cfg)
    engine = None
    if cfg.embedded:
        engine = EmbeddedEngine()
        urls = engine.ensure()
    else:
        if not cfg.api:
            raise ConfigError(f"no server URL in {cfg.path}; run 'privifs init'")
        urls = cfg.endpoints()
    try:
        yield Account(Endpoints.from_dict(urls), creds, key)
    finally:
        if engine is not None:
            engine.stop()
