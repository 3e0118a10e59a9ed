"""Command appliers and the voting gate, driven alone: a database connection in, an outcome out,
no HTTP, no command runner. And building the API turns nothing on: privifs.engine.features does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

import pytest

from privifs.engine import features
from privifs.engine.blobs import BlobStore
from privifs.engine.commands import Rejected
from privifs.engine.core import Engine
from privifs.engine.db import SCHEMA, Database
from privifs.engine.options import COMMAND_KINDS, EngineOptions
from privifs.engine.routes_datatoken import apply_delete, apply_request_data
from privifs.engine.routes_device import apply_state
from privifs.engine.routes_voting import gate
from privifs.engine.server import api_app
from privifs.engine.storage import StorageDevices

PROFILE = "prf-A"


@pytest.fixture
def conn() -> sqlite3.Connection:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.row_factory = sqlite3.Row
    c.executescript(SCHEMA)
    yield c
    c.close()


def add_device(conn: sqlite3.Connection, device_id: str, state: str, *, authenticator: int = 0) -> None:
    conn.execute(
        "INSERT INTO devices (id, profile_id, command_id, name, state, authenticator, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (device_id, PROFILE, "c-" + device_id, device_id, state, authenticator, time.time()),
    )


def add_token(conn: sqlite3.Connection, token: str, blob_id: str, size: int) -> None:
    conn.execute(
        "INSERT INTO data_tokens (token, profile_id, context, file_name, extension, size, path, blob_id,"
        " blob_size, created_at, updated_at) VALUES (?, ?, 'ctx', 'f', '', ?, '', ?, ?, 0, 0)",
        (token, PROFILE, size, blob_id, size),
    )


def device_state(conn: sqlite3.Connection, device_id: str) -> str:
    return conn.execute("SELECT state FROM devices WHERE id = ?", (device_id,)).fetchone()["state"]


def test_approving_a_pending_device_approves_it_and_again_is_harmless(conn):
    add_device(conn, "dev-1", "pending")
    apply_state("approved", conn, {"device": "dev-1"}, PROFILE, "cid-1")
    apply_state("approved", conn, {"device": "dev-1"}, PROFILE, "cid-2")
    assert device_state(conn, "dev-1") == "approved"


def test_a_decided_device_cannot_be_decided_the_other_way(conn):
    add_device(conn, "dev-1", "approved")
    with pytest.raises(Rejected) as exc:
        apply_state("rejected", conn, {"device": "dev-1"}, PROFILE, "cid-1")
    assert exc.value.reason == "device.already_approved"
    assert device_state(conn, "dev-1") == "approved"


def test_another_profiles_device_is_not_found(conn):
    add_device(conn, "dev-1", "pending")
    with pytest.raises(Rejected) as exc:
        apply_state("approved", conn, {"device": "dev-1"}, "prf-B", "cid-1")
    assert exc.value.reason == "device.not_found"


def test_request_data_answers_inline_below_the_threshold_and_by_stream_above(conn, tmp_path):
    blobs = BlobStore(tmp_path)
    small, big = blobs.new_id(), blobs.new_id()
    for blob_id, size in ((small, 10), (big, 100)):
        blobs.dir_of(blob_id).mkdir(exist_ok=True)
        blobs.path(blob_id).write_bytes(b"x" * size)
    add_token(conn, "dtk-small", small, 10)
    add_token(conn, "dtk-big", big, 100)
    opts = EngineOptions()
    opts.update({"inline_threshold": 50})

    inline = apply_request_data(opts, blobs, conn, {"token": "dtk-small", "request_id": "r1"}, PROFILE, "c1")
    [event] = inline.events
    assert event["data"]["command_status"] == 2 and event["data"]["output_type"] == 0
    streamed = apply_request_data(opts, blobs, conn, {"token": "dtk-big", "request_id": "r2"}, PROFILE, "c2")
    assert streamed.events[0]["data"]["output_type"] == 1
    assert streamed.events[1]["data"]["type"] == "STREAM-READY"
    assert conn.execute("SELECT COUNT(*) FROM downstream WHERE token = 'dtk-big'").fetchone()[0] == 1


def test_request_data_for_a_missing_token_is_rejected_with_its_request_event(conn, tmp_path):
    with pytest.raises(Rejected) as exc:
        apply_request_data(
            EngineOptions(), BlobStore(tmp_path), conn, {"token": "dtk-none", "request_id": "r1"}, PROFILE, "c1"
        )
    assert exc.value.reason == "data_token.not_found"
    assert exc.value.events[0]["data"]["id"] == "r1"


async def test_deleting_a_token_removes_its_row_then_its_blob_and_storage_copies(tmp_path):
    db = Database(tmp_path / "engine.sqlite3")
    try:
        blobs = BlobStore(tmp_path)
        storage = StorageDevices(db, blobs, tmp_path / "storage")
        blob_id, _, _ = await blobs.write_bytes(b"payload")

        def setup(c: sqlite3.Connection) -> None:
            add_token(c, "dtk-1", blob_id, 7)
            add_device(c, "dev-s", "approved")
            c.execute("UPDATE devices SET storage = 1 WHERE id = 'dev-s'")

        await db.write(setup)
        await storage.backfill(PROFILE, "dev-s")
        copy = storage.device_dir("dev-s") / "dtk-1"
        assert copy.read_bytes() == b"payload"

        outcome = await db.write(lambda c: apply_delete(blobs, storage, c, {"token": "dtk-1"}, PROFILE, "c1"))
        assert db.read(lambda c: c.execute("SELECT COUNT(*) FROM data_tokens").fetchone()[0]) == 0
        assert blobs.path(blob_id).exists() and copy.exists()  # files go only after the commit
        for fn in outcome.after_commit:
            fn()
        assert not blobs.path(blob_id).exists() and not copy.exists()
    finally:
        db.close()


def test_the_gate_holds_a_policy_kind_in_a_new_pool_and_passes_other_kinds(conn):
    add_device(conn, "dev-v", "approved", authenticator=1)
    conn.execute(
        "INSERT INTO voting_configs (id, profile_id, name, strategy, time_limit, device_ids, created_at)"
        " VALUES ('vc-1', ?, 'vc', 'unanimous', 60, '[]', 0)",
        (PROFILE,),
    )
    conn.execute(
        "INSERT INTO policies (id, profile_id, name, template_id, event_ids, voting_config_id,"
        " configuration, active, created_at) VALUES ('pol-1', ?, 'p', 'tpl-data-governance', ?,"
        " 'vc-1', '{}', 1, 0)",
        (PROFILE, json.dumps(["5"])),
    )
    assert gate(conn, "reserve-token-space", PROFILE, "c-reserve") is True  # event 1 is not in the policy
    assert gate(conn, "delete-data", PROFILE, "c-delete") is False
    pool = conn.execute("SELECT * FROM pools WHERE command_id = 'c-delete'").fetchone()
    assert (pool["status"], json.loads(pool["voters"]), pool["required"]) == ("open", ["dev-v"], 1)
    assert gate(conn, "delete-data", PROFILE, "c-delete") is False  # still held: the pool is open
    conn.execute("UPDATE pools SET status = 'approved' WHERE command_id = 'c-delete'")
    assert gate(conn, "delete-data", PROFILE, "c-delete") is True


def test_building_the_api_turns_nothing_on_and_install_turns_everything_on(tmp_path):
    engine = Engine(tmp_path / "engine", EngineOptions())
    try:
        api_app(engine)
        assert (engine.runner.appliers, engine.runner.gate, engine.background) == ({}, None, [])
        features.install(engine)
        assert set(engine.runner.appliers) == set(COMMAND_KINDS)  # every kind a route can submit
        assert engine.runner.gate is not None and len(engine.background) == 2 and engine.at_start
    finally:
        engine.db.close()


@pytest.mark.parametrize("pieces", [[b"a" * (1 << 20), b"b" * (2 << 20), b"c" * 100], [b""], [b"x" * 10] * 5])
async def test_a_received_blob_is_created_written_and_synced_off_the_event_loop(tmp_path, monkeypatch, pieces):
    """Creating a file costs the engine's event loop 0.1-1 ms on ext4: a streamed upload opens
    its blob file on a worker thread, with its writes (big chunks as they came, small ones
    gathered), and an empty upload is an empty blob."""
    import threading

    from privifs.engine import blobs as blobs_module

    loop_thread = threading.current_thread()
    opened = []
    real_open = os.open
    monkeypatch.setattr(blobs_module.os, "open", lambda *a: opened.append(threading.current_thread()) or real_open(*a))

    store = BlobStore(tmp_path)

    async def chunks():
        for p in pieces:
            yield p

    blob_id, size, _ = await store.receive(chunks())
    assert store.path(blob_id).read_bytes() == b"".join(pieces) and size == sum(map(len, pieces))
    assert opened and loop_thread not in opened
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_a_parts_blob_is_served_in_one_read_and_one_send(tmp_path):
    """The downstream server reads a blob 4 MiB at a time: a part (4 MiB of plaintext and the
    wire format's 28 bytes) costs the engine two reads and sends, not five."""
    from privifs.engine.streams import downstream_app

    engine = Engine(tmp_path / "engine", EngineOptions())
    try:
        payload = os.urandom(4 * 1024 * 1024 + 28)
        blob_id, size, _ = await engine.blobs.write_bytes(payload)

        def rows(c: sqlite3.Connection) -> None:
            add_token(c, "dtk-part", blob_id, size)
            c.execute(
                "INSERT INTO downstream (auth, token, profile_id, expires_at) VALUES ('a1', 'dtk-part', ?, ?)",
                (PROFILE, time.time() + 60),
            )

        await engine.db.write(rows)
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "GET", "query_string": b"auth=a1"}
        await downstream_app(engine)(scope, receive, send)
        assert sent[0]["status"] == 200
        bodies = [m["body"] for m in sent[1:]]
        assert b"".join(bodies) == payload
        assert [len(b) for b in bodies if b] == [4 * 1024 * 1024, 28]
    finally:
        engine.db.close()
