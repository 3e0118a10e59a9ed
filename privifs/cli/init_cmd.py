"""privifs init: write the configuration and keys, and optionally register a new profile.

Server URLs and credentials come from PRIVICORE_API_URL, PRIVICORE_WS_URL,
PRIVICORE_UPSTREAM_URL, PRIVICORE_DOWNSTREAM_URL, PRIVICORE_USERNAME and PRIVICORE_PASSWORD
(or a prompt, or --password-file), never from arguments. With no server given, privifs uses its
embedded engine: it reuses the profile the engine's data already holds (a restored vault), or
provisions a new one when there is none.

The AES key (a new one, or a copy of --key-file) and the password are kept next to the
configuration, mode 0600, and checked against the vault before the configuration is written.
An existing key, password or identity key is never overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from privifs import paths
from privifs.account import embedded_profiles
from privifs.cli.commands import help_of
from privifs.cli.prompt import ask_secret, env_text
from privifs.client.provision import register_profile
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.client.urls import validate_urls
from privifs.config import SECRET_NAMES, Config, default_config_path, load, place_secret, restoring_marker, save
from privifs.crypto.keys import (
    AES_KEY_SIZE,
    generate_identity,
    identity_public_key,
    key_id,
    load_aes_key,
)
from privifs.embedded import EmbeddedEngine
from privifs.errors import AuthenticationError, ConfigError, KeyFileError, WrongKeyError


def register(sub) -> None:
    p = sub.add_parser("init", help=help_of("init"), description=__doc__)
    p.add_argument("--register", action="store_true", help="register a new profile on the server")
    p.add_argument("--password-file", type=Path, help="read the password from this file")
    p.add_argument(
        "--key-file",
        type=Path,
        help="use this existing AES key (copied next to the configuration) instead of a new one",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing configuration (keys and password are still never overwritten)",
    )
    p.set_defaults(func=run)


def _password(args: argparse.Namespace, confirm: bool) -> str:
    return ask_secret(
        "password",
        "Privicore password",
        file=args.password_file,
        env="PRIVICORE_PASSWORD",
        flag="--password-file",
        confirm=confirm,
    )


def _username() -> str:
    env = os.environ.get("PRIVICORE_USERNAME")
    if env:
        return env
    if not sys.stdin.isatty():
        raise ConfigError("no username: set PRIVICORE_USERNAME or run on a terminal")
    return input("Privicore username: ").strip()


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text().rstrip("\n")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


@dataclass
class Plan:
    """What init does: which account, whether it is new, and which key."""

    username: str
    password: str
    register_new: bool
    key: bytes
    key_is_new: bool


def _embedded_plan(args: argparse.Namespace, cfg_dir: Path, key: bytes | None) -> Plan:
    """The embedded engine: reuse the profile its data holds (a restored vault) or make one."""
    engine_dir = paths.embedded_engine_dir()
    known = embedded_profiles(engine_dir)
    stored_pw = _read_secret(cfg_dir / SECRET_NAMES["password_file"])
    wanted = os.environ.get("PRIVICORE_USERNAME")
    if known and not args.register:
        if wanted and wanted not in known:
            raise ConfigError(
                f"the embedded engine's data in {engine_dir} has no profile {wanted!r} (it holds {', '.join(known)})"
            )
        if not wanted and len(known) > 1:
            raise ConfigError(
                f"the embedded engine's data in {engine_dir} holds {len(known)} profiles "
                f"({', '.join(known)}); set PRIVICORE_USERNAME to the one to use"
            )
        password = stored_pw or os.environ.get("PRIVICORE_PASSWORD")
        if password is None:
            raise ConfigError(
                f"the embedded engine's data in {engine_dir} already holds a vault, but there is "
                f"no password file at {cfg_dir / 'password'}: restore it (or the whole backup "
                f"with 'privifs restore FILE'), or move {engine_dir} away to start a new vault"
            )
        username = wanted or next(iter(known))
        if not known[username]:
            # a profile without its public key: the first init that made it was killed before it
            # registered the key (register_profile finishes that with the same password); nothing
            # can be stored in it yet, so a key lost with that run is simply made again
            return Plan(username, password, True, key or os.urandom(AES_KEY_SIZE), key is None)
        if key is None:
            raise KeyFileError(
                f"the embedded engine's data in {engine_dir} already holds a vault, but there is "
                f"no AES key at {cfg_dir / 'aes.key'}: restore the vault's key (or use "
                f"'privifs init --key-file KEY'); a new key could not read it"
            )
        return Plan(username, password, False, key, False)
    username = wanted or f"privifs-{secrets.token_hex(4)}@localhost"
    password = stored_pw or os.environ.get("PRIVICORE_PASSWORD") or secrets.token_urlsafe(24)
    return Plan(username, password, True, key or os.urandom(AES_KEY_SIZE), key is None)


def _replaced_server(cfg_path: Path) -> Config | None:
    """The separate server the configuration ``init --force`` replaces names (None: the
    embedded engine). ``init --force`` run to repair it without the ``PRIVICORE_*`` settings
    made a new vault on the embedded engine instead: the next mount showed an empty drive, and
    what the old vault had staged stayed behind (helper hAM F3). One that cannot be read but
    says ``embedded = false`` or names an ``api`` is refused: which server it meant is unknown."""
    try:
        old = load(cfg_path)
    except ConfigError as exc:
        try:
            text = paths.read_small(cfg_path).decode(errors="replace")
        except OSError:
            return None
        if re.search(r"^\s*(embedded\s*=\s*false|api\s*=)", text, re.MULTILINE):
            raise ConfigError(
                f"{exc}; it was set up for a separate server: run 'privifs init --force' with that server's "
                f"PRIVICORE_API_URL (and PRIVICORE_USERNAME), or move {cfg_path} away to make a vault on the "
                "embedded engine instead"
            ) from None
        return None
    return None if old.embedded or not old.api else old


SETTINGS = (
    "PRIVICORE_API_URL",
    "PRIVICORE_WS_URL",
    "PRIVICORE_UPSTREAM_URL",
    "PRIVICORE_DOWNSTREAM_URL",
    "PRIVICORE_USERNAME",
    "PRIVICORE_PASSWORD",
)


@contextlib.contextmanager
def setup_lock(cfg_path: Path) -> Iterator[None]:
    """One set-up at a time per configuration directory (held by ``init`` and by a first
    ``mount`` making its configuration): two first mounts at once each found no profile in the
    embedded engine and registered one of their own; both mounted, each on its own vault, and the
    configuration named only one of them, so what was written to the other drive was gone after
    a remount (helper hW: 4 of 30; in 3 more both failed)."""
    fd = os.open(paths.private_dir(cfg_path.parent), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # (no file left)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def run(args: argparse.Namespace) -> int:
    with setup_lock(args.config or default_config_path()):
        return set_up(args)


def set_up(args: argparse.Namespace) -> int:
    """What ``init`` does, with :func:`setup_lock` held by the caller."""
    for name in SETTINGS:  # checked before anything is written or sent
        env_text(name)
    cfg_path = args.config or default_config_path()
    if cfg_path.exists() and not args.force:
        raise ConfigError(f"{cfg_path} already exists; use --force to replace it")
    cfg_dir = paths.private_dir(cfg_path.parent)
    if restoring_marker(cfg_path).exists():
        raise ConfigError(
            f"a restore into {cfg_dir} is running (or was interrupted): wait for it and mount "
            f"then; if it was interrupted, run 'privifs restore FILE' again (or remove "
            f"{restoring_marker(cfg_path)} to make a new vault here instead)"
        )
    key_path = cfg_dir / SECRET_NAMES["aes_key_file"]
    # the AES key: a copy of --key-file (refused if another key is already in place), or the one
    # already next to the configuration, or (later) a new one
    key = load_aes_key(key_path) if key_path.exists() else None
    if args.key_file is not None:
        given = load_aes_key(args.key_file.expanduser())
        if key is not None and key != given:
            raise KeyFileError(
                f"{key_path} already holds another AES key (fingerprint {key_id(key)}, "
                f"{args.key_file} has {key_id(given)}); privifs never overwrites a key: move "
                f"{key_path} away first if you mean to replace it"
            )
        key = given
    cfg = Config(path=cfg_path)
    api = os.environ.get("PRIVICORE_API_URL")
    kept = _replaced_server(cfg_path) if not api and cfg_path.exists() else None
    if api:
        cfg.embedded = False
        cfg.api = api.rstrip("/")
        cfg.ws = os.environ.get("PRIVICORE_WS_URL")
        cfg.upstream = os.environ.get("PRIVICORE_UPSTREAM_URL")
        cfg.downstream = os.environ.get("PRIVICORE_DOWNSTREAM_URL")
    elif kept is not None:  # the server the replaced configuration names, and its account
        cfg.embedded = False
        cfg.api, cfg.ws, cfg.upstream, cfg.downstream = kept.api, kept.ws, kept.upstream, kept.downstream
        print(f"keeping the server of {cfg_path}: {kept.server_label()} (set PRIVICORE_API_URL to use another)")
    if not cfg.embedded:
        stored = None
        if kept is not None and args.password_file is None and not os.environ.get("PRIVICORE_PASSWORD"):
            stored = _read_secret(cfg_dir / SECRET_NAMES["password_file"])
        plan = Plan(
            os.environ.get("PRIVICORE_USERNAME") or (kept.username if kept is not None else None) or _username(),
            stored or _password(args, confirm=args.register),
            args.register,
            key or os.urandom(AES_KEY_SIZE),
            key is None,
        )
    else:
        cfg.embedded = True
        plan = _embedded_plan(args, cfg_dir, key)
    cfg.username = plan.username
    cfg.password_file = cfg_dir / SECRET_NAMES["password_file"]
    cfg.aes_key_file = key_path
    cfg.key_id = key_id(plan.key)
    # secrets this run makes that nothing on the server depends on yet: removed if init fails
    # before it does (a wrong password must not leave a new key behind that then blocks
    # 'init --key-file' with "already holds another AES key")
    unused: list[Path] = []

    def keep(path: Path, data: bytes, what: str) -> None:
        existed = path.exists()
        place_secret(path, data, what)
        if not existed:
            unused.append(path)

    if plan.register_new:
        # a new profile's password and identity must be kept before the server knows them
        keep(cfg.password_file, plan.password.encode(), "password")
    if plan.key_is_new:
        # the key check the vault gets is written with this key: keep it first
        keep(key_path, plan.key.hex().encode() + b"\n", "AES key")
    engine = None
    try:
        if cfg.embedded:
            engine = EmbeddedEngine(defer_to_starter=True)  # (a mount beside it restarts its engine)
            urls = engine.ensure()
        else:
            urls = trio.run(validate_urls, cfg.endpoints())  # scheme and reachability of all four
        endpoints = Endpoints.from_dict(urls)
        if plan.register_new:
            cfg.identity_key_file = cfg_dir / SECRET_NAMES["identity_key_file"]
            identity = _read_secret(cfg.identity_key_file)
            if identity is None:
                raw, public = generate_identity()
                keep(cfg.identity_key_file, raw.hex().encode(), "identity key")
            else:
                try:
                    public = identity_public_key(bytes.fromhex(identity))
                except ValueError:
                    raise KeyFileError(f"{cfg.identity_key_file} is not an identity key; move it away") from None
            trio.run(register_profile, endpoints, cfg.username, plan.password, public)
            unused = [p for p in unused if p == key_path]  # the server knows the password and identity now
        try:
            trio.run(_check_account, endpoints, cfg.username, plan.password, plan.key)
        except (AuthenticationError, WrongKeyError):
            raise  # refused before anything was stored with the key
        except BaseException:
            unused = [p for p in unused if p != key_path]  # the vault's key check may be written with it
            raise
    except BaseException:
        for path in unused:
            path.unlink(missing_ok=True)
        raise
    finally:
        if engine is not None:
            engine.stop()
    place_secret(cfg.password_file, plan.password.encode(), "password")
    place_secret(key_path, plan.key.hex().encode() + b"\n", "AES key")
    identity_file = cfg_dir / SECRET_NAMES["identity_key_file"]
    if cfg.identity_key_file is None and identity_file.exists():
        cfg.identity_key_file = identity_file
    save(cfg)
    print(f"configuration: {cfg_path}")
    print(f"server:        {cfg.server_label()}")
    note = (
        " (registered now)"
        if plan.register_new
        else " (the vault already in the embedded engine's data)"
        if cfg.embedded
        else ""
    )
    print(f"username:      {cfg.username}{note}")
    print(f"AES key:       {cfg.aes_key_file}  (fingerprint {cfg.key_id})")
    print(
        "Keep a copy of the AES key somewhere safe (or make a backup with 'privifs backup FILE'): "
        "without it the vault's data cannot be decrypted, by anyone."
    )
    return 0


async def _check_account(endpoints: Endpoints, username: str, password: str, key: bytes) -> None:
    """Log in and check the key against the vault's key check (creating it on a new vault)."""
    from privifs.client.connect import connect
    from privifs.keycheck import verify_key

    async with connect(endpoints, PasswordCredentials(username, password)) as client:
        await verify_key(client, client.vault(key))
