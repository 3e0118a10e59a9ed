"""Engine, data-token group: the store and retrieve chains, listing, update, risk meta, delete,
limits, expiry and isolation — over real HTTP and WebSocket."""

from __future__ import annotations

import base64
import os

import httpx
import pytest
import trio

from tests.enginekit import Wire, command_id


def blob_files(eng) -> dict[str, bytes]:
    root = eng.data_dir / "blobs"
    return {f.name: f.read_bytes() for d in root.iterdir() for f in d.iterdir()}


async def test_inline_store_and_retrieve_round_trip_byte_for_byte(eng, wire):
    await wire.provision()
    payload = os.urandom(1000)
    async with wire.channel() as ch:
        token = await wire.store(ch, payload, streamed=False)
        assert token.startswith("dtk-")
        assert await wire.retrieve(ch, token) == payload
    assert payload in blob_files(eng).values()


async def test_streamed_store_and_retrieve_round_trip(eng, wire):
    await wire.provision()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    async with wire.channel() as ch:
        token = await wire.store(ch, payload, streamed=True)
        r = await wire.post("/data-token/request-data", {"token": token})
        rid = r.headers["x-dpt-cab-request-id"]
        assert r.headers["x-dpt-cab-id"]
        d = await ch.wait_for("X-DPT-CAB-REQUEST-ID", rid)
        assert d["output_type"] == 1
        ready = await ch.wait_for("STREAM-READY", rid)
        assert ready["requestId"] == rid
        async with httpx.AsyncClient() as c:
            got = await c.get(eng.urls["downstream"] + "/", params={"auth": d["body"]})
            assert got.status_code == 200 and got.content == payload
            again = await c.get(eng.urls["downstream"] + "/", params={"auth": d["body"]})
            assert again.status_code == 404  # single use
    assert payload in blob_files(eng).values()


async def test_request_data_answers_202_with_null_body_and_both_headers(wire):
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"x" * 10)
        r = await wire.post("/data-token/request-data", {"token": token})
    assert r.status_code == 202
    assert r.json() is None
    assert r.headers["x-dpt-cab-id"] and r.headers["x-dpt-cab-request-id"]


async def test_inline_threshold_decides_output_type(eng, wire):
    eng.set_options(inline_threshold=100)
    await wire.provision()
    async with wire.channel() as ch:
        small = await wire.store(ch, b"a" * 100)
        big = await wire.store(ch, b"b" * 101)
        for token, otype in ((small, 0), (big, 1)):
            r = await wire.post("/data-token/request-data", {"token": token})
            d = await ch.wait_for("X-DPT-CAB-REQUEST-ID", r.headers["x-dpt-cab-request-id"])
            assert d["output_type"] == otype
        assert await wire.retrieve(ch, big) == b"b" * 101


async def test_upstream_auth_is_single_use(eng, wire):
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        cid = command_id(r)
        await ch.wait_for("X-DPT-CAB-ID", cid)
        body = (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).json()
        assert body["stream"].startswith("auth=") and body["ttl"] == "5" and body["uuid"] == cid
        url = f"{eng.urls['upstream']}/?{body['stream']}"
        async with httpx.AsyncClient() as c:
            assert (await c.post(url, content=b"first")).status_code == 200
            assert (await c.post(url, content=b"second")).status_code == 403
            assert (await c.post(f"{eng.urls['upstream']}/?auth=nope", content=b"x")).status_code == 404
            assert (await c.post(f"{eng.urls['upstream']}/", content=b"x")).status_code == 401


async def test_inline_exchange_size_cap_and_base64_are_checked(eng, wire):
    eng.set_options(inline_limit=1024)
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        temp = (await wire.get(f"/data-token/retrieve-temporary-data-token/{command_id(r)}")).json()["token"]
        r = await wire.post(
            "/data-token/exchange-data-for-token",
            {"temporaryTokenSpace": temp, "data": base64.b64encode(os.urandom(1025)).decode()},
        )
        assert r.status_code == 422 and "data" in r.json()["errors"]
        r = await wire.post(
            "/data-token/exchange-data-for-token",
            {"temporaryTokenSpace": temp, "data": base64.b64encode(os.urandom(100_000)).decode()},
        )
        assert r.status_code == 422 and "data" in r.json()["errors"]
        r = await wire.post("/data-token/exchange-data-for-token", {"temporaryTokenSpace": temp, "data": "@@@"})
        assert r.status_code == 422 and "data" in r.json()["errors"]
        r = await wire.post("/data-token/exchange-data-for-token", {"temporaryTokenSpace": temp})
        assert r.status_code == 422 and "data" in r.json()["errors"]
        r = await wire.post(
            "/data-token/exchange-data-for-token", {"temporaryTokenSpace": "tmp-unknown", "data": "eA=="}
        )
        assert r.status_code == 404


