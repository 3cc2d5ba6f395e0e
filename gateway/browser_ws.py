"""The browser WebSocket: PCM and JSON up into Redis, `events:{sid}` down as JSON (+ audio).

Two tasks per socket. `_uplink` validates every frame and publishes it; bad input gets an
`error` event (or a documented close code) and never touches another session. `_downlink`
reads the session's event stream from where the browser left off (`last_event`), so a
reconnecting page loses nothing, and sends at the browser's pace: a stalled browser stalls only
its own reader, and the stream itself is bounded in Redis. A send that cannot complete within
`BROWSER_SEND_TIMEOUT_S` closes the socket with 4408; the page reconnects with `last_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

import orjson
from fastapi import APIRouter, WebSocket
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from common import keys, tracing
from common.bus import REDIS_ERRORS, Bus, dump, is_redis_failure
from common.metrics import HOP_BUCKETS, entry_age_s
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
from common.tasks import cancel_and_wait
from gateway.turn_timing import TurnTimer

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_BAD_TOKEN = 4401
CLOSE_ORIGIN_NOT_ALLOWED = 4403
CLOSE_UNKNOWN_SESSION = 4404
CLOSE_BAD_FRAME = 1003
CLOSE_TOO_LARGE = 1009
CLOSE_TOO_SLOW = 4408  # a send did not complete in BROWSER_SEND_TIMEOUT_S: reconnect with last_event
CLOSE_TIMEOUT_S = 10.0  # how long a close frame may wait behind a full socket before we give up on it
MAX_BAD_FRAMES_IN_A_ROW = 20
LAST_SEEN_EVERY_S = 5.0
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")

FRAMES_IN = Counter("gateway_audio_frames_total", "Audio frames received from browsers")
FRAMES_DROPPED = Counter("gateway_audio_frames_dropped_total", "Audio frames refused", ["reason"])
SOCKETS = Gauge("gateway_browser_sockets", "Open browser WebSockets")
AUDIO_PUBLISH = Histogram(
    "gateway_audio_publish_seconds", "Browser audio frame received -> added to its Redis stream", buckets=HOP_BUCKETS
)
EVENT_DELIVERY = Histogram(
    "gateway_event_delivery_seconds",
    "Event added to Redis -> sent to the browser (live events, not the catch-up after a connect)",
    buckets=HOP_BUCKETS,
)
SLOW_CLOSES = Counter(
    "gateway_slow_client_closes", "Browser sockets closed with 4408: a send did not complete in time"
)


class ClientTooSlow(Exception):
    """A send to the browser did not complete within `browser_send_timeout_s`."""


@router.websocket("/v1/sessions/{sid}/ws")
async def browser_socket(ws: WebSocket, sid: str, token: str = "", last_event: str = "") -> None:
    app = ws.app
    store: SessionStore = app.state.store
    await ws.accept()
    if not app.state.origins.allows_scope(ws.scope):
        # Before the session is looked at: another site's page learns nothing about it.
        origin, who = (ws.headers.get("origin") or "")[:200], sid[:64]  # both come from the client
        log.warning("session %s: socket refused, origin %r not allowed", who, origin, extra={"sid": who})
        await ws.close(CLOSE_ORIGIN_NOT_ALLOWED, "origin not allowed")
        return
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
        self.conn_id = new_session_id()  # this socket's entry in `conns:{sid}`
        self._seq_prefix = f"{self.conn_id}:".encode()
        self._frames_published = 0  # numbers this socket's audio entries (see Bus.publish_audio)
        # Token bucket on audio seconds: a client may not stream faster than ~real time.
        self._audio_budget_s = 5.0
        self._audio_budget_at = time.monotonic()
        self._flood_reported = False
        self.turn_timer = TurnTimer()  # end of speech -> first audio, per turn (gateway/turn_timing.py)

    async def serve(self, last_event: str) -> None:
        self.turn_timer.enabled = last_event == "0"  # a resumed socket cannot map session audio time
        await self.store.touch_connection(self.sid, self.conn_id)
        await self.store.set_fields(self.sid, **{keys.F_LAST_SEEN: f"{time.time():.3f}"})
        SOCKETS.inc()
        up = asyncio.create_task(self._uplink())
        down = asyncio.create_task(self._downlink(last_event))
        presence = asyncio.create_task(self._keep_present())
        close_code, close_reason = 1000, ""
        try:
            done, _ = await asyncio.wait({up, down, presence}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled() or task.exception() is None:
                    continue
                if isinstance(task.exception(), WebSocketDisconnect):
                    continue  # the page left while an event was on its way to it: an ordinary end
                if isinstance(task.exception(), ClientTooSlow):
                    # The page stopped reading (or its link is too slow): hold nothing for it. The
                    # events stay in Redis; 4408 tells the page to reconnect with `last_event`.
                    SLOW_CLOSES.inc()
                    log.warning("session %s: browser too slow, closing with 4408", self.sid, extra={"sid": self.sid})
                    close_code, close_reason = CLOSE_TOO_SLOW, "client too slow"
                elif is_redis_failure(task.exception()):
                    # The bus failed, not the session: 1011 tells the page to reconnect.
                    log.warning("session %s: bus error %r", self.sid, task.exception(), extra={"sid": self.sid})
                    close_code = 1011
                else:
                    # A bug, not the page's doing: never a silent 1000 (the page would take the session
                    # as over); 1011 makes it reconnect with `last_event`, and the log says why.
                    log.error("session %s: socket task failed", self.sid, exc_info=task.exception(),
                              extra={"sid": self.sid})
                    close_code, close_reason = 1011, "server error"
        finally:
            await cancel_and_wait((up, down, presence))
            SOCKETS.dec()
            with contextlib.suppress(*REDIS_ERRORS):  # else its entry expires on its own
                await self.store.drop_connection(self.sid, self.conn_id)
            if self.ws.application_state != WebSocketState.DISCONNECTED:
                # Bounded: behind a stalled page even the close frame waits for room in the socket.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await self.ws.close(close_code, close_reason)

    async def _keep_present(self) -> None:
        """Refresh this socket's presence entry while it lives, whether or not the page sends
        anything: only a gateway that died stops refreshing, and then the entry expires."""
        while True:
            await asyncio.sleep(self.settings.browser_presence_refresh_s)
            await self.store.touch_connection(self.sid, self.conn_id)

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
        started = time.perf_counter()
        self._frames_published += 1
        await self.bus.publish_audio(self.sid, pcm, self._seq_prefix + str(self._frames_published).encode())
        AUDIO_PUBLISH.observe(time.perf_counter() - started)
        self.turn_timer.audio(len(pcm), time.monotonic())
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
        live = False  # until the catch-up after connecting is sent: only live events measure delivery
        while True:
            reply = await r.xread({stream: after}, count=64, block=5000 if after != "0" else 1)
            if not reply:
                live = True
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
            entries = reply[0][1]
            for entry_id, fields in entries:
                after = entry_id.decode()
                event = fields[b"e"]
                await self._send(_with_id(event, after), fields.get(b"pcm"))
                if live:
                    EVENT_DELIVERY.observe(entry_age_s(after))
                    self.turn_timer.event(event, time.monotonic())
                    if b"tp" in fields:  # a traced turn's event (common/tracing.py)
                        tracing.delivered(fields[b"tp"], orjson.loads(event).get("type", ""), int(after.split("-")[0]))
                if b'"type":"session.ended"' in event:
                    await self._close(1000, "session ended")
                    return
            live = live or len(entries) < 64

    async def _send(self, text: str, pcm: bytes | None = None) -> None:
        """Send an event (and the audio frame that belongs to it, adjacent), or raise
        `ClientTooSlow` when that cannot complete within `browser_send_timeout_s`.

        uvicorn's send waits while the socket's write buffer is full (the page is not reading),
        so a stalled page holds only the batch already read (≤ 64 events) and its stream is not
        read further until the socket is closed.
        """
        try:
            async with asyncio.timeout(self.settings.browser_send_timeout_s), self._send_lock:
                await self.ws.send_text(text)
                if pcm is not None:
                    await self.ws.send_bytes(pcm)
        except TimeoutError:
            raise ClientTooSlow from None

    async def _send_text(self, payload: bytes) -> None:
        await self._send(payload.decode())

    async def _send_error(self, code: str, message: str) -> None:
        await self._send_text(dump(ErrorEvent(code=code, message=message, fatal=False)))

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S), self._send_lock:
                await self.ws.close(code, reason)


def _with_id(event: bytes, entry_id: str) -> str:
    """Stamp the stream id into the event JSON so the page can resume after it."""
    return '{"id":"' + entry_id + '",' + event[1:].decode()
