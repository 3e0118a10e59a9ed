"""The index skips a save that would write the row it already holds, and never skips one whose
earlier write was rolled back: what is on disk is what the nodes say."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from privifs.fs.namespace import COLUMNS, Index, Namespace
from privifs.fs.tokenmeta import KIND_FILE

COLUMN_SIZE = COLUMNS.index("size")


def _rows(path: Path) -> dict[int, tuple]:
    other = Index(path)  # a second connection sees only what was committed
    try:
        return {n.ino: n.row() for n in other.load()}
    finally:
        other.close()


@pytest.fixture
def ns(tmp_path: Path):
    index = Index(tmp_path / "index.sqlite3")
    yield Namespace(index, dir_mode=0o755, file_mode=0o644)
    index.close()


def test_every_column_of_a_node_is_read_back_as_it_was_saved(ns: Namespace) -> None:
    node = ns.new_node(ns.root, "a.txt", KIND_FILE, 0o644)
    values = {
        c: (f"{c}-value" if isinstance(getattr(node, c), str) or getattr(node, c) is None else 1000 + i)
        for i, c in enumerate(COLUMNS)
        if c not in ("ino", "parent", "kind")
    }
    for c, v in values.items():
        setattr(node, c, v)
    ns.index.save(node)
    again = {n.ino: n for n in ns.index.load()}[node.ino]
    assert again.row() == node.row()
    assert {c: getattr(again, c) for c in values} == values


def test_saving_an_unchanged_node_writes_nothing(ns: Namespace) -> None:
    node = ns.new_node(ns.root, "a", KIND_FILE, 0o644)
    ns.index.save(node)
    before = ns.index.conn.total_changes
    ns.index.save(node)
    assert ns.index.conn.total_changes == before
    node.size = 7
    ns.index.save(node)
    assert ns.index.conn.total_changes == before + 1


def test_a_changed_node_is_saved_and_committed(ns: Namespace, tmp_path: Path) -> None:
    node = ns.new_node(ns.root, "a", KIND_FILE, 0o644)
    ns.index.save(node)
    node.mode = 0o600
    ns.index.save(node)
    assert _rows(tmp_path / "index.sqlite3")[node.ino] == node.row()


def test_a_save_rolled_back_is_written_again(ns: Namespace, tmp_path: Path) -> None:
    node = ns.new_node(ns.root, "a", KIND_FILE, 0o644)
    ns.index.save(node)
    node.size = 10
    with pytest.raises(RuntimeError):
        with ns.index:
            ns.index.save(node)
            raise RuntimeError("the handler failed after saving")
    assert _rows(tmp_path / "index.sqlite3")[node.ino][COLUMN_SIZE] == 0  # rolled back
    ns.index.save(node)  # the same row as the rolled-back save: must be written
    assert _rows(tmp_path / "index.sqlite3")[node.ino] == node.row()


def test_a_forgotten_node_saved_again_comes_back(ns: Namespace, tmp_path: Path) -> None:
    node = ns.new_node(ns.root, "a", KIND_FILE, 0o644)
    ns.index.save(node)
    ns.index.forget(node.ino)
    ns.index.save(node)
    assert node.ino in _rows(tmp_path / "index.sqlite3")


def test_the_memory_of_saved_rows_is_bounded(ns: Namespace, monkeypatch) -> None:
    monkeypatch.setattr(Index, "SAVED_ROWS", 5)
    nodes = [ns.new_node(ns.root, f"f{i}", KIND_FILE, 0o644) for i in range(20)]
    for node in nodes:
        ns.index.save(node)
    assert len(ns.index._saved) <= 5
    before = ns.index.conn.total_changes
    ns.index.save(nodes[0])  # no longer remembered: written again (the same row, harmless)
    assert ns.index.conn.total_changes == before + 1


def _checkpointed_rows(path: Path) -> int:
    """Rows of the database file itself, ignoring its WAL (what checkpoints copied there)."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
    except sqlite3.OperationalError:  # no table in the file yet: nothing checkpointed
        return 0
    finally:
        conn.close()


def test_commits_never_checkpoint_the_wal_the_checkpointer_thread_does(
    ns: Namespace, tmp_path: Path, monkeypatch
) -> None:
    # a checkpoint fsyncs the WAL and the database: a commit on the trio thread must not run one
    monkeypatch.setattr(ns.index, "CHECKPOINT_EVERY", 10**9)
    monkeypatch.setattr(ns.index, "_catch_up_at", 10**9)
    path = tmp_path / "index.sqlite3"
    for i in range(3000):  # WAL pages well past SQLite's automatic checkpoint (1,000)
        ns.index.save(ns.new_node(ns.root, f"f{i}", KIND_FILE, 0o644))
    assert _checkpointed_rows(path) == 0
    ns.index.checkpointer.ask()
    assert ns.index.checkpointer.wait(60)
    assert _checkpointed_rows(path) == 3000 + 1  # and the root
    assert len(_rows(path)) == 3001


