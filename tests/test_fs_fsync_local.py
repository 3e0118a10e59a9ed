"""``--fsync local``: fsync returns once the change is durable on the local disk (staged and
indexed), whatever the server does; the upload follows in the background, even while the file
stays open, and after a kill -9 of the daemon the next mount uploads it."""

from __future__ import annotations

import os
import time

from tests.mountkit import Mount, privifs

WAIT = 60


def _token_sizes(m: Mount, name: str) -> list[int]:
    return [int(t["size"]) for t in m.tokens() if t["context"] == "/" and t["fileName"] == name]


def _wait_for_token(m: Mount, name: str, size: int) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if size in _token_sizes(m, name):
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} ({size} bytes) never reached the vault; log:\n{m.log()[-6000:]}")


def test_fsync_local_succeeds_while_the_server_refuses_uploads_and_the_data_follows(eng, tmp_path):
    with Mount(tmp_path, eng.urls, mount_args=("--fsync", "local", "--fsync-timeout", "5")).mounted() as m:
        eng.set_options(reject="reserve-token-space", reject_reason="policy.rejected")
        data = os.urandom(50_000)
        fd = os.open(m.dir / "app.db", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)  # the default mode fails here with EIO (test_fs_faults)
            status = m.status()
            assert status["fsync"]["mode"] == "local"
            assert status["fsync"]["not_in_vault"] >= 1 and status["fsync"]["fsynced_not_in_vault"] == 1
            assert "fsync:        LOCAL" in privifs(m.env, "status", str(m.dir)).stdout
            assert _token_sizes(m, "app.db") == []
            eng.set_options(reject="")
            m.wait_idle()  # retries now; the file stays open (as a database keeps it)
            _wait_for_token(m, "app.db", len(data))
            assert m.status()["fsync"]["fsynced_not_in_vault"] == 0
        finally:
            os.close(fd)
        assert (m.dir / "app.db").read_bytes() == data


def test_fsync_local_data_survives_kill9_of_the_daemon_and_the_next_mount_uploads_it(eng, tmp_path):
    m = Mount(tmp_path, eng.urls, mount_args=("--fsync", "local"))
    try:
        m.mount()
        eng.set_options(reject="reserve-token-space", reject_reason="policy.rejected")
        data = os.urandom(20_000)
        fd = os.open(m.dir / "journal.bin", os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, data)
        os.fsync(fd)
        more = os.urandom(90_000)  # it grows; this fdatasync commits no size to the index: the
        os.write(fd, more)  # staged file's header has it
        os.fdatasync(fd)
        data += more
        m.kill9()  # right after the fsync, the descriptor still open
        try:
            os.close(fd)
        except OSError:  # ENOTCONN: the mount died under it
            pass
        eng.set_options(reject="")
        m.mount()
        m.wait_idle()
        _wait_for_token(m, "journal.bin", len(data))
        assert (m.dir / "journal.bin").read_bytes() == data
    finally:
        m.cleanup()
