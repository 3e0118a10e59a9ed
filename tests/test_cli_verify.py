"""``privifs verify``: the local index against the listing, every token's tag with --data, and
--repair from the local cache — against a real engine whose blob files are tampered with."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from tests.mountkit import Mount, privifs


def blob_of(engine, wire_size: int):
    found = engine.blob_files(wire_size)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.slow
def test_verify_finds_a_tampered_blob_and_a_deleted_token_and_repairs_from_the_cache(engine, tmp_path):
    m = Mount(tmp_path, engine.urls)
    try:
        content = os.urandom(123_457)  # a size no other test uses, to find its blob
        with m.mounted():
            (m.dir / "docs").mkdir()
            (m.dir / "docs" / "victim.bin").write_bytes(content)
            (m.dir / "gone.txt").write_text("deleted behind the mount's back")
            (m.dir / "fine.txt").write_text("untouched")
            swapped = {name: os.urandom(76_543) for name in ("s1.bin", "s2.bin")}  # a size no other test uses
            for name, data in swapped.items():
                (m.dir / name).write_bytes(data)
            m.wait_idle()
            tokens = {t["fileName"]: t["token"] for t in m.tokens()}
        clean = privifs(m.env, "verify", "--data", check=False)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "verify: ok" in clean.stdout and "0 damaged" in clean.stdout

        blob = blob_of(engine, len(content) + 28)
        raw = bytearray(blob.read_bytes())
        raw[70_000] ^= 0x01
        blob.write_bytes(bytes(raw))
        m.token("rm", tokens["gone.txt"])
        one, two = engine.blob_files(76_543 + 28)  # each well-formed, each the other token's content
        first, second = one.read_bytes(), two.read_bytes()
        one.write_bytes(second)
        two.write_bytes(first)

        quick = privifs(m.env, "verify", check=False)  # the index against the listing only
        assert quick.returncode == 3, quick.stdout + quick.stderr
        assert "missing: /gone.txt" in quick.stdout and "damaged" not in quick.stdout

        full = privifs(m.env, "verify", "--data", check=False)
        assert full.returncode == 3, full.stdout + full.stderr
        assert "damaged: /docs/victim.bin" in full.stdout and "missing: /gone.txt" in full.stdout
        assert "damaged: /s1.bin" in full.stdout and "damaged: /s2.bin" in full.stdout
        assert "does not match the digest" in full.stdout
        got = m.token("get", tokens["s1.bin"], str(tmp_path / "s1.out"), check=False)
        assert got.returncode != 0 and "does not match the digest" in got.stderr, got.stdout + got.stderr
        assert "Traceback" not in got.stderr and not (tmp_path / "s1.out").exists()
        assert "fine.txt" not in full.stdout and "Traceback" not in full.stderr

        fixed = privifs(m.env, "verify", "--data", "--repair", check=False)
        assert "repaired: /docs/victim.bin" in fixed.stdout, fixed.stdout + fixed.stderr
        assert "repaired: /s1.bin" in fixed.stdout and "repaired: /s2.bin" in fixed.stdout
        assert fixed.returncode == 3  # /gone.txt has no copy to restore from the vault's side: still reported
        names = {t["fileName"]: t for t in m.tokens()}
        assert names["victim.bin"]["token"] != tokens["victim.bin"] and names["victim.bin"]["context"] == "/docs"

        with m.mounted():  # the mount follows: the new token replaces the damaged one, gone.txt goes
            assert (m.dir / "docs" / "victim.bin").read_bytes() == content
            assert sorted(os.listdir(m.dir)) == ["docs", "fine.txt", "s1.bin", "s2.bin"]
            assert all((m.dir / name).read_bytes() == data for name, data in swapped.items())
        after = privifs(m.env, "verify", "--data", check=False)
        assert after.returncode == 0, after.stdout + after.stderr
    finally:
        m.cleanup()


def test_repair_without_a_local_copy_says_so_and_exits_non_zero(engine, tmp_path):
    import shutil

    m = Mount(tmp_path, engine.urls)
    try:
        content = os.urandom(98_765)
        with m.mounted():
            (m.dir / "lonely.bin").write_bytes(content)
            m.wait_idle()
        shutil.rmtree(m.root / "cache")
        blob = blob_of(engine, len(content) + 28)
        raw = bytearray(blob.read_bytes())
        raw[-1] ^= 0x80  # the tag itself
        blob.write_bytes(bytes(raw))
        r = privifs(m.env, "verify", "--data", "--repair", check=False)
        assert r.returncode == 3
        assert "damaged: /lonely.bin" in r.stdout and "not repaired: /lonely.bin: no local copy" in r.stdout
    finally:
        m.cleanup()


def test_a_damaged_part_of_a_big_file_is_never_stored_again_under_a_new_token(engine, tmp_path):
    from privifs.parts.store import PART_SIZE

    m = Mount(tmp_path, engine.urls)
    try:
        tail = 200_000 + secrets.randbelow(100_000)  # the last part's size finds its blob: no other test's
        content = os.urandom(2 * PART_SIZE + tail)  # above the threshold: parts + a manifest
        with m.mounted():
            (m.dir / "big.bin").write_bytes(content)
            m.wait_idle()
            assert (m.dir / "big.bin").read_bytes() == content  # the whole content now in the cache
        blob = blob_of(engine, tail + 28)  # the last part
        raw = bytearray(blob.read_bytes())
        raw[-1] ^= 0x80
        blob.write_bytes(bytes(raw))
        r = privifs(m.env, "verify", "--data", "--repair", check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "damaged: /big.bin: part 2 " in r.stdout and "cannot be stored again" in r.stdout
        assert (
            "1 damaged, 0 repaired" in r.stdout and "not yet in the local index" not in r.stdout
        )  # parts are no files
    finally:
        m.cleanup()


def blob_of_token(engine, token: str):
    import sqlite3

    conn = sqlite3.connect(f"file:{engine.data_dir / 'engine.sqlite3'}?mode=ro", uri=True)
    try:
        (blob_id,) = conn.execute("SELECT blob_id FROM data_tokens WHERE token = ?", (token,)).fetchone()
    finally:
        conn.close()
    return engine.data_dir / "blobs" / blob_id[:2] / blob_id


@pytest.mark.slow
def test_a_swapped_or_missing_part_names_its_file_though_every_tag_verifies(engine, tmp_path):
    """Each part's GCM tag proves only that the vault's key wrote it: a part replaced by another
    part of the vault, or deleted, is found by checking the parts against their manifest (size,
    keyed digest, presence), as every read does; verify said "ok" while reads of it were EIO."""
    import json

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from privifs.parts import format as fmt
    from privifs.parts.store import PART_SIZE

    m = Mount(tmp_path, engine.urls)
    try:
        content = os.urandom(2 * PART_SIZE + 300_001)  # three parts: two full ones and a tail
        with m.mounted():
            (m.dir / "whole.bin").write_bytes(content)
            m.wait_idle()
        listing = [json.loads(line) for line in m.token("ls", "--json").stdout.splitlines()]
        manifest_token = next(t["token"] for t in listing if t["fileName"] == "whole.bin")
        blob = blob_of_token(engine, manifest_token).read_bytes()
        key = bytes.fromhex(m.key_file.read_text().strip())
        manifest = fmt.decode(AESGCM(key).decrypt(blob[:12], blob[12:], None))
        parts = [p.token for p in manifest.parts]
        assert len(parts) == 3 and not any(p.is_hole for p in manifest.parts)
        first, second = (blob_of_token(engine, parts[i]) for i in (0, 1))
        original = first.read_bytes()
        first.write_bytes(second.read_bytes())  # part 1's blob, valid GCM under the key, in part 0's place
        r = privifs(m.env, "verify", "--data", check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        assert "damaged: /whole.bin: part 0 " in r.stdout and "digest" in r.stdout, r.stdout
        assert "/.privifs/parts" not in r.stdout and "Traceback" not in r.stderr

        first.write_bytes(original)
        m.token("rm", parts[2])  # a part gone from the vault (what a wrong collection would do)
        r = privifs(m.env, "verify", "--data", check=False)
        assert r.returncode == 3, r.stdout + r.stderr
        assert f"damaged: /whole.bin: part 2 (token {parts[2]}) is missing from the vault" in r.stdout, r.stdout
        assert "part 0" not in r.stdout
    finally:
        m.cleanup()


@pytest.mark.slow
def test_a_damaged_manifest_is_repaired_from_the_cached_whole_content_and_reads_back(engine, tmp_path):
    """The manifest token's privifs.digest states the manifest's encoding, and the cache keeps the
    file's whole content under that token: the copy was refused as 'damaged too' against the
    manifest's digest (it is intact), and stored with that digest every read would be EIO."""
    from privifs.parts.store import THRESHOLD

    m = Mount(tmp_path, engine.urls)
    try:
        content = os.urandom(THRESHOLD + 123_457)  # above the threshold: parts + a manifest
        with m.mounted():
            (m.dir / "big.bin").write_bytes(content)
            m.wait_idle()
        (info,) = [t for t in m.tokens() if t["fileName"] == "big.bin"]
        assert "privifs.parts" in info["risk"] and "privifs.digest" in info["risk"]
        blob = blob_of_token(engine, info["token"])
        raw = bytearray(blob.read_bytes())
        raw[-1] ^= 0x80
        blob.write_bytes(bytes(raw))
        r = privifs(m.env, "verify", "--data", "--repair", check=False)
        assert r.returncode == 0 and "\nrepaired: /big.bin" in "\n" + r.stdout, r.stdout + r.stderr
        with m.mounted():  # the mount follows the new token
            assert (m.dir / "big.bin").read_bytes() == content
        again = privifs(m.env, "verify", "--data", check=False)
        assert again.returncode == 0, again.stdout + again.stderr
        other = Mount(tmp_path / "other", engine.urls, username=m.username, register=False, key_file=m.key_file)
        try:
            with other.mounted():
                assert (other.dir / "big.bin").read_bytes() == content
        finally:
            other.cleanup()
    finally:
        m.cleanup()