@pytest.mark.parametrize("ttl", ["0", "61", "300", "3600", "-1", "five"])
async def test_reserve_ttl_bounds(wire, ttl):
    await wire.provision()
    r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": ttl})
    assert r.status_code == 422 and "ttl" in r.json()["errors"]


async def test_reserve_requires_context(wire):
    await wire.provision()
    r = await wire.post("/data-token/reserve-token-space", {"ttl": "5"})
    assert r.status_code == 422 and "context" in r.json()["errors"]


async def test_temporary_token_is_404_until_the_reservation_settles(eng, wire):
    eng.set_options(apply_delay_ms=700)
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        cid = command_id(r)
        assert (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).status_code == 404
        assert (await wire.http.post(f"/request-status/{cid}", json={})).json() == "started"
        await ch.wait_for("X-DPT-CAB-ID", cid)
        assert (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).status_code == 200


async def test_a_route_s_last_segment_parameter_is_routed_like_starlette_would(eng, wire, tmp_path):
    """The temporary-token route is found by its prefix without Starlette's router (one of the
    five requests of every upload); what Starlette would not route there is not routed there."""
    from privifs.engine.core import Engine
    from privifs.engine.options import EngineOptions
    from privifs.engine.server import api_app

    local = Engine(tmp_path / "routes", EngineOptions())
    try:
        assert ("GET", "/data-token/retrieve-temporary-data-token/") in api_app(local).tail
    finally:
        local.db.close()
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        cid = command_id(r)
        await ch.wait_for("X-DPT-CAB-ID", cid)
        path = f"/data-token/retrieve-temporary-data-token/{cid}"
        assert (await wire.get(path)).json()["uuid"] == cid
        assert (await wire.get(path + "/more")).status_code == 404
        assert (await wire.get("/data-token/retrieve-temporary-data-token/")).status_code == 404
        assert (await wire.get("/data-token/retrieve-temporary-data-token/x%2Fy")).status_code == 404
        assert (await wire.http.post(path)).status_code == 405  # Starlette's answer for the method
        assert (await wire.get(f"/request-status/{cid}")).json() == "succeeded"


def test_a_route_is_found_by_its_prefix_only_where_no_other_route_could_take_the_path():
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from privifs.engine.server import ExactRoutes

    async def handler(request):
        return Response()

    handler.guarded = True
    app = Starlette(
        routes=[
            Route("/x/all", handler),  # a literal path under /x/ goes first in Starlette's order
            Route("/x/{id}", handler),
            Route("/y/{id}", handler),
            Route("/z/{n:int}", handler),  # not a plain string parameter
            Route("/w/{a}/{b}", handler),
        ]
    )
    assert {prefix for _, prefix in ExactRoutes(app).tail} == {"/y/"}


async def test_unpromoted_reservation_expires_with_its_ttl(eng, wire):
    eng.set_options(ttl_unit="seconds")
    await wire.provision()
    async with wire.channel() as ch:
        # 3 s: the store below must reach the engine before the reservation expires, on a
        # loaded machine too (with 1 s it sometimes did not, and nothing was stored to expire)
        r = await wire.post("/data-token/reserve-token-space", {"context": "c", "ttl": "3"})
        cid = command_id(r)
        await ch.wait_for("X-DPT-CAB-ID", cid)
        reserved = trio.current_time()  # the reservation exists by now: it expires before +3 s
        temp = (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).json()["token"]
        payload = os.urandom(64)
        r = await wire.post(
            "/data-token/exchange-data-for-token",
            {"temporaryTokenSpace": temp, "data": base64.b64encode(payload).decode()},
        )
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        assert payload in blob_files(eng).values()
        await trio.sleep_until(reserved + 3.3)
        assert (await wire.get(f"/data-token/retrieve-temporary-data-token/{cid}")).status_code == 404
        r = await wire.post(
            "/data-token/configure-file-meta", {"token": temp, "fileName": "a", "context": "c", "size": "36"}
        )
        assert r.status_code == 404
        eng.admin("sweep")
        assert payload not in blob_files(eng).values()


