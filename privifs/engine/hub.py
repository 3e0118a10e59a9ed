"""The WebSocket proxy's channels: which sockets hear which profile's events.

Each joined socket has a bounded outbox drained by its own sender task. :meth:`Hub.publish`
never blocks: an event goes to every socket joined with a token of the profile, is dropped for
a socket whose outbox is full (that socket is closed: delivery is at most once, as in the
reference), and is never replayed. A socket whose token expired or was revoked is closed instead
of being delivered to.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from privifs.engine.options import EngineOptions

log = logging.getLogger("privifs.engine.ws")

OUTBOX = 1024
CLOSE = object()


@dataclass(eq=False)
class Channel:
    """One WebSocket connection; joined once it has a profile."""

    send: trio.MemorySendChannel
    profile_id: str | None = None
    token_hash: str | None = None
    expires_at: float = 0.0
    channel_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    close_code: int = 1000
    close_reason: str = ""


class Hub:
    def __init__(self, opts: EngineOptions):
        self.opts = opts
        self._by_profile: dict[str, set[Channel]] = {}

    def new_channel(self) -> tuple[Channel, trio.MemoryReceiveChannel]:
        send, recv = trio.open_memory_channel(OUTBOX)
        return Channel(send), recv

    def join(self, ch: Channel, profile_id: str, token_hash: str, expires_at: float) -> None:
        self.leave(ch)
        ch.profile_id, ch.token_hash, ch.expires_at = profile_id, token_hash, expires_at
        self._by_profile.setdefault(profile_id, set()).add(ch)

    def leave(self, ch: Channel) -> None:
        if ch.profile_id is not None:
            chans = self._by_profile.get(ch.profile_id)
            if chans is not None:
                chans.discard(ch)
                if not chans:
                    del self._by_profile[ch.profile_id]
        ch.profile_id = None

    def _close(self, ch: Channel, code: int, reason: str) -> None:
        self.leave(ch)
        ch.close_code, ch.close_reason = code, reason
        try:
            ch.send.send_nowait(CLOSE)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            ch.send.close()

    def publish(self, profile_id: str | None, message: dict[str, Any]) -> int:
        """Deliver ``message`` to the profile's channels now; returns how many got it."""
        if profile_id is None:
            return 0
        now = time.time()
        text = json.dumps(message)
        delivered = 0
        for ch in list(self._by_profile.get(profile_id, ())):
            if ch.expires_at <= now:
                self._close(ch, 4001, "authorization token expired")
                continue
            if self.opts.chance(self.opts.ws_drop_rate):
                self._close(ch, 4000, "injected disconnect")
                continue
            try:
                ch.send.send_nowait(text)
                delivered += 1
            except trio.WouldBlock:
                self._close(ch, 4008, "client too slow")
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self.leave(ch)
        return delivered

    def token_changed(self, token_hash: str, expires_at: float | None) -> None:
        """A token was extended (new expiry) or revoked (``None``): update or close its channels."""
        for chans in list(self._by_profile.values()):
            for ch in list(chans):
                if ch.token_hash == token_hash:
                    if expires_at is None:
                        self._close(ch, 4001, "authorization token revoked")
                    else:
                        ch.expires_at = expires_at

    def disconnect_all(self) -> int:
        n = 0
        for chans in list(self._by_profile.values()):
            for ch in list(chans):
                self._close(ch, 4000, "disconnected by the engine")
                n += 1
        return n

    def count(self) -> int:
        return sum(len(c) for c in self._by_profile.values())
