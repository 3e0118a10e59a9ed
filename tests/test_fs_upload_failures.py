"""What an upload that fails leaves behind: nothing of a file removed or written again while it
was in flight (its staged copy stayed on disk, held open, with nothing pending, until a remount),
and no second token when the server made the token but answered an error (the retry stored the
file again, and every mount showed a conflict copy). Driven in-process against the real engine
with its fault injection (tests/fskit.py)."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import pytest
import trio

from privifs.client.datatokens import DataTokens
from privifs.errors import PrivifsError, ServerError


async def wait_for(predicate, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_a_file_removed_while_its_upload_fails_leaves_no_staged_copy(kit, eng):
    eng.set_options(fail_rate=1.0, latency_ms=300)
    fh, node = kit.create_node(1, "gone.bin")
    await kit.fs.write(fh, 0, os.urandom(200_000))
    kit.fs.release(fh)
    await wait_for(lambda: node.uploading)
    await kit.unlink("gone.bin")
    kit.forget(node)  # the kernel lets go while the upload is still in flight
    await wait_for(lambda: not node.uploading)
    assert kit.fs.staging.ids() == set()
    eng.set_options(fail_rate=0.0, latency_ms=0)
    await kit.settle()
    assert await kit.vault_tree() == {}


async def test_a_file_removed_while_open_and_uploading_reads_whole_after_the_upload_ends(kit, eng):
    """``rm`` of a file another program has open, while its upload is in flight: when the upload
    ended, its staged copy was deleted although the descriptor still read from it, which then
    read 0 bytes of a file whose fstat said 300 MiB (seen on a mount: write, close, open, unlink
    a second later, read). It stays for the descriptor, and goes with the last close."""
    eng.set_options(latency_ms=300)
    data = os.urandom(200_000)
    fh, node = kit.create_node(1, "open.bin")
    await kit.fs.write(fh, 0, data)
    kit.fs.release(fh)
    await wait_for(lambda: node.uploading)
    reader = await kit.open_node(node, os.O_RDONLY)
    await kit.unlink("open.bin")
    await wait_for(lambda: not node.uploading)
    assert await kit.fs.read(reader, 0, 1 << 20) == data
    kit.fs.release(reader)
    kit.forget(node)
    eng.set_options(latency_ms=0)
    await kit.settle()
    assert kit.fs.staging.ids() == set()
    assert await kit.vault_tree() == {}


async def test_a_file_written_again_while_its_upload_fails_keeps_only_its_current_staged_copy(kit, eng):
    eng.set_options(fail_rate=1.0, latency_ms=300)
    fh, node = kit.create_node(1, "again.bin")
    await kit.fs.write(fh, 0, b"first " * 10_000)
    kit.fs.release(fh)
    await wait_for(lambda: node.uploading)
    fh = await kit.open_node(node)
    await kit.fs.write(fh, 0, b"second")  # a copy of the staged file takes its place
    kit.fs.release(fh)
    await wait_for(lambda: not node.uploading)
    assert kit.fs.staging.ids() == {node.staged_id}
    eng.set_options(fail_rate=0.0, latency_ms=0)
    await kit.settle()
    assert await kit.vault_tree() == {"again.bin": b"second" + b"first " * 9_999}
    assert kit.fs.staging.ids() == set()


async def test_a_token_the_server_made_despite_answering_an_error_is_not_left_as_a_second_copy(kit, monkeypatch):
    """configure-file-meta did its work, but every answer was lost: the upload failed after the
    token existed. Its retry stores the file again; the first token is deleted, not shown as a
    conflict copy on every mount."""
    real = DataTokens.configure
    first_tries = kit.syncer.tokens.options.store_attempts  # every try of the first upload
    calls = []

    async def answer_lost(self, tmp, meta):
        token = await real(self, tmp, meta)  # the server made the token
        calls.append(token)
        if len(calls) <= first_tries:
            raise ServerError("the answer was lost", status=503)
        return token

    monkeypatch.setattr(DataTokens, "configure", answer_lost)
    await kit.write_file("once.txt", b"written once")
    await kit.settle(timeout=60)
    monkeypatch.setattr(DataTokens, "configure", real)
    await kit.refresh()
    await kit.settle()
    assert await kit.tree() == {"once.txt": b"written once"}
    assert await kit.vault_tree() == {"once.txt": b"written once"}
    assert len(set(calls)) >= 2  # the first token was made, and replaced


@pytest.mark.slow
async def test_write_back_that_backed_off_goes_as_soon_as_the_listing_works_again(kit, eng):
    """After an outage the retries had backed off to minutes (up to 5), so a mount whose server
    came back took that long to upload; a listing that works again retries them at once."""
    eng.set_options(fail_rate=1.0)
    await kit.refresher._refresh_logged()  # the listing fails too
    assert kit.refresher.last_error is not None
    fh, node = kit.create_node(1, "waiting.txt")
    await kit.fs.write(fh, 0, b"written during the outage")
    kit.fs.release(fh)
    await wait_for(lambda: node.attempts >= 2 and node.retry_at > trio.current_time() + 1.8, timeout=90)
    eng.set_options(fail_rate=0.0)
    await kit.refresher._refresh_logged()
    await wait_for(lambda: not node.content_dirty, timeout=1.2)  # not at its backoff's end, 1.8 s on or more
    assert await kit.vault_tree() == {"waiting.txt": b"written during the outage"}


async def test_files_whose_promotion_answer_was_cut_short_are_stored_not_dropped(module_account, eng, tmp_path):
    """configure-file-meta's answer cut short on its way ('{"token":"dtk-1a2b', or '"dtk-1a2b'
    from a server answering bare strings) was taken for the new token: its risk meta then got
    "not found", the write-back took that for a deletion by another client and dropped the
    change. Files just written and closed vanished from the mount (a directory showed as an empty
    file), though the vault held them. The answer is asked for again."""
    from tests.enginekit import proxied_api
    from tests.fskit import inprocess_fs

    endpoints, creds = module_account
    eng.set_options(file_meta_shape="string")
    left = {"cuts": 6}

    def mangle(path: str, status: int, body: bytes) -> tuple[int, bytes]:
        if path.startswith("/data-token/configure-file-meta") and status == 200 and left["cuts"]:
            left["cuts"] -= 1
            return status, body[: len(body) // 2]
        return status, body

    async with proxied_api(endpoints, mangle) as proxied:
        async with inprocess_fs(tmp_path, proxied, creds, empty_vault=True) as kit:
            await kit.mkdir("d")
            await kit.write_file("a.txt", b"one")
            await kit.write_file("d/b.txt", b"two")
            await kit.write_file("c.bin", b"three" * 20_000)
            await kit.settle(timeout=60)
            await kit.refresh()
            expected = {"a.txt": b"one", "d": "dir", "d/b.txt": b"two", "c.bin": b"three" * 20_000}
            assert await kit.tree() == expected
            assert await kit.vault_tree() == expected
    assert left["cuts"] == 0


async def test_files_whose_promotion_answer_named_no_such_token_are_stored_under_the_real_one(
    module_account, eng, tmp_path
):
    """configure-file-meta's answer changed on its way into other token-like text, a character
    flipped or a proxy's 200 ``hello`` (a bare-string token), was taken for the new token. A big
    file's manifest then named a part that does not exist: fsync returned 0, and the file read
    EIO on every mount while its real part went unnamed (collected an hour later); a directory's
    marker so named showed as an empty file. The answer is taken once the vault lists it."""
    from privifs.parts.store import THRESHOLD
    from tests.enginekit import proxied_api
    from tests.fskit import inprocess_fs

    endpoints, creds = module_account
    eng.set_options(file_meta_shape="string")
    changes = iter([lambda b: b"hello", lambda b: b[:-3] + bytes([b[-3] ^ 1]) + b[-2:]] * 6)
    changed = []

    def mangle(path: str, status: int, body: bytes) -> tuple[int, bytes]:
        if path.startswith("/data-token/configure-file-meta") and status == 200 and len(changed) % 2 == 0:
            change = next(changes, None)
            if change is not None:
                changed.append(body)
                return status, change(body)
        if path.startswith("/data-token/configure-file-meta"):
            changed.append(None)
        return status, body

    big = os.urandom(THRESHOLD + 1_000_003)  # three parts and a manifest
    async with proxied_api(endpoints, mangle) as proxied:
        async with inprocess_fs(tmp_path, proxied, creds, empty_vault=True) as kit:
            await kit.mkdir("d")
            await kit.write_file("d/a.txt", b"one", fsync=True)
            await kit.write_file("big.bin", big, fsync=True)
            await kit.settle(timeout=60)
            await kit.refresh()
            expected = {"d": "dir", "d/a.txt": b"one", "big.bin": big}
            assert await kit.tree() == expected
            async with kit.fresh() as other:
                assert await other.tree() == expected
    assert len([b for b in changed if b is not None]) >= 4


async def test_one_answer_changed_on_its_way_neither_fails_an_fsync_nor_undoes_a_rename(module_account, eng, tmp_path):
    """A 202 whose command id was changed on its way ("the server does not know command …") and a
    temporary token answer with a key so changed (``{"tmken": …}``) failed the fsync waiting on
    them with EIO at once, though the next attempt succeeded; the changed id of a rename's
    update, or its answer's status changed to 404, was taken for "the token is gone", and the
    rename was dropped: the file went back to its old name on every mount."""
    from tests.enginekit import proxied_api
    from tests.fskit import inprocess_fs

    endpoints, creds = module_account
    armed = {"temporary": False, "update": False, "404": False}
    seen = []

    def mangle(path: str, status: int, body: bytes) -> tuple[int, bytes]:
        if armed["temporary"] and path.startswith("/data-token/retrieve-temporary-data-token") and status == 200:
            armed["temporary"] = False
            seen.append("temporary")
            return status, body.replace(b'"token"', b'"tmken"')
        if armed["update"] and path.startswith("/data-token/update-data-token") and status in (200, 202):
            armed["update"] = False
            seen.append("update")
            return status, body.replace(b"-", b"+", 1) if b"-" in body else b"x" + body
        if armed["404"] and path.startswith("/data-token/update-data-token"):
            armed["404"] = False
            seen.append("404")
            return 404, b'{"message": "not found"}'
        return status, body

    async with proxied_api(endpoints, mangle) as proxied:
        async with inprocess_fs(tmp_path, proxied, creds, empty_vault=True) as kit:
            await kit.write_file("a.txt", b"first", fsync=True)
            armed["temporary"] = True
            await kit.write_file("a.txt", b"second", fsync=True)  # an OSError(EIO) before
            armed["update"] = True
            await kit.rename("a.txt", "b.txt")
            await kit.settle(timeout=60)
            armed["404"] = True
            await kit.rename("b.txt", "c.txt")
            await kit.settle(timeout=60)
            await kit.refresh()
            assert await kit.tree() == {"c.txt": b"second"}
            assert await kit.vault_tree() == {"c.txt": b"second"}
    assert seen == ["temporary", "update", "404"]


def test_an_fsync_waits_through_a_few_answers_of_a_shape_it_does_not_know_not_for_ever():
    from privifs.errors import MalformedAnswer, ProtocolError
    from privifs.fs.sync import fsync_waits_through

    odd = ProtocolError("unexpected temporary token answer: {'tmken': …}")
    assert [fsync_waits_through(odd, odd_answers=n) for n in range(5)] == [True, True, True, False, False]
    assert fsync_waits_through(MalformedAnswer("cut short"), odd_answers=10)  # transient: always


async def test_a_removal_whose_delete_answered_404_on_its_way_still_deletes_the_token(module_account, eng, tmp_path):
    """A delete answered 404 ("already gone") counted as done; a 404 the server never sent (a
    middlebox answering for it) left the removed file's token in the vault, and the file came
    back on every mount."""
    from tests.enginekit import proxied_api
    from tests.fskit import inprocess_fs

    endpoints, creds = module_account
    armed = {"404": 0}

    def answer(path: str) -> tuple[int, bytes] | None:
        if armed["404"] and path.startswith("/data-token/delete-data"):
            armed["404"] -= 1
            return 404, b'{"message": "not found"}'
        return None

    async with proxied_api(endpoints, None, answer) as proxied:
        async with inprocess_fs(tmp_path, proxied, creds, empty_vault=True) as kit:
            await kit.write_file("kept.txt", b"kept", fsync=True)
            await kit.write_file("gone.txt", b"removed here", fsync=True)
            armed["404"] = 1
            await kit.unlink("gone.txt")
            await kit.settle(timeout=60)
            await kit.refresh()
            assert armed["404"] == 0
            assert await kit.vault_tree() == {"kept.txt": b"kept"}
            assert await kit.tree() == {"kept.txt": b"kept"}


async def test_a_save_whose_look_at_the_old_version_failed_deletes_it_once_the_look_succeeds(
    module_account, eng, tmp_path
):
    """A save looks whether the version it replaces was renamed by another client before it
    deletes it. When that look failed (a 503), the old version was kept for good: older, it held
    the plain name on every other mount and, after a restart, on this one too; the fsynced save
    was a conflict copy there (helper hS F1, 2 of 2). It is now deleted once a look tells."""
    from privifs.client.datatokens import find
    from privifs.client.transport import ClientOptions
    from tests.enginekit import proxied_api
    from tests.fskit import inprocess_fs

    endpoints, creds = module_account
    failing: dict[str, int] = {}

    def mangle(path: str, status: int, body: bytes) -> tuple[int, bytes]:
        for token in failing:
            if f"filters%5Btoken%5D={token}" in path and failing[token] > 0:
                failing[token] -= 1
                return 503, b'{"status": 503, "message": "injected"}'
        return status, body

    async with proxied_api(endpoints, mangle) as proxied:
        async with inprocess_fs(tmp_path, proxied, creds, empty_vault=True) as kit:
            await kit.write_file("f.txt", b"the old version", fsync=True)
            old = kit.node("/f.txt").token
            failing[old] = ClientOptions.retry_attempts  # the save's look, with its retries
            await kit.write_file("f.txt", b"the save", fsync=True)
            with trio.fail_after(30):
                while failing[old] or await find(kit.client.tokens, old) is not None:
                    await trio.sleep(0.2)
            await kit.settle(timeout=30)
            async with kit.fresh() as other:
                assert await other.tree() == {"f.txt": b"the save"}


@asynccontextmanager
async def failing_looks(account, tmp_path):
    """An in-process mount on an emptied vault whose stores make one confirming look each (no
    retries), behind a proxy answering 503 to the next ``failing["lookups"]`` looks of a token
    by id (``filters[token]``); yields the mount and ``failing``."""
    from tests.enginekit import proxied_api
    from tests.fskit import inprocess_fs

    endpoints, creds = account
    failing = {"lookups": 0}

    def mangle(path: str, status: int, body: bytes) -> tuple[int, bytes]:
        if failing["lookups"] > 0 and "filters%5Btoken%5D=dtk" in path:
            failing["lookups"] -= 1
            return 503, b'{"status": 503, "message": "injected"}'
        return status, body

    async with proxied_api(endpoints, mangle) as proxied:
        async with inprocess_fs(tmp_path, proxied, creds, empty_vault=True) as kit:
            options = kit.client.tokens.options
            options.retry_attempts = options.store_attempts = 1
            yield kit, failing


async def test_a_directory_whose_marker_was_made_though_its_store_failed_leaves_no_empty_file(
    module_account, eng, tmp_path
):
    """A directory's marker whose store failed after configure-file-meta had made it (the look
    that confirms the token failed) was made again by the retry, and the first one stayed: an
    empty file ``d.conflict-…`` on every mount (helper hS F3). It is settled as a file's upload
    is: asked for again and deleted before the retry."""
    async with failing_looks(module_account, tmp_path) as (kit, failing):
        failing["lookups"] = 1  # the first store's look
        await kit.mkdir("d")
        await kit.settle(timeout=30)
        assert failing["lookups"] == 0
        await kit.refresh()
        assert await kit.vault_tree() == {"d": "dir"}
        async with kit.fresh() as other:
            assert await other.tree() == {"d": "dir"}


async def test_a_token_the_write_back_is_deleting_is_not_adopted_as_an_interrupted_upload(
    module_account, eng, tmp_path
):
    """A store that failed after configure-file-meta made its token is settled by the next
    upload's start (the token asked for again and tombstoned); the listing meanwhile took the
    same token for an interrupted upload and recorded it as the file's (helper hU N1: 6 ms
    apart). The file's token was then being deleted, and the upload in flight made one no one
    settled, which held the name over the next fsynced save on every mount."""
    from privifs.client.datatokens import find

    async with failing_looks(module_account, tmp_path) as (kit, failing):
        resume = kit.hold_write_back()
        await kit.write_file("f.txt", b"the content")
        node = kit.node("/f.txt")
        failing["lookups"] = 1  # the store's confirming look
        with pytest.raises(PrivifsError):
            await kit.syncer._upload(node)
        tmp, meta = kit.syncer._unconfigured.pop(node.ino)
        await kit.syncer._drop_unconfigured(node, tmp, meta)  # what the next upload does first
        (info,) = [i async for i in kit.client.tokens.list() if i.file_name == "f.txt"]
        assert info.token in set(kit.syncer.index.tombstones())
        assert not await kit.syncer.adopt_orphan(node, info)
        resume()
        await kit.settle(timeout=30)
        assert await find(kit.client.tokens, info.token) is None
        async with kit.fresh() as other:
            assert await other.tree() == {"f.txt": b"the content"}


@pytest.mark.slow
async def test_uploads_failing_alike_are_logged_once_every_few_seconds_with_a_count(kit, eng, caplog):
    """A server failing every upload the same way (a full disk) logged one warning per file and
    attempt: on the full disk it failed for, the log took the space as it was freed. Such
    warnings come once per interval now, the next saying how many more it stood for."""
    import logging

    warnings = kit.fs.sync.retry_warnings
    warnings.every = 120.0  # longer than the first attempts of all three take
    eng.set_options(fail_rate=1.0)
    nodes = []

    def retry_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="privifs.fs.sync"):
        for i in range(3):
            fh, node = kit.create_node(1, f"f{i}.bin")
            await kit.fs.write(fh, 0, b"x" * 1000)
            kit.fs.release(fh)
            nodes.append(node)
        await wait_for(lambda: all(n.attempts >= 1 for n in nodes), timeout=90)
        first = retry_lines()
        assert len(first) == 1 and "injected failure" in first[0], first
        warnings.every = 0.0  # the next failure is logged, with the count of those not logged
        await wait_for(lambda: len(retry_lines()) > 1, timeout=60)
        assert "more like it" in retry_lines()[1], retry_lines()
        eng.set_options(fail_rate=0.0)
        kit.fs.sync.retry_all_now()
        await kit.settle(timeout=60)
    assert set((await kit.vault_tree()).keys()) == {f"f{i}.bin" for i in range(3)}
