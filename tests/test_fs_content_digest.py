"""A whole-token file's content digest (privifs/crypto/digest.py): written with its risk meta,
kept through renames, and checked on download, so a server that answers with another token's
data (or blobs swapped between tokens of the vault, each well-formed and encrypted with the
vault's key) gives EIO instead of the wrong bytes."""

from __future__ import annotations

import dataclasses
import errno
import hmac
import os

import pytest
import trio

from privifs.crypto import digest
from privifs.parts.store import THRESHOLD as PARTS_THRESHOLD
from tests.fskit import fails_with

SIZE = 54_321  # a plaintext size no other test uses, to find the blobs in the engine's directory
WIRE = 12 + SIZE + 16


def blobs_of_size(engine, size: int):
    return [
        f for d in (engine.data_dir / "blobs").iterdir() if d.is_dir() for f in d.iterdir() if f.stat().st_size == size
    ]


async def test_an_upload_states_its_content_digest_and_a_rename_keeps_it(kit):
    data = os.urandom(1000)
    await kit.write_file("a.bin", data)
    await kit.settle()
    (info,) = [i for i in await kit.listing() if i.file_name == "a.bin"]
    key = kit.syncer.content_key
    assert info.risk[digest.FIELD] == hmac.new(key, data, "sha256").hexdigest()
    await kit.rename("a.bin", "b.bin")
    await kit.setattr("b.bin", mode=0o600)
    await kit.settle()
    (info,) = [i for i in await kit.listing() if i.file_name == "b.bin"]
    assert info.risk[digest.FIELD] == hmac.new(key, data, "sha256").hexdigest()
    assert info.risk["privifs.mode"] == "600"


async def test_blobs_swapped_between_two_tokens_read_as_eio_never_as_each_others_bytes(kit, eng):
    one, two = os.urandom(SIZE), os.urandom(SIZE)
    await kit.write_file("one.bin", one)
    await kit.write_file("two.bin", two)
    await kit.settle()
    a, b = eng.blob_files(WIRE)
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)
    try:
        async with kit.fresh() as other:  # an empty cache: both are downloaded
            for name in ("one.bin", "two.bin"):
                with fails_with(errno.EIO):
                    await other.read_file(name)
    finally:
        a.write_bytes(first)
        b.write_bytes(second)
    async with kit.fresh() as other:
        assert await other.read_file("one.bin") == one and await other.read_file("two.bin") == two


async def _wire(kit, token: str) -> bytes:
    got = bytearray()

    async def consume(chunks) -> None:
        got.clear()
        async for chunk in chunks:
            got.extend(chunk)

    await kit.client.tokens.fetch(token, consume)
    return bytes(got)


def _blob_holding(engine, wire: bytes):
    (found,) = [f for f in engine.blob_files(len(wire)) if f.read_bytes() == wire]
    return found


async def test_manifests_swapped_between_two_big_files_read_as_eio_and_their_parts_stay(kit, eng):
    big = PARTS_THRESHOLD + 1
    one, two = os.urandom(big), os.urandom(big)
    await kit.write_file("one.bin", one)
    await kit.write_file("two.bin", two)
    await kit.settle()
    manifests = {i.file_name: i for i in await kit.listing() if i.file_name in ("one.bin", "two.bin")}
    assert all(digest.FIELD in i.risk and "privifs.parts" in i.risk for i in manifests.values())
    a = _blob_holding(eng, await _wire(kit, manifests["one.bin"].token))
    b = _blob_holding(eng, await _wire(kit, manifests["two.bin"].token))
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)
    try:
        async with kit.fresh() as other:
            for name in ("one.bin", "two.bin"):
                with fails_with(errno.EIO):
                    await other.read_file(name)
            # removing one.bin must not retire the parts its token's blob (two.bin's manifest) names
            await other.unlink("one.bin")
            await other.settle()
            assert await other.syncer.retire_due(now=float("inf")) == 0
    finally:
        b.write_bytes(second)
    async with kit.fresh() as other:
        assert await other.tree() == {"two.bin": two}


