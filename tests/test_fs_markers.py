"""A directory two machines made at once has two marker tokens; an rmdir or rename here deletes
the other one too, or the old path comes back. The other markers are kept in the index: a mount
that started offline (no listing to learn them from) lost them, and its rmdir or rename was
undone on every machine once it reconnected. In-process against the real engine."""

from __future__ import annotations

from privifs.cli.verify_cmd import read_index
from privifs.fs.namespace import Index, Namespace
from tests.fskit import inprocess_fs


async def test_a_directorys_other_marker_survives_a_restart_without_a_listing(module_account, eng, tmp_path):
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True) as kit:
        await kit.mkdir("x")
        await kit.settle()
        own = kit.node("x").token
        other = await kit.remote.mkdir("x")  # another machine's mkdir of the same name, at once
        await kit.refresh()
        # one of the two is the directory's token (the first claim: same second, so the token
        # ids decide), the other its other marker
        main = kit.node("x").token
        extra = ({own, other} - {main}).pop()
        assert main in (own, other) and kit.node("x").extra_markers == {extra}
        assert await kit.tree() == {"x": "dir"}
        kit.fs.index.settle()
    assert read_index(tmp_path)[2] == {extra}  # privifs verify counts it as known, not as added elsewhere
    index = Index(tmp_path / "index.sqlite3")  # the next start, before (or without) any listing
    try:
        ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
        x = ns.child(ns.root, "x")
        assert x.token == main and x.extra_markers == {extra}
        with index:
            ns.remove(x, delete_token=True)  # what an rmdir made offline records
        assert set(index.tombstones()) == {own, other}
    finally:
        index.close()


async def test_an_rmdir_after_a_restart_deletes_every_marker_of_the_directory(module_account, eng, tmp_path):
    async with inprocess_fs(tmp_path, *module_account, empty_vault=True) as kit:
        await kit.mkdir("x")
        await kit.settle()
        await kit.remote.mkdir("x")
        await kit.refresh()
        key = kit.key
    async with inprocess_fs(tmp_path, *module_account, key=key) as again:
        await again.rmdir("x")
        await again.settle()
        assert await again.vault_tree() == {}
        await again.refresh()
        assert await again.tree() == {}
