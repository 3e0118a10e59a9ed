"""The one entry point: :func:`connect` wires transport, session, events and data tokens
together, logs in (giving up on a server that does not answer the login within
``ClientOptions.login_timeout``), joins the event channel before anything else is sent, and keeps the
authorization fresh in the background until the ``async with`` block ends. The event channel and
the renewal run supervised (:mod:`privifs.supervise`): a bug in either is logged, shown through
``Client.supervisor`` and the task restarted; it never ends the block."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from privifs.client.datatokens import DataTokens
from privifs.client.events import Commands, EventHub
from privifs.client.session import Credentials, Session
from privifs.client.transport import ClientOptions, Endpoints, Transport
from privifs.client.vault import Vault
from privifs.errors import ServerUnreachable, single_error
from privifs.supervise import Supervisor


@dataclass
class Client:
    endpoints: Endpoints
    options: ClientOptions
    transport: Transport
    session: Session
    hub: EventHub
    commands: Commands
    tokens: DataTokens
    supervisor: Supervisor

    def vault(self, key: bytes) -> Vault:
        return Vault(self.tokens, key)


@asynccontextmanager
async def connect(
    endpoints: Endpoints,
    credentials: Credentials,
    options: ClientOptions | None = None,
    *,
    revoke_on_close: bool = True,
    supervisor: Supervisor | None = None,
):
    options = options or ClientOptions()
    supervisor = supervisor or Supervisor()
    transport = Transport(endpoints, options)
    session = Session(transport, credentials, options)
    try:
        with trio.move_on_after(options.login_timeout) as login:
            await session.login()
        if login.cancelled_caught:
            raise ServerUnreachable(
                f"the Privicore server at {endpoints.api} did not answer within {options.login_timeout:g}s "
                f"(it accepts connections but answers nothing); check that the server is running and answering"
            )
        hub = EventHub(endpoints.ws, session, options, endpoints)
        commands = Commands(transport, hub, options)
        session.await_command = lambda cid: commands.wait(cid, what="reauthorize")
        client = Client(
            endpoints,
            options,
            transport,
            session,
            hub,
            commands,
            DataTokens(transport, commands, hub, options),
            supervisor,
        )
        with single_error():
            async with trio.open_nursery() as nursery:
                await supervisor.start(nursery, "event channel", hub.run)
                supervisor.start_soon(nursery, "authorization renewal", session.keep_fresh)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if revoke_on_close:
                await session.revoke()
            await transport.aclose()
