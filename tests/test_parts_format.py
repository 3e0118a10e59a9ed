"""The manifest format in-process: round trip, the documented worked example, strict refusal of
anything else, and the part digest binding content and position."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from privifs.errors import IntegrityError
from privifs.parts import format as fmt

KEY = bytes(range(32))


def sample(total: int = 10, part_size: int = 4) -> fmt.Manifest:
    dk = fmt.part_key(KEY)
    data = bytes(range(total))
    parts = tuple(
        fmt.Part(f"tok-{i}", len(data[o : o + part_size]), fmt.part_digest(dk, i, data[o : o + part_size]))
        for i, o in enumerate(range(0, total, part_size))
    )
    return fmt.Manifest(part_size, total, parts)


def test_manifest_round_trips_and_has_the_documented_layout():
    m = sample()
    raw = fmt.encode(m)
    assert fmt.decode(raw) == m
    assert raw[:8] == b"PVFSMNFT" and raw[8] == 1 and raw[9:12] == bytes(3)
    assert struct.unpack_from("<IQI", raw, 12) == (4, 10, 3)
    assert raw[32] == len("tok-0") and raw[33:38] == b"tok-0"
    assert len(raw) == 32 + 3 * (1 + 5 + 4 + 32)


def shown_in_docs(marker: str) -> str:
    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    lines = [line.strip() for line in doc.splitlines()]
    start = lines.index(marker) + 2
    return "".join("".join(line.split()) for line in lines[start : lines.index("<!-- end -->", start) - 1])


def test_worked_examples_in_docs_match_the_code():
    """docs/format.md prints the bytes of these manifests; they must be what the code writes."""
    data = b"hello, parts!"  # 13 bytes in parts of 8
    dk = fmt.part_key(bytes(32))
    t1 = fmt.Part("T1", 8, fmt.part_digest(dk, 0, data[:8]))
    m = fmt.Manifest(8, 13, (t1, fmt.Part("T2", 5, fmt.part_digest(dk, 1, data[8:]))))
    assert shown_in_docs("<!-- manifest example -->") == fmt.encode(m).hex()
    assert f"part key `{dk.hex()}`" in (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    sparse = fmt.Manifest(8, 13, (t1, fmt.hole(5)))
    assert shown_in_docs("<!-- manifest example with a hole -->") == fmt.encode(sparse).hex()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: b"PVFSMNFX" + r[8:],  # magic
        lambda r: r[:9] + b"\x01" + r[10:],  # reserved byte
        lambda r: r[:28] + b"\x00\x00\x00\x01" + r[32:],  # reserved word
        lambda r: r[:-1],  # truncated digest
        lambda r: r + b"\x00",  # trailing junk
        lambda r: r[:24] + struct.pack("<I", 4) + r[28:],  # count disagrees with sizes
        lambda r: r[:16] + struct.pack("<Q", 11) + r[24:],  # total disagrees with part sizes
        lambda r: r[:12] + struct.pack("<I", 0) + r[16:],  # part size zero
        lambda r: r[:32] + b"\x00" + r[33:],  # empty token
        lambda r: r[:33] + b"t\xffk-0" + r[38:],  # token not ASCII
        lambda r: r[:20],  # header truncated
    ],
)
def test_decode_refuses_damaged_manifests(mutate):
    with pytest.raises(IntegrityError):
        fmt.decode(mutate(fmt.encode(sample())))


def test_decode_names_the_version_it_cannot_read():
    raw = fmt.encode(sample())
    with pytest.raises(IntegrityError, match="version 3"):
        fmt.decode(raw[:8] + b"\x03" + raw[9:])


def with_hole(m: fmt.Manifest, index: int) -> fmt.Manifest:
    parts = list(m.parts)
    parts[index] = fmt.hole(parts[index].size)
    return fmt.Manifest(m.part_size, m.total, tuple(parts))


def test_a_hole_is_an_entry_without_token_or_digest_and_makes_the_manifest_version_2():
    m = with_hole(sample(), 1)
    raw = fmt.encode(m)
    assert raw[8] == 2 and fmt.decode(raw) == m
    entry = 32 + 1 + 5 + 4 + 32  # the hole follows the first entry
    assert raw[entry : entry + 1 + 4 + 32] == b"\x00" + struct.pack("<I", 4) + bytes(32)
    assert m.tokens() == ["tok-0", "tok-2"] and [p.is_hole for p in m.parts] == [False, True, False]
    assert fmt.encode(sample())[8] == 1  # a manifest without holes stays readable by version 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r[:8] + b"\x01" + r[9:],  # a hole in a version 1 manifest
        lambda r: r[:-1] + b"\x01",  # a hole with a digest (the last entry is the hole)
    ],
)
def test_decode_refuses_holes_where_they_cannot_be(mutate):
    raw = fmt.encode(fmt.Manifest(4, 10, (*sample().parts[:2], fmt.hole(2))))
    assert fmt.decode(raw).parts[2].is_hole
    with pytest.raises(IntegrityError):
        fmt.decode(mutate(raw))


def test_a_version_2_manifest_without_holes_is_refused():
    raw = fmt.encode(sample())
    with pytest.raises(IntegrityError, match="version"):
        fmt.decode(raw[:8] + b"\x02" + raw[9:])


def test_encode_refuses_parts_of_uneven_size():
    m = sample()
    bad = fmt.Manifest(4, 10, (m.parts[0], fmt.Part("x", 2, m.parts[1].digest), m.parts[2]))
    with pytest.raises(IntegrityError):
        fmt.encode(bad)


def test_digest_binds_content_position_and_key():
    dk = fmt.part_key(KEY)
    d = fmt.part_digest(dk, 0, b"abc")
    assert d != fmt.part_digest(dk, 1, b"abc")
    assert d != fmt.part_digest(dk, 0, b"abd")
    assert d != fmt.part_digest(fmt.part_key(bytes(32)), 0, b"abc")
    assert fmt.part_key(KEY) != KEY


def test_touched_parts_of_a_range():
    m = sample(10, 4)
    assert list(m.touched(0, 1)) == [0]
    assert list(m.touched(3, 2)) == [0, 1]
    assert list(m.touched(8, 100)) == [2]
    assert list(m.touched(10, 5)) == [] and list(m.touched(5, 0)) == []
    assert m.span(2) == (8, 10)
