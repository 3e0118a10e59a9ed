"""The user's configuration: which server, which account, which keys, mount defaults.

Stored as TOML at ``$PRIVIFS_CONFIG`` or ``~/.config/privifs/config.toml`` (mode 0600). Secrets
are never in it: the password lives in its own 0600 file, keys in theirs, next to it; the config
only points at them. ``server.embedded = true`` means privifs runs its own local engine.

A secret file is never overwritten (:func:`place_secret`): an existing one with the same content
is reused, one with other content makes the command stop and say so.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from privifs import paths
from privifs.crypto.keys import write_secret_file
from privifs.errors import ConfigError

SECRET_NAMES = {
    "aes_key_file": "aes.key",
    "password_file": "password",
    "identity_key_file": "identity.key",
    "oauth_file": "oauth.json",
}


def place_secret(path: Path, data: bytes, what: str) -> Path:
    """Make ``path`` a 0600 file holding ``data``, unless it already does; never overwrite a
    different secret (the caller must not lose a key or password by mistake)."""
    try:
        existing = path.read_bytes()
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise ConfigError(f"cannot read the existing {what} file {path}: {exc.strerror}") from None
    if existing is not None:
        if existing.strip() == data.strip():
            return path
        raise ConfigError(
            f"{path} already holds a different {what}; privifs never overwrites a secret: "
            f"move it away first if you really mean to replace it"
        )
    try:
        write_secret_file(path, data)
    except FileExistsError:
        raise ConfigError(f"{path} appeared while privifs was writing it; run the command again") from None
    except OSError as exc:
        raise ConfigError(f"cannot write the {what} file {path}: {exc.strerror}") from None
    return path


def check_config_path(path: Path) -> Path:
    """Refuse a configuration path named like one of the secrets privifs keeps beside it
    (``--config DIR/aes.key``): the configuration would be written over that secret."""
    if path.name in SECRET_NAMES.values():
        raise ConfigError(
            f"the configuration {path} would be written over the {path.name} secret privifs keeps "
            f"beside it; name the configuration file otherwise (e.g. {path.with_name('config.toml')})"
        )
    return path


def check_not_shared(path: Path) -> None:
    """Refuse a configuration ``path`` that another local user may replace: the file, its
    directory (where the key and password files live) or any directory above them writable by
    all users (a directory with the sticky bit, like /tmp, is not: others cannot replace what is
    in it), or the file or its directory owned by another user than the caller and root. Such a
    user could point the configuration at a server and a key of their own and read what is
    stored next; ssh refuses its files in those cases too."""
    shared = paths.shared_with_others(path)
    if shared is None:
        return
    raise ConfigError(
        f"{shared.place} {shared.why}: another user could replace the configuration or the keys beside it; "
        + (
            f"run 'chmod o-w {shared.place}'"
            if shared.writable
            else "run privifs as that user, or use a configuration of your own"
        )
    )


def default_config_path() -> Path:
    env = os.environ.get("PRIVIFS_CONFIG")
    return Path(env) if env else paths.config_dir() / "config.toml"


@dataclass
class Config:
    path: Path
    embedded: bool = True
    api: str | None = None
    ws: str | None = None
    upstream: str | None = None
    downstream: str | None = None
    username: str | None = None
    password_file: Path | None = None
    oauth_file: Path | None = None
    aes_key_file: Path | None = None
    identity_key_file: Path | None = None
    key_id: str | None = None
    mount: dict[str, object] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.path.parent

    def endpoints(self) -> dict[str, str | None]:
        return {"api": self.api, "ws": self.ws, "upstream": self.upstream, "downstream": self.downstream}

    def password(self) -> str:
        if self.password_file is None:
            raise ConfigError(f"no password file is configured in {self.path}; run 'privifs init'")
        try:
            password = paths.read_small(self.password_file, private=True).decode().rstrip("\n")
        except OSError as exc:
            raise ConfigError(f"cannot read the password file {self.password_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"the password file {self.password_file} is not UTF-8 text") from None
        if not password:  # (the server's answer said "HTTP 422: password must not be empty", naming no file)
            raise ConfigError(f"the password file {self.password_file} is empty; write the account's password in it")
        return password

    def server_label(self) -> str:
        return "the embedded engine" if self.embedded else (self.api or "?")

    def server_section(self) -> dict[str, object]:
        """The ``[server]`` settings, as the config file and a backup record them."""
        return {"embedded": self.embedded, **self.endpoints()}


def load(path: Path | None = None) -> Config:
    path = path or default_config_path()
    try:
        raw = tomllib.loads(paths.read_small(path).decode())
    except FileNotFoundError:
        raise ConfigError(
            f"no configuration at {path}; run 'privifs init' first (or mount with no "
            f"configuration to use the embedded engine)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read the configuration {path}: it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc}") from None
    except RecursionError:  # ([[[…]]] nested past the parser's limit: exit 70, 'internal error')
        raise ConfigError(f"cannot read the configuration {path}: it nests arrays or tables too deeply") from None
    for section in ("server", "account", "keys", "mount"):
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"cannot read the configuration {path}: '{section}' must be a [{section}] section")
    server, account, keys = raw.get("server", {}), raw.get("account", {}), raw.get("keys", {})

    def typed(section: dict, where: str, key: str, kind: type, default=None):
        """The value, checked: ``embedded = "false"`` read as true, a key file ``5`` as the path "5"."""
        value = section.get(key, default)
        if value is not None and not isinstance(value, kind):
            what = "true or false" if kind is bool else "text in quotes"
            raise ConfigError(f"{path}: [{where}] {key} = {value!r}: must be {what}")
        return value

    def text(section: dict, where: str, key: str) -> str | None:
        return typed(section, where, key, str) or None

    def p(section: dict, where: str, key: str) -> Path | None:
        """A file the configuration names: a relative path is relative to its directory."""
        value = text(section, where, key)
        return path.absolute().parent / Path(value).expanduser() if value else None

    return Config(
        path=path,
        embedded=typed(server, "server", "embedded", bool, False),
        api=text(server, "server", "api"),
        ws=text(server, "server", "ws"),
        upstream=text(server, "server", "upstream"),
        downstream=text(server, "server", "downstream"),
        username=text(account, "account", "username"),
        password_file=p(account, "account", "password_file"),
        oauth_file=p(account, "account", "oauth_file"),
        aes_key_file=p(keys, "keys", "aes_key_file"),
        identity_key_file=p(keys, "keys", "identity_key_file"),
        key_id=text(keys, "keys", "key_id"),
        mount=dict(raw.get("mount", {})),
    )


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v), ensure_ascii=False)


def _beside(cfg: Config, file: Path | None) -> Path | str | None:
    """How the configuration names ``file``: a file in its own directory (the secrets privifs
    keeps there) by its name alone, read back relative to that directory; so a home moved or
    copied elsewhere (``usermod -m``, a new machine) keeps working with its own secrets, where
    the paths written out named the old home's (helper hAO F7)."""
    if file is None or os.path.abspath(file.parent) != os.path.abspath(cfg.path.parent):
        return file
    return file.name


def save(cfg: Config) -> None:
    sections = {
        "server": cfg.server_section(),
        "account": {
            "username": cfg.username,
            "password_file": _beside(cfg, cfg.password_file),
            "oauth_file": _beside(cfg, cfg.oauth_file),
        },
        "keys": {
            "aes_key_file": _beside(cfg, cfg.aes_key_file),
            "identity_key_file": _beside(cfg, cfg.identity_key_file),
            "key_id": cfg.key_id,
        },
        "mount": cfg.mount,
    }
    lines = ["# privifs configuration (secrets live in the files it points at, never here)"]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        for k, v in values.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
    check_config_path(cfg.path)
    paths.private_dir(cfg.path.parent)
    check_not_shared(cfg.path)
    tmp = cfg.path.with_name(f".{cfg.path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, cfg.path)


def restoring_marker(cfg_path: Path) -> Path:
    """The file ``privifs restore`` keeps beside the configuration it is writing: while it is
    there, ``privifs init`` (and so a first ``privifs mount``) makes no vault in that place."""
    return cfg_path.parent / ".restore-in-progress"
