"""The parts layer against the real engine: a file stored as parts plus a manifest, range reads
that fetch only the parts they touch, verification of every part, and collection of parts no
manifest names."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.errors import IntegrityError, NotFoundError
from privifs.parts import format as fmt
from privifs.parts.store import PartStore, is_manifest, is_part

KEY = bytes(range(32))
PART = 64 * 1024


async def stream(data: bytes, piece: int = 10_000):
    for off in range(0, len(data), piece):
        yield data[off : off + piece]


async def stored(client, data: bytes, name: str = "big.bin") -> tuple[PartStore, str]:
    store = PartStore(client.vault(KEY), part_size=PART)
    token = await store.put(lambda: stream(data), len(data), FileMeta(name, "bin", "/media", 0, f"/media/{name}"))
    return store, token


async def test_a_file_stored_as_parts_lists_as_one_file_of_its_size(account):
    data = os.urandom(5 * PART + 123)
    async with connect(*account) as client:
        store, token = await stored(client, data)
        infos = [i async for i in client.tokens.list()]
        manifest = next(i for i in infos if i.token == token)
        assert (manifest.context, manifest.file_name, manifest.size) == ("/media", "big.bin", len(data))
        assert is_manifest(manifest) and not is_part(manifest)
        parts = [i for i in infos if is_part(i)]
        assert len(parts) == 6 and all(i.context == fmt.PARTS_CONTEXT for i in parts)
        m = await store.manifest(token)
        assert m.total == len(data) and [p.size for p in m.parts] == [PART] * 5 + [123]
        got = bytearray()

        async def write(piece: bytes) -> None:
            got.extend(piece)

        await store.copy(m, write)
        assert got == data


async def test_a_range_read_fetches_only_the_parts_it_touches(account):
    data = os.urandom(8 * PART)
    async with connect(*account) as client:
        store, token = await stored(client, data)
        m = await store.manifest(token)
        assert await store.read(m, 3 * PART + 100, 1000) == data[3 * PART + 100 : 3 * PART + 1100]
        assert store.parts_fetched == 1
        assert await store.read(m, 5 * PART - 10, 20) == data[5 * PART - 10 : 5 * PART + 10]
        assert store.parts_fetched == 3
        assert await store.read(m, 8 * PART - 5, 100) == data[-5:]


async def test_parts_are_plain_wire_blobs_and_the_manifest_reads_as_documented(account):
    """What another application with only the key does: decrypt the manifest, walk its entries,
    decrypt each part with AES-GCM, check the HMAC, concatenate."""
    import hashlib
    import hmac

    data = os.urandom(2 * PART + 9)
    async with connect(*account) as client:
        store, token = await stored(client, data)

        async def blob(t: str) -> bytes:  # the raw wire bytes as the vault serves them
            got = bytearray()

            async def consume(chunks) -> None:
                got.clear()
                async for c in chunks:
                    got.extend(c)

            await client.tokens.fetch(t, consume)
            return bytes(got)

        aes = AESGCM(KEY)
        sealed = await blob(token)
        plain = aes.decrypt(sealed[:12], sealed[12:], None)
        magic, version, _, part_size, total, count, _ = struct.unpack_from("<8sB3sIQI4s", plain)
        assert (magic, version, total, count) == (b"PVFSMNFT", 1, len(data), 3)
        pos, out = 32, b""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        dkey = HKDF(hashes.SHA256(), 32, b"privifs-parts", b"privifs part digest key v1").derive(KEY)
        for i in range(count):
            n = plain[pos]
            tok = plain[pos + 1 : pos + 1 + n].decode()
            size, digest = struct.unpack_from("<I32s", plain, pos + 1 + n)
            pos += 1 + n + 36
            part = await blob(tok)
            body = aes.decrypt(part[:12], part[12:], None)
            assert len(body) == size
            assert hmac.new(dkey, struct.pack("<Q", i) + body, hashlib.sha256).digest() == digest
            out += body
        assert pos == len(plain) and out == data


async def test_a_swapped_or_missing_part_is_refused(account):
    data = os.urandom(3 * PART)
    async with connect(*account) as client:
        store, token = await stored(client, data)
        m = await store.manifest(token)
        swapped = fmt.Manifest(
            m.part_size, m.total, (fmt.Part(m.parts[1].token, PART, m.parts[0].digest), m.parts[1], m.parts[2])
        )
        with pytest.raises(IntegrityError, match="digest"):
            await store.read(swapped, 0, 10)
        await client.tokens.delete(m.parts[2].token)
        with pytest.raises(NotFoundError):
            await store.read(m, 2 * PART, 10)
        assert await store.read(m, 0, 10) == data[:10]


async def test_collect_deletes_only_parts_no_manifest_names(account):
    data = os.urandom(2 * PART)
    async with connect(*account) as client:
        store, token = await stored(client, data)
        m = await store.manifest(token)
        orphan = await store.put_part("c7a5ed0000000000", 0, b"x" * 100)  # a store that never wrote its manifest
        infos = [i async for i in client.tokens.list()]
        assert [i.token for i in await store.unreferenced(infos)] == []  # too young to be collected
        assert await store.collect(min_age=0) == 1
        left = {i.token async for i in client.tokens.list()}
        assert orphan.token not in left and {p.token for p in m.parts} <= left
        assert await store.read(m, 0, 2 * PART) == data
        await store.delete(token, m)
        assert {i.token async for i in client.tokens.list()} == set()


async def test_the_manifest_mark_in_risk_meta_is_the_manifest_version_as_documented(account):
    """docs/format.md said a manifest token has risk meta ``privifs.parts = 1``; a file with a hole
    (a part of zeros) has a version 2 manifest and ``privifs.parts = 2``, so a reader written
    from the docs that looked for ``1`` took it for a file stored whole (and read the manifest's
    bytes as its content)."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    assert "privifs.parts = 1" not in doc
    assert "`privifs.parts`: the\nmanifest's format version, `1`, or `2` when it has a hole" in doc
    async with connect(*account) as client:
        _, whole = await stored(client, os.urandom(2 * PART + 9), "whole.bin")
        _, holed = await stored(client, os.urandom(PART) + bytes(PART) + b"tail", "holed.bin")
        marks = {i.token: i.risk.get(fmt.MARK) async for i in client.tokens.list()}
        assert (marks[whole], marks[holed]) == ("1", "2")


