"""Verified authenticators, voting configurations, voting pools and policies.

An approved device registered as a *verified authenticator* can vote. A *voting configuration*
names its voters (none listed: every authenticator of the profile), a strategy and a time limit.
A *policy* made from a template binds events of that template to a voting configuration; while
it is active, a command raising one of those events is **gated**: it keeps status 1 and a voting
pool opens (a ``VOTING-BALLOT`` message goes to the profile's channels). When the pool approves,
the command is applied and acknowledged as usual (a late ``X-DPT-CAB-ID`` with status 2); when a
vote rejects it, or the time limit passes, it ends with status 3 and ``voting.rejected`` or
``voting.time_limit_exceeded``.

The reference documents no endpoint for casting a vote (devices vote over the message bus), so
the engine adds ``POST /voting/cast-vote`` and ``GET /voting/list-pools`` (see docs/engine.md).
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from functools import partial

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from privifs.engine.commands import REJECTED, CommandRunner, Outcome, Rejected
from privifs.engine.core import Engine
from privifs.engine.db import Database
from privifs.engine.http import (
    ApiError,
    Form,
    client_json,
    command_accepted,
    guarded,
    invalid,
    iso,
    not_found,
    owned_row,
    read_form,
)
from privifs.engine.hub import Hub
from privifs.engine.routes_device import _device_field, approved_device, device_command

log = logging.getLogger("privifs.engine.voting")

STRATEGIES = ("unanimous", "majority", "any")
TEMPLATES = {
    "tpl-data-governance": {
        "name": "Data governance",
        "description": "Hold data-token operations until the profile's verified authenticators approve them.",
        "events": {
            "1": "data.reserve",
            "2": "data.exchange",
            "3": "data.request",
            "4": "data.update",
            "5": "data.delete",
        },
    },
}
EVENT_KINDS = {
    "data.reserve": ("reserve-token-space",),
    "data.exchange": ("exchange-data-for-token",),
    "data.request": ("request-data",),
    "data.update": ("update-data-token", "configure-information-security-risk-meta"),
    "data.delete": ("delete-data",),
}
GATED_KINDS = frozenset(k for kinds in EVENT_KINDS.values() for k in kinds)  # what a policy can hold


def tally(conn: sqlite3.Connection, pool_id: str) -> tuple[int, int]:
    """(approvals, rejections) cast in a pool."""
    counts = dict(
        conn.execute(
            "SELECT decision, COUNT(*) FROM ballots WHERE pool_id = ? GROUP BY decision", (pool_id,)
        ).fetchall()
    )
    return counts.get("approve", 0), counts.get("reject", 0)


def required_votes(strategy: str, voters: int) -> int:
    return {"unanimous": voters, "majority": voters // 2 + 1, "any": 1}[strategy]


# -- the voting gate: the command runner's gate, called inside its transaction; the collaborators
# before the first argument the runner passes are bound where it is installed
# (privifs/engine/features.py) --------------------------------------------------------------------
def gate(conn: sqlite3.Connection, kind: str, profile_id: str | None, cid: str) -> bool:
    """May command ``cid`` be applied now? No if an active policy holds its kind: a pool opens."""
    if profile_id is None or kind not in GATED_KINDS:
        return True  # no policy event raises this kind, so no pool can hold it
    pool = conn.execute("SELECT status FROM pools WHERE command_id = ?", (cid,)).fetchone()
    if pool is not None:
        return pool["status"] == "approved"
    for policy in conn.execute("SELECT * FROM policies WHERE profile_id = ? AND active = 1", (profile_id,)):
        template = TEMPLATES.get(policy["template_id"], {"events": {}})
        events = {template["events"].get(e) for e in json.loads(policy["event_ids"])}
        if any(kind in EVENT_KINDS.get(e, ()) for e in events):
            vc = conn.execute("SELECT * FROM voting_configs WHERE id = ?", (policy["voting_config_id"],)).fetchone()
            if vc is None:
                continue
            able = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM devices WHERE profile_id = ? AND authenticator = 1 AND state = 'approved'"
                    " ORDER BY rowid",
                    (profile_id,),
                )
            ]
            listed = json.loads(vc["device_ids"])
            voters = [d for d in listed if d in able] if listed else able  # removed devices cannot vote
            if not voters:
                continue  # a vote among nobody is decided at once: applied (docs/engine.md)
            pool_id = "pool-" + secrets.token_hex(10)
            deadline = time.time() + vc["time_limit"]
            conn.execute(
                "INSERT INTO pools (id, profile_id, command_id, policy_id, voting_config_id, voters,"
                " required, strategy, deadline, status, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    pool_id,
                    profile_id,
                    cid,
                    policy["id"],
                    vc["id"],
                    json.dumps(voters),
                    required_votes(vc["strategy"], len(voters)),
                    vc["strategy"],
                    deadline,
                    "open",
                    time.time(),
                ),
            )
            return False
    return True


def ballot(db: Database, hub: Hub, profile_id: str | None, cid: str) -> None:
    """After the commit that held ``cid``: tell the profile's channels a vote is open."""
    pool = db.read(lambda c: c.execute("SELECT * FROM pools WHERE command_id = ?", (cid,)).fetchone())
    if pool is not None and pool["status"] == "open":
        hub.publish(
            profile_id,
            {
                "data": {
                    "type": "VOTING-BALLOT",
                    "id": pool["id"],
                    "poolId": pool["id"],
                    "commandId": cid,
                    "voters": json.loads(pool["voters"]),
                    "deadline": iso(pool["deadline"]),
                }
            },
        )


