"""Warnings that repeat by the thousand (every upload on a full disk, every request in a flood),
logged at most once every few seconds per kind, the next line saying how many it stood for.

One logged line per event ate a full disk's freed space as fast as it was freed (helper hAM F1:
about 2,000 lines a minute from the engine, as many again from a mount retrying its uploads)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable


class RateLimitedWarnings:
    """Warnings to ``logger``, one per :attr:`every` seconds per kind; the others are counted.

    A kind's count is said by its next line, or, once its :attr:`every` seconds are over, by the
    next warning of any kind (a burst that stopped is not left unsaid while others go on); a
    kind quiet for that long is forgotten, so the kinds kept are those of the last few seconds."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[Hashable, float] = {}  # kind → when its last line was logged
        self._quiet: dict[Hashable, tuple[int, str]] = {}  # kind → (lines not logged, the last of them)

    def warn(self, kind: Hashable, text: str, *args: object) -> None:
        """Log ``text % args`` unless a warning of ``kind`` was logged less than :attr:`every`
        seconds ago."""
        now = time.monotonic()
        self._say_ended(now, kind)
        if now - self._last.get(kind, -math.inf) < self.every:
            quiet, _ = self._quiet.get(kind, (0, ""))
            self._quiet[kind] = (quiet + 1, text % args if args else text)
            return
        self._last[kind] = now
        quiet, _ = self._quiet.pop(kind, (0, ""))
        if quiet:
            text += " (and %d more like it in the last %.0f s)"
            args = (*args, quiet, self.every)
        self.logger.warning(text, *args)

    def _say_ended(self, now: float, but: Hashable) -> None:
        """The counts of the kinds whose period is over (``but`` says its own), and those kinds
        forgotten."""
        for kind, at in list(self._last.items()):
            if kind == but or now - at < self.every:
                continue
            del self._last[kind]
            quiet, last = self._quiet.pop(kind, (0, ""))
            if quiet:
                self.logger.warning("%d more like this in the last %.0f s, the last: %s", quiet, self.every, last)


class AcceptFailuresOncePerMinute(logging.Filter):
    """trio's listeners log every failed accept with its traceback and try again ten times a
    second: a flood of connections that used up the file descriptors (EMFILE) wrote ten
    tracebacks a second, 800 KB of log a minute (the engine's ports; the mount's control socket
    when its files used them up: helper hAO F5). One line a minute instead, with how many."""

    EVERY = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._last = -math.inf
        self._skipped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < self.EVERY:
            self._skipped += 1
            return False
        self._last = now
        cause = record.exc_info[1] if record.exc_info else None
        record.msg = "cannot accept connections: %s (%d more failed accepts since the last such line)"
        record.args = (cause if cause is not None else record.getMessage(), self._skipped)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._skipped = 0
        return True


def quiet_failed_accepts() -> None:
    """Put :class:`AcceptFailuresOncePerMinute` on trio's listener log (once per process)."""
    accepts = logging.getLogger("trio.serve_listeners")
    if not any(isinstance(f, AcceptFailuresOncePerMinute) for f in accepts.filters):
        accepts.addFilter(AcceptFailuresOncePerMinute())
