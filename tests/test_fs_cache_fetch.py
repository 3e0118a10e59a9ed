"""ContentCache.fetch shares one download among concurrent readers of a token; when that shared
download fails, every waiter retries and reports on its own, and the in-flight bookkeeping stays
consistent however those retries overlap; downloads that would take the cache directory past its
limit wait until those in flight land (in-process: vault stand-ins)."""

from __future__ import annotations

import pytest
import trio

from privifs.crypto.sealed import local_key
from privifs.errors import IntegrityError
from privifs.fs.cache import ContentCache, download_footprint
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
