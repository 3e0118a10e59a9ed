"""ContentCache.fetch shares one download among concurrent readers of a token; when that shared
download fails, every waiter retries and reports on its own, and the in-flight bookkeeping stays
consistent however those retries overlap; downloads that would take the cache directory past its
limit wait until those in flight land; a download that gets no data (or under
DOWNLOAD_PROGRESS bytes) for DOWNLOAD_IDLE seconds fails, however long one whose data keeps
coming takes (in-process: vault stand-ins, the stalls on
trio's mock clock)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from privifs.crypto.sealed import local_key
from privifs.errors import IntegrityError, ServerUnreachable
from privifs.fs.cache import DOWNLOAD_IDLE, STALL_MEMORY, ContentCache, download_footprint
from tests.fskit import DiskPeak

KEY = local_key(b"k" * 32)


class FailingVault:
    """Every download fails after a pause (a tampered token, as a real vault reports it)."""

    def __init__(self) -> None:
        self.gets = 0

    async def get(self, token, sink, size=None):
        self.gets += 1
        await trio.sleep(0.01)
        raise IntegrityError("ciphertext failed authentication (tampered, truncated or wrong key)")


@pytest.mark.parametrize("readers", [2, 3, 6])
def test_concurrent_readers_of_a_token_whose_download_fails_each_get_the_integrity_error(tmp_path, readers):
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    vault = FailingVault()
    errors: list[BaseException] = []

    async def reader() -> None:
        try:
            await cache.fetch("tok", vault, 100)
        except Exception as exc:  # noqa: BLE001 - the test records what each reader saw
            errors.append(exc)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(readers):
                nursery.start_soon(reader)

    try:
        trio.run(main)
        assert [type(e) for e in errors] == [IntegrityError] * readers
        assert cache._inflight == {} and cache.reserved == 0
        assert vault.gets >= 2  # the first download was shared, then the waiters retried
    finally:
        cache.close()


class SlowVault:
    """Serves each token's content in 64 KiB pieces with pauses, counting downloads in flight."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.active = self.most = 0

    async def get(self, token, sink, size=None):
        self.active += 1
        self.most = max(self.most, self.active)
        try:
            await sink.reset()
            for _ in range(0, self.size, 65536):
                await trio.sleep(0.002)
                await sink.write(token.encode()[:1] * 65536)
        finally:
            self.active -= 1
        return self.size


def test_downloads_that_would_pass_the_limit_wait_for_those_in_flight(tmp_path):
    size = 256 * 1024
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    # room for two downloads besides the table: six readers of six tokens at once
    cache.size_limit = cache.overhead() + 2 * download_footprint(size) + 1000
    vault = SlowVault(size)
    got: dict[str, bytes] = {}

    async def reader(token: str) -> None:
        sealed = await cache.fetch(token, vault, size)
        got[token] = sealed.read(0, size)
        sealed.close()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for name in "abcdef":
                nursery.start_soon(reader, name)

    try:
        with DiskPeak(tmp_path / "cache") as disk:
            trio.run(main)
        assert got == {name: name.encode() * size for name in "abcdef"}
        assert vault.most == 2 and cache.reserved == 0 and cache._inflight == {}
        assert disk.peak <= cache.size_limit
        assert sum(cache.holds(name) for name in "abcdef") == 2  # the last two to land stay
    finally:
        cache.close()


class TricklingVault:
    """Sends ``pieces`` 64 KiB pieces ``gap`` seconds apart, then (``stall``) nothing ever again,
    as a stalled server does while the vault client retries."""

    def __init__(self, pieces: int, gap: float, stall: bool, piece: int = 65536) -> None:
        self.pieces, self.gap, self.stall, self.piece = pieces, gap, stall, piece
        self.gets = 0

    async def get(self, token, sink, size=None):
        self.gets += 1
        await sink.reset()
        for _ in range(self.pieces):
            await trio.sleep(self.gap)
            await sink.write(b"t" * self.piece)
        if self.stall:
            await trio.sleep_forever()
        return self.pieces * self.piece


def test_a_stalled_download_fails_after_the_idle_limit_and_the_immediate_retry_fails_at_once(tmp_path):
    """A server that stops sending held a read for every retry's timeout in turn (about 8
    minutes with the kernel's own second try); now the read fails once nothing arrived for
    DOWNLOAD_IDLE seconds, and the kernel's retry right after does not wait again."""
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    vault = TricklingVault(pieces=3, gap=DOWNLOAD_IDLE / 2, stall=True)

    async def main() -> None:
        start = trio.current_time()
        with pytest.raises(ServerUnreachable, match="sent no data"):
            await cache.fetch("tok", vault, 4 * 65536)
        assert trio.current_time() - start == pytest.approx(1.5 * DOWNLOAD_IDLE + DOWNLOAD_IDLE, abs=1)
        with pytest.raises(ServerUnreachable, match="sent no data"):
            await cache.fetch("tok", vault, 4 * 65536)
        assert vault.gets == 1, "the retry right after a stall downloaded again"
        await trio.sleep(STALL_MEMORY)
        vault.stall = False
        vault.pieces = 4
        sealed = await cache.fetch("tok", vault, 4 * 65536)
        assert sealed.read(0, 1 << 20) == b"t" * 4 * 65536
        sealed.close()
        assert cache._inflight == {} and cache.reserved == 0

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.2))
    finally:
        cache.close()


