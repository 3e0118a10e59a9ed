"""What the engine turns on, listed in one place: every command kind and its applier, the voting
gate and the background tasks.

:func:`install` is the only code that registers appliers, sets the command runner's gate or
adds background tasks; building the API (each ``routes_*.routes(engine)``) only returns routes.
Appliers are module-level functions of their route group; the collaborators an applier needs
(the blob store, the storage devices, the hub, ...) come first in its signature and are bound
here, so a test can call any applier alone with a database connection.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from privifs.engine import routes_datatoken, routes_device, routes_oauth, routes_profile, routes_voting
from privifs.engine.commands import Applier
from privifs.engine.core import Engine
from privifs.engine.options import EngineOptions


def appliers(engine: Engine) -> dict[str, Applier]:
    """Command kind -> the function that applies it, collaborators bound."""
    blobs, storage, opts = engine.blobs, engine.storage, engine.opts
    profile, data, oauth = routes_profile, routes_datatoken, routes_oauth
    device, voting = routes_device, routes_voting
    return {
        # profiles and public keys
        "register-profile": profile.apply_register,
        "change-password": profile.apply_change_password,
        "reauthorize-authorization-token": partial(profile.apply_reauthorize, engine.hub),
        "register-public-key": profile.apply_public_key,
        # data tokens
        "reserve-token-space": partial(data.apply_reserve, opts),
        "exchange-data-for-token": partial(data.apply_exchange, blobs),
        "request-data": partial(data.apply_request_data, opts, blobs),
        "update-data-token": data.apply_update,
        "configure-information-security-risk-meta": data.apply_risk,
        "delete-data": partial(data.apply_delete, blobs, storage),
        # OAuth applications
        "oauth-application-register": oauth.apply_register,
        "oauth-application-request-authorization-code": oauth.apply_request_code,
        # devices and storage devices
        "request-unique-identifier": device.apply_request,
        "approve-device": partial(device.apply_state, "approved"),
        "reject-device": partial(device.apply_state, "rejected"),
        "configure-device-meta": device.apply_meta,
        "remove-device": partial(device.apply_remove, storage),
        "register-storage-device": partial(device.apply_storage_register, storage, engine.spawn),
        "remove-storage-device": partial(device.apply_storage_remove, storage),
        # verified authenticators, voting configurations, policies
        "register-authenticator": voting.apply_authenticator,
        "register-voting-configuration": voting.apply_voting_configuration,
        "register-policy": voting.apply_register_policy,
        "activate-policy": partial(voting.apply_switch, 1),
        "deactivate-policy": partial(voting.apply_switch, 0),
    }


def install(engine: Engine) -> None:
    """Turn every feature of ``engine`` on (once, before it runs)."""
    runner = engine.runner
    for kind, applier in appliers(engine).items():
        runner.register(kind, applier)
    # policies hold commands for a vote: the gate opens a pool, the ballot announces it
    runner.gate = routes_voting.gate
    runner.after_hold = partial(routes_voting.ballot, engine.db, engine.hub)
    # run for the engine's lifetime (started by privifs.engine.server.run_engine)
    engine.background.append(engine.janitor)
    engine.background.append(partial(routes_voting.expire_pools, engine.db, engine.runner))
    # run once at start, in the background
    engine.at_start.append(engine.storage.reconcile)


def build_engine(data_dir: Path, opts: EngineOptions) -> Engine:
    """An :class:`Engine` on ``data_dir`` with every feature installed."""
    engine = Engine(data_dir, opts)
    install(engine)
    return engine
