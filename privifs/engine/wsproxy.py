"""The WebSocket proxy: ``joinChannel`` binds a connection to a profile; events follow.

Frames are JSON text. ``{"action": "joinChannel", "data": {"authorizationToken": …}}`` (with an
optional ``correlationId`` at the top level or in ``data``) answers
``{"correlationId", "status": 200, "data": {"channelId", "message"}}``; a bad token answers
``status`` 401. ``leaveChannel`` detaches. Anything else is ignored. Any path is accepted.
"""

from __future__ import annotations

import json
import logging

import h11
import trio
from starlette.websockets import WebSocket, WebSocketDisconnect

from privifs.engine.core import Engine
from privifs.engine.http import ApiError, drain_body, strict_json
from privifs.engine.hub import CLOSE
from privifs.engine.streams import _lifespan

log = logging.getLogger("privifs.engine.ws")

MAX_FRAME = 64 * 1024


def websocket_app(engine: Engine):
    hub = engine.hub

    async def sender(ws: WebSocket, ch, outbox) -> None:
        async with outbox:
            async for message in outbox:
                if message is CLOSE:
                    await ws.close(code=ch.close_code, reason=ch.close_reason)
                    return
                await ws.send_text(message)

    async def handle(ws: WebSocket, ch, text: str) -> None:
        try:
            frame = strict_json(text)  # a correlationId of NaN was echoed back as NaN, not JSON
        except (ValueError, RecursionError):  # not JSON, or nested too deep: ignored like any junk
            return
        if not isinstance(frame, dict):
            return
        data = frame.get("data") if isinstance(frame.get("data"), dict) else {}
        correlation = frame.get("correlationId", data.get("correlationId"))
        action = frame.get("action")
        if action == "joinChannel":
            token = data.get("authorizationToken")
            try:
                who, expires = engine.principal_from_token(token if isinstance(token, str) else None)
            except ApiError as exc:
                await ch.send.send(
                    json.dumps({"correlationId": correlation, "status": exc.status, "data": {"message": exc.message}})
                )
                return
            hub.join(ch, who.profile_id, who.token_hash, expires)
            await ch.send.send(
                json.dumps(
                    {
                        "correlationId": correlation,
                        "status": 200,
                        "data": {"channelId": ch.channel_id, "message": "Successfully joined profile channel."},
                    }
                )
            )
        elif action == "leaveChannel":
            hub.leave(ch)
            await ch.send.send(
                json.dumps({"correlationId": correlation, "status": 200, "data": {"message": "Left profile channel."}})
            )

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] == "http":
            await drain_body(receive)  # unread, the connection closed after the 426 without saying so
            body = b'{"status":426,"message":"this is the WebSocket proxy; connect with WebSocket"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 426,
                    "headers": [(b"content-type", b"application/json"), (b"upgrade", b"websocket")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        ws = WebSocket(scope, receive, send)
        try:
            await ws.accept()
        except h11.LocalProtocolError as exc:
            # the client sent bytes behind its upgrade request before our 101: hypercorn has
            # already answered 400 and the handshake can no longer be accepted
            log.info("WebSocket handshake refused: %s", exc)
            return
        ch, outbox = hub.new_channel()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender, ws, ch, outbox)
                try:
                    while True:
                        message = await ws.receive()
                        if message["type"] == "websocket.disconnect":
                            break
                        text = message.get("text")
                        if text is None or len(text) > MAX_FRAME:
                            continue
                        await handle(ws, ch, text)
                except WebSocketDisconnect:
                    pass
                finally:
                    hub.leave(ch)
                    ch.send.close()
        except* (WebSocketDisconnect, trio.BrokenResourceError, trio.ClosedResourceError, RuntimeError):
            pass
        finally:
            hub.leave(ch)

    return app
