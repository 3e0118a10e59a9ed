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


def test_an_entry_still_shown_as_its_token_named_it_keeps_the_tokens_fields():
    node = _node("README.md", shown_as="README.md", remote_name="README", remote_extension="md")
    assert names.token_naming(node) == ("README", "md")
    renamed = _node("guide.rst", shown_as="README.md", remote_name="README", remote_extension="md")
    assert names.token_naming(renamed) == ("guide.rst", "rst")
    assert names.token_name(_node(".bashrc")) == ".bashrc" and names.token_naming(_node(".bashrc"))[1] == ""


def test_conflict_names_keep_the_extension_and_tokenmeta_reexports_the_same_functions():
    assert names.conflict_name("a.txt", "tok-123456789") == "a.conflict-23456789.txt"
    assert names.conflict_name("Makefile", "abc") == "Makefile.conflict-abc"
    assert tokenmeta.shown_name is names.shown_name and tokenmeta.display_name is names.display_name