async def test_configure_file_meta_needs_data_and_is_idempotent(wire):
    await wire.provision()
    async with wire.channel() as ch:
        r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        temp = (await wire.get(f"/data-token/retrieve-temporary-data-token/{command_id(r)}")).json()["token"]
        meta = {"token": temp, "fileName": "a.txt", "extension": "txt", "context": "c", "size": "3", "path": "/"}
        r = await wire.post("/data-token/configure-file-meta", meta)
        assert r.status_code == 422 and "token" in r.json()["errors"]
        r = await wire.post(
            "/data-token/exchange-data-for-token",
            {"temporaryTokenSpace": temp, "data": base64.b64encode(b"abc").decode()},
        )
        await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        for missing in ("fileName", "size"):
            r = await wire.post("/data-token/configure-file-meta", {k: v for k, v in meta.items() if k != missing})
            assert r.status_code == 422 and missing in r.json()["errors"]
        r = await wire.post("/data-token/configure-file-meta", {**meta, "size": "-3"})
        assert r.status_code == 422 and "size" in r.json()["errors"]
        first = (await wire.post("/data-token/configure-file-meta", meta)).json()["token"]
        second = (await wire.post("/data-token/configure-file-meta", meta)).json()["token"]
        assert first == second and first.startswith("dtk-")
        # exchanging again for a promoted token is refused
        r = await wire.post(
            "/data-token/exchange-data-for-token",
            {"temporaryTokenSpace": temp, "data": base64.b64encode(b"x").decode()},
        )
        assert r.status_code == 422


async def test_listing_pages_in_a_stable_order_with_filters(wire):
    await wire.provision()
    async with wire.channel() as ch:
        tokens = [
            await wire.store(ch, f"p{i}".encode(), context="a" if i % 2 else "b", file_name=f"f{i}.txt")
            for i in range(7)
        ]
    pages = []
    for page in (1, 2, 3, 4):
        r = await wire.get("/data-token/list-data-tokens", params={"page": page, "perPage": 3})
        body = r.json()
        assert body["meta"] == {"count": 7, "page": page, "perPage": 3}
        pages.append([i["token"] for i in body["items"]])
    assert [len(p) for p in pages] == [3, 3, 1, 0]
    assert sum(pages, []) == tokens
    item = (await wire.get("/data-token/list-data-tokens", params={"perPage": 1})).json()["items"][0]
    assert item["fileName"] == "f0.txt" and item["extension"] == "txt" and item["size"] == 2
    assert item["meta"]["file"]["fileName"] == "f0.txt" and item["createdAt"]
    r = await wire.get("/data-token/list-data-tokens", params={"filters[context]": "a", "perPage": 100})
    assert [i["token"] for i in r.json()["items"]] == tokens[1::2]
    r = await wire.get("/data-token/list-data-tokens", params={"filters[meta.file.fileName]": "f4.txt"})
    assert [i["token"] for i in r.json()["items"]] == [tokens[4]]
    r = await wire.get("/data-token/list-data-tokens", params={"filters[token]": tokens[6]})
    assert r.json()["meta"]["count"] == 1
    for bad in ({"page": "0"}, {"perPage": "x"}, {"page": "-2"}):
        assert (await wire.get("/data-token/list-data-tokens", params=bad)).status_code == 422


async def test_listing_pages_read_across_a_delete_or_a_store_show_what_page_numbers_show(wire):
    """Pages read while nothing changes continue from the page before (no recount, no skipping
    of earlier pages: engine.pages); a delete or a store between two pages shifts them as page
    numbers do, whatever was remembered of the pages before."""

    async def page(n: int) -> tuple[int, list[str]]:
        body = (await wire.get("/data-token/list-data-tokens", params={"page": n, "perPage": 3})).json()
        return body["meta"]["count"], [i["token"] for i in body["items"]]

    await wire.provision()
    async with wire.channel() as ch:
        t = [await wire.store(ch, f"p{i}".encode(), file_name=f"f{i}.txt") for i in range(7)]
        assert [await page(n) for n in (1, 2, 3)] == [(7, t[0:3]), (7, t[3:6]), (7, t[6:7])]
        assert [await page(n) for n in (1, 2)] == [(7, t[0:3]), (7, t[3:6])]
        r = await wire.post("/data-token/delete-data", {"token": t[1]})
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
        assert await page(3) == (6, [])  # t[6] moved to page 2 (it was listed after t[5] before)
        assert [await page(n) for n in (1, 2, 3)] == [(6, [t[0], *t[2:4]]), (6, t[4:7]), (6, [])]
        t.append(await wire.store(ch, b"new", file_name="f7.txt"))
        assert await page(3) == (7, [t[7]])


async def test_update_changes_name_and_context(wire):
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"hello", context="old", file_name="a.txt")
        r = await wire.post(
            "/data-token/update-data-token",
            {"token": token, "fileName": "b.md", "extension": "md", "context": "new/dir"},
        )
        assert r.status_code == 202
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
        item = (await wire.get("/data-token/list-data-tokens", params={"filters[token]": token})).json()["items"][0]
        assert (item["fileName"], item["extension"], item["context"]) == ("b.md", "md", "new/dir")
        assert await wire.retrieve(ch, token) == b"hello"
        r = await wire.post("/data-token/update-data-token", {"token": token})
        assert r.status_code == 422
        r = await wire.post("/data-token/update-data-token", {"token": "dtk-nope", "fileName": "x"})
        assert r.status_code == 404


