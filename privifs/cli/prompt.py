"""Reading a secret the user types (the account password, a backup passphrase): from a file
named by an option, from an environment variable, or from the terminal without echo. Never from
the command line, where other users could read it."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from privifs.cli.options import is_utf8
from privifs.errors import ConfigError
from privifs.paths import read_small


def ask_secret(noun: str, prompt: str, *, file: Path | None, env: str, flag: str, confirm: bool) -> str:
    """The secret from ``file``, else ``$env``, else a prompt (typed twice with ``confirm``)."""
    if file is not None:
        try:  # a secret other users can read is refused, as key and password files are
            return read_small(file, private=True).decode().rstrip("\n")
        except OSError as exc:
            raise ConfigError(f"cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file} is not UTF-8 text") from None
    value = env_text(env)
    if value:
        return value
    if not sys.stdin.isatty():
        raise ConfigError(f"no {noun}: set {env}, use {flag}, or run on a terminal")
    text = getpass.getpass(f"{prompt}: ")
    if confirm and getpass.getpass(f"Repeat the {noun}: ") != text:
        raise ConfigError(f"the {noun}s differ")
    return text


def env_text(name: str) -> str | None:
    """The environment variable ``name``, refused (ConfigError) if it is not valid UTF-8: its
    bytes arrive as lone surrogates, which no request and no file can carry."""
    value = os.environ.get(name)
    if value is not None and not is_utf8(value):
        raise ConfigError(f"{name} is not valid UTF-8 text")
    return value