def test_a_download_that_keeps_receiving_is_never_cut_however_long_it_takes(tmp_path):
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    vault = TricklingVault(pieces=5, gap=DOWNLOAD_IDLE * 0.9, stall=False)

    async def main() -> None:
        start = trio.current_time()
        sealed = await cache.fetch("tok", vault, 5 * 65536)
        assert trio.current_time() - start > 4 * DOWNLOAD_IDLE  # far longer than the idle limit
        assert sealed.size == 5 * 65536
        sealed.close()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.2))
    finally:
        cache.close()


def fetch_fails_after_the_idle_limit(tmp_path, vault, size: int, autojump: float = 0.2) -> None:
    """A fetch of ``size`` bytes from ``vault`` fails DOWNLOAD_IDLE seconds after it began (on
    trio's mock clock, which jumps to the next deadline once every task has waited ``autojump``
    real seconds), keeping nothing in flight or reserved."""
    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)

    async def main() -> None:
        start = trio.current_time()
        with trio.fail_after(3 * DOWNLOAD_IDLE), pytest.raises(ServerUnreachable, match="sent no data"):
            await cache.fetch("tok", vault, size)
        assert trio.current_time() - start == pytest.approx(DOWNLOAD_IDLE, abs=2)
        assert cache._inflight == {} and cache.reserved == 0

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=autojump))
    finally:
        cache.close()


def test_a_download_that_trickles_a_byte_a_second_fails_after_the_idle_limit(tmp_path):
    """A server sending one byte a second (found through a throttling proxy on the downstream
    port, helper hM) restarted the idle wait with every byte: a 300 KB file would have taken 83
    hours, its reader stuck in read(2). Now only DOWNLOAD_PROGRESS bytes restart it: the read
    fails after DOWNLOAD_IDLE seconds, as for a stall."""
    # each mock second waited 0.2 s of real time (18 s in all); a jump made while a write is on
    # its worker thread only brings the next byte sooner: the idle limit counts 64 KiB, not bytes
    vault = TricklingVault(pieces=10**6, gap=1.0, stall=False, piece=1)
    fetch_fails_after_the_idle_limit(tmp_path, vault, 10**6, autojump=0.02)


class RepeatingVault:
    """Each of the client's attempts gets the same first ``pieces`` 64 KiB pieces, then nothing
    until the client's read time-out (60 s) and its next attempt, as from a server that stalls
    at the same point of every answer."""

    def __init__(self, pieces: int, attempts: int = 10) -> None:
        self.pieces, self.attempts = pieces, attempts

    async def get(self, token, sink, size=None):
        for _ in range(self.attempts):
            await sink.reset()
            for _ in range(self.pieces):
                await sink.write(b"r" * 65536)
            await trio.sleep(60)  # the read time-out, then the client tries again
        raise ServerUnreachable("no more attempts")


def test_a_server_sending_each_retry_the_same_first_bytes_then_stalling_fails_after_the_idle_limit(tmp_path):
    """Bytes a retry received again restarted the idle wait: a server that gave every attempt the
    same first 300 KB and then stalled held the read for each of the client's attempts in turn
    (seen over 3 minutes through a stalling proxy, the docs promise 90 s). Only bytes past what an
    earlier attempt received are progress now."""
    fetch_fails_after_the_idle_limit(tmp_path, RepeatingVault(pieces=5), 10 * 65536)


def test_a_manifest_the_vault_never_sends_fails_the_read_after_the_idle_limit(tmp_path):
    """A file stored as parts needs its manifest before any part: a stalled server held that
    fetch for every retry's timeout in turn too."""
    from privifs.client.vault import Vault
    from privifs.fs.parts import PartReader

    cache = ContentCache(tmp_path / "cache", 1 << 30, KEY)
    reader = PartReader(cache, Vault(None, b"v" * 32))
    asked = []

    async def never(token, risk=None):
        asked.append(token)
        await trio.sleep_forever()

    reader.store.manifest = never

    async def main() -> None:
        start = trio.current_time()
        with pytest.raises(ServerUnreachable, match="sent no data for manifest m1"):
            await reader.read("m1", 0, 4096)
        assert trio.current_time() - start == pytest.approx(DOWNLOAD_IDLE, abs=1)
        assert asked == ["m1"]

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.2))
    finally:
        cache.close()
