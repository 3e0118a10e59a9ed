"""ContentCache.fetch shares one download among concurrent readers of a token; when that shared
download fails, every waiter retries and reports on its own, and the in-flight bookkeeping stays
consistent however those retries overlap (in-process: a vault stand-in whose downloads fail)."""

from __future__ import annotations

import pytest
import trio

from privifs.crypto.sealed import local_key
from privifs.errors import IntegrityError
from privifs.fs.cache import ContentCache

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
