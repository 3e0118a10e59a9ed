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


def test_numbers_from_other_applications_past_64_bits_or_negative_ids_read_as_absent():
    """Another application's token with ``privifs.mtime`` of 40 digits (or an atime of 2^63, a uid
    of -5 or 2^40) made every listing fail (SQLite: "Python int too large to convert to SQLite
    INTEGER") and its directory unreadable (readdir: EIO, pyfuse3 could not set st_atime_ns)."""
    info = _info(
        {"privifs.mtime": "9" * 40, "privifs.atime": str(2**63), "privifs.uid": "-5", "privifs.gid": str(2**40)}
    )
    info.created_at = 1_700_000_000.0
    a = tokenmeta.attributes(info)
    assert a.mtime_ns == 1_700_000_000 * 10**9  # the creation time, as for a token with no mtime
    assert a.atime_ns is None and a.uid is None and a.gid is None
    far = _info({"privifs.mtime": str(-(2**64))})
    far.created_at = 1e12  # year 33658: past what nanoseconds in 64 bits hold
    assert tokenmeta.attributes(far).mtime_ns is None
    edge = _info(
        {
            "privifs.mtime": str(2**63 - 1),
            "privifs.atime": str(-(2**63)),
            "privifs.uid": "0",
            "privifs.gid": str(2**32 - 2),
        }
    )
    a = tokenmeta.attributes(edge)
    assert (a.mtime_ns, a.atime_ns, a.uid, a.gid) == (2**63 - 1, -(2**63), 0, 2**32 - 2)


def test_a_mode_outside_what_a_mode_holds_reads_as_absent_not_as_every_bit_set():
    """A ``privifs.mode`` of -1 or 77777777 from another application showed as 07777
    (``-rwsrwsrwt``: set-user-ID and set-group-ID set) where the docs say such a number reads as
    absent (helper hAG L4); 4755 stays 4755."""
    for junk in ("-1", "77777777", "10000", "999", "rw-"):
        assert tokenmeta.attributes(_info({"privifs.mode": junk})).mode is None, junk
    assert tokenmeta.attributes(_info({"privifs.mode": "4755"})).mode == 0o4755
    assert tokenmeta.attributes(_info({"privifs.mode": "0"})).mode == 0


def test_a_listed_size_that_is_negative_or_past_64_bits_is_no_size():
    base = {"token": "dtk-1", "context": "/", "fileName": "f"}
    for junk in (-1, 2**63, 10**30, "1e9", float("inf"), float("nan"), [1]):
        assert TokenInfo.from_item({**base, "size": junk}).size is None, junk
    assert TokenInfo.from_item({**base, "size": 2**63 - 1}).size == 2**63 - 1
    assert TokenInfo.from_item({**base, "size": "14"}).size == 14


def test_fields_a_later_privifs_writes_are_kept_and_our_own_are_written_afresh():
    """An older privifs dropped every privifs field it did not know on a chmod or rename (the
    extended attributes a later mount set were lost, helper hA): only the fields risk_fields
    writes are replaced now."""
    base = {
        "privifs.future": "kept",
        "other.app": "kept",
        "privifs.digest": "d" * 64,
        "privifs.mode": "777",
        "privifs.target": "stale",
        "privifs.xattrs": "stale",
        "privifs.uid": "5",
    }
    risk = tokenmeta.risk_fields(base, tokenmeta.KIND_FILE, 0o640, 7, None, None, None)
    assert risk["privifs.future"] == "kept" and risk["other.app"] == "kept" and risk["privifs.digest"] == "d" * 64
    assert risk["privifs.mode"] == "640" and risk["privifs.mtime"] == "7"
    assert not {"privifs.target", "privifs.xattrs", "privifs.uid"} & set(risk)
