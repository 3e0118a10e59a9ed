"""The mount under a voting policy: a file whose upload is held by a vote stays pending (shown
by ``privifs status``), readable and safe; it is committed when the vote passes, and a rejected
vote surfaces as a clear error while the file stays staged."""

from __future__ import annotations

import time

import pytest
import trio

from privifs.client import governance as gov
from privifs.client.connect import connect
from privifs.client.session import PasswordCredentials
from privifs.client.transport import Endpoints
from tests.mountkit import Mount


def admin(eng, m: Mount, fn):
    """Run ``fn(client)`` as the mount's user with the client library."""

    async def main():
        async with connect(
            Endpoints.from_dict(eng.urls),
            PasswordCredentials(m.username, "correct-horse-battery"),
            revoke_on_close=False,
        ) as client:
            return await fn(client)

    return trio.run(main)


async def hold_reservations(client) -> tuple[str, str]:
    device = await gov.request_device(client, "phone")
    await gov.approve_device(client, device)
    await gov.register_authenticator(client, device)
    await gov.register_voting_configuration(client, "uploads", devices=[device], time_limit=600)
    templates = await gov.policy_templates(client)
    event = next(k for k, v in templates["tpl-data-governance"]["events"].items() if v == "data.reserve")
    policy = await gov.register_policy(
        client, "hold-uploads", "tpl-data-governance", [event], "uploads", {"why": "test"}
    )
    await gov.activate_policy(client, policy)
    return device, policy


def wait_for_pool(eng, m, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        pools = admin(eng, m, lambda c: gov.list_pools(c, "open"))
        if pools:
            return pools[0]
        assert time.monotonic() < deadline, "no vote was opened for the upload"
        time.sleep(0.3)


def test_upload_held_by_a_vote_completes_when_approved(eng, tmp_path):
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "0")).mounted() as m:
        device, _ = admin(eng, m, hold_reservations)
        (m.dir / "report.txt").write_text("needs approval")
        pool = wait_for_pool(eng, m)
        st = m.status()
        assert [p["path"] for p in st["pending"]] == ["/report.txt"]
        assert (m.dir / "report.txt").read_text() == "needs approval"
        assert admin(eng, m, lambda c: gov.cast_vote(c, pool["poolId"], device, True)) == "approved"
        m.wait_idle()
        assert "report.txt" in {t["fileName"] for t in m.tokens()}
        assert m.status()["last_error"] is None or "report.txt" not in (m.status()["last_error"] or "")


@pytest.mark.slow
def test_upload_rejected_by_a_vote_is_reported_and_kept(eng, tmp_path):
    with Mount(tmp_path, eng.urls, mount_args=("--write-back-delay", "0")).mounted() as m:
        device, policy = admin(eng, m, hold_reservations)
        (m.dir / "secret.txt").write_text("rejected but kept")
        pool = wait_for_pool(eng, m)
        assert admin(eng, m, lambda c: gov.cast_vote(c, pool["poolId"], device, False)) == "rejected"
        deadline = time.monotonic() + 60
        while "voting.rejected" not in (m.status()["last_error"] or ""):
            assert time.monotonic() < deadline, "the rejection never showed in privifs status"
            time.sleep(0.3)
        st = m.status()
        assert any(p["path"] == "/secret.txt" and "voting.rejected" in p["state"] for p in st["pending"])
        assert "voting.rejected" in m.log()
        assert (m.dir / "secret.txt").read_text() == "rejected but kept"
        assert "secret.txt" not in {t["fileName"] for t in m.tokens()}
        admin(eng, m, lambda c: gov.deactivate_policy(c, policy))
        m.wait_idle()
        assert "secret.txt" in {t["fileName"] for t in m.tokens()}
