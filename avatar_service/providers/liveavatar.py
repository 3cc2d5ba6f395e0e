"""HeyGen LiveAvatar in LITE mode: the adapter of the cloud lifecycle (`cloud.py`) for LiveAvatar's wire.

Per session (LiveAvatar API): `POST /v1/sessions/token` (X-API-KEY, `mode: LITE`) gives the session
id (recorded before anything else) → `POST /v1/sessions/start` (Bearer session token) gives the
LiveKit url + viewer token for the browser, the `ws_url` this worker holds and the
`max_session_duration`. Over the socket each reply is 24 kHz mono PCM16 (`agent.speak`, base64, one
`event_id` per reply, a short first chunk), then `agent.speak_end`; `agent.interrupt` on barge-in,
acknowledged by `agent.audio_buffer_cleared`; `agent.start_listening` / `stop_listening` while the
user talks; `session.keep_alive` while idle. Speech is the project's TTS (piper), resampled as one
stream per reply (no filter restart, so no click, at chunk edges).

Talking state: real sessions send `agent.state_updated` (`idle` / `listening` / `talking`) and
`agent.audio_buffer_appended/committed/cleared` acks; the documented `agent.speak_started/ended`
may not come (livekit/agents#7232). Both are read and either is enough; buffer acks are acks, not
playback.

A socket the vendor closes (after `session.state_updated: closed`, or a clean 1000) is the vendor
ending the session: sandbox expiry, the duration limit or the vendor's own reasons, an expected end.
Other drops reconnect with backoff; when that fails the REST API says whether the session is gone
(an expected end) or we lost it (`avatar_lost`). The API key and the session token never leave this
process; `ws_url` embeds a credential, so it lives only in the (internal) session hash.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlparse

import orjson
import websockets
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from avatar_service.driver import AvatarError, Speech, sentences_of
from avatar_service.providers._liveavatar_full import Contexts, LiveAvatarFullSession
from avatar_service.providers.cloud import (
    CloudDriver,
    CloudOptions,
    CloudSession,
    CloudSettings,
    EndReason,
    Fields,
    VendorEnded,
    VendorHandle,
)
from avatar_service.providers.local import _next_or_interrupt
from avatar_service.providers.vendor_api import VendorApi, VendorApiError, VendorSession
from avatar_service.tts import PiperTts
from common.bus import Bus
from common.models import AvatarStartedTalking, AvatarStoppedTalking, SessionConfig, SessionReady
from common.pcm import StreamResampler
from common.retry import Backoff
from common.settings import Settings

log = logging.getLogger(__name__)

NAME = "liveavatar"
F_VENDOR_ID = Fields(NAME).vendor_id

RATE = 24_000
BYTES_PER_S = RATE * 2
OUTBOX_MAX = 512  # queued commands (≈ 8 min of 1 s audio chunks) before `speak` waits for room
RECONNECTS = 3
SOCKET_BACKOFF = Backoff(base_s=0.25, max_s=4.0)
CLEAR_ACK_TIMEOUT_S = 1.5  # below the worker's wait for an interrupted reply
AVATAR_IDENTITY = "heygen"  # the avatar's LiveKit participant (LiveAvatar's web SDK takes tracks from it)
SANDBOX_LIMIT_S = 60  # the sandbox's documented ~1 minute, when the start response gives no limit
LIST_PAGE_SIZE = 100
LIST_MAX_PAGES = 100  # 10 000 sessions: a bound, not a limit anyone should reach
STOP_REASONS: dict[EndReason, str] = {
    EndReason.USER_ENDED: "USER_CLOSED",
    EndReason.BROWSER_LEFT: "USER_DISCONNECTED",
    EndReason.IDLE_TIMEOUT: "IDLE_TIMEOUT",
    EndReason.MAX_DURATION: "MAX_DURATION_REACHED",
    EndReason.TIME_LIMIT: "MAX_DURATION_REACHED",
    EndReason.SANDBOX_EXPIRED: "MAX_DURATION_REACHED",
    EndReason.VENDOR_CLOSED: "UNKNOWN",
    EndReason.LOST: "SERVER_ERROR",
    EndReason.ERROR: "SERVER_ERROR",
    EndReason.REPLACED: "SERVER_ERROR",
    EndReason.ORPHAN: "ZOMBIE_SESSION_REAP",
}


class LiveAvatarSettings(BaseSettings):
    """`LIVEAVATAR_*`: this vendor's settings, beside its adapter (common/settings.py holds only shared ones)."""

    model_config = SettingsConfigDict(env_prefix="LIVEAVATAR_", env_file=".env", extra="ignore")

    api_key: SecretStr | None = None
    server_url: str = "https://api.liveavatar.com"
    avatar_id: str = ""  # uuid; the sandbox works only with dd73ea75-1218-4ef3-92ce-606d5f7fbc0a
    sandbox: bool = False  # `is_sandbox`: free ~1 minute sessions for development
    video_quality: Literal["very_high", "high", "medium", "low"] = "high"
    video_encoding: Literal["VP8", "H264"] = "H264"  # the API's default
    max_session_s: int = Field(default=0, ge=0)  # 0 = the plan's limit
    keepalive_s: float = Field(default=60.0, gt=0)  # `session.keep_alive` after this long idle
    http_timeout_s: float = Field(default=10.0, ge=1)
    connect_timeout_s: float = Field(default=15.0, gt=0)  # until the WS says `connected`
    first_chunk_ms: int = Field(default=400, ge=20, le=2000)
    chunk_ms: int = Field(default=1000, ge=20, le=5000)
    stop_grace_s: float = Field(default=2.0, ge=0)  # wait past the audio for the end of speech
    reaper_interval_s: float = Field(default=120.0, ge=0)  # 0 = no orphan reaper
    reaper_grace_s: float = Field(default=60.0, ge=0)
    expiry_warning_s: float = Field(default=30.0, ge=0)  # `avatar_expiring` this long before the limit
    # LITE: our brain answers, our TTS speaks. FULL: LiveAvatar's LLM answers from a Context.
    mode: Literal["LITE", "FULL"] = "LITE"
    context_id: str = ""  # FULL: empty = one created once from `knowledge_file`, its id cached in Redis
    knowledge_file: str = ""  # FULL: empty = the bundled avatar_service/knowledge.md
    voice_id: str = ""  # FULL: the avatar's voice; empty = the avatar's default


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
    expiry_warning_s: float = 30.0
    reaper_interval_s: float = 120.0
    reaper_grace_s: float = 60.0
    mode: str = "LITE"
    context_id: str = ""
    knowledge_file: str = ""
    voice_id: str = ""

    @classmethod
    def from_settings(cls, v: LiveAvatarSettings) -> LiveAvatarOptions:
        return cls(
            api_key=v.api_key.get_secret_value() if v.api_key else "", server_url=v.server_url,
            avatar_id=v.avatar_id, sandbox=v.sandbox, quality=v.video_quality, encoding=v.video_encoding,
            max_session_s=v.max_session_s, keepalive_s=v.keepalive_s, http_timeout_s=v.http_timeout_s,
            connect_timeout_s=v.connect_timeout_s, first_chunk_ms=v.first_chunk_ms, chunk_ms=v.chunk_ms,
            stop_grace_s=v.stop_grace_s, expiry_warning_s=v.expiry_warning_s,
            reaper_interval_s=v.reaper_interval_s, reaper_grace_s=v.reaper_grace_s, mode=v.mode,
            context_id=v.context_id, knowledge_file=v.knowledge_file, voice_id=v.voice_id,
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


def avatar_error(exc: VendorApiError) -> AvatarError:
    if isinstance(exc, LiveAvatarError) and exc.auth:
        return AvatarError("avatar_auth", "the avatar service rejected its API key (check LIVEAVATAR_API_KEY)")
    if exc.status == 422 or ("avatar" in exc.message.lower() and "not" in exc.message.lower()):
        return AvatarError("avatar_not_found", "LiveAvatar refused this avatar (check LIVEAVATAR_AVATAR_ID)")
    if exc.transient:
        return AvatarError("avatar_unavailable", "the avatar service is unreachable, try again shortly")
    return AvatarError("avatar_failed", "the avatar could not be started")


def _required(data: dict[str, Any], name: str, path: str) -> str:
    """A string field the response must carry: a missing one is an error, never the text "None"."""
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise LiveAvatarError(path, 200, None, f"response without {name}")
    return value


class LiveAvatarClient(VendorApi):
    """The REST API over one pooled client; raises `LiveAvatarError`. Only idempotent calls retry."""

    vendor = "LiveAvatar"
    error = LiveAvatarError
    key_header = "X-API-KEY"

    async def create_token(self, body: dict[str, Any]) -> tuple[str, str]:
        data = await self._call("POST", "/v1/sessions/token", body)
        return _required(data, "session_id", "/v1/sessions/token"), _required(data, "session_token",
                                                                               "/v1/sessions/token")

    async def start(self, session_token: str, *, lite: bool = True) -> VendorHandle:
        path = "/v1/sessions/start"
        data = await self._call("POST", path, {}, bearer=session_token)
        limit = data.get("max_session_duration")
        return VendorHandle(
            vendor_id=_required(data, "session_id", path), livekit_url=_required(data, "livekit_url", path),
            livekit_token=_required(data, "livekit_client_token", path),
            ws_url=_required(data, "ws_url", path) if lite else None,
            expires_at=time.time() + limit if isinstance(limit, int | float) and limit > 0 else None,
            agent_token=data.get("livekit_agent_token") if isinstance(data.get("livekit_agent_token"), str) else None,
        )

    async def create_context(self, name: str, prompt: str, opening_text: str = "") -> str:
        """`POST /v1/contexts` (FULL mode's knowledge, the old knowledge base) → its id."""
        data = await self._call("POST", "/v1/contexts", {"name": name, "prompt": prompt, "opening_text": opening_text})
        return _required(data, "id", "/v1/contexts")

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
        """Every active session of the account (`GET /v1/sessions?type=active`), all pages (`next`)."""
        out: list[VendorSession] = []
        page = 1
        for _ in range(LIST_MAX_PAGES):
            data = await self._call("GET", f"/v1/sessions?type=active&page={page}&page_size={LIST_PAGE_SIZE}",
                                    retries=2)
            for item in data.get("results") or []:
                if isinstance(item, dict) and (vid := item.get("id") or item.get("session_id")):
                    out.append(VendorSession(str(vid), str(item.get("status", "active")), _unix(item.get("created_at")),
                                             source=str(item.get("source") or ""), mode=str(item.get("mode") or "")))
            following = data.get("next")
            if not following:
                return out
            page = _next_page(following, page)
        log.warning("LiveAvatar session list longer than %d pages; reaping the first ones", LIST_MAX_PAGES)
        return out

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                    bearer: str | None = None, retries: int = 0) -> dict[str, Any]:
        payload = await self._request(method, path, body, bearer, retries)
        data = payload.get("data")
        return data if isinstance(data, dict) else {}


