"""The name rules (privifs/fs/names.py): token fields → entry names and back."""

from __future__ import annotations

from types import SimpleNamespace

from privifs.client.shapes import TokenInfo
from privifs.fs import names, tokenmeta


def _node(name, shown_as=None, remote_name=None, remote_extension=None):
    return SimpleNamespace(name=name, shown_as=shown_as, remote_name=remote_name, remote_extension=remote_extension)


def test_a_token_shows_as_its_file_name_with_the_extension_it_lacks():
    assert names.shown_name("README", "md") == "README.md"
    assert names.shown_name("notes.txt", "txt") == "notes.txt"
    assert names.shown_name("a/b", None) == "a\u2215b"
    assert names.shown_name("..", "") == "unnamed.."
    assert len(names.shown_name("x" * 300, "").encode()) <= names.NAME_MAX


def test_a_listed_token_shows_under_its_shown_name():
    info = TokenInfo(
        token="t1", context="/docs", file_name="README", extension="md", size=1, path=None, created_at=None
    )
    assert names.entry_name(info) == "README.md" == names.listed_name(info)


def test_an_extension_another_application_wrote_with_its_dot_is_the_same_extension():
    """A token of another application with fileName 'doc' and extension '.md' showed as 'doc..md',
    one with 'report.pdf' and '.pdf' as 'report.pdf..pdf' (the reference says "no dot", but a
    dot is what a careless writer sends)."""
    assert names.shown_name("doc", ".md") == "doc.md"
    assert names.shown_name("report.pdf", ".pdf") == "report.pdf"
    assert names.shown_name("archive.tar", "..gz") == "archive.tar.gz"
    assert names.shown_name(".bashrc", ".") == ".bashrc"


def test_an_entry_still_shown_as_its_token_named_it_keeps_the_tokens_fields():
    node = _node("README.md", shown_as="README.md", remote_name="README", remote_extension="md")
    assert names.token_naming(node) == ("README", "md")
    renamed = _node("guide.rst", shown_as="README.md", remote_name="README", remote_extension="md")
    assert names.token_naming(renamed) == ("guide.rst", "rst")
    assert names.token_name(_node(".bashrc")) == ".bashrc" and names.token_naming(_node(".bashrc"))[1] == ""


def test_conflict_names_keep_the_extension_and_the_name_rules_live_in_names_only():
    assert names.conflict_name("a.txt", "tok-123456789") == "a.conflict-23456789.txt"
    assert names.conflict_name("Makefile", "abc") == "Makefile.conflict-abc"
    assert not any(hasattr(tokenmeta, f) for f in ("shown_name", "entry_name", "joined_name", "conflict_name"))


def test_the_conflict_name_of_a_name_cut_to_255_bytes_is_another_name():
    """Two tokens of another application whose long names differ only past the cut both showed as
    'nnn…~truncated'; the second one's conflict name, cut to 255 bytes again, was that same name,
    so it never showed at all."""
    for raw in ("n" * 300 + "b.txt", "é" * 200 + ".md", "n" * 300, "x." + "e" * 300, "n" * 250 + ".txt"):
        plain = names.display_name(raw)
        conflict = names.conflict_name(plain, "dtk-2107b030-dc6f-446b-953a-9e1ea8d88013")
        assert conflict != plain and len(conflict.encode()) <= names.NAME_MAX, raw
        assert ".conflict-a8d88013" in conflict, conflict
        assert conflict == names.conflict_name(plain, "dtk-2107b030-dc6f-446b-953a-9e1ea8d88013")  # same everywhere
    assert names.conflict_name("notes.txt", "dtk-1977cab3") == "notes.conflict-1977cab3.txt"  # short names: as before
    assert names.conflict_name("README", "dtk-1977cab3") == "README.conflict-1977cab3"


def test_the_name_rules_docs_format_md_states_are_the_codes():
    """docs/format.md is what another application's author reads: its examples of the
    ``extension`` field and of sanitised names must be what privifs does (the doc said only
    "the last suffix" and "empty names become unnamed", which fit neither ``.bashrc`` nor ``..``)."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "format.md").read_text()
    for name, ext in ((".bashrc", ""), ("trailing.", ""), ("a.tar.gz", "gz"), ("..x", "x")):
        assert names.extension_of(name) == ext
        assert f"`{name}`" in doc
    for raw, shown in (("", "unnamed"), (".", "unnamed."), ("..", "unnamed..")):
        assert names.shown_name(raw, "") == shown
        assert f"`{shown}`" in doc
    assert names.shown_name("a\0b", "") == "ab"
    long = names.shown_name("é" * 140, "")
    assert long.endswith("~truncated") and len(long.encode()) <= 255
    assert len(long.removesuffix("~truncated").encode()) <= 243
    assert "243 bytes" in doc and "`~truncated`" in doc


def test_the_conflict_mark_semantics_md_states_is_the_codes():
    """docs/semantics.md names the mark "the last 8 letters or digits of its token": a token whose
    tail has a dash (another server's ids) must not get a dash in the mark."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "semantics.md").read_text()
    assert "the last 8 letters or digits of its token" in doc
    assert names.conflict_name("notes.txt", "dtk-aaaa-bb-1234") == "notes.conflict-aabb1234.txt"
    assert names.conflict_name(".bashrc", "dtk-00000000-1977cab3") == ".bashrc.conflict-1977cab3"
    assert "`.bashrc.conflict-1977cab3`" in doc
