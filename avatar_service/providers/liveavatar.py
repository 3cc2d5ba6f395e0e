"""HeyGen LiveAvatar in LITE mode as an avatar driver: LiveAvatar renders video, we bring the rest.

Per session (reference §3): `POST /v1/sessions/token` (X-API-KEY, `mode: LITE`) →
`POST /v1/sessions/start` (Bearer session token) gives the LiveKit url + viewer token for the
browser (`session.ready`) and a `ws_url` this worker holds. Over that socket each reply is sent as
24 kHz mono PCM16 (`agent.speak`, base64, one `event_id` per reply, a short first chunk), then
`agent.speak_end`; `agent.interrupt` on barge-in; `session.keep_alive` while idle. The avatar's
`agent.speak_started` / `agent.speak_ended` become `avatar.started_talking` / `stopped_talking`.
Speech is the project's TTS (piper), resampled to 24 kHz.

No leaks (same rules as the HeyGen driver): the vendor session id is written to the session hash
right after the token call, before `start`; only `stop()` (the session ended) calls
`/v1/sessions/stop`; a worker that hands its sessions back (SIGTERM) only closes its socket, and
the new owner reconnects to the stored session after a keep-alive probe, or stops it and makes a
new one. The API key and the session token never leave this process; `ws_url` embeds a
credential, so it is kept only in the (internal) session hash, never logged or sent to a browser.

Commands sent before the socket reports `connected` are queued (bounded, with back-pressure),
never dropped; a socket that closes unexpectedly is reconnected a few times, then the session is
ended with a clear `avatar_lost` error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import websockets
from redis.exceptions import RedisError

from avatar_service.driver import AvatarError, Speech, sentences_of
from avatar_service.providers.local import _next_or_interrupt
from avatar_service.providers.vendor_api import VendorApi, VendorApiError, VendorSession
from avatar_service.tts import PiperTts
from common import keys
from common.bus import Bus
from common.models import (
    AvatarStartedTalking,
    AvatarStoppedTalking,
    LiveKitInfo,
    SessionConfig,
    SessionReady,
)
from common.pcm import resample_pcm16
from common.sessions import SessionStore
from common.settings import Settings

log = logging.getLogger(__name__)

F_VENDOR_ID = "liveavatar_session_id"
F_LIVEKIT_URL = "liveavatar_livekit_url"
F_LIVEKIT_TOKEN = "liveavatar_livekit_token"  # the browser's token: it is in `session.ready` anyway
F_WS_URL = "liveavatar_ws_url"  # embeds a credential: internal only, never logged
F_STARTED = "liveavatar_started"
VENDOR_FIELDS = (F_VENDOR_ID, F_LIVEKIT_URL, F_LIVEKIT_TOKEN, F_WS_URL, F_STARTED)

RATE = 24_000
BYTES_PER_S = RATE * 2
OUTBOX_MAX = 512  # queued commands (≈ 8 min of 1 s audio chunks) before `speak` waits for room
RECONNECTS = 3
STOP_REASONS = {
    "browser_left": "USER_DISCONNECTED",
    "idle_timeout": "IDLE_TIMEOUT",
    "max_duration": "MAX_DURATION_REACHED",
    "deleted": "USER_CLOSED",
    "user_ended": "USER_CLOSED",
}


@dataclass(frozen=True)
class LiveAvatarOptions:
    api_key: str
    server_url: str
    avatar_id: str
    sandbox: bool
    quality: str
    encoding: str
    max_session_s: int
    keepalive_s: float
    http_timeout_s: float
    connect_timeout_s: float
    first_chunk_ms: int
    chunk_ms: int
    stop_grace_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveAvatarOptions:
        key = settings.liveavatar_api_key.get_secret_value() if settings.liveavatar_api_key else ""
        return cls(
            api_key=key, server_url=settings.liveavatar_server_url, avatar_id=settings.liveavatar_avatar_id,
            sandbox=settings.liveavatar_sandbox, quality=settings.liveavatar_video_quality,
            encoding=settings.liveavatar_video_encoding, max_session_s=settings.liveavatar_max_session_s,
            keepalive_s=settings.liveavatar_keepalive_s, http_timeout_s=settings.liveavatar_http_timeout_s,
            connect_timeout_s=settings.liveavatar_connect_timeout_s,
            first_chunk_ms=settings.liveavatar_first_chunk_ms, chunk_ms=settings.liveavatar_chunk_ms,
            stop_grace_s=settings.liveavatar_stop_grace_s,
        )


# ---------------------------------------------------------------- REST


class LiveAvatarError(VendorApiError):
    """A failed LiveAvatar call."""

    @property
    def auth(self) -> bool:
        return self.status in (401, 403)

    @property
    def gone(self) -> bool:
        text = self.message.lower()
        return self.status == 404 or ("session" in text and ("not found" in text or "closed" in text
                                                              or "ended" in text or "stopped" in text))


def avatar_error(exc: LiveAvatarError) -> AvatarError:
    if exc.auth:
        return AvatarError("avatar_auth", "the avatar service rejected its API key (check LIVEAVATAR_API_KEY)")
    if exc.status == 422 or ("avatar" in exc.message.lower() and "not" in exc.message.lower()):
        return AvatarError("avatar_not_found", "LiveAvatar refused this avatar (check LIVEAVATAR_AVATAR_ID)")
    if exc.transient:
        return AvatarError("avatar_unavailable", "the avatar service is unreachable, try again shortly")
    return AvatarError("avatar_failed", "the avatar could not be started")


@dataclass(frozen=True)
class Started:
    session_id: str
    livekit_url: str
    livekit_client_token: str
    ws_url: str


class LiveAvatarClient(VendorApi):
    """The REST API over one pooled client; raises `LiveAvatarError`. Only idempotent calls retry."""

    vendor = "LiveAvatar"
    error = LiveAvatarError
    key_header = "X-API-KEY"

    async def create_token(self, body: dict[str, Any]) -> tuple[str, str]:
        data = await self._call("POST", "/v1/sessions/token", body)
        sid, token = data.get("session_id"), data.get("session_token")
        if not sid or not token:
            raise LiveAvatarError("/v1/sessions/token", 200, None, "no session id or token in the response")
        return str(sid), str(token)

    async def start(self, session_token: str) -> Started:
        data = await self._call("POST", "/v1/sessions/start", {}, bearer=session_token)
        try:
            return Started(str(data["session_id"]), str(data["livekit_url"]), str(data["livekit_client_token"]),
                           str(data["ws_url"]))
        except KeyError as exc:
            raise LiveAvatarError("/v1/sessions/start", 200, None, f"response without {exc}") from None

    async def keep_alive(self, session_id: str) -> None:
        await self._call("POST", "/v1/sessions/keep-alive", {"session_id": session_id}, retries=2)

    async def stop(self, session_id: str, reason: str = "UNKNOWN") -> bool:
        """False if the vendor says it was already gone (idempotent for callers)."""
        try:
            await self._call("POST", "/v1/sessions/stop", {"session_id": session_id, "reason": reason}, retries=2)
        except LiveAvatarError as exc:
            if exc.gone:
                return False
            raise
        return True

    async def list_sessions(self) -> list[VendorSession]:
        """Active sessions (`GET /v1/sessions?type=active`; item shape unconfirmed, read leniently)."""
        payload = await self._request("GET", "/v1/sessions?type=active", None, None, 2)
        data = payload.get("data")
        items = data if isinstance(data, list) else (
            (data.get("results") or data.get("sessions") or []) if isinstance(data, dict) else [])
        out = []
        for item in items:
            if not isinstance(item, dict):
                continue
            vid = item.get("session_id") or item.get("id")
            if vid:
                out.append(VendorSession(str(vid), str(item.get("status", "")), _unix(item.get("created_at"))))
        return out

    # Same signature as HeyGenClient.stop for the reaper.
    async def reap(self, session_id: str) -> bool:
        return await self.stop(session_id, "ZOMBIE_SESSION_REAP")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                    bearer: str | None = None, retries: int = 0) -> dict[str, Any]:
        payload = await self._request(method, path, body, bearer, retries)
        data = payload.get("data")
        return data if isinstance(data, dict) else {}


def _unix(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


# ---------------------------------------------------------------- driver


class LiveAvatarDriver:
    name = "liveavatar"

    def __init__(self, settings: Settings, bus: Bus, *, tts: PiperTts | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.options = LiveAvatarOptions.from_settings(settings)
        if not self.options.api_key:
            raise SystemExit("AVATAR_PROVIDER=liveavatar needs LIVEAVATAR_API_KEY")
        if not self.options.avatar_id:
            raise SystemExit("AVATAR_PROVIDER=liveavatar needs LIVEAVATAR_AVATAR_ID")
        self.client = LiveAvatarClient(self.options.server_url, self.options.api_key,
                                       timeout_s=self.options.http_timeout_s)
        if tts is None:  # loading blocks for ~1 s: construct the driver off the event loop
            tts = PiperTts(settings=settings)
            tts.warm_up()
        self.tts = tts
        self.store = SessionStore(bus.r, bus)
        self.served: set[LiveAvatarSession] = set()

    async def open(self, session_id: str, config: SessionConfig, *, resumed: bool) -> LiveAvatarSession:
        return LiveAvatarSession(self, session_id, config)

    async def aclose(self) -> None:
        """Worker shutdown: close our sockets, never stop the sessions (they are handed back)."""
        for session in list(self.served):
            session.release()
        await asyncio.sleep(0)
        await self.client.aclose()


class _Outbox:
    """Commands for the socket, in order; bounded (put waits for room); speech can be dropped."""

    def __init__(self, maxlen: int) -> None:
        self.items: deque[dict[str, Any]] = deque()
        self.maxlen = maxlen
        self.changed = asyncio.Event()

    async def put(self, cmd: dict[str, Any]) -> None:
        while len(self.items) >= self.maxlen:
            self.changed.clear()
            await self.changed.wait()
        self.put_now(cmd)

    def put_now(self, cmd: dict[str, Any]) -> None:
        self.items.append(cmd)
        self.changed.set()

    def drop(self, pred: Callable[[dict[str, Any]], bool]) -> None:
        self.items = deque(c for c in self.items if not pred(c))
        self.changed.set()

    async def get(self, timeout_s: float) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.items:
            self.changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        cmd = self.items.popleft()
        self.changed.set()
        return cmd


@dataclass
class _Reply:
    reply_id: str
    event_id: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    cut: asyncio.Event = field(default_factory=asyncio.Event)  # set with `interrupted`
    interrupted: bool = False
    interrupted_at: float = 0.0
    sent_any: bool = False
    first_sent_at: float | None = None
    started_at: float | None = None  # the vendor's agent.speak_started
    ended: bool = False  # the vendor's agent.speak_ended
    announced: bool = False


class LiveAvatarSession:
    answers_itself = False

    def __init__(self, driver: LiveAvatarDriver, sid: str, config: SessionConfig) -> None:
        self.driver = driver
        self.sid = sid
        self.config = config
        self.options = driver.options
        self.client = driver.client
        self.bus = driver.bus
        self.store = driver.store
        self.vendor: Started | None = None
        self.connected = asyncio.Event()
        self.outbox = _Outbox(OUTBOX_MAX)
        self._link: asyncio.Task[None] | None = None
        self._reply: _Reply | None = None
        self._stopped = False
        self._released = False
        self._lost_once = False
        self._was_connected = False

    # ---- lifecycle

    async def start(self) -> None:
        try:
            self.vendor = await self._resume() or await self._create()
        except LiveAvatarError as exc:
            log.error("starting the LiveAvatar avatar failed: %s", exc, extra={"sid": self.sid})
            error = avatar_error(exc)
            with contextlib.suppress(RedisError):
                await self.bus.publish_event(self.sid, error.event())
            raise error from None
        self._link = asyncio.create_task(self._link_loop(self.vendor), name=f"liveavatar-ws:{self.sid}")
        self.driver.served.add(self)
        owner = asyncio.current_task()
        if owner is not None:
            owner.add_done_callback(lambda _task: self.release())
        ready = SessionReady(
            provider="liveavatar", stt_provider=self.driver.settings.resolved_stt_provider(),
            livekit=LiveKitInfo(url=self.vendor.livekit_url, token=self.vendor.livekit_client_token),
        )
        await self.bus.publish_event(self.sid, ready)

    def release(self) -> None:
        """This worker no longer serves the session: close the socket (the session lives on)."""
        self._released = True
        if self._link is not None:
            self._link.cancel()
        self.driver.served.discard(self)
        reply = self._reply
        if reply is not None:
            reply.interrupted = True
            reply.cut.set()
            reply.changed.set()

    async def stop(self, reason: str) -> None:
        """Stop the vendor session for good; idempotent. A failure is left to the reaper."""
        if self._stopped:
            return
        self._stopped = True
        self.release()
        if self._link is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._link
        vendor_id = self.vendor.session_id if self.vendor else await self._stored(F_VENDOR_ID)
        if not vendor_id:
            return
        vendor_reason = await self._stop_reason()
        try:
            stopped = await self.client.stop(vendor_id, vendor_reason)
        except LiveAvatarError as exc:
            log.error("could not stop LiveAvatar session %s (%s); the reaper will", vendor_id, exc,
                      extra={"sid": self.sid})
            return
        log.info("%s LiveAvatar session %s (%s)", "stopped" if stopped else "found already gone", vendor_id,
                 vendor_reason, extra={"sid": self.sid})
        with contextlib.suppress(RedisError):
            await self.bus.r.hdel(keys.session(self.sid), *VENDOR_FIELDS)

    # ---- speech

    async def speak(self, reply_id: str, text: Speech, *, user_text: str | None = None) -> str:
        """Stream the reply's audio over the socket; return once spoken, or soon after `interrupt()`.

        Returns the sentences whose audio had started playing (by the avatar's clock, from
        `agent.speak_started`) when an interrupt came; all of them otherwise.
        """
        if self.vendor is None or self._stopped or self._released:
            return ""
        tts = self.driver.tts
        reply = self._reply = _Reply(reply_id, uuid.uuid4().hex)
        loop = asyncio.get_running_loop()
        starts: list[tuple[float, str]] = []  # (audio offset in s, sentence)
        sent_bytes = 0
        target = max(2, BYTES_PER_S * self.options.first_chunk_ms // 1000 // 2 * 2)
        buf = bytearray()

        async def send(chunk: bytes) -> None:
            nonlocal sent_bytes, target
            cmd = {"type": "agent.speak", "event_id": reply.event_id, "audio": base64.b64encode(chunk).decode()}
            await self.outbox.put(cmd)
            sent_bytes += len(chunk)
            reply.sent_any = True
            if reply.first_sent_at is None:
                reply.first_sent_at = loop.time()
            target = max(2, BYTES_PER_S * self.options.chunk_ms // 1000 // 2 * 2)

        sentences = sentences_of(text)
        try:
            while not reply.interrupted:
                sentence = await _next_or_interrupt(sentences, reply.cut)
                if sentence is None:
                    break
                starts.append(((sent_bytes + len(buf)) / BYTES_PER_S, sentence))
                chunks = tts.stream(sentence)
                try:
                    while not reply.interrupted:
                        pcm = await _next_or_interrupt(chunks, reply.cut)
                        if pcm is None:
                            break
                        buf += resample_pcm16(pcm, tts.sample_rate, RATE)
                        while len(buf) >= target and not reply.interrupted:
                            chunk, buf = bytes(buf[:target]), buf[target:]
                            await send(chunk)
                finally:
                    await chunks.aclose()
                if buf and not reply.interrupted:  # never hold audio back waiting for the next sentence
                    chunk, buf = bytes(buf), bytearray()
                    await send(chunk)
        finally:
            await sentences.aclose()
        if reply.sent_any and not reply.interrupted:
            await self.outbox.put({"type": "agent.speak_end", "event_id": reply.event_id})
            await self._wait_spoken(reply, sent_bytes / BYTES_PER_S)
        if self._reply is reply:
            self._reply = None
        if reply.sent_any:
            if not reply.announced:
                reply.announced = True
                await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply_id))
            await self.bus.publish_event(self.sid, AvatarStoppedTalking(reply_id=reply_id,
                                                                          interrupted=reply.interrupted))
        if not reply.interrupted:
            return " ".join(s for _, s in starts)
        began = reply.started_at or reply.first_sent_at
        played = reply.interrupted_at - began if began is not None else 0.0
        return " ".join(s for offset, s in starts if offset <= played)

    async def interrupt(self) -> None:
        reply = self._reply
        if reply is None or reply.interrupted:
            return
        reply.interrupted = True
        reply.interrupted_at = asyncio.get_running_loop().time()
        reply.cut.set()
        reply.changed.set()
        # Chunks still queued here are simply not sent; the avatar drops what it has buffered.
        self.outbox.drop(lambda c: c.get("event_id") == reply.event_id and c["type"] != "agent.interrupt")
        if reply.sent_any:
            self.outbox.put_now({"type": "agent.interrupt", "event_id": reply.event_id})

    async def pause(self) -> bool:
        return False  # the vendor's stream has no pause: barge-in interrupts once words are clear

    async def resume(self) -> None:
        return None

    async def on_user_speaking(self, speaking: bool) -> None:
        return None

    async def on_vendor_event(self, event: str, data: dict) -> None:
        return None  # LITE mode: the avatar's events come over our socket, not from the page

    async def _wait_spoken(self, reply: _Reply, audio_s: float) -> None:
        loop = asyncio.get_running_loop()
        while not (reply.ended or reply.interrupted):
            began = reply.started_at or reply.first_sent_at or loop.time()
            deadline = began + audio_s + self.options.stop_grace_s + (0 if reply.started_at else
                                                                      self.options.connect_timeout_s)
            if loop.time() >= deadline:
                log.info("no agent.speak_ended for %s; taking it as spoken", reply.event_id, extra={"sid": self.sid})
                return
            reply.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reply.changed.wait(), deadline - loop.time())

    # ---- the socket

    async def _link_loop(self, vendor: Started) -> None:
        """Hold the socket; reconnect a few times if it drops; end the session if it cannot."""
        failures = 0
        while not (self._stopped or self._released):
            self._was_connected = False
            close: int | None = None
            try:
                async with websockets.connect(vendor.ws_url, ping_interval=None, max_size=2**22,
                                              open_timeout=self.options.connect_timeout_s) as ws:
                    writer = asyncio.create_task(self._writer(ws))
                    try:
                        await self._reader(ws)
                    finally:
                        writer.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await writer
                        self.connected.clear()
                    close = ws.close_code
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                log.warning("LiveAvatar socket failed: %s", type(exc).__name__, extra={"sid": self.sid})
            if self._stopped or self._released:
                return
            failures = 1 if self._was_connected else failures + 1
            if failures > RECONNECTS:
                await self._lost(f"socket closed ({close})")
                return
            log.warning("LiveAvatar socket closed (%s); reconnecting", close, extra={"sid": self.sid})
            await asyncio.sleep(0.25 * 2 ** (failures - 1))

    async def _reader(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        async for message in ws:
            try:
                event = orjson.loads(message)
            except orjson.JSONDecodeError:
                continue
            kind = event.get("type")
            reply = self._reply
            if kind == "session.state_updated":
                state = event.get("state")
                if state == "connected":
                    self._was_connected = True
                    self.connected.set()
                elif state in ("closing", "closed"):
                    self.connected.clear()
            elif kind == "agent.speak_started" and reply is not None and event.get("event_id") == reply.event_id:
                reply.started_at = reply.started_at or loop.time()
                reply.changed.set()
                if not reply.announced:
                    reply.announced = True
                    await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply.reply_id))
            elif kind in ("agent.speak_ended", "agent.speak_interrupted") and reply is not None \
                    and event.get("event_id") == reply.event_id:
                reply.ended = True
                reply.changed.set()

    async def _writer(self, ws: Any) -> None:
        """Send queued commands once `connected`; `session.keep_alive` when idle. A command whose
        send fails stays at the head of the queue for the next socket."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), self.options.connect_timeout_s)
        if not self.connected.is_set():
            log.warning("LiveAvatar socket never reported connected; reconnecting", extra={"sid": self.sid})
            await ws.close(1000)
            return
        while True:
            cmd = await self.outbox.get(self.options.keepalive_s)
            if cmd is None:
                cmd = {"type": "session.keep_alive", "event_id": uuid.uuid4().hex}
            await self.connected.wait()
            try:
                await ws.send(orjson.dumps(cmd).decode())
            except websockets.ConnectionClosed:
                if cmd["type"] != "session.keep_alive":
                    self.outbox.items.appendleft(cmd)
                raise

    # ---- internals

    async def _lost(self, why: str) -> None:
        if self._lost_once or self._stopped:
            return
        self._lost_once = True
        log.error("LiveAvatar session is gone (%s); ending the session", why, extra={"sid": self.sid})
        reply = self._reply
        if reply is not None:
            reply.interrupted = True
            reply.cut.set()
            reply.changed.set()
        error = AvatarError("avatar_lost", "the avatar session ended unexpectedly")
        with contextlib.suppress(RedisError):
            await self.bus.publish_event(self.sid, error.event())
            await self.store.end(self.sid, error.code)

    async def _resume(self) -> Started | None:
        record = await self.store.get(self.sid) or {}
        vendor_id = record.get(F_VENDOR_ID)
        if not vendor_id:
            return None
        url, token, ws_url = record.get(F_LIVEKIT_URL), record.get(F_LIVEKIT_TOKEN), record.get(F_WS_URL)
        if record.get(F_STARTED) == "1" and url and token and ws_url:
            try:
                await self.client.keep_alive(vendor_id)
            except LiveAvatarError as exc:
                if exc.auth:
                    raise
                log.warning("LiveAvatar session %s cannot be resumed (%s); starting a new one", vendor_id, exc,
                            extra={"sid": self.sid})
            else:
                log.info("resumed LiveAvatar session %s", vendor_id, extra={"sid": self.sid})
                return Started(vendor_id, url, token, ws_url)
        await self._discard(vendor_id)
        return None

    async def _create(self) -> Started:
        o = self.options
        body: dict[str, Any] = {
            "mode": "LITE", "avatar_id": self.config.avatar_id or o.avatar_id, "is_sandbox": o.sandbox,
            "video_settings": {"quality": o.quality, "encoding": o.encoding},
        }
        if o.max_session_s:
            body["max_session_duration"] = o.max_session_s
        vendor_id, token = await self.client.create_token(body)
        # Recorded before `start`: a takeover resumes or stops it, and the reaper leaves it alone.
        await self.store.set_fields(self.sid, **{F_VENDOR_ID: vendor_id, F_STARTED: "0"})
        try:
            started = await self.client.start(token)
        except LiveAvatarError:
            await self._discard(vendor_id)
            raise
        await self.store.set_fields(self.sid, **{
            F_LIVEKIT_URL: started.livekit_url, F_LIVEKIT_TOKEN: started.livekit_client_token,
            F_WS_URL: started.ws_url, F_STARTED: "1",
        })
        log.info("started LiveAvatar session %s", vendor_id, extra={"sid": self.sid})
        return Started(vendor_id, started.livekit_url, started.livekit_client_token, started.ws_url)

    async def _discard(self, vendor_id: str) -> None:
        try:
            await self.client.stop(vendor_id, "SERVER_ERROR")
        except LiveAvatarError as exc:
            log.warning("could not stop LiveAvatar session %s (%s)", vendor_id, exc, extra={"sid": self.sid})
        await self.bus.r.hdel(keys.session(self.sid), *VENDOR_FIELDS)

    async def _stored(self, name: str) -> str | None:
        with contextlib.suppress(RedisError):
            raw = await self.bus.r.hget(keys.session(self.sid), name)
            return raw.decode() if raw else None
        return None

    async def _stop_reason(self) -> str:
        reason = await self._stored(keys.F_ENDED_REASON) or ""
        if reason in STOP_REASONS:
            return STOP_REASONS[reason]
        return "SERVER_ERROR" if reason.startswith(("avatar", "stt", "llm")) else "USER_CLOSED"
