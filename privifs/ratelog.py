"""Warnings that repeat by the thousand (every upload on a full disk, every request in a flood),
logged at most once every few seconds per kind, the next line saying how many it stood for.

One logged line per event ate a full disk's freed space as fast as it was freed (helper hAM F1:
about 2,000 lines a minute from the engine, as many again from a mount retrying its uploads)."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable


class RateLimitedWarnings:
    """Warnings to ``logger``, one per :attr:`every` seconds per kind; the others are counted."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[Hashable, float] = {}
        self._quiet: dict[Hashable, int] = {}

    def warn(self, kind: Hashable, text: str, *args: object) -> bool:
        """Log ``text % args`` unless a warning of ``kind`` was logged less than :attr:`every`
        seconds ago; returns whether it was logged."""
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) < self.every:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return False
        self._last[kind] = now
        quiet = self._quiet.pop(kind, 0)
        if quiet:
            text += " (and %d more like it in the last %.0f s)"
            args = (*args, quiet, self.every)
        self.logger.warning(text, *args)
        return True