async def test_a_mount_that_listed_a_file_before_its_risk_meta_keeps_the_manifest_mark_and_digest_on_a_chmod(kit):
    """Another mount listed the file between the writer's configure-file-meta and its risk-meta
    write (no privifs field yet), and a chmod there is written after the writer's risk meta: the
    chmod's risk meta must not drop privifs.parts and privifs.digest (without the mark every
    mount served the 263-byte manifest as the file's content, and the sweep took its parts)."""
    data = os.urandom(PARTS_THRESHOLD + 4321)
    await kit.write_file("big.bin", data)
    await kit.write_file("small.bin", b"small content")
    await kit.settle()
    written = {i.file_name: i for i in await kit.listing() if i.file_name in ("big.bin", "small.bin")}
    assert "privifs.parts" in written["big.bin"].risk and digest.FIELD in written["small.bin"].risk
    async with kit.fresh() as other:
        real = other.refresher.fetch

        async def before_the_risk_meta():  # the listing other takes comes before the risk meta
            infos, started = await real()
            return [dataclasses.replace(i, risk={}) if i.token in tokens else i for i in infos], started

        tokens = {i.token for i in written.values()}
        other.refresher.fetch = before_the_risk_meta
        await other.refresh()
        other.refresher.fetch = real
        await other.setattr("big.bin", mode=0o600)  # before other's next listing
        await other.setattr("small.bin", mode=0o600)
        await other.settle()
    after = {i.file_name: i for i in await kit.listing() if i.file_name in ("big.bin", "small.bin")}
    for name in written:
        assert after[name].risk["privifs.mode"] == "600"
        assert after[name].risk[digest.FIELD] == written[name].risk[digest.FIELD]
    assert after["big.bin"].risk["privifs.parts"] == written["big.bin"].risk["privifs.parts"]
    async with kit.fresh() as third:
        assert await third.read_file("big.bin") == data
        assert await third.read_file("small.bin") == b"small content"


async def refresh_seeing_no_risk_meta(mount, token: str) -> None:
    """One refresh of ``mount`` whose listing shows ``token`` with no risk meta, as between its
    writer's configure-file-meta and its risk meta write."""
    real = mount.refresher.fetch

    async def before_the_risk_meta():
        infos, started = await real()
        return [dataclasses.replace(i, risk={}) if i.token == token else i for i in infos], started

    mount.refresher.fetch = before_the_risk_meta
    try:
        await mount.refresh()
    finally:
        mount.refresher.fetch = real


async def test_a_manifest_read_as_content_before_its_mark_was_listed_is_not_kept_as_the_file(kit):
    """A mount that reads a big file listed between the writer's configure-file-meta and its
    risk meta write got the manifest's bytes (nothing said yet it is a manifest), and once the
    listing showed the mark, that download, cached under the manifest's token, was still served
    as the whole content (and staged for a write)."""
    data = os.urandom(PARTS_THRESHOLD + 999)
    await kit.write_file("big.bin", data)
    await kit.settle()
    (info,) = [i for i in await kit.listing() if i.file_name == "big.bin"]
    async with kit.fresh() as other:
        await refresh_seeing_no_risk_meta(other, info.token)
        # it decodes as a manifest of the size the token's meta says: read through its parts (it
        # was served as the manifest's own bytes, and then kept as the file)
        assert await other.read_file("big.bin") == data
        await other.refresh()
        assert await other.read_file("big.bin") == data
        fh = await other.open_file("big.bin")
        await other.write(fh, len(data), b"tail")
        await other.close(fh)
        await other.settle()
        assert await other.read_file("big.bin") == data + b"tail"
    async with kit.fresh() as third:
        assert await third.read_file("big.bin") == data + b"tail"


async def test_a_write_to_a_big_file_listed_before_its_mark_stages_the_file_not_its_manifest(kit):
    data = os.urandom(PARTS_THRESHOLD + 555)
    await kit.write_file("big.bin", data)
    await kit.settle()
    (info,) = [i for i in await kit.listing() if i.file_name == "big.bin"]
    async with kit.fresh() as other:
        await refresh_seeing_no_risk_meta(other, info.token)
        fh = await other.open_file("big.bin")
        await other.write(fh, 10, b"patched")  # the first write stages the content: the file's
        await other.close(fh)
        await other.settle()
    async with kit.fresh() as third:
        assert await third.read_file("big.bin") == data[:10] + b"patched" + data[17:]


async def test_a_chmod_of_a_young_file_without_risk_meta_waits_for_its_writers_risk_meta(kit):
    """A mount that lists a file between its writer's configure-file-meta and risk meta write
    (no privifs fields yet), and chmods it, re-lists the token first; if it is still bare and
    young, its write waits: written at once, it could land after the writer's, and a risk meta
    write replaces the whole field set (the content digest, a manifest's mark, gone)."""
    token = await kit.remote.put("f.bin", b"content")  # configured, its risk meta not written yet
    await kit.refresh()
    await kit.setattr("f.bin", mode=0o600)
    with trio.move_on_after(1.5):
        await kit.settle()
    assert (await kit.remote.token("f.bin")).risk == {}  # the chmod waits
    stated = digest.stated(kit.syncer.content_key, b"content")
    await kit.client.tokens.set_risk(token, {"privifs.type": "file", "privifs.mode": "644", **stated})
    await kit.settle()
    risk = (await kit.remote.token("f.bin")).risk
    assert risk["privifs.mode"] == "600" and risk[digest.FIELD] == stated[digest.FIELD]


