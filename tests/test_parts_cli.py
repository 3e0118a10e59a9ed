"""``privifs token put/get/ls/rm`` of a file above the parts threshold, as a user runs them."""

from __future__ import annotations

import hashlib
import json
import os

import trio

from privifs.client.connect import connect
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from privifs.parts.store import THRESHOLD
from tests.mountkit import privifs as run


def test_a_big_file_is_put_as_parts_and_got_back_whole(user, tmp_path):
    src = tmp_path / "movie.mkv"
    data = os.urandom(THRESHOLD + 5)
    src.write_bytes(data)
    token = run(user, "token", "put", str(src), "--context", "/media").stdout.strip()
    rows = [json.loads(line) for line in run(user, "token", "ls", "--json").stdout.splitlines()]
    assert [(r["token"], r["context"], r["fileName"], r["size"]) for r in rows] == [
        (token, "/media", "movie.mkv", len(data))
    ]
    everything = [json.loads(line) for line in run(user, "token", "ls", "--json", "--all").stdout.splitlines()]
    parts = [r for r in everything if r["context"] == "/.privifs/parts"]
    assert len(parts) == 3 and sum(r["size"] for r in parts) == len(data)
    out = tmp_path / "back.mkv"
    run(user, "token", "get", token, str(out))
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    run(user, "token", "rm", token)
    left = [json.loads(line) for line in run(user, "token", "ls", "--json", "--all").stdout.splitlines()]
    assert [r["context"] for r in left] == ["/.privifs"]  # only the key check


def test_a_small_file_stays_one_token(user, tmp_path):
    src = tmp_path / "small.bin"
    src.write_bytes(os.urandom(1000))
    run(user, "token", "put", str(src))
    everything = [json.loads(line) for line in run(user, "token", "ls", "--json", "--all").stdout.splitlines()]
    assert sorted(r["context"] for r in everything) == ["/", "/.privifs"]
    assert "privifs.parts" not in next(r for r in everything if r["context"] == "/")["risk"]


def test_a_sparse_file_is_put_without_its_holes_and_got_back_sparse(user, tmp_path):
    src = tmp_path / "disk.img"
    head, tail = os.urandom(1000), os.urandom(1000)
    with open(src, "wb") as f:
        f.write(head)
        f.seek(3 * THRESHOLD)
        f.write(tail)
        f.truncate(4 * THRESHOLD)
    token = run(user, "token", "put", str(src)).stdout.strip()
    everything = [json.loads(line) for line in run(user, "token", "ls", "--json", "--all").stdout.splitlines()]
    assert len([r for r in everything if r["context"] == "/.privifs/parts"]) == 2  # the parts with data
    out = tmp_path / "back.img"
    run(user, "token", "get", token, str(out))
    assert out.stat().st_size == 4 * THRESHOLD and out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 < THRESHOLD  # its holes are holes again


def test_a_big_file_whose_risk_meta_another_application_replaced_is_got_whole_not_as_its_manifest(user, tmp_path, eng):
    """Another application set its own risk meta on the manifest's token (the server replaces
    the whole set: the manifest mark went): 'get' wrote the 263-byte manifest, exit 0. It now
    sees a content that is a manifest of the size the token states, and reassembles it."""
    src = tmp_path / "relabel.bin"
    data = os.urandom(THRESHOLD + 5)
    src.write_bytes(data)
    token = run(user, "token", "put", str(src)).stdout.strip()

    async def relabel() -> None:
        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], "correct-horse-battery")
        async with connect(Endpoints.from_dict(eng.urls), credentials) as client:
            await client.tokens.set_risk(token, {"classification": "internal", "handling": "none"})

    trio.run(relabel)
    assert "privifs.parts" not in run(user, "token", "stat", token).stdout
    out = tmp_path / "back.bin"
    run(user, "token", "get", token, str(out))
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_verify_checks_a_manifest_that_lost_its_mark_through_its_parts(user, tmp_path, eng):
    """A manifest whose risk meta another application replaced (the mark went) is read through
    its parts by a mount, 'token get' and the sweep (docs/format.md). 'verify --data' took it for
    a whole file: it printed "note: its meta states 8388613 bytes, its verified content has 263;
    a mount shows the content's size once the file is opened" (a mount shows 8388613), counted
    the file's parts as "parts of no file", and checked none of them against the manifest, so a
    missing part went unreported (exit 0) while every read of it was EIO."""
    src = tmp_path / "relabel.bin"
    src.write_bytes(os.urandom(THRESHOLD + 5))
    token = run(user, "token", "put", str(src)).stdout.strip()
    everything = [json.loads(line) for line in run(user, "token", "ls", "--json", "--all").stdout.splitlines()]
    parts = sorted((r for r in everything if r["context"] == "/.privifs/parts"), key=lambda r: r["fileName"])

    async def on_the_wire(what, *args) -> None:
        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], "correct-horse-battery")
        async with connect(Endpoints.from_dict(eng.urls), credentials) as client:
            await getattr(client.tokens, what)(*args)

    trio.run(on_the_wire, "set_risk", token, {"classification": "internal", "handling": "none"})
    r = run(user, "verify", "--data", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "note:" not in r.stdout and "parts of no file" not in r.stdout, r.stdout
    trio.run(on_the_wire, "delete", parts[1]["token"])
    r = run(user, "verify", "--data", check=False)
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"/relabel.bin: part 1 (token {parts[1]['token']}) is missing" in r.stdout, r.stdout


def test_verify_notes_a_manifest_whose_meta_states_another_size(user, tmp_path, eng):
    """A manifest token whose file meta states another size than the manifest (docs/format.md:
    it must be the whole file's) showed 223 bytes of an 8 MiB file on a mount; verify said
    nothing of it. It is now a note (no damage: the manifest, authenticated, is what a mount and
    'token get' read), as a whole token's other size already was."""
    from privifs.client.datatokens import FileMeta
    from privifs.client.vault import Vault
    from privifs.crypto import digest
    from privifs.crypto.keys import load_aes_key
    from privifs.parts import format as fmt
    from privifs.parts.store import PartStore

    src = tmp_path / "whole.bin"
    src.write_bytes(os.urandom(THRESHOLD + 5))
    token = run(user, "token", "put", str(src)).stdout.strip()
    key = load_aes_key(next(tmp_path.rglob("aes.key")))

    async def short_copy() -> None:
        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], "correct-horse-battery")
        async with connect(Endpoints.from_dict(eng.urls), credentials) as client:
            vault = Vault(client.tokens, key)
            encoded = fmt.encode(await PartStore(vault).manifest(token))
            copy = await vault.put_bytes(encoded, FileMeta("short.bin", "bin", "/", 0, "/short.bin"))
            risk = {fmt.MARK: "1", **digest.stated(vault.derive(digest.content_key), encoded)}
            await client.tokens.set_risk(copy, risk)

    trio.run(short_copy)
    r = run(user, "verify", "--data", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"note: /short.bin: its meta states 263 bytes, its manifest {THRESHOLD + 5}" in r.stdout, r.stdout