def test_a_writer_that_never_pauses_still_gets_its_wal_started_over(ns: Namespace, tmp_path: Path, monkeypatch) -> None:
    # background checkpoints cannot catch up with commits that keep coming (only a WAL
    # checkpointed to its end starts over): the writer's own, every CATCH_UP_EVERY commits, bounds it
    monkeypatch.setattr(ns.index, "CHECKPOINT_EVERY", 10**9)
    monkeypatch.setattr(ns.index, "CATCH_UP_EVERY", 300)
    monkeypatch.setattr(ns.index, "_catch_up_at", 300)
    for i in range(6000):  # about 50 MB of WAL if it never started over
        ns.index.save(ns.new_node(ns.root, f"f{i}", KIND_FILE, 0o644))
    assert (tmp_path / "index.sqlite3-wal").stat().st_size < 8 * 2**20
    assert _checkpointed_rows(tmp_path / "index.sqlite3") >= 5700
    assert len(_rows(tmp_path / "index.sqlite3")) == 6001


def test_a_save_soon_goes_with_the_next_commit_or_the_close(ns: Namespace, tmp_path: Path) -> None:
    # a release's size and times (a staged file's header has them) take no commit of their own
    path = tmp_path / "index.sqlite3"
    a = ns.new_node(ns.root, "a", KIND_FILE, 0o644)
    ns.index.save(a)
    a.size = 5
    ns.index.save_soon(a)
    assert _rows(path)[a.ino][COLUMN_SIZE] == 0
    ns.index.save(ns.new_node(ns.root, "b", KIND_FILE, 0o644))  # the next commit takes it along
    assert _rows(path)[a.ino][COLUMN_SIZE] == 5
    a.size = 6
    ns.index.save_soon(a)
    ns.index.close()
    assert _rows(path)[a.ino][COLUMN_SIZE] == 6


def test_a_save_writes_only_the_columns_that_changed(ns: Namespace, tmp_path: Path) -> None:
    # an UPDATE of the changed columns writes one page; a whole row also rewrote the token's
    # index entry, twice the WAL of a chmod, a utime or a release
    statements: list[str] = []
    ns.index.conn.set_trace_callback(statements.append)
    node = ns.new_node(ns.root, "a", KIND_FILE, 0o644)
    ns.index.save(node)
    node.mode, node.size = 0o600, 9
    ns.index.save(node)
    assert statements[-1].startswith("UPDATE nodes SET mode = 384")  # 0o600
    assert "token" not in statements[-1] and "size = 9" in statements[-1]
    ns.set_token(node, "T1")
    ns.index.save(node)
    assert "token = 'T1'" in statements[-1]
    assert _rows(tmp_path / "index.sqlite3")[node.ino] == node.row()
    ns.index.conn.execute("DELETE FROM nodes WHERE ino = ?", (node.ino,))  # behind the index's back
    node.size = 10
    ns.index.save(node)  # the update finds no row: the whole row is written
    assert _rows(tmp_path / "index.sqlite3")[node.ino] == node.row()


def test_the_kernel_forgetting_a_removed_node_writes_nothing_more(ns: Namespace, tmp_path: Path) -> None:
    # unlink deleted its row; the FORGET that follows was a second DELETE and a commit of nothing
    node = ns.new_node(ns.root, "a", KIND_FILE, 0o644)
    ns.index.save(node)
    ns.looked_up(node)
    ns.remove(node, delete_token=True)
    assert node.ino not in _rows(tmp_path / "index.sqlite3")
    statements: list[str] = []
    ns.index.conn.set_trace_callback(statements.append)
    ns.forgotten(node, 1)
    ns.release(node, None)
    assert ns.get(node.ino) is None and statements == []


def test_the_index_and_its_wal_are_readable_by_their_owner_only(ns: Namespace, tmp_path: Path) -> None:
    """They were 0644 (the umask's), where every other file of a vault's state is 0600; an index
    an older privifs made is made 0600 when it is opened (helper hX)."""
    ns.index.save(ns.new_node(ns.root, "f", KIND_FILE, 0o644))
    files = [tmp_path / name for name in ("index.sqlite3", "index.sqlite3-wal", "index.sqlite3-shm")]
    assert [oct(p.stat().st_mode & 0o777) for p in files] == ["0o600"] * 3
    for p in files:
        p.chmod(0o644)
    Index(tmp_path / "index.sqlite3").close()
    assert (tmp_path / "index.sqlite3").stat().st_mode & 0o777 == 0o600
