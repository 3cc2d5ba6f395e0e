"""The browser WebSocket: PCM and JSON up into Redis, `events:{sid}` down as JSON (+ audio).

Two tasks per socket. `_uplink` validates every frame and publishes it; bad input gets an
`error` event (or a documented close code) and never touches another session. `_downlink`
reads the session's event stream from where the browser left off (`last_event`), so a
reconnecting page loses nothing, and sends at the browser's pace: a stalled browser stalls only
its own reader, and the stream itself is bounded in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import orjson
from fastapi import APIRouter, WebSocket
from prometheus_client import Counter, Gauge
from pydantic import ValidationError
from redis.exceptions import RedisError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from common import keys
from common.bus import Bus, dump
from common.models import (
    AvatarEventIn,
    AvatarVendorEvent,
    EndIn,
    ErrorEvent,
    InterruptIn,
    PingIn,
    SessionEnded,
    TextIn,
    UserInterrupt,
    UserTurn,
    browser_message_adapter,
)
from common.sessions import SessionStore, new_session_id

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_BAD_TOKEN = 4401
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_BAD_FRAME = 1003
CLOSE_TOO_LARGE = 1009
MAX_BAD_FRAMES_IN_A_ROW = 20
LAST_SEEN_EVERY_S = 5.0
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

FRAMES_IN = Counter("gateway_audio_frames_total", "Audio frames received from browsers")
FRAMES_DROPPED = Counter("gateway_audio_frames_dropped_total", "Audio frames refused", ["reason"])
SOCKETS = Gauge("gateway_browser_sockets", "Open browser WebSockets")


@router.websocket("/v1/sessions/{sid}/ws")
async def browser_socket(ws: WebSocket, sid: str, token: str = "", last_event: str = "") -> None:
    app = ws.app
    store: SessionStore = app.state.store
    await ws.accept()
    valid = await store.check_token(sid, token) if token else False
    if valid is None:
        await ws.close(CLOSE_UNKNOWN_SESSION, "unknown session")
        return
    if not valid:
        await ws.close(CLOSE_BAD_TOKEN, "invalid session token")
        return
    conn = BrowserConnection(ws, sid, store, app.state.bus)
    await conn.serve(last_event if STREAM_ID.match(last_event) else "0")


class BrowserConnection:
    def __init__(self, ws: WebSocket, sid: str, store: SessionStore, bus: Bus) -> None:
        self.ws = ws
        self.sid = sid
        self.store = store
        self.bus = bus
        self.settings = bus.settings
        self._send_lock = asyncio.Lock()  # an audio event and its binary frame stay adjacent
        self._bad_in_a_row = 0
        self._last_seen_write = 0.0
        # Token bucket on audio seconds: a client may not stream faster than ~real time.
        self._audio_budget_s = 5.0
        self._audio_budget_at = time.monotonic()
        self._flood_reported = False

    async def serve(self, last_event: str) -> None:
        await self.store.add_connection(self.sid, 1)
        await self.store.set_fields(self.sid, **{keys.F_LAST_SEEN: f"{time.time():.3f}"})
        SOCKETS.inc()
        up = asyncio.create_task(self._uplink())
        down = asyncio.create_task(self._downlink(last_event))
        close_code = 1000
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and isinstance(task.exception(), RedisError | OSError):
                    # The bus failed, not the session: 1011 tells the page to reconnect.
                    log.warning("session %s: bus error %r", self.sid, task.exception(), extra={"sid": self.sid})
                    close_code = 1011
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            SOCKETS.dec()
            with contextlib.suppress(RedisError, OSError):
                left = await self.store.add_connection(self.sid, -1)
                if left is not None and left <= 0:
                    await self.store.set_fields(
                        self.sid, **{keys.F_CONNECTED: "0", keys.F_DISCONNECTED_AT: f"{time.time():.3f}"}
                    )
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                with contextlib.suppress(Exception):
                    await self.ws.close(close_code)

    # ------------------------------------------------------------------ up

    async def _uplink(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                if not await self._on_audio(message["bytes"]):
                    return
            elif message.get("text") is not None:
                if not await self._on_text(message["text"]):
                    return
            await self._touch()

    async def _on_audio(self, pcm: bytes) -> bool:
        if len(pcm) > self.settings.max_frame_bytes:
            FRAMES_DROPPED.labels("too_large").inc()
            await self._close(CLOSE_TOO_LARGE, f"audio frame over {self.settings.max_frame_bytes} bytes")
            return False
        if not pcm or len(pcm) % 2:
            FRAMES_DROPPED.labels("bad_frame").inc()
            return await self._bad_input(
                "bad_audio_frame", "audio frames must be PCM16 mono 16 kHz: an even, non-zero byte count"
            )
        if not self._spend_audio_budget(len(pcm) / 32000):
            FRAMES_DROPPED.labels("rate_limited").inc()
            if not self._flood_reported:
                self._flood_reported = True
                await self._send_error("audio_rate_limited", "audio arrives faster than real time; dropped")
            return True
        self._bad_in_a_row = 0
        FRAMES_IN.inc()
        await self.bus.publish_audio(self.sid, pcm)
        return True

    def _spend_audio_budget(self, seconds: float) -> bool:
        now = time.monotonic()
        self._audio_budget_s = min(5.0, self._audio_budget_s + (now - self._audio_budget_at) * 1.25)
        self._audio_budget_at = now
        if self._audio_budget_s < seconds:
            return False
        self._audio_budget_s -= seconds
        return True

    async def _on_text(self, text: str) -> bool:
        try:
            msg = browser_message_adapter.validate_json(text)
        except ValidationError as exc:
            reason = exc.errors()[0].get("msg", "invalid message") if exc.errors() else "invalid message"
            return await self._bad_input("bad_message", f"message refused: {reason}")
        self._bad_in_a_row = 0
        if isinstance(msg, TextIn):
            if len(msg.text) > self.settings.max_text_chars:
                await self._send_error("text_too_long", f"text over {self.settings.max_text_chars} characters")
                return True
            await self.bus.publish_turn(
                self.sid, UserTurn(turn_id=f"t{new_session_id()[:16]}", text=msg.text.strip(), source="text")
            )
        elif isinstance(msg, InterruptIn):
            await self.bus.publish_turn(self.sid, UserInterrupt())
        elif isinstance(msg, AvatarEventIn):
            data = {k: v for k, v in (msg.model_extra or {}).items()}
            if len(orjson.dumps(data)) > 4096:
                await self._send_error("bad_message", "avatar.event payload too large")
                return True
            await self.bus.publish_turn(self.sid, AvatarVendorEvent(event=msg.event, data=data))
        elif isinstance(msg, EndIn):
            await self.store.end(self.sid, "user_ended")
        elif isinstance(msg, PingIn):
            pass
        return True

    async def _bad_input(self, code: str, message: str) -> bool:
        self._bad_in_a_row += 1
        if self._bad_in_a_row >= MAX_BAD_FRAMES_IN_A_ROW:
            await self._close(CLOSE_BAD_FRAME, "too many bad frames")
            return False
        await self._send_error(code, message)
        return True

    async def _touch(self) -> None:
        now = time.time()
        if now - self._last_seen_write >= LAST_SEEN_EVERY_S:
            self._last_seen_write = now
            await self.store.set_fields(self.sid, **{keys.F_LAST_SEEN: f"{now:.3f}"})

    # ---------------------------------------------------------------- down

    async def _downlink(self, after: str) -> None:
        r = self.store.r
        stream = keys.events(self.sid)
        while True:
            reply = await r.xread({stream: after}, count=64, block=5000 if after != "0" else 1)
            if not reply:
                record = await self.store.get(self.sid)
                if record is None or record.get(keys.F_STATE, "ended") == "ended":
                    # Its session.ended event is gone (trimmed or expired): say it anyway.
                    reason = (record or {}).get(keys.F_ENDED_REASON, "ended")
                    await self._send_text(dump(SessionEnded(reason=reason)))
                    await self._close(1000, "session ended")
                    return
                if after == "0":
                    after = "0-0"
                continue
            for entry_id, fields in reply[0][1]:
                after = entry_id.decode()
                event = fields[b"e"]
                async with self._send_lock:
                    await self.ws.send_text(_with_id(event, after))
                    pcm = fields.get(b"pcm")
                    if pcm is not None:
                        await self.ws.send_bytes(pcm)
                if b'"type":"session.ended"' in event:
                    await self._close(1000, "session ended")
                    return

    async def _send_text(self, payload: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_text(payload.decode())

    async def _send_error(self, code: str, message: str) -> None:
        await self._send_text(dump(ErrorEvent(code=code, message=message, fatal=False)))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            async with self._send_lock:
                await self.ws.close(code, reason)


def _with_id(event: bytes, entry_id: str) -> str:
    """Stamp the stream id into the event JSON so the page can resume after it."""
    return '{"id":"' + entry_id + '",' + event[1:].decode()