async def test_a_manifest_whose_mark_is_listed_while_its_download_runs_reads_as_the_file(kit):
    """A big file listed before its writer's risk meta marked it is downloaded whole by a first
    open; when the listing (or another reader) marks the token a manifest while that download
    runs, the download is the manifest: the open took the manifest's size as the file's, and
    the reads served the manifest's bytes (seen with three mounts: a reader got 257 bytes of
    ``PVFSMNFT…`` for a 20 MiB file another mount rewrote)."""
    data = os.urandom(PARTS_THRESHOLD + 777)
    await kit.write_file("big.bin", data)
    await kit.settle()
    (info,) = [i for i in await kit.listing() if i.file_name == "big.bin"]
    async with kit.fresh() as other:
        real = other.refresher.fetch

        async def before_the_risk_meta():
            infos, started = await real()
            return [dataclasses.replace(i, risk={}) if i.token == info.token else i for i in infos], started

        other.refresher.fetch = before_the_risk_meta
        await other.refresh()
        other.refresher.fetch = real
        fetch = other.syncer.fetch_content

        async def marked_meanwhile(node, token):
            sealed = await fetch(node, token)
            await other.refresh()  # the listing shows the mark while the download ran
            return sealed

        other.syncer.fetch_content = marked_meanwhile
        fh = await other.open_file("big.bin", os.O_RDONLY)
        assert (await other.lookup("big.bin")).st_size == len(data)
        assert await other.read(fh) == data
        await other.close(fh)
        other.syncer.fetch_content = fetch
        assert await other.read_file("big.bin") == data


@pytest.mark.parametrize("moved", ["itself", "with its directory"])
async def test_a_directory_marker_listed_bare_and_then_moved_here_stays_a_directory(kit, moved):
    """A mount that lists another mount's new directory marker between its configure-file-meta
    and its risk meta write shows it as an empty file. Renamed here (itself, or along with the
    directory above it) once the marker's risk meta was written, the re-listed risk meta says
    it is a directory: the rename must not write "a file" over it. It did, with the defaults
    the bare listing gave (mode 644, mtime of its createdAt): seen with three mounts renaming
    and making directories at random, the mount that made the directory kept showing it (it
    held entries) with mode 644, while every other mount and a fresh one showed an empty file
    ``d`` and the entries under ``d.dir``."""
    await kit.mkdir("p")
    await kit.settle()
    token = await kit.remote.put("p/m", b"")  # a marker whose writer has not written its risk meta yet
    await kit.refresh()
    assert (await kit.tree("p")) == {"p/m": b""}  # listed bare: an empty file
    marker = {"privifs.type": "dir", "privifs.mode": "750", "privifs.mtime": "1700000000123456789"}
    await kit.client.tokens.set_risk(token, marker)  # ... and now its writer wrote it
    if moved == "itself":
        await kit.rename("p/m", "p/n")
        where = "p/n"
    else:
        await kit.rename("p", "q")
        where = "q/m"
    await kit.settle()
    risk = (await kit.remote.token(where)).risk
    assert {k: risk.get(k) for k in marker} == marker, risk
    await kit.refresh()
    assert (await kit.tree()) == {where.split("/")[0]: "dir", where: "dir"}
    async with kit.fresh() as other:
        assert (await other.tree()) == {where.split("/")[0]: "dir", where: "dir"}


async def test_a_file_listed_bare_and_then_renamed_here_keeps_its_writers_mode_and_mtime(kit):
    """A file listed between its writer's configure-file-meta and risk meta write shows the
    defaults (mode 644, mtime of its createdAt). Renamed here once the writer's risk meta is
    there, the rename wrote those defaults over the writer's mode and mtime on every mount (an
    executable script lost its x bit, a build tool saw another mtime). Only what was changed
    here goes over the writer's attributes."""
    token = await kit.remote.put("run.sh", b"#!/bin/sh\n")
    await kit.refresh()
    stated = digest.stated(kit.syncer.content_key, b"#!/bin/sh\n")
    written = {"privifs.type": "file", "privifs.mode": "755", "privifs.mtime": "1700000000123456789", **stated}
    await kit.client.tokens.set_risk(token, written)
    await kit.rename("run.sh", "go.sh")
    await kit.settle()
    risk = (await kit.remote.token("go.sh")).risk
    assert {k: risk.get(k) for k in written} == written, risk
    await kit.refresh()
    attrs = await kit.lookup("go.sh")
    assert (attrs.st_mode & 0o7777, attrs.st_mtime_ns) == (0o755, 1700000000123456789)


async def test_a_chmod_of_a_file_listed_bare_goes_over_its_writers_mode_and_keeps_its_mtime(kit):
    token = await kit.remote.put("f.txt", b"text")
    await kit.refresh()
    stated = digest.stated(kit.syncer.content_key, b"text")
    written = {"privifs.type": "file", "privifs.mode": "644", "privifs.mtime": "1700000000123456789", **stated}
    await kit.client.tokens.set_risk(token, written)
    await kit.setattr("f.txt", mode=0o600)
    await kit.settle()
    risk = (await kit.remote.token("f.txt")).risk
    assert {k: risk.get(k) for k in written} == {**written, "privifs.mode": "600"}, risk
