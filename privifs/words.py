"""Counted nouns in what commands and the mount say ("1 change", "2 changes")."""

from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``count(1, "change")`` is "1 change"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def verb(n: int, singular: str, plural: str) -> str:
    """The form of a verb agreeing with ``n`` subjects: ``verb(1, "stays", "stay")``."""
    return singular if n == 1 else plural
