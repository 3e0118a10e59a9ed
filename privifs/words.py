"""Words in what commands and the mount say: counted nouns ("1 change", "2 changes") and text
made safe to print."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``count(1, "change")`` is "1 change"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def verb(n: int, singular: str, plural: str) -> str:
    """The form of a verb agreeing with ``n`` subjects: ``verb(1, "stays", "stay")``."""
    return singular if n == 1 else plural


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: each character that is not printable (control
    characters, escape sequences' ESC, bidirectional overrides, line breaks) shown as its Python
    escape (``\\x1b``, ``\\n``, ``\\u202e``), so a name another application gave a token cannot
    change the terminal or split a line of output."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
