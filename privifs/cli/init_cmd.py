"""``privifs init``: write the configuration and keys, and optionally provision a new profile.

Server URLs and credentials come from ``PRIVICORE_API_URL``, ``PRIVICORE_WS_URL``,
``PRIVICORE_UPSTREAM_URL``, ``PRIVICORE_DOWNSTREAM_URL``, ``PRIVICORE_USERNAME`` and
``PRIVICORE_PASSWORD`` (or a prompt, or ``--password-file``), never from arguments. With no
server given, privifs provisions a profile on its embedded engine.
"""
from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
from pathlib import Path

import trio

from privifs import paths
from privifs.client.provision import register_profile
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.client.urls import validate_urls
from privifs.config import Config, default_config_path, save
from privifs.crypto.keys import generate_aes_key_file, generate_identity, key_id, load_aes_key, write_secret_file
from privifs.embedded import EmbeddedEngine
from privifs.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("init", help="write the configuration and keys (and register a profile)",
                       description=__doc__)
    p.add_argument("--register", action="store_true", help="register a new profile on the server")
    p.add_argument("--password-file", type=Path, help="read the password from this file")
    p.add_argument("--key-file", type=Path, help="use this existing AES key file instead of creating one")
    p.add_argument("--force", action="store_true", help="replace an existing configuration")
    p.set_defaults(func=run)


def _password(args: argparse.Namespace, confirm: bool) -> str:
    if args.password_file is not None:
        try:
            return args.password_file.read_text().rstrip("\n")
        except OSError as exc:
            raise ConfigError(f"cannot read {args.password_file}: {exc.strerror}") from None
    env = os.environ.get("PRIVICORE_PASSWORD")
    if env:
        return env
    if not sys.stdin.isatty():
        raise ConfigError("no password: set PRIVICORE_PASSWORD, use --password-file, or run on a terminal")
    pw = getpass.getpass("Privicore password: ")
    if confirm and getpass.getpass("Repeat the password: ") != pw:
        raise ConfigError("the passwords differ")
    return pw


def _username() -> str:
    env = os.environ.get("PRIVICORE_USERNAME")
    if env:
        return env
    if not sys.stdin.isatty():
        raise ConfigError("no username: set PRIVICORE_USERNAME or run on a terminal")
    return input("Privicore username: ").strip()


def run(args: argparse.Namespace) -> int:
    cfg_path = args.config or default_config_path()
    if cfg_path.exists() and not args.force:
        raise ConfigError(f"{cfg_path} already exists; use --force to replace it")
    cfg_dir = paths.private_dir(cfg_path.parent)
    cfg = Config(path=cfg_path)
    api = os.environ.get("PRIVICORE_API_URL")
    engine = None
    if api:
        cfg.embedded = False
        cfg.api = api.rstrip("/")
        cfg.ws = os.environ.get("PRIVICORE_WS_URL")
        cfg.upstream = os.environ.get("PRIVICORE_UPSTREAM_URL")
        cfg.downstream = os.environ.get("PRIVICORE_DOWNSTREAM_URL")
        cfg.username = _username()
        password = _password(args, confirm=args.register)
        register_new = args.register
    else:
        cfg.embedded = True
        cfg.username = os.environ.get("PRIVICORE_USERNAME") or f"privifs-{secrets.token_hex(4)}@localhost"
        password = os.environ.get("PRIVICORE_PASSWORD") or secrets.token_urlsafe(24)
        register_new = True
    # the AES key: an existing one, or a new one
    if args.key_file is not None:
        key = load_aes_key(args.key_file.expanduser())
        cfg.aes_key_file = args.key_file.expanduser().resolve()
    else:
        cfg.aes_key_file = cfg_dir / "aes.key"
        key = load_aes_key(cfg.aes_key_file) if cfg.aes_key_file.exists() else generate_aes_key_file(cfg.aes_key_file)
    cfg.key_id = key_id(key)
    cfg.password_file = cfg_dir / "password"
    cfg.password_file.unlink(missing_ok=True)
    write_secret_file(cfg.password_file, password.encode())
    try:
        if cfg.embedded:
            engine = EmbeddedEngine()
            urls = engine.ensure()
        else:
            urls = trio.run(validate_urls, cfg.endpoints())  # scheme and reachability of all four
        endpoints = Endpoints.from_dict(urls)
        if register_new:
            identity, public = generate_identity()
            cfg.identity_key_file = cfg_dir / "identity.key"
            cfg.identity_key_file.unlink(missing_ok=True)
            write_secret_file(cfg.identity_key_file, identity.hex().encode())
            trio.run(register_profile, endpoints, cfg.username, password, public)
        else:
            trio.run(_check_login, endpoints, cfg.username, password)
    finally:
        if engine is not None:
            engine.stop()
    save(cfg)
    print(f"configuration: {cfg_path}")
    print(f"server:        {cfg.server_label()}")
    print(f"username:      {cfg.username}{' (registered now)' if register_new else ''}")
    print(f"AES key:       {cfg.aes_key_file}  (fingerprint {cfg.key_id})")
    print("Keep a copy of the AES key somewhere safe: without it the vault's data cannot be decrypted, "
          "by anyone.")
    return 0


async def _check_login(endpoints: Endpoints, username: str, password: str) -> None:
    from privifs.client.connect import connect

    async with connect(endpoints, PasswordCredentials(username, password)):
        pass
