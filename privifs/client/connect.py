"""The one entry point: :func:`connect` wires transport, session, events and data tokens
together, logs in, joins the event channel before anything else is sent, and keeps the
authorization fresh in the background until the ``async with`` block ends."""
from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from privifs.client.datatokens import DataTokens
from privifs.client.events import Commands, EventHub
from privifs.client.session import Credentials, Session
from privifs.client.transport import ClientOptions, Endpoints, Transport
from privifs.client.vault import Vault
from privifs.errors import single_error


@dataclass
class Client:
    endpoints: Endpoints
    options: ClientOptions
    transport: Transport
    session: Session
    hub: EventHub
    commands: Commands
    tokens: DataTokens

    def vault(self, key: bytes) -> Vault:
        return Vault(self.tokens, key)


@asynccontextmanager
async def connect(endpoints: Endpoints, credentials: Credentials, options: ClientOptions | None = None,
                  *, revoke_on_close: bool = True):
    options = options or ClientOptions()
    transport = Transport(endpoints, options)
    session = Session(transport, credentials, options)
    try:
        await session.login()
        hub = EventHub(endpoints.ws, session, options)
        commands = Commands(transport, hub, options)
        session.await_command = lambda cid: commands.wait(cid, what="reauthorize")
        client = Client(endpoints, options, transport, session, hub, commands,
                        DataTokens(transport, commands, hub, options))
        with single_error():
            async with trio.open_nursery() as nursery:
                await nursery.start(hub.run)
                nursery.start_soon(session.keep_fresh)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if revoke_on_close:
                await session.revoke()
            await transport.aclose()