async def resolve(db: Database, runner: CommandRunner, pool_id: str) -> str:
    """Decide an open pool from its ballots and deadline; act on the outcome."""

    def work(conn: sqlite3.Connection):
        pool = conn.execute("SELECT * FROM pools WHERE id = ?", (pool_id,)).fetchone()
        if pool is None or pool["status"] != "open":
            return pool["status"] if pool else None, None
        voters = len(json.loads(pool["voters"]))
        approvals, rejections = tally(conn, pool_id)
        if approvals >= pool["required"]:
            status = "approved"
        elif voters - rejections < pool["required"]:
            status = "rejected"
        elif pool["deadline"] <= time.time():
            status = "expired"
        else:
            return "open", None
        conn.execute("UPDATE pools SET status = ? WHERE id = ?", (status, pool_id))
        return status, pool["command_id"]

    status, cid = await db.write(work)
    if cid is not None:
        if status == "approved":
            runner.release(cid)
        else:
            await runner.finish(
                cid, REJECTED, "voting.rejected" if status == "rejected" else "voting.time_limit_exceeded"
            )
    return status


async def expire_pools(db: Database, runner: CommandRunner) -> None:
    """Background task: end the pools whose time limit has passed."""
    while True:
        await trio.sleep(0.5)
        now = time.time()
        due = db.read(
            lambda c, now=now: [
                r[0] for r in c.execute("SELECT id FROM pools WHERE status = 'open' AND deadline <= ?", (now,))
            ]
        )
        for pool_id in due:
            try:
                await resolve(db, runner, pool_id)
            except (sqlite3.Error, OSError) as exc:  # a full disk: the pool is decided once it can be written
                log.warning("ending pool %s failed (%s); trying again", pool_id, exc)
                await trio.sleep(5)
                break


# -- command appliers: run by the command runner inside its transaction ------------------------------
def apply_authenticator(conn, params, profile_id, cid) -> Outcome:
    approved_device(conn, params["device"], profile_id)
    conn.execute("UPDATE devices SET authenticator = 1 WHERE id = ?", (params["device"],))
    return Outcome()


def apply_voting_configuration(conn, params, profile_id, cid) -> Outcome:
    try:
        conn.execute(
            "INSERT INTO voting_configs (id, profile_id, name, strategy, time_limit, device_ids,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                "vc-" + secrets.token_hex(8),
                profile_id,
                params["name"],
                params["strategy"],
                params["time_limit"],
                json.dumps(params["devices"]),
                time.time(),
            ),
        )
    except sqlite3.IntegrityError:
        raise Rejected("voting_configuration.name_taken") from None
    return Outcome()


def apply_register_policy(conn, params, profile_id, cid) -> Outcome:
    try:
        conn.execute(
            "INSERT INTO policies (id, profile_id, name, template_id, event_ids, voting_config_id,"
            " configuration, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                "pol-" + secrets.token_hex(8),
                profile_id,
                params["name"],
                params["template"],
                json.dumps(params["events"]),
                params["vc"],
                json.dumps(params["configuration"]),
                time.time(),
            ),
        )
    except sqlite3.IntegrityError:
        raise Rejected("policy.name_taken") from None
    return Outcome()


def apply_switch(active: int, conn, params, profile_id, cid) -> Outcome:
    """Activate (``active`` 1) or deactivate (0) a policy."""
    conn.execute(
        "UPDATE policies SET active = ? WHERE id = ? AND profile_id = ?", (active, params["policy"], profile_id)
    )
    return Outcome()


