"""A server that stops accepting the mount's login while it is mounted (the password was changed
on another machine, the account was disabled): the mount stays up, says why in ``privifs
status``, keeps what it could not upload, ``privifs umount`` says so and ends, and a password
file brought up to date lets the mount go on without a remount."""

from __future__ import annotations

import os
import time

import pytest
import trio

from tests.enginekit import Wire, command_id
from tests.mountkit import is_mounted, privifs
from tests.test_fs_offline import own_engine_mount

PASSWORD = "correct-horse-battery"  # what Mount registers its user with
# tokens that expire within seconds: the mount logs in again soon after the password changed
SHORT_TOKENS = {"token_ttl": 4, "max_reauthorize_ttl": 4}


def change_password(urls: dict, username: str, old: str, new: str) -> None:
    """What another machine of the same account does: change its password."""

    async def change() -> None:
        wire = Wire(urls)
        try:
            r = await wire.post("/profile/authenticate", {"username": username, "password": old})
            assert r.status_code == 200, r.text
            token = r.json()["authorizationToken"]
            r = await wire.post("/profile/change-password", {"currentPassword": old, "newPassword": new}, token=token)
            assert r.status_code == 202, r.text
            assert await wire.poll(command_id(r)) == "succeeded"
        finally:
            await wire.aclose()

    trio.run(change)


def wait_for_refusal(m, path: str | None = None) -> dict:
    """Until the listing (every second), or the upload of ``path``, meets the refused login."""
    deadline = time.monotonic() + 90
    while True:
        st = m.status()
        if path is None and "refused username" in (st["refresh_error"] or ""):
            return st
        if any(p["path"] == path and "refused username" in p["state"] for p in st["pending"]):
            return st
        assert time.monotonic() < deadline, (st, m.log()[-3000:])
        time.sleep(0.5)


@pytest.mark.slow
def test_umount_ends_and_keeps_the_changes_when_the_server_refuses_the_login(tmp_path):
    """It waited for ever: a refused login is no refusal of the change itself, so the flush
    waited for an upload that could not happen (seen: 'privifs umount' still running after 180 s)."""
    with own_engine_mount(tmp_path, ("--write-back-delay", "0"), settings=SHORT_TOKENS) as (eng, m):
        m.mount()
        (m.dir / "old.txt").write_text("uploaded before")
        m.wait_idle()
        change_password(eng.urls, m.username, PASSWORD, "changed-elsewhere-1")
        wait_for_refusal(m)  # the mount's token expired
        (m.dir / "precious.txt").write_text("do not lose me")
        os.unlink(m.dir / "old.txt")  # a delete waits too
        st = wait_for_refusal(m, "/precious.txt")
        assert "refused username" in privifs(m.env, "status", str(m.dir)).stdout, st
        r = privifs(m.env, "umount", str(m.dir), check=False, timeout=120)
        assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)
        assert "refuses the login" in r.stderr and "staged in" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not is_mounted(m.dir)

        change_password(eng.urls, m.username, "changed-elsewhere-1", PASSWORD)
        m.mount()
        m.wait_idle()
        assert (m.dir / "precious.txt").read_text() == "do not lose me"
        names = [t["fileName"] for t in m.tokens()]
        assert "precious.txt" in names and "old.txt" not in names
        m.umount()


@pytest.mark.slow
def test_a_password_file_brought_up_to_date_lets_the_mount_go_on(tmp_path):
    """The mount read the password once, at its start: after the password was changed elsewhere
    and written into the password file, it kept logging in with the old one until remounted."""
    with own_engine_mount(tmp_path, ("--write-back-delay", "0"), settings=SHORT_TOKENS) as (eng, m):
        m.mount()
        change_password(eng.urls, m.username, PASSWORD, "changed-elsewhere-2")
        wait_for_refusal(m)
        (m.dir / "precious.txt").write_text("do not lose me")
        wait_for_refusal(m, "/precious.txt")
        password_file = m.root / "config" / "privifs" / "password"
        password_file.write_text("changed-elsewhere-2\n")
        m.wait_idle(timeout=120)
        assert "precious.txt" in [t["fileName"] for t in m.tokens()]
        assert "refused" not in privifs(m.env, "status", str(m.dir)).stdout.split("last error:")[0]
        m.umount()


@pytest.mark.slow
def test_umount_of_a_mount_that_came_back_to_a_refused_login_says_refused_not_unreachable(tmp_path):
    """Started offline (the server gone), then the server answered but refused the login (the
    password was changed meanwhile): umount said "the server is unreachable (offline: the
    server refused username …)", which sent the user looking at the network."""
    with own_engine_mount(tmp_path, ("--write-back-delay", "0")) as (eng, m):
        m.mount()
        m.umount()
        change_password(eng.urls, m.username, PASSWORD, "changed-elsewhere-3")
        eng.stop()
        assert "OFFLINE" in m.mount().stdout
        (m.dir / "precious.txt").write_text("do not lose me")
        eng.start()
        deadline = time.monotonic() + 120
        while "refused username" not in (m.status()["connection"]["offline_reason"] or ""):
            assert time.monotonic() < deadline, (m.status(), m.log()[-3000:])
            m.control({"cmd": "flush", "timeout": 1})  # (asks the connector to try now)
            time.sleep(0.5)
        r = privifs(m.env, "umount", str(m.dir), check=False, timeout=120)
        assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)
        assert "refuses the login" in r.stderr and "unreachable" not in r.stderr, r.stderr
        assert "staged in" in r.stderr and "Traceback" not in r.stderr
        assert not is_mounted(m.dir)