STRAY_PART = """
import os, secrets, trio
from privifs.account import open_account
from privifs.client.connect import connect
from privifs.client.datatokens import FileMeta
from privifs.config import load

async def main(account):
    async with connect(account.endpoints, account.credentials) as client:
        name = secrets.token_hex(8) + "-0"
        meta = FileMeta(name, "", "/.privifs/parts", 1000, "/.privifs/parts/" + name)
        await client.vault(account.key).put_bytes(os.urandom(1000), meta)

with open_account(load()) as account:
    trio.run(main, account)
"""


@pytest.mark.slow
def test_verify_data_counts_the_parts_no_file_names(engine, tmp_path):
    """Parts a killed or failed upload left (no manifest names them) were invisible: a count of
    the vault's part tokens did not match its files and nothing said why. verify --data names
    how many there are and that a mount's sweep removes them; they are no damage (exit 0)."""
    from privifs.parts.store import PART_SIZE

    m = Mount(tmp_path, engine.urls)
    try:
        with m.mounted():
            (m.dir / "big.bin").write_bytes(os.urandom(2 * PART_SIZE + 5))
            m.wait_idle()
        r = privifs(m.env, "verify", "--data")
        assert "parts of no file" not in r.stdout, r.stdout
        # a part no manifest names, as a killed upload leaves it (token put refuses that context)
        subprocess.run([sys.executable, "-c", STRAY_PART], env=m.env, check=True, timeout=120)
        r = privifs(m.env, "verify", "--data", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verify: ok:" in r.stdout and "1 parts of no file" in r.stdout, r.stdout
        # a big file removed just before the unmount leaves its parts too (deleted a minute after the
        # removal, by the next start if the mount stopped first): the summary named only uploads
        with m.mounted():
            (m.dir / "big.bin").unlink()
        r = privifs(m.env, "verify", "--data", check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "4 parts of no file" in r.stdout and "big files removed" in r.stdout, r.stdout
    finally:
        m.cleanup()


async def test_a_token_deleted_while_verify_runs_is_no_damage(account, tmp_path):
    """verify --data beside a live mount (found by a kill -9 loop: verify after the remount): the
    mount retired an old manifest's parts (60 s after the rewrite) between verify's listing and
    its download of them, and verify reported them missing, exit 3. A token the vault no longer
    lists and no local file names was deleted meanwhile: counted, no damage."""
    import argparse

    from privifs.cli.verify_cmd import verify
    from privifs.client.connect import connect
    from privifs.client.datatokens import FileMeta

    key = secrets.token_bytes(32)
    async with connect(*account) as client:
        vault = client.vault(key)
        await vault.put_bytes(b"kept", FileMeta("kept", "txt", "/", 4, "/kept.txt"))
        doomed = [
            await vault.put_bytes(b"replaced", FileMeta("old", "txt", "/", 8, "/old.txt")),
            await vault.put_bytes(
                os.urandom(1000), FileMeta("ab12-0", "", "/.privifs/parts", 1000, "/.privifs/parts/ab12-0")
            ),
        ]
        listing = client.tokens.list

        async def listed_then_deleted(**filters):
            async for info in listing(**filters):
                yield info
            if not filters:  # verify's listing was read: another client deletes now
                for token in doomed:
                    await client.tokens.delete(token)

        client.tokens.list = listed_then_deleted
        args = argparse.Namespace(data=True, repair=False)
        report = await verify(args, client, vault, key, tmp_path / "state", tmp_path / "cache")
    assert report.missing == [] and report.damaged == [], report
    assert report.gone == 2 and report.checked == 1


@pytest.mark.parametrize("when", ["before the check", "while --data runs"])
async def test_a_file_another_client_replaced_is_not_reported_missing(kit, when):
    """verify beside another client rewriting a file (a new token at its place, the old one
    deleted): this machine's index still named the old token until its mount's next listing,
    and verify reported the file missing, exit 3 (helper hJ, 2 of 2 beside fsx on another
    mount). A newer token at the file's place is another client's version: counted, no damage."""
    import argparse

    from privifs.cli.verify_cmd import verify

    await kit.write_file("doc.txt", b"mine")
    await kit.settle()
    client = kit.client
    if when == "before the check":
        await kit.remote.rewrite("doc.txt", b"theirs")
    else:
        listing = client.tokens.list

        async def listed_then_replaced(**filters):
            async for info in listing(**filters):
                yield info
            if not filters:  # verify's listing was read: another client rewrites the file now
                client.tokens.list = listing
                await kit.remote.rewrite("doc.txt", b"theirs")

        client.tokens.list = listed_then_replaced
    args = argparse.Namespace(data=when != "before the check", repair=False)
    report = await verify(args, client, client.vault(kit.key), kit.key, kit.state, kit.state / "no-cache")
    assert report.missing == [] and report.damaged == [], report
    assert report.replaced + report.gone == 1, report


def test_verify_names_other_applications_tokens_in_the_reserved_context(user, tmp_path):
    """Another application's token put in /.privifs (or under it, not named as a part) is shown by
    no mount; nothing said so (helper hAG L2). verify names each, and the key check and parts are
    not among them."""
    import trio

    from privifs.client.connect import connect
    from privifs.client.datatokens import FileMeta
    from privifs.client.session import PasswordCredentials
    from privifs.client.transport import Endpoints
    from privifs.client.vault import Vault
    from privifs.crypto.keys import load_aes_key

    async def store() -> None:
        credentials = PasswordCredentials(user["PRIVICORE_USERNAME"], user["PRIVICORE_PASSWORD"])
        urls = {k: user[f"PRIVICORE_{k.upper()}_URL"] for k in ("api", "ws", "upstream", "downstream")}
        async with connect(Endpoints.from_dict(urls), credentials) as client:
            vault = Vault(client.tokens, load_aes_key(tmp_path / "config" / "privifs" / "aes.key"))
            for context, name in (("/.privifs", "c8.txt"), ("/.privifs/parts", "c9.txt")):
                await vault.put_bytes(b"theirs", FileMeta(name, "txt", context, 6, f"{context}/{name}"))

    privifs(user, "token", "ls")  # (makes the key check)
    trio.run(store)
    r = privifs(user, "verify", check=False)
    notes = [line for line in r.stdout.splitlines() if "which privifs keeps for its own tokens" in line]
    assert len(notes) == 2, r.stdout
    assert notes[0].startswith("note: /.privifs/c8.txt (token dtk-")
    assert notes[1].startswith("note: /.privifs/parts/c9.txt (token dtk-")
    assert "2 in /.privifs, which mounts do not show" in r.stdout and r.returncode == 0, (r.returncode, r.stdout)
