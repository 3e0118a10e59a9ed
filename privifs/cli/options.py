"""Argument types for the command line: every number, size and mode is checked when it is
parsed, so a bad value stops the command at once with a message naming the option's rule
(``--refresh-interval 0`` would otherwise re-list without pause)."""

from __future__ import annotations

import argparse
import math
import re

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text: str) -> int:
    """A positive size in bytes: ``500M``, ``2G``, ``1.5GiB``, ``65536``."""
    m = SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500M, 2G)")
    value = int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be larger than 0, not {text!r}")
    return value


def parse_octal(text: str) -> int:
    """A permission mask such as ``022`` or ``0077`` (octal, at most 777)."""
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (e.g. 022)") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"must be an octal mode between 000 and 777, not {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def seconds(minimum: float = 0.0, *, inclusive: bool = True):
    """Seconds, at least ``minimum`` (or more than it when not ``inclusive``)."""

    def parse(text: str) -> float:
        value = _number(text)
        if value < minimum or (not inclusive and value == minimum):
            rule = f"at least {minimum:g}" if inclusive else f"more than {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be {rule} seconds, not {text!r}")
        return value

    return parse


def integer(minimum: int, maximum: int | None = None):
    """A whole number between ``minimum`` and ``maximum`` (inclusive)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            rule = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {rule}, not {text!r}")
        return value

    return parse


port = integer(0, 65535)


def is_utf8(text: str) -> bool:
    """Whether ``text`` is valid UTF-8: bytes that are not (in an argument, a path or the
    environment) arrive as lone surrogates, which no request and no text file can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_text(text: str) -> str:
    """A name or context: valid UTF-8 (:func:`is_utf8`)."""
    if not is_utf8(text):
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {text.encode('utf-8', 'surrogateescape')!r}")
    return text


def file_name(text: str) -> str:
    """A token's new file name (``token mv --name``): one entry of a directory, as the mount
    shows it. An empty name went to the server (refused there, exit 1); one with a '/' was
    stored, and its listing entry ('/docs/a/b') read as a path."""
    from privifs.fs.names import NAME_MAX, entry_problem

    utf8_text(text)
    problem = entry_problem(text)  # (the mount's rule for an entry's name)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    if len(text.encode()) > NAME_MAX:
        raise argparse.ArgumentTypeError(f"the name has {len(text.encode())} bytes; a file name has at most {NAME_MAX}")
    return text


def context_path(text: str) -> str:
    """A context (directory) for a token: an absolute path as the mount shows it (``/docs``,
    ``//docs/`` is ``/docs``), with no ``.`` or ``..`` and outside privifs' own ``/.privifs``."""
    utf8_text(text)
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an absolute path (e.g. /docs)")
    parts = [p for p in text.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} has a '.' or '..' component; give the path itself (e.g. /docs)")
    if parts[:1] == [".privifs"]:
        raise argparse.ArgumentTypeError(f"{text!r} is reserved for privifs' own tokens")
    return "/" + "/".join(parts)
