"""How attributes are written into a token's risk meta and read back (privifs/fs/tokenmeta.py)."""

from __future__ import annotations

import os

from privifs.client.shapes import TokenInfo
from privifs.fs import tokenmeta


def _info(risk: dict[str, str]) -> TokenInfo:
    return TokenInfo(token="t", context="/", file_name="d", extension="", size=0, path=None, created_at=None, risk=risk)


def test_a_device_number_round_trips_as_major_minor_and_junk_from_others_reads_as_0_0():
    disk = os.makedev(259, 65536)
    risk = tokenmeta.risk_fields({}, tokenmeta.KIND_BLOCKDEV, 0o600, 1, None, None, None, rdev=disk)
    assert risk["privifs.rdev"] == "259:65536"
    assert tokenmeta.attributes(_info(risk)).rdev == disk
    for junk in ("", "8", "a:b", "-1:0", "1:2:3", "4096:0", "0:1048576", "99999999999:0"):
        assert tokenmeta.attributes(_info({**risk, "privifs.rdev": junk})).rdev == 0, junk


def test_only_device_nodes_carry_a_device_number():
    fifo = tokenmeta.risk_fields({}, tokenmeta.KIND_FIFO, 0o600, 1, None, None, None, rdev=os.makedev(1, 3))
    assert "privifs.rdev" not in fifo
    assert tokenmeta.attributes(_info({**fifo, "privifs.rdev": "1:3"})).rdev == 0