class VotingApi:
    """The authenticator, voting and policy groups' handlers (one method each) and their route table."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.opts = engine.opts
        self.db = engine.db
        self.runner = engine.runner

    # -- authenticators and voting configurations ---------------------------------------------------
    async def named_body(self, request: Request) -> tuple[dict, str]:
        """A JSON body (live) or a form (guides) with a required ``name``."""
        form = await read_form(request)
        data = form.json if isinstance(form.json, dict) else {k: v[-1] for k, v in form.fields.items()}
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise invalid("name", "this field is required")
        return data, Form._check("name", name, 256, False)

    async def register_voting_configuration(self, request: Request) -> Response:
        who = self.engine.principal(request)
        data, name = await self.named_body(request)
        strategy = data.get("strategy", "unanimous")
        if strategy not in STRATEGIES:
            raise invalid("strategy", f"must be one of {', '.join(STRATEGIES)}")
        try:
            time_limit = int(data.get("timeLimit", 60))
        except (TypeError, ValueError, OverflowError):  # OverflowError: a JSON number such as 1e400 (infinity)
            raise invalid("timeLimit", "must be an integer (seconds)") from None
        if not 1 <= time_limit <= 7 * 86400:
            raise invalid("timeLimit", "must be between 1 and 604800 seconds")
        devices = data.get("deviceIdentifiers", [])
        if isinstance(devices, str):
            devices = (
                client_json(devices, "deviceIdentifiers", "must be a list of device identifiers")
                if devices.startswith("[")
                else [d for d in devices.split(",") if d.strip()]
            )
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise invalid("deviceIdentifiers", "must be a list of device identifiers")
        known = self.db.read(
            lambda c: {
                r[0]
                for r in c.execute(
                    "SELECT id FROM devices WHERE profile_id = ? AND authenticator = 1", (who.profile_id,)
                )
            }
        )
        if set(devices) - known:
            raise invalid("deviceIdentifiers", "every device must be a verified authenticator of this profile")
        params = {"name": name, "strategy": strategy, "time_limit": time_limit, "devices": devices}
        cid = await self.runner.submit("register-voting-configuration", who.profile_id, params)
        return command_accepted(self.opts, "register-voting-configuration", cid)

    # -- pools ------------------------------------------------------------------------------------
    def pool_record(self, pool: sqlite3.Row | dict) -> dict:
        approvals, rejections = self.db.read(lambda c: tally(c, pool["id"]))
        return {
            "poolId": pool["id"],
            "status": pool["status"],
            "commandId": pool["command_id"],
            "strategy": pool["strategy"],
            "required": pool["required"],
            "voters": json.loads(pool["voters"]),
            "approvals": approvals,
            "rejections": rejections,
            "deadline": iso(pool["deadline"]),
            "createdAt": iso(pool["created_at"]),
        }

    def owned_pool(self, profile_id: str, pool_id: str) -> sqlite3.Row:
        return owned_row(self.db, "pools", "id", pool_id, profile_id)

    async def check_pool(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        pool = self.owned_pool(who.profile_id, request.path_params["pool_id"])
        if pool["status"] == "open" and pool["deadline"] <= time.time():
            pool = {**dict(pool), "status": await resolve(self.db, self.runner, pool["id"])}
        return JSONResponse(self.pool_record(pool))

    async def list_pools(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        status = request.query_params.get("status")
        rows = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM pools WHERE profile_id = ? AND (? IS NULL OR status = ?) ORDER BY created_at",
                (who.profile_id, status, status),
            ).fetchall()
        )
        return JSONResponse({"items": [self.pool_record(r) for r in rows], "meta": {"count": len(rows)}})

    async def cast_vote(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        form = await read_form(request)
        pool_id = form.required("poolId", max_len=128)
        device_id = _device_field(form)
        decision = form.required("decision", max_len=16).lower()
        if decision not in ("approve", "reject"):
            raise invalid("decision", "must be approve or reject")
        pool = self.owned_pool(who.profile_id, pool_id)
        if device_id not in json.loads(pool["voters"]):
            raise invalid("deviceIdentifier", "this device is not a voter of this pool")
        if pool["status"] != "open":
            raise ApiError(409, f"the pool is already {pool['status']}")

        def vote(conn) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO ballots (pool_id, device_id, decision, at) VALUES (?, ?, ?, ?)",
                (pool_id, device_id, decision, time.time()),
            )

        await self.db.write(vote)
        status = await resolve(self.db, self.runner, pool_id)
        return JSONResponse({"poolId": pool_id, "status": status})

    async def cancel_pool(self, request: Request) -> Response:
        who = self.engine.principal(request, require_key=False)
        form = await read_form(request)
        pool_id = form.required("poolId", max_len=128)
        pool = self.owned_pool(who.profile_id, pool_id)
        if pool["status"] != "open":
            raise ApiError(409, f"the pool is already {pool['status']}")

        def cancel(conn) -> None:
            conn.execute("UPDATE pools SET status = 'cancelled' WHERE id = ?", (pool_id,))

        await self.db.write(cancel)
        await self.runner.finish(pool["command_id"], REJECTED, "voting.cancelled")
        return JSONResponse({"poolId": pool_id, "status": "cancelled"})

    # -- policies ---------------------------------------------------------------------------------
    async def list_templates(self, request: Request) -> Response:
        self.engine.principal(request, require_key=False)
        return JSONResponse(TEMPLATES)

    async def register_policy(self, request: Request) -> Response:
        who = self.engine.principal(request)
        data, name = await self.named_body(request)
        template_id = data.get("policyTemplateId")
        if not isinstance(template_id, str) or template_id not in TEMPLATES:  # a list: unhashable, a 500
            raise invalid("policyTemplateId", "unknown policy template")
        events = data.get("applyingEventIds")
        if isinstance(events, str):
            events = [e.strip() for e in events.split(",") if e.strip()]
        if (
            not isinstance(events, list)
            or not events
            or not all(str(e) in TEMPLATES[template_id]["events"] for e in events)
        ):
            raise invalid("applyingEventIds", "must list event ids of the template")
        configuration = data.get("configuration")
        if isinstance(configuration, str):
            configuration = client_json(configuration, "configuration", "must be a JSON object")
        if not isinstance(configuration, dict) or not configuration:
            raise invalid("configuration", "must be a non-empty object")
        vc_ref = data.get("votingConfigurationId")
        if not isinstance(vc_ref, str) or not vc_ref:
            raise invalid("votingConfigurationId", "this field is required")
        vc = self.db.read(
            lambda c: c.execute(  # the probe passes the name
                "SELECT id FROM voting_configs WHERE profile_id = ? AND (id = ? OR name = ?)",
                (who.profile_id, vc_ref, vc_ref),
            ).fetchone()
        )
        if vc is None:
            raise invalid("votingConfigurationId", "no such voting configuration")
        cid = await self.runner.submit(
            "register-policy",
            who.profile_id,
            {
                "name": name,
                "template": template_id,
                "events": [str(e) for e in events],
                "vc": vc["id"],
                "configuration": configuration,
            },
        )
        return command_accepted(self.opts, "register-policy", cid)

    def policy_record(self, r: sqlite3.Row) -> dict:
        return {
            "id": r["id"],
            "name": r["name"],
            "policyTemplateId": r["template_id"],
            "applyingEventIds": json.loads(r["event_ids"]),
            "votingConfigurationId": r["voting_config_id"],
            "configuration": json.loads(r["configuration"]),
            "active": bool(r["active"]),
            "createdAt": iso(r["created_at"]),
        }

    async def retrieve_policy(self, request: Request) -> Response:
        who = self.engine.principal(request)
        row = self.db.read(
            lambda c: c.execute(
                "SELECT * FROM policies WHERE profile_id = ? AND name = ?",
                (who.profile_id, request.path_params["name"]),
            ).fetchone()
        )
        if row is None:
            raise not_found()
        return JSONResponse(self.policy_record(row))

    def policy_switch(self, kind: str):
        async def handler(request: Request) -> Response:
            who = self.engine.principal(request)
            form = await read_form(request)
            ref = form.get("policyId") or form.get("name")
            if not ref:
                raise invalid("policyId", "this field is required")
            row = self.db.read(
                lambda c: c.execute(
                    "SELECT id FROM policies WHERE profile_id = ? AND (id = ? OR name = ?)", (who.profile_id, ref, ref)
                ).fetchone()
            )
            if row is None:
                raise not_found()
            cid = await self.runner.submit(kind, who.profile_id, {"policy": row["id"]})
            return command_accepted(self.opts, kind, cid)

        return handler

    def routes(self) -> list[Route]:
        g = partial(guarded, self.opts)
        return [
            Route(
                "/verified-authenticator/register",
                g(device_command(self.engine, "register-authenticator")),
                methods=["POST"],
            ),
            Route(
                "/verified-authenticator/voting-configuration/register",
                g(self.register_voting_configuration),
                methods=["POST"],
            ),
            Route(
                "/verified-authenticator/voting-configuration/create",
                g(self.register_voting_configuration),
                methods=["POST"],
            ),
            Route("/voting/check-pool-status/{pool_id}", g(self.check_pool), methods=["GET"]),
            Route("/voting/cancel-pool", g(self.cancel_pool), methods=["POST"]),
            Route("/voting/cast-vote", g(self.cast_vote), methods=["POST"]),
            Route("/voting/list-pools", g(self.list_pools), methods=["GET"]),
            Route("/policy/list-policy-templates", g(self.list_templates), methods=["GET"]),
            Route("/policy/register", g(self.register_policy), methods=["POST"]),
            Route("/policy/register-policy", g(self.register_policy), methods=["POST"]),
            Route("/policy/retrieve-policy/{name}", g(self.retrieve_policy), methods=["GET"]),
            Route("/policy/activate", g(self.policy_switch("activate-policy")), methods=["POST"]),
            Route("/policy/deactivate", g(self.policy_switch("deactivate-policy")), methods=["POST"]),
        ]


def routes(engine: Engine) -> list[Route]:
    return VotingApi(engine).routes()