def _next_page(following: Any, page: int) -> int:
    """`next` is a URL (or a page number) in the paginated response; read its `page`, else count on."""
    if isinstance(following, int):
        return following
    with contextlib.suppress(ValueError, IndexError, TypeError):
        return int(parse_qs(urlparse(str(following)).query)["page"][0])
    return page + 1


def _unix(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


class LiveAvatarReaping:
    """Reaping for LiveAvatar: the account's active API sessions of our mode (the ledger decides the rest)."""

    name = NAME
    fields = Fields(NAME)
    errors: tuple[type[Exception], ...] = (LiveAvatarError,)

    def __init__(self, options: LiveAvatarOptions) -> None:
        self.options = options
        self.interval_s = options.reaper_interval_s
        self.grace_s = options.reaper_grace_s
        self.client = LiveAvatarClient(options.server_url, options.api_key, timeout_s=options.http_timeout_s)

    async def list_own_sessions(self) -> list[VendorSession]:
        return [s for s in await self.client.list_sessions()
                if s.source in ("", "API") and s.mode in ("", self.options.mode, "CUSTOM")]

    async def stop_session(self, vendor_id: str, reason: EndReason) -> bool:
        return await self.client.stop(vendor_id, STOP_REASONS[reason])

    async def aclose(self) -> None:
        await self.client.aclose()


# ---------------------------------------------------------------- driver


class LiveAvatarDriver(CloudDriver):
    name = NAME

    def __init__(self, settings: Settings, bus: Bus, *, tts: PiperTts | None = None,
                 vendor: LiveAvatarSettings | None = None, cloud: CloudSettings | None = None) -> None:
        super().__init__(settings, bus)
        self.cloud = cloud or CloudSettings()
        self.options = LiveAvatarOptions.from_settings(vendor or LiveAvatarSettings())
        if not self.options.api_key:
            raise SystemExit("AVATAR_PROVIDER=liveavatar needs LIVEAVATAR_API_KEY")
        if not self.options.avatar_id:
            raise SystemExit("AVATAR_PROVIDER=liveavatar needs LIVEAVATAR_AVATAR_ID")
        self.client = LiveAvatarClient(self.options.server_url, self.options.api_key,
                                       timeout_s=self.options.http_timeout_s)
        self.contexts = Contexts(bus.r, self.client, self.options.context_id, self.options.knowledge_file)
        if tts is None and self.options.mode == "LITE":  # loading blocks for ~1 s: construct off the loop
            tts = PiperTts(settings=settings)
            tts.warm_up()
        self.tts = tts

    async def open(self, session_id: str, config: SessionConfig, *, resumed: bool) -> CloudSession:
        if self.options.mode == "FULL":
            return LiveAvatarFullSession(self, session_id, config, self._cloud_options())
        return LiveAvatarSession(self, session_id, config)

    def _cloud_options(self) -> CloudOptions:
        o = self.options
        return CloudOptions(keepalive_s=o.keepalive_s, expiry_warning_s=o.expiry_warning_s, sandbox=o.sandbox,
                            rollover=self.cloud.rollover, rollover_lead_s=self.cloud.rollover_lead_s)

    async def _close_clients(self) -> None:
        await self.client.aclose()


def make_driver(settings: Settings, bus: Bus) -> LiveAvatarDriver:
    return LiveAvatarDriver(settings, bus)


def make_reaping(settings: Settings, vendor: LiveAvatarSettings | None = None) -> LiveAvatarReaping | None:
    options = LiveAvatarOptions.from_settings(vendor or LiveAvatarSettings())
    if not options.api_key or options.reaper_interval_s <= 0:
        return None
    return LiveAvatarReaping(options)


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
        if len(self.items) >= self.maxlen * 2:  # control commands past the bound: the oldest goes
            self.items.popleft()
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
    end_sent: bool = False
    first_sent_at: float | None = None
    started_at: float | None = None  # the avatar started talking (state `talking` or speak_started)
    ended: bool = False  # the avatar finished it (speak_ended, or state left `talking` after speak_end)
    announced: bool = False

    def about(self, event: dict[str, Any]) -> bool:
        task = event.get("task")
        ids = {event.get("event_id"), event.get("source_event_id"), task.get("id") if isinstance(task, dict) else None}
        return self.event_id in ids


class LiveAvatarSession(CloudSession):
    label = "LiveAvatar"
    error_type = LiveAvatarError
    answers_itself = False

    def __init__(self, driver: LiveAvatarDriver, sid: str, config: SessionConfig) -> None:
        super().__init__(driver, sid, config, driver._cloud_options())
        self.options = driver.options
        self.client = driver.client
        self.tts = driver.tts
        self.connected = asyncio.Event()
        self.outbox = _Outbox(OUTBOX_MAX)
        self._reply: _Reply | None = None
        self._was_connected = False
        self._vendor_closing = False
        self._closed_by_us = False
        self._clear_id: str | None = None  # the interrupt whose `audio_buffer_cleared` is awaited
        self._cleared = asyncio.Event()
        self._cleared.set()
        self._listening = False
        self._talking = False

    # ---- lifecycle (the adapter's part of cloud.py)

    async def _reserve(self) -> tuple[str, Any]:
        o = self.options
        body: dict[str, Any] = {
            "mode": o.mode, "avatar_id": self.config.avatar_id or o.avatar_id, "is_sandbox": o.sandbox,
            "video_settings": {"quality": o.quality, "encoding": o.encoding},
        }
        if o.max_session_s:
            body["max_session_duration"] = o.max_session_s
        return await self.client.create_token(body)

    async def _start_reserved(self, vendor_id: str, pending: Any) -> VendorHandle:
        handle = await self.client.start(pending)
        if handle.expires_at is None and self.options.sandbox:
            handle = dataclasses.replace(handle, expires_at=time.time() + SANDBOX_LIMIT_S)
        return handle

    async def _probe(self, handle: VendorHandle) -> None:
        await self.client.keep_alive(handle.vendor_id)

    async def _stop_vendor(self, vendor_id: str, reason: EndReason) -> bool:
        return await self.client.stop(vendor_id, STOP_REASONS[reason])

    def _avatar_error(self, exc: VendorApiError) -> AvatarError:
        return avatar_error(exc)

    def _ready(self, handle: VendorHandle) -> SessionReady:
        ready = super()._ready(handle)
        assert ready.livekit is not None
        ready.livekit.avatar_identity = AVATAR_IDENTITY
        return ready

    async def _switched(self, old: VendorHandle, new: VendorHandle) -> None:
        """Rolled over: the next socket is the fresh session's; its avatar starts idle and clear."""
        self._vendor_closing = self._closed_by_us = self._was_connected = self._talking = False
        self._listening = False
        self._cleared.set()
        self.connected.clear()

    def _cut_reply(self) -> None:
        reply = self._reply
        if reply is not None:
            reply.interrupted = True
            reply.cut.set()
            reply.changed.set()

    # ---- speech

    async def _speak(self, reply_id: str, text: Speech, *, user_text: str | None = None) -> str:
        """Stream the reply's audio over the socket; return once spoken, or soon after `interrupt()`.

        Returns the sentences whose audio had started playing (by the avatar's clock) when an
        interrupt came; all of them otherwise.
        """
        if self.vendor is None or self._stopped or self._released or self._ending:
            return ""
        tts = self.tts
        reply = self._reply = _Reply(reply_id, uuid.uuid4().hex)
        loop = asyncio.get_running_loop()
        starts: list[tuple[float, str]] = []  # (audio offset in s, sentence)
        sent_bytes = 0
        target = max(2, BYTES_PER_S * self.options.first_chunk_ms // 1000 // 2 * 2)
        buf = bytearray()
        resampler = StreamResampler(tts.sample_rate, RATE)

        async def send(chunk: bytes) -> None:
            nonlocal sent_bytes, target
            if not reply.sent_any:
                await self._await_cleared()  # new audio after an interrupt only once the buffer is clear
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
                    buf += resampler.flush()
                    break
                starts.append(((sent_bytes + len(buf)) / BYTES_PER_S, sentence))
                chunks = tts.stream(sentence)
                try:
                    while not reply.interrupted:
                        pcm = await _next_or_interrupt(chunks, reply.cut)
                        if pcm is None:
                            break
                        buf += resampler.push(pcm)
                        while len(buf) >= target and not reply.interrupted:
                            chunk, buf = bytes(buf[:target]), buf[target:]
                            await send(chunk)
                finally:
                    await chunks.aclose()
                if len(buf) >= 2 and not reply.interrupted:  # never hold audio back waiting for the next sentence
                    cut = len(buf) // 2 * 2
                    chunk, buf = bytes(buf[:cut]), buf[cut:]
                    await send(chunk)
            if len(buf) >= 2 and not reply.interrupted:
                await send(bytes(buf[: len(buf) // 2 * 2]))
        finally:
            await sentences.aclose()
        if reply.sent_any and not reply.interrupted:
            await self.outbox.put({"type": "agent.speak_end", "event_id": reply.event_id})
            reply.end_sent = True
            await self._wait_spoken(reply, sent_bytes / BYTES_PER_S)
        elif reply.sent_any:
            await self._await_cleared()
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
        # Chunks still queued here are simply not sent; the avatar clears what it has buffered.
        self.outbox.drop(lambda c: c.get("event_id") == reply.event_id)
        if reply.sent_any:
            self._clear_id = uuid.uuid4().hex
            self._cleared.clear()
            self.outbox.put_now({"type": "agent.interrupt", "event_id": self._clear_id})

    async def on_user_speaking(self, speaking: bool) -> None:
        """The listening pose while the user talks (`agent.start_listening` / `agent.stop_listening`)."""
        if speaking == self._listening or self.vendor is None or self._stopped or self._released:
            return
        self._listening = speaking
        kind = "agent.start_listening" if speaking else "agent.stop_listening"
        self.outbox.put_now({"type": kind, "event_id": uuid.uuid4().hex})

    async def _await_cleared(self) -> None:
        if not self._cleared.is_set():
            try:
                await asyncio.wait_for(self._cleared.wait(), CLEAR_ACK_TIMEOUT_S)
            except TimeoutError:
                log.info("no agent.audio_buffer_cleared for the interrupt; going on", extra={"sid": self.sid})
                self._cleared.set()

    async def _wait_spoken(self, reply: _Reply, audio_s: float) -> None:
        loop = asyncio.get_running_loop()
        while not (reply.ended or reply.interrupted):
            began = reply.started_at or reply.first_sent_at or loop.time()
            deadline = began + audio_s + self.options.stop_grace_s + (0 if reply.started_at else
                                                                      self.options.connect_timeout_s)
            if loop.time() >= deadline:
                log.info("no end of speech for %s; taking it as spoken", reply.event_id, extra={"sid": self.sid})
                return
            reply.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reply.changed.wait(), deadline - loop.time())

    # ---- the socket

    async def _run(self, handle: VendorHandle) -> None:
        """Hold the socket; reconnect if it drops; the vendor closing it ends the session."""
        if not handle.ws_url:
            raise VendorEnded("no ws_url for this session")
        failures = 0
        while not (self._stopped or self._released):
            self._was_connected = False
            close: int | None = None
            try:
                async with websockets.connect(handle.ws_url, ping_interval=None, max_size=2**22,
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
            if self._vendor_closing or (close == 1000 and not self._closed_by_us):
                raise VendorEnded(f"the vendor closed the socket ({close})")
            self._closed_by_us = False
            failures = 1 if self._was_connected else failures + 1
            if failures > RECONNECTS:
                await self._gone_or_lost(handle, close)
                return
            wait = SOCKET_BACKOFF.delay(failures - 1)
            log.warning("LiveAvatar socket closed (%s); reconnecting in %.2f s", close, wait, extra={"sid": self.sid})
            await asyncio.sleep(wait)

    async def _gone_or_lost(self, handle: VendorHandle, close: int | None) -> None:
        """The socket cannot be had back: ask the REST API whether the vendor ended the session."""
        try:
            await self.client.keep_alive(handle.vendor_id)
        except LiveAvatarError as exc:
            if exc.gone:
                raise VendorEnded(f"socket refused and the session is gone ({close})") from None
        await self.lost(f"socket closed ({close})")

    async def _reader(self, ws: Any) -> None:
        async for message in ws:
            try:
                event = orjson.loads(message)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                await self._on_event(event)

    async def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        reply = self._reply
        if kind == "session.state_updated":
            state = event.get("state")
            if state == "connected":
                self._was_connected = True
                self.connected.set()
            elif state in ("closing", "closed"):
                self._vendor_closing = True
                self.connected.clear()
        elif kind == "session.stopped":
            self._vendor_closing = True
        elif kind == "agent.state_updated":
            await self._on_state(str(event.get("new_state") or event.get("state") or ""))
        elif kind == "agent.speak_started" and reply is not None and reply.about(event):
            await self._started(reply)
        elif kind in ("agent.speak_ended", "agent.speak_interrupted") and reply is not None and reply.about(event):
            reply.ended = True
            reply.changed.set()
        elif kind == "agent.audio_buffer_cleared":
            source = event.get("source_event_id")
            if source is None or source == self._clear_id:
                self._cleared.set()
        elif kind in ("error", "warning"):
            detail = event.get(kind) if isinstance(event.get(kind), dict) else {}
            log.log(logging.WARNING if kind == "error" else logging.INFO, "LiveAvatar %s: %s %s", kind,
                    str(detail.get("type", ""))[:64], str(detail.get("message", ""))[:200], extra={"sid": self.sid})

    async def _on_state(self, state: str) -> None:
        """`agent.state_updated`: the avatar's own word on whether it is talking."""
        reply = self._reply
        was_talking, self._talking = self._talking, state == "talking"
        if self._talking and reply is not None and reply.sent_any and not reply.interrupted:
            await self._started(reply)
        elif was_talking and not self._talking and reply is not None and reply.end_sent:
            reply.ended = True  # left `talking` after the whole reply was sent: it was spoken
            reply.changed.set()

    async def _started(self, reply: _Reply) -> None:
        reply.started_at = reply.started_at or asyncio.get_running_loop().time()
        reply.changed.set()
        if not reply.announced:
            reply.announced = True
            await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply.reply_id))

    async def _writer(self, ws: Any) -> None:
        """Send queued commands once `connected`; `session.keep_alive` when idle. A command whose
        send fails stays at the head of the queue for the next socket."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.connected.wait(), self.options.connect_timeout_s)
        if not self.connected.is_set():
            log.warning("LiveAvatar socket never reported connected; reconnecting", extra={"sid": self.sid})
            self._closed_by_us = True
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
