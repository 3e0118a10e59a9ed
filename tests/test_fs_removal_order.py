"""A removal reaches the vault after the files this mount closed before it: another client never
sees a state this one never had (git's ``gc`` writes a new pack and then deletes the old ones; a
reader on another mount found neither and reported missing objects; ``pack-refs`` left it an
unborn branch)."""

from __future__ import annotations

import trio

from privifs.fs import sync
from tests.fskit import inprocess_fs


async def watch_vault(c, old: str, new: str, timeout: float = 30) -> list[tuple[bool, bool]]:
    """Poll the vault's listing until ``old`` is gone from it; each state seen, (old, new) there."""
    seen: list[tuple[bool, bool]] = []
    with trio.fail_after(timeout):
        while True:
            names = await c.vault_names()
            state = (old in names, new in names)
            if not seen or seen[-1] != state:
                seen.append(state)
            if not state[0]:
                return seen
            await trio.sleep(0.01)


async def test_a_file_removed_after_another_was_closed_leaves_the_vault_after_that_one_arrived(account, tmp_path):
    async with inprocess_fs(tmp_path, *account, write_back_delay=1.0) as c:
        await c.write_file("/old.pack", b"old objects")
        await c.wait_idle()
        await c.write_file("/new.pack", b"old and new objects")  # closed: uploaded after the delay
        await c.unlink("/old.pack")
        seen = await watch_vault(c, "old.pack", "new.pack")
        assert (False, False) not in seen, f"the vault held neither file: {seen}"
        assert seen[-1] == (False, True)
        await c.wait_idle()


async def test_a_removal_does_not_wait_for_a_file_still_open_for_writing(account, tmp_path):
    async with inprocess_fs(tmp_path, *account, write_back_delay=1.0) as c:
        await c.write_file("/gone", b"x")
        await c.wait_idle()
        fh = await c.create_file("/log")
        await c.write(fh, 0, b"still being written")
        await c.unlink("/gone")
        with trio.fail_after(10):  # not held until /log is closed and uploaded
            while "gone" in await c.vault_names():
                await trio.sleep(0.02)
        await c.close(fh)
        await c.wait_idle()


async def test_a_removal_waits_for_an_upload_that_does_not_land_only_so_long(account, tmp_path, monkeypatch):
    monkeypatch.setattr(sync, "REMOVAL_AFTER_UPLOADS", 1.0)
    async with inprocess_fs(tmp_path, *account) as c:
        await c.write_file("/gone", b"x")
        await c.wait_idle()
        resume = c.hold_write_back()  # /stuck's upload does not go (a server refusing it, say)
        await c.write_file("/stuck", b"y")
        await c.unlink("/gone")
        with trio.fail_after(10):
            while "gone" in await c.vault_names():
                await trio.sleep(0.02)
        assert "stuck" not in await c.vault_names()
        resume()
        await c.wait_idle()