@pytest.mark.parametrize("empty", [b'{"items":[]}', b"[]", b'{"data":[]}', b'{"items":[],"meta":{"count":0}}'])
async def test_collect_deletes_nothing_after_a_listing_whose_end_cannot_be_told(eng, account, empty):
    """A proxy answered a listing page with a well-formed empty page: the listing ended there,
    twice (the confirming listing too), and the parts of a file whose manifest was on the pages
    after it were collected: the file read EIO for good (helper hL, 6 of 6 after helper hI's
    non-listing pages were refused). A listing that ends at an empty page no stated total vouches
    for collects nothing."""
    from tests.enginekit import proxied_api

    endpoints, creds = account
    eng.set_options(per_page_max=2)  # pages of two: [part, part], [manifest, orphan]
    data = os.urandom(2 * PART)
    async with connect(*account) as direct:
        store, token = await stored(direct, data)
        orphan = await store.put_part("c7a5ed0000000000", 0, b"x" * 100)

    def mangle(path: str, status: int, body: bytes) -> tuple[int, bytes]:
        if path.startswith("/data-token/list-data-tokens") and "page=2&" in path:
            return 200, empty
        return status, body

    async with proxied_api(endpoints, mangle) as proxied, connect(proxied, creds) as client:
        assert await PartStore(client.vault(KEY), part_size=PART).collect(min_age=0) == 0
    async with connect(*account) as direct:
        left = {i.token async for i in direct.tokens.list()}
        store = PartStore(direct.vault(KEY), part_size=PART)
        m = await store.manifest(token)
        assert {p.token for p in m.parts} <= left and orphan.token in left
        assert await store.collect(min_age=0) == 1  # honest: the orphan only
        assert await store.read(m, 0, 2 * PART) == data
