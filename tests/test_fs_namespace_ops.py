"""The Namespace operations that are the only writers of a node's fields, in-process (no engine,
no kernel): each keeps its invariant in one place."""

from __future__ import annotations

import secrets

import pytest

from privifs.crypto.sealed import local_key
from privifs.fs.namespace import Index, Namespace
from privifs.fs.staging import Staging
from privifs.fs.tokenmeta import KIND_DIR, KIND_FILE


@pytest.fixture
def tree(tmp_path):
    index = Index(tmp_path / "index.sqlite3")
    ns = Namespace(index, dir_mode=0o755, file_mode=0o644)
    staging = Staging(tmp_path / "staging", local_key(secrets.token_bytes(32)))
    yield ns, staging
    index.close()


def _reload(ns: Namespace) -> Namespace:
    return Namespace(ns.index, dir_mode=0o755, file_mode=0o644)


def test_staged_content_and_its_id_change_together(tree):
    ns, staging = tree
    node = ns.new_node(ns.root, "a.txt", KIND_FILE, 0o644)
    staged = staging.create()
    ns.set_staged(node, staged)
    assert ns.content_changed(node) and not ns.content_changed(node)
    assert (node.staged, node.staged_id, node.content_dirty) == (staged, staged.id, 1)
    ns.index.save(node)
    assert _reload(ns).nodes[node.ino].staged_id == staged.id
    ns.clear_staged(node, content_clean=True)
    assert (node.staged, node.staged_id, node.content_dirty) == (None, None, 0)
    staging.remove(staged)


def test_removing_a_node_takes_it_out_of_the_tree_the_token_map_and_the_index(tree):
    ns, staging = tree
    d = ns.new_node(ns.root, "d", KIND_DIR, 0o755)
    kept = ns.new_node(d, "kept.txt", KIND_FILE, 0o644)
    gone = ns.new_node(d, "gone.txt", KIND_FILE, 0o644)
    ns.set_token(kept, "tok-kept")
    ns.set_token(gone, "tok-gone")
    for n in (d, kept, gone):
        ns.index.save(n)
    ns.looked_up(gone)
    ns.remove(gone, delete_token=True)
    ns.remove(kept, delete_token=False)
    assert gone.unlinked and ns.child(d, "gone.txt") is None and "tok-gone" not in ns.by_token
    assert ns.index.tombstones().keys() == {"tok-gone"}  # only a token removed here is deleted
    assert ns.get(gone.ino) is gone  # the kernel still refers to it
    assert set(_reload(ns).nodes) == {1, d.ino}
    ns.release(gone, staging)
    assert ns.get(gone.ino) is gone
    ns.forgotten(gone, 1)
    ns.release(gone, staging)
    assert ns.get(gone.ino) is None


def test_release_frees_staged_content_unless_an_upload_still_reads_it(tree):
    ns, staging = tree
    node = ns.new_node(ns.root, "big.bin", KIND_FILE, 0o644)
    staged = staging.create()
    ns.set_staged(node, staged)
    ns.begin_upload(node, streaming=True)
    ns.remove(node, delete_token=True)
    ns.release(node, staging)
    # the node is forgotten, but its staged file stays for the upload (which frees it when it ends)
    assert ns.get(node.ino) is None
    assert node.staged is staged and staged.id in staging.ids()
    other = ns.new_node(ns.root, "small.bin", KIND_FILE, 0o644)
    small = staging.create()
    ns.set_staged(other, small)
    ns.remove(other, delete_token=True)
    ns.release(other, staging)
    assert other.staged is None and small.id not in staging.ids() and ns.get(other.ino) is None


def test_meta_written_cleans_the_node_only_if_nothing_changed_meanwhile(tree):
    ns, _ = tree
    node = ns.new_node(ns.root, "m.txt", KIND_FILE, 0o644)
    ns.meta_changed(node)
    version = node.meta_version
    ns.meta_changed(node)  # a chmod while the update was on its way
    assert not ns.meta_written(node, version, 5.0) and node.meta_dirty
    assert ns.meta_written(node, node.meta_version, 6.0) and not node.meta_dirty
    assert node.synced_at == 6.0


def test_recorded_errors_count_attempts_until_a_success(tree):
    ns, _ = tree
    node = ns.new_node(ns.root, "e.txt", KIND_FILE, 0o644)
    assert ns.record_error(node, "down") == 1 and ns.record_error(node, "still down") == 2
    assert node.last_error == "still down"
    ns.record_success(node)
    assert (node.attempts, node.last_error) == (0, None)


def test_an_uploaded_node_shows_under_its_tokens_name_and_a_waiting_writer_is_seen(tree):
    ns, _ = tree
    node = ns.new_node(ns.root, "README.md", KIND_FILE, 0o644)
    ns.begin_upload(node, streaming=False)
    ns.mark_uploaded(node, "tok-1", "/", "README", "md", 3.0)
    assert (node.token, node.shown_as, node.upload_started, node.synced_at) == ("tok-1", "README.md", None, 3.0)
    assert ns.by_token["tok-1"] == node.ino
    ns.opened(node, writable=True)
    ns.content_changed(node)
    assert node.waiting_for_close and node in ns.pending()
    ns.closed(node, writable=True)
    assert not node.waiting_for_close


def test_set_attributes_refuses_a_field_that_is_not_an_attribute(tree):
    ns, _ = tree
    node = ns.new_node(ns.root, "x", KIND_FILE, 0o644)
    ns.set_attributes(node, mode=0o600, size=3)
    assert (node.mode, node.size) == (0o600, 3)
    with pytest.raises(TypeError):
        ns.set_attributes(node, staged_id="sneaky")


def test_an_inode_number_is_never_handed_out_again_after_a_restart(tree):
    """A file handle (open_by_handle_at, an NFS export of the mount) names a node by its number
    alone: a number reused after its node was removed would open another file."""
    ns, _ = tree
    nodes = [ns.new_node(ns.root, f"f{i}", KIND_FILE, 0o644) for i in range(3)]
    for n in nodes:
        ns.index.save(n)
    last = nodes[-1]
    ns.remove(last, delete_token=False)
    again = _reload(ns)  # what a restart reads: the highest number's node is gone
    fresh = again.new_node(again.root, "new", KIND_FILE, 0o644)
    assert fresh.ino > last.ino
    again.index.save(fresh)
    again.remove(fresh, delete_token=False)
    assert _reload(again).new_node(again.root, "newer", KIND_FILE, 0o644).ino > fresh.ino


def test_a_root_change_an_older_privifs_left_to_write_back_stays_local(tree):
    # (that privifs wrote a chmod of the root back as a marker with an empty name, which the
    # server refuses: pending for good, and every umount reported it)
    ns, _ = tree
    ns.root.mode = 0o700
    ns.root.meta_dirty = ns.root.explicit = 1
    ns.index.save(ns.root)
    root = _reload(ns).root
    assert (root.mode, root.meta_dirty, root.explicit) == (0o700, 0, 0)
    assert _reload(ns).root.meta_dirty == 0  # and so in the index