async def test_risk_meta_takes_arbitrary_fields_and_shows_in_listing(wire):
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"x")
        fields = {
            "classification": "internal",
            "label": "privifs",
            "handling": "none",
            "retentionDays": "30",
            "privifs.mode": "100644",
        }
        r = await wire.post("/data-token/configure-information-security-risk-meta", {"token": token, **fields})
        assert r.status_code == 202
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
    item = (await wire.get("/data-token/list-data-tokens", params={"filters[token]": token})).json()["items"][0]
    assert item["meta"]["information_security_risk"] == fields
    r = await wire.post("/data-token/configure-information-security-risk-meta", {"token": token})
    assert r.status_code == 422
    r = await wire.post(
        "/data-token/configure-information-security-risk-meta", {"token": token, **{f"f{i}": "v" for i in range(100)}}
    )
    assert r.status_code == 422


async def test_delete_makes_the_token_404_and_removes_the_blob(eng, wire):
    await wire.provision()
    payload = os.urandom(200)
    async with wire.channel() as ch:
        token = await wire.store(ch, payload)
        r = await wire.post("/data-token/delete-data", {"token": token})
        assert r.status_code == 202
        assert (await ch.wait_for("X-DPT-CAB-ID", command_id(r)))["command_status"] == 2
    assert (await wire.post("/data-token/request-data", {"token": token})).status_code == 404
    assert (await wire.post("/data-token/delete-data", {"token": token})).status_code == 404
    listing = (await wire.get("/data-token/list-data-tokens", params={"filters[token]": token})).json()
    assert listing["items"] == []
    assert payload not in blob_files(eng).values()


async def test_another_profiles_tokens_are_invisible(eng, wire):
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"secret")
        r = await wire.post("/data-token/update-data-token", {"token": token, "fileName": "y"})
        cid = command_id(r)
        await ch.wait_for("X-DPT-CAB-ID", cid)
    other = Wire(eng.urls)
    try:
        await other.provision()
        for path, form in (
            ("/data-token/request-data", {"token": token}),
            ("/data-token/delete-data", {"token": token}),
            ("/data-token/update-data-token", {"token": token, "fileName": "stolen"}),
            ("/data-token/configure-information-security-risk-meta", {"token": token, "a": "b"}),
        ):
            assert (await other.post(path, form)).status_code == 404, path
        assert (await other.get("/data-token/list-data-tokens")).json()["meta"]["count"] == 0
        assert (await other.get(f"/utility/request-command-id-status/{cid}")).status_code == 404
    finally:
        await other.aclose()
    async with wire.channel() as ch:
        assert await wire.retrieve(ch, token) == b"secret"


async def test_status_poll_paths_and_shapes(eng, wire):
    await wire.provision()
    r = await wire.post("/data-token/reserve-token-space", {"context": "c"})
    cid = command_id(r)
    assert await wire.poll(cid) == "succeeded"
    assert (await wire.http.get(f"/request-status/{cid}")).json() == "succeeded"
    obj = (await wire.get(f"/utility/request-command-id-status/{cid}")).json()
    assert obj == {"commandId": cid, "command_status": 2, "body": None}
    eng.set_options(status_shape="array")
    assert (await wire.http.post(f"/request-status/{cid}", json={})).json() == ["succeeded"]
    assert (await wire.http.post("/request-status/nope", json={})).status_code == 404


async def test_rejected_command_reports_status_3_with_reason(eng, wire):
    await wire.provision()
    async with wire.channel() as ch:
        token = await wire.store(ch, b"x")
        eng.set_options(reject="delete-data")
        r = await wire.post("/data-token/delete-data", {"token": token})
        ack = await ch.wait_for("X-DPT-CAB-ID", command_id(r))
        assert ack["command_status"] == 3 and ack["body"] == "policy.rejected"
        assert await wire.poll(command_id(r)) == "rejected"
        assert await wire.retrieve(ch, token) == b"x"


async def test_request_data_of_a_token_whose_data_file_is_lost_is_rejected_at_once(eng, wire):
    """A blob gone from the store (a damaged vault): the apply raised, the command got no result
    and the client asked four times before its read failed (80 s), with a traceback in the log
    each time. Now the request is rejected at once and the log names the file."""
    await wire.provision()
    async with wire.channel() as ch:
        small = await wire.store(ch, os.urandom(300), streamed=False)
        big = await wire.store(ch, os.urandom(200_000), streamed=True)  # served downstream: was a 404 there
        for f in (eng.data_dir / "blobs").rglob("*"):
            if f.is_file():
                f.unlink()
        for token in (small, big):
            r = await wire.post("/data-token/request-data", {"token": token})
            assert r.status_code == 202, r.text
            d = await ch.wait_for("X-DPT-CAB-REQUEST-ID", r.headers["x-dpt-cab-request-id"], timeout=10)
            assert d["command_status"] == 3, d
