"""HeyGen Interactive Avatar (legacy streaming API, `version: "v2"` over LiveKit): a cloud adapter.

Deprecated by HeyGen in favour of LiveAvatar: only used with `AVATAR_PROVIDER=heygen`. The
lifecycle (record before start, resume, keep-alive, stop with the real reason, the duration limit
`session_duration_limit`, reaping) is `cloud.py`'s; this module holds HeyGen's wire details.

Per session (reference §2): `streaming.create_token` → `streaming.new` → `streaming.start`, then
`streaming.task` / `streaming.interrupt` / `streaming.keep_alive` while it is live and
`streaming.stop` at the end. The browser joins the LiveKit room with the `url` and user
`access_token` of `streaming.new` (sent in `session.ready`); the API key and the HeyGen session
token never leave this process. The session token authenticates the calls that create the session
(`new`, `start`); everything any worker may do to any session later (task, interrupt, keep-alive,
stop, list) uses the API key, so a worker that takes a session over needs nothing secret from Redis.

Why it is shaped like this:
- A vendor session outlives the worker that created it: its id is recorded right after
  `streaming.new`, before `streaming.start` (`_reserve` / `_start_reserved`), so a new owner
  resumes it and the reaper knows it is ours.
- A keep-alive or task that finds the session gone at its duration limit is an expected end;
  anywhere else it is `avatar_lost`. `streaming.stop` takes no reason: ours is logged.
- Whether the avatar is talking comes from the data-channel events the page relays
  (`avatar_start_talking` / `avatar_stop_talking`, matched by `task_id`); the task response's
  `duration_ms` is the fallback for a page that relays nothing.

`task_type` (`HEYGEN_TASK_TYPE`): `talk` (default) sends what the *user* said and HeyGen answers
from the knowledge base; `repeat` speaks the given text verbatim, split at sentence boundaries
under the per-task length limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from avatar_service.driver import AvatarError, Speech
from avatar_service.providers.cloud import (
    CloudDriver,
    CloudOptions,
    CloudSession,
    CloudSettings,
    EndReason,
    Fields,
    VendorHandle,
    background,
)
from avatar_service.providers.vendor_api import VendorApi, VendorApiError, VendorSession
from avatar_service.responder import split_sentences
from common.bus import Bus
from common.models import AvatarStartedTalking, AvatarStoppedTalking, ErrorEvent, SessionConfig
from common.settings import Settings

log = logging.getLogger(__name__)

NAME = "heygen"
# Fields the lifecycle keeps in the session hash `session:{sid}` (see cloud.py).
F_VENDOR_ID = Fields(NAME).vendor_id
F_STARTED = Fields(NAME).started  # "1" once streaming.start succeeded
DEPRECATED = (
    "AVATAR_PROVIDER=heygen uses HeyGen's legacy Interactive Avatar streaming API, which HeyGen is "
    "deprecating in favour of LiveAvatar; move to AVATAR_PROVIDER=liveavatar (LIVEAVATAR_API_KEY)"
)

KB_KEY_PREFIX = "heygen:kb:"  # + digest of the prompt -> knowledge base id
KB_LOCK_S = 15
DEFAULT_KB_PROMPT_FILE = Path(__file__).resolve().parent.parent / "knowledge.md"

CODE_INVALID_CREDENTIALS = 40009
CODE_WRONG_STATE = 400006
CODE_SESSION_NOT_FOUND = 10005
CODE_AVATAR_NOT_FOUND = 10013
START_FALLBACK_S = 1.5  # for a page that relays nothing: announce `started_talking` this long after a task
UNKNOWN_DURATION_S = 30.0  # fallback when a task response has no usable `duration_ms`
INTERRUPT_TIMEOUT_S = 2.0  # below the worker's wait for an interrupted reply
RECENT_TASK_EVENTS = 64

class HeyGenSettings(BaseSettings):
    """`HEYGEN_*`: this vendor's settings, beside its adapter (common/settings.py holds only shared ones)."""

    model_config = SettingsConfigDict(env_prefix="HEYGEN_", env_file=".env", extra="ignore")

    api_key: SecretStr | None = None
    server_url: str = "https://api.heygen.com"
    avatar_id: str = ""
    voice_id: str = ""
    knowledge_base_id: str = ""
    task_type: Literal["talk", "repeat"] = "talk"  # talk: HeyGen answers from its knowledge base
    quality: Literal["low", "medium", "high"] = "medium"
    voice_rate: float = Field(default=1.0, gt=0.4, le=2.0)
    voice_emotion: str = ""  # Excited | Serious | Friendly | Soothing | Broadcaster
    task_max_chars: int = Field(default=900, ge=50, le=1000)
    idle_timeout_s: int = Field(default=300, ge=30, le=3600)
    keepalive_s: float = Field(default=60.0, gt=0)
    stop_grace_s: float = Field(default=2.0, ge=0)
    http_timeout_s: float = Field(default=10.0, ge=1)
    kb_prompt_file: str = ""  # empty = the bundled knowledge file
    reaper_interval_s: float = Field(default=120.0, ge=0)  # 0 = no orphan reaper
    reaper_grace_s: float = Field(default=60.0, ge=0)
    video_encoding: Literal["VP8", "H264"] = "H264"  # as HeyGen's own SDK sends
    expiry_warning_s: float = Field(default=30.0, ge=0)  # `avatar_expiring` before `session_duration_limit`


@dataclass(frozen=True)
class HeyGenOptions:
    """Everything the driver reads from the settings, checked once."""

    api_key: str
    server_url: str = "https://api.heygen.com"
    avatar_id: str = ""
    voice_id: str = ""
    knowledge_base_id: str = ""
    quality: str = "medium"
    voice_rate: float = 1.0
    voice_emotion: str = ""
    task_type: str = "talk"
    task_max_chars: int = 900
    idle_timeout_s: int = 300
    keepalive_s: float = 60.0
    stop_grace_s: float = 2.0
    http_timeout_s: float = 10.0
    kb_prompt_file: str = ""
    reaper_interval_s: float = 120.0
    reaper_grace_s: float = 60.0
    video_encoding: str = "H264"
    expiry_warning_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: HeyGenSettings) -> HeyGenOptions:
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        task_type = settings.task_type.lower()
        if task_type not in ("talk", "repeat"):
            raise ValueError(f"HEYGEN_TASK_TYPE must be talk or repeat, not {task_type!r}")
        quality = settings.quality.lower()
        if quality not in ("low", "medium", "high"):
            raise ValueError(f"HEYGEN_QUALITY must be low, medium or high, not {quality!r}")
        idle = min(3600, max(30, settings.idle_timeout_s))  # the vendor's range
        keepalive = settings.keepalive_s
        if not 0 < keepalive <= idle / 2:
            log.warning("HEYGEN_KEEPALIVE_S=%s is not well inside the %d s idle timeout; using %d s",
                        keepalive, idle, idle // 3)
            keepalive = idle / 3
        return cls(
            api_key=key,
            server_url=settings.server_url,
            avatar_id=settings.avatar_id,
            voice_id=settings.voice_id,
            knowledge_base_id=settings.knowledge_base_id,
            quality=quality,
            voice_rate=settings.voice_rate,
            voice_emotion=settings.voice_emotion,
            task_type=task_type,
            task_max_chars=max(50, settings.task_max_chars),
            idle_timeout_s=idle,
            keepalive_s=keepalive,
            stop_grace_s=max(0.0, settings.stop_grace_s),
            http_timeout_s=max(1.0, settings.http_timeout_s),
            kb_prompt_file=settings.kb_prompt_file,
            reaper_interval_s=settings.reaper_interval_s,
            reaper_grace_s=max(0.0, settings.reaper_grace_s),
            video_encoding=settings.video_encoding,
            expiry_warning_s=settings.expiry_warning_s,
        )


# ---------------------------------------------------------------- errors


class HeyGenError(VendorApiError):
    """A failed HeyGen call."""

    @property
    def capacity(self) -> bool:
        """The concurrency limit; its body is unconfirmed (reference §2.3), so match the text."""
        return "concurren" in self.message.lower()

    @property
    def auth(self) -> bool:
        return self.status in (401, 403) or self.code == CODE_INVALID_CREDENTIALS

    @property
    def gone(self) -> bool:
        """The vendor session no longer exists or is closed (stopped, idle timeout, duration limit)."""
        text = self.message.lower()
        return self.code in (CODE_WRONG_STATE, CODE_SESSION_NOT_FOUND) or (
            "session" in text and ("not found" in text or "closed" in text or "correct state" in text)
        )

    @property
    def transient(self) -> bool:
        return not self.capacity and super().transient


def avatar_error(exc: HeyGenError) -> AvatarError:
    """What the user is told when starting the avatar failed (never the vendor's raw text)."""
    if exc.capacity:
        return AvatarError("avatar_capacity", "all avatars are busy, try again shortly")
    if exc.auth:
        return AvatarError("avatar_auth", "the avatar service rejected its API key (check HEYGEN_API_KEY)")
    if exc.code == CODE_AVATAR_NOT_FOUND:
        return AvatarError("avatar_not_found", "HeyGen does not know this avatar id (check HEYGEN_AVATAR_ID)")
    if exc.transient:
        return AvatarError("avatar_unavailable", "the avatar service is unreachable, try again shortly")
    return AvatarError("avatar_failed", "the avatar could not be started")


# ---------------------------------------------------------------- HTTP client


@dataclass(frozen=True)
class NewSession:
    session_id: str
    url: str
    access_token: str
    duration_limit_s: float | None = None  # `session_duration_limit`: HeyGen closes the session then


@dataclass(frozen=True)
class TaskResult:
    task_id: str
    duration_s: float  # the vendor's estimate; 0 when it gave none


class HeyGenClient(VendorApi):
    """The streaming API over one pooled `httpx.AsyncClient`; raises `HeyGenError`.

    Only calls that are safe to repeat (keep-alive, interrupt, stop, list) are retried, and only
    on transient failures: a repeated `new` could open a second paid session, a repeated `task`
    would say the text twice.
    """

    vendor = "HeyGen"
    error = HeyGenError

    async def create_token(self) -> str:
        data = await self._call("POST", "/v1/streaming.create_token", {})
        token = data.get("token")
        if not isinstance(token, str) or not token:
            raise HeyGenError("/v1/streaming.create_token", 200, None, "no token in the response")
        return token

    async def new_session(self, token: str, body: dict[str, Any]) -> NewSession:
        data = await self._call("POST", "/v1/streaming.new", body, bearer=token)
        values = [data.get(k) for k in ("session_id", "url", "access_token")]
        if not all(isinstance(v, str) and v for v in values):
            raise HeyGenError("/v1/streaming.new", 200, None, "response without session_id, url or access_token")
        limit = data.get("session_duration_limit")
        return NewSession(*values, float(limit) if isinstance(limit, int | float) and limit > 0 else None)

    async def start(self, session_id: str, token: str | None = None) -> None:
        await self._call("POST", "/v1/streaming.start", {"session_id": session_id}, bearer=token)

    async def task(self, session_id: str, text: str, task_type: str) -> TaskResult:
        body = {"session_id": session_id, "text": text, "task_type": task_type, "task_mode": "async"}
        data = await self._call("POST", "/v1/streaming.task", body)
        duration = data.get("duration_ms")
        seconds = float(duration) / 1000 if isinstance(duration, int | float) and duration > 0 else 0.0
        return TaskResult(str(data.get("task_id") or ""), seconds)

    async def interrupt(self, session_id: str) -> None:
        await self._call("POST", "/v1/streaming.interrupt", {"session_id": session_id},
                         retries=1, timeout_s=INTERRUPT_TIMEOUT_S)

    async def listening(self, session_id: str, on: bool) -> None:
        path = "/v1/streaming.start_listening" if on else "/v1/streaming.stop_listening"
        await self._call("POST", path, {"session_id": session_id}, timeout_s=INTERRUPT_TIMEOUT_S)

    async def keep_alive(self, session_id: str, *, retries: int = 2) -> None:
        await self._call("POST", "/v1/streaming.keep_alive", {"session_id": session_id}, retries=retries)

    async def stop(self, session_id: str) -> bool:
        """Stop a session; False if the vendor says it was already gone (idempotent for callers)."""
        try:
            await self._call("POST", "/v1/streaming.stop", {"session_id": session_id}, retries=2)
        except HeyGenError as exc:
            if exc.gone:
                return False
            raise
        return True

    async def list_sessions(self) -> list[VendorSession]:
        data = await self._call("GET", "/v1/streaming.list", retries=2)
        out = []
        for item in data.get("sessions") or []:
            if isinstance(item, dict) and item.get("session_id"):
                created = item.get("created_at")
                out.append(VendorSession(
                    str(item["session_id"]), str(item.get("status", "")),
                    float(created) if isinstance(created, int | float) else None,
                ))
        return out

    async def knowledge_bases(self) -> list[dict[str, Any]]:
        """Shapes vary (reference §2.3): `data.list[]` or `data` as the list itself."""
        payload = await self._request("GET", "/v1/streaming/knowledge_base/list", None, None, 2, None)
        data = payload.get("data")
        items = data.get("list") if isinstance(data, dict) else data
        return [item for item in items or [] if isinstance(item, dict)]

    async def create_knowledge_base(self, name: str, prompt: str, opening: str = "") -> str:
        body = {"name": name, "opening": opening, "prompt": prompt}
        data = await self._call("POST", "/v1/streaming/knowledge_base/create", body)
        kb_id = data.get("id") or data.get("knowledge_base_id")
        if not kb_id:
            raise HeyGenError("/v1/streaming/knowledge_base/create", 200, None, "no id in the response")
        return str(kb_id)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                    bearer: str | None = None, retries: int = 0, timeout_s: float | None = None) -> dict[str, Any]:
        payload = await self._request(method, path, body, bearer, retries, timeout_s)
        data = payload.get("data")
        return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- knowledge base


@dataclass(frozen=True)
class Knowledge:
    """What `talk` answers from: a knowledge base id, else the prompt passed inline."""

    id: str | None = None
    prompt: str | None = None


class KnowledgeBase:
    """`HEYGEN_KNOWLEDGE_BASE_ID`, else one created once per prompt from a file, its id cached in Redis.

    The Redis key carries a digest of the prompt, so editing the file makes a new knowledge base; a
    short lock keeps two workers from creating it twice. If creating it fails, sessions still get
    the prompt inline (`knowledge_base`), so `talk` keeps working.
    """

    def __init__(self, r: aioredis.Redis, client: HeyGenClient, options: HeyGenOptions) -> None:
        self.r = r
        self.client = client
        self.options = options
        self._prompt: str | None = None

    async def resolve(self) -> Knowledge:
        if self.options.knowledge_base_id:
            return Knowledge(id=self.options.knowledge_base_id)
        prompt = await self._read_prompt()
        key, name = self._key(prompt)
        cached = await self.r.get(key)
        if cached:
            return Knowledge(id=cached.decode())
        if await self.r.set(f"{key}:lock", "1", nx=True, ex=KB_LOCK_S):
            try:
                kb_id = await self._find_or_create(name, prompt)
            except HeyGenError as exc:
                if exc.auth:
                    raise
                log.warning("could not create a HeyGen knowledge base (%s); passing the prompt inline", exc)
                return Knowledge(prompt=prompt)
            finally:
                await self.r.delete(f"{key}:lock")
            await self.r.set(key, kb_id)
            log.info("created HeyGen knowledge base %s from %s", kb_id, self._prompt_path())
            return Knowledge(id=kb_id)
        for _ in range(KB_LOCK_S * 5):  # another worker is creating it
            await asyncio.sleep(0.2)
            cached = await self.r.get(key)
            if cached:
                return Knowledge(id=cached.decode())
        return Knowledge(prompt=prompt)

    async def forget(self) -> None:
        """The vendor no longer knows the cached id: the next session creates it again."""
        if self._prompt is not None and not self.options.knowledge_base_id:
            await self.r.delete(self._key(self._prompt)[0])

    def _key(self, prompt: str) -> tuple[str, str]:
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        return KB_KEY_PREFIX + digest, f"avatar-stack {digest}"

    def _prompt_path(self) -> Path:
        return Path(self.options.kb_prompt_file) if self.options.kb_prompt_file else DEFAULT_KB_PROMPT_FILE

    async def _read_prompt(self) -> str:
        if self._prompt is None:
            self._prompt = (await asyncio.to_thread(self._prompt_path().read_text, encoding="utf-8")).strip()
        return self._prompt

    async def _find_or_create(self, name: str, prompt: str) -> str:
        """Reuse one made by an earlier run whose Redis was flushed, rather than pile up copies."""
        try:
            for item in await self.client.knowledge_bases():
                if item.get("name") == name and item.get("id"):
                    return str(item["id"])
        except HeyGenError as exc:
            if exc.auth:
                raise
        return await self.client.create_knowledge_base(name, prompt)


def pack_sentences(text: str, max_chars: int) -> list[str]:
    """Whole sentences, packed into as few pieces of at most `max_chars` as possible."""
    pieces: list[str] = []
    for sentence in split_sentences(text, max_chars):
        if pieces and len(pieces[-1]) + 1 + len(sentence) <= max_chars:
            pieces[-1] += " " + sentence
        else:
            pieces.append(sentence)
    return pieces


# ---------------------------------------------------------------- driver


class HeyGenAvatarDriver(CloudDriver):
    name = NAME

    def __init__(self, settings: Settings, bus: Bus, *, options: HeyGenOptions | None = None,
                 client: HeyGenClient | None = None, vendor: HeyGenSettings | None = None,
                 cloud: CloudSettings | None = None) -> None:
        super().__init__(settings, bus)
        self.cloud = cloud or CloudSettings()
        try:
            self.options = options or HeyGenOptions.from_settings(vendor or HeyGenSettings())
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        if not self.options.api_key:
            raise SystemExit("AVATAR_PROVIDER=heygen needs HEYGEN_API_KEY")
        self.client = client or HeyGenClient(
            self.options.server_url, self.options.api_key, timeout_s=self.options.http_timeout_s
        )
        self.knowledge = KnowledgeBase(bus.r, self.client, self.options)

    async def open(self, session_id: str, config: SessionConfig, *, resumed: bool) -> HeyGenAvatarSession:
        return HeyGenAvatarSession(self, session_id, config, resumed=resumed)

    async def _close_clients(self) -> None:
        await self.client.aclose()


def make_driver(settings: Settings, bus: Bus) -> HeyGenAvatarDriver:
    log.warning(DEPRECATED)
    return HeyGenAvatarDriver(settings, bus)


class HeyGenReaping:
    """Reaping for HeyGen: `streaming.list` holds only this API key's sessions (the ledger decides)."""

    name = NAME
    fields = Fields(NAME)
    errors: tuple[type[Exception], ...] = (HeyGenError,)

    def __init__(self, options: HeyGenOptions) -> None:
        self.interval_s = options.reaper_interval_s
        self.grace_s = options.reaper_grace_s
        self.client = HeyGenClient(options.server_url, options.api_key, timeout_s=options.http_timeout_s)

    async def list_own_sessions(self) -> list[VendorSession]:
        return await self.client.list_sessions()

    async def stop_session(self, vendor_id: str, reason: EndReason) -> bool:
        return await self.client.stop(vendor_id)

    async def aclose(self) -> None:
        await self.client.aclose()


def make_reaping(settings: Settings, vendor: HeyGenSettings | None = None) -> HeyGenReaping | None:
    options = HeyGenOptions.from_settings(vendor or HeyGenSettings())
    if not options.api_key or options.reaper_interval_s <= 0:
        return None
    return HeyGenReaping(options)


@dataclass
class _Reply:
    """One `speak`: its current vendor task, and what the relayed events said about it."""

    reply_id: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task_id: str | None = None  # "" when the vendor gave none: then only untagged events match
    accepted: bool = False  # the vendor took at least one task of this reply
    done: bool = False  # the current task has been spoken (or cut short)
    interrupted: bool = False
    announced: bool = False  # avatar.started_talking published
    started_at: float | None = None
    duration_s: float = 0.0
    announce_at: float = 0.0
    deadline: float = 0.0  # fallback: assume the current task was spoken by then

    def owns(self, task_id: str | None) -> bool:
        """An event without a task id is taken to be about the task in flight."""
        return self.task_id is not None and (task_id is None or task_id == self.task_id)


class HeyGenAvatarSession(CloudSession):
    label = "HeyGen"
    error_type = HeyGenError

    def __init__(self, driver: HeyGenAvatarDriver, sid: str, config: SessionConfig, *, resumed: bool) -> None:
        o = driver.options
        cloud = driver.cloud
        super().__init__(driver, sid, config, CloudOptions(
            keepalive_s=o.keepalive_s, expiry_warning_s=o.expiry_warning_s, rollover=cloud.rollover,
            rollover_lead_s=cloud.rollover_lead_s))
        self.resumed = resumed
        self.options = o
        self.client = driver.client
        self.knowledge = driver.knowledge
        self._reply: _Reply | None = None
        self._talking = False  # from relayed events
        self._page_relays = False  # the page has relayed at least one talking event
        self._started_tasks: deque[str] = deque(maxlen=RECENT_TASK_EVENTS)
        self._stopped_tasks: deque[str] = deque(maxlen=RECENT_TASK_EVENTS)
        self._calls: set[asyncio.Task[None]] = set()
        self._listening = False

    @property
    def answers_itself(self) -> bool:  # type: ignore[override]
        """True in `talk` mode: HeyGen writes the answer, so the worker has no reply text to show."""
        return self.options.task_type == "talk"

    # ---- lifecycle (the adapter's part of cloud.py)

    async def _reserve(self) -> tuple[str, Any]:
        knowledge = await self.knowledge.resolve() if self.options.task_type == "talk" else Knowledge()
        token = await self.client.create_token()
        try:
            created = await self.client.new_session(token, self._new_body(knowledge))
        except HeyGenError as exc:
            if knowledge.id and "knowledge" in exc.message.lower():
                await self.knowledge.forget()
            raise
        return created.session_id, (token, created)

    async def _start_reserved(self, vendor_id: str, pending: Any) -> VendorHandle:
        token, created = pending
        await self.client.start(vendor_id, token)
        limit = created.duration_limit_s
        return VendorHandle(vendor_id, created.url, created.access_token,
                            expires_at=time.time() + limit if limit else None)

    async def _probe(self, handle: VendorHandle) -> None:
        await self.client.keep_alive(handle.vendor_id)

    async def _stop_vendor(self, vendor_id: str, reason: EndReason) -> bool:
        return await self.client.stop(vendor_id)

    def _avatar_error(self, exc: VendorApiError) -> AvatarError:
        return avatar_error(exc)  # type: ignore[arg-type]

    def _cut_reply(self) -> None:
        if self._reply is not None:
            self._reply.interrupted = True
            self._reply.changed.set()

    async def _run(self, handle: VendorHandle) -> None:
        """Keep-alives while served; a keep-alive that finds the session gone means HeyGen ended it."""
        while True:
            await asyncio.sleep(self.options.keepalive_s)
            try:
                await self.client.keep_alive(handle.vendor_id, retries=1)
            except HeyGenError as exc:
                if exc.auth:
                    await asyncio.shield(self.lost("keep-alive", avatar_error(exc)))
                    return
                if exc.gone:
                    await asyncio.shield(self._gone(handle, "keep-alive"))
                    return
                log.warning("HeyGen keep-alive failed (%s); trying again next time", exc, extra={"sid": self.sid})

    async def _gone(self, handle: VendorHandle, during: str) -> None:
        """HeyGen no longer knows the session: its duration limit (an expected end), else lost."""
        if self.vendor is not None and handle.vendor_id != self.vendor.vendor_id:
            return  # the session we rolled over from: stopped on purpose
        if self._vendor_end_reason() is EndReason.TIME_LIMIT:
            await self.ended_by_vendor(f"gone at its duration limit (seen on {during})")
        else:
            await self.lost(f"gone (seen on {during})")

    async def on_user_speaking(self, speaking: bool) -> None:
        """HeyGen's listening animation while the user talks (`streaming.start_listening` / `stop_listening`)."""
        vendor = self.vendor
        if vendor is None or speaking == self._listening or self._stopped or self._released:
            return
        self._listening = speaking

        async def call() -> None:
            try:
                await self.client.listening(vendor.vendor_id, speaking)
            except HeyGenError as exc:
                log.info("HeyGen %s_listening failed: %s", "start" if speaking else "stop", exc,
                         extra={"sid": self.sid})

        background(call, self._calls)

    # ---- speech

    async def _speak(self, reply_id: str, text: Speech, *, user_text: str | None = None) -> str | None:
        """Say a reply; returns once the avatar stopped talking, or promptly after `interrupt()`.

        `talk`: sends `user_text` (what the user said; `text` when not given) as one task and
        HeyGen answers it. `repeat`: speaks `text`, one task per piece under the length limit,
        each sent once the previous one has been spoken; `text` may be a stream of sentences (from
        the brain), then each arrives as a task as soon as the previous one was spoken.
        Returns the text of the tasks HeyGen accepted (`repeat`), None in `talk` mode.
        """
        vendor = self.vendor
        if vendor is None or self._stopped or self._released or self._ending:
            log.warning("speak on a HeyGen session that is not live", extra={"sid": self.sid})
            return None if self.answers_itself else ""
        reply = self._reply = _Reply(reply_id)
        said: list[str] = []
        pieces = self._piece_stream(text, user_text)
        try:
            async for piece in pieces:
                if reply.interrupted:
                    break
                try:
                    result = await self.client.task(vendor.vendor_id, piece, self.options.task_type)
                except HeyGenError as exc:
                    await self._task_failed(vendor, exc)
                    break
                self._accept(reply, result)
                said.append(piece)
                if reply.interrupted:  # the barge-in came while the task was on its way
                    await self._interrupt_vendor(vendor)
                    break
                await self._wait_spoken(reply)
        finally:
            await pieces.aclose()
            if self._reply is reply:
                self._reply = None
        if reply.accepted:
            if not reply.announced:
                await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply_id))
            stopped = AvatarStoppedTalking(reply_id=reply_id, interrupted=reply.interrupted)
            await self.bus.publish_event(self.sid, stopped)
        return None if self.answers_itself else " ".join(said)

    async def interrupt(self) -> None:
        """Barge-in: `streaming.interrupt` if the avatar is (about to be) talking; `speak` returns."""
        reply = self._reply
        if reply is None or reply.interrupted:
            return
        reply.interrupted = True
        reply.changed.set()
        if self.vendor is not None and reply.task_id is not None and (not reply.done or self._talking):
            await self._interrupt_vendor(self.vendor)

    async def on_vendor_event(self, event: str, data: dict) -> None:
        task_id = str(data["task_id"]) if data.get("task_id") is not None else None
        reply = self._reply
        now = asyncio.get_running_loop().time()
        if event in ("avatar_start_talking", "avatar_stop_talking"):
            self._page_relays = True
        if event == "avatar_start_talking":
            self._talking = True
            if task_id:
                self._started_tasks.append(task_id)
            if reply is not None and reply.owns(task_id) and reply.started_at is None:
                self._mark_started(reply, now)
        elif event == "avatar_stop_talking":
            self._talking = False
            if task_id:
                self._stopped_tasks.append(task_id)
            if reply is not None and reply.owns(task_id):
                reply.done = True
                reply.changed.set()

    # ---- internals

    async def _piece_stream(self, text: Speech, user_text: str | None) -> AsyncIterator[str]:
        if isinstance(text, str) or self.options.task_type != "repeat":
            if not isinstance(text, str) and user_text is None:
                text = " ".join([s async for s in text])
            for piece in self._pieces(text if isinstance(text, str) else "", user_text):
                yield piece
            return
        # A stream of sentences: each task packs every sentence that has arrived by the time the
        # previous task was spoken (a whole reply that is ready at once is still one task).
        limit = self.options.task_max_chars
        ready: deque[str] = deque()
        arrived = asyncio.Event()
        finished = False

        async def collect() -> None:
            nonlocal finished
            try:
                async for sentence in text:
                    ready.extend(pack_sentences(sentence, limit))
                    arrived.set()
            finally:
                finished = True
                arrived.set()

        collector = asyncio.create_task(collect())
        try:
            while True:
                arrived.clear()
                if not ready:
                    if finished:
                        break
                    await arrived.wait()
                    continue
                piece = ready.popleft()
                while ready and len(piece) + 1 + len(ready[0]) <= limit:
                    piece += " " + ready.popleft()
                yield piece
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    def _pieces(self, text: str, user_text: str | None) -> list[str]:
        limit = self.options.task_max_chars
        if self.options.task_type == "repeat":
            return pack_sentences(text, limit)
        pieces = pack_sentences(user_text if user_text is not None else text, limit)
        if len(pieces) > 1:
            log.warning("user text over %d characters: sending its first part", limit, extra={"sid": self.sid})
        return pieces[:1]

    def _accept(self, reply: _Reply, result: TaskResult) -> None:
        now = asyncio.get_running_loop().time()
        reply.task_id = result.task_id
        reply.accepted = True
        reply.done = False
        reply.started_at = None
        reply.duration_s = result.duration_s or UNKNOWN_DURATION_S
        reply.deadline = now + reply.duration_s + self.options.stop_grace_s
        # A relaying page tells when the avatar really starts (after HeyGen's LLM, in `talk`).
        reply.announce_at = reply.deadline if self._page_relays else now + START_FALLBACK_S
        if result.task_id and result.task_id in self._started_tasks:  # the relay outran the task response
            self._mark_started(reply, now)
        if result.task_id and result.task_id in self._stopped_tasks:
            reply.done = True

    def _mark_started(self, reply: _Reply, now: float) -> None:
        reply.started_at = now
        reply.deadline = now + reply.duration_s + self.options.stop_grace_s
        reply.changed.set()

    async def _wait_spoken(self, reply: _Reply) -> None:
        """Until the current task was spoken (relayed stop, or the fallback deadline) or interrupted."""
        loop = asyncio.get_running_loop()
        while not (reply.done or reply.interrupted):
            now = loop.time()
            if not reply.announced and (reply.started_at is not None or now >= reply.announce_at):
                reply.announced = True
                await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply.reply_id))
                continue
            if now >= reply.deadline:
                log.info("no avatar_stop_talking for task %s; taking it as spoken", reply.task_id,
                         extra={"sid": self.sid})
                reply.done = True
                return
            wake = reply.deadline if reply.announced else min(reply.deadline, reply.announce_at)
            reply.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reply.changed.wait(), wake - now)

    async def _interrupt_vendor(self, vendor: VendorHandle) -> None:
        try:
            await self.client.interrupt(vendor.vendor_id)
        except HeyGenError as exc:
            if exc.gone:
                await asyncio.shield(self._gone(vendor, "interrupt"))
            else:
                log.warning("HeyGen interrupt failed: %s", exc, extra={"sid": self.sid})

    async def _task_failed(self, vendor: VendorHandle, exc: HeyGenError) -> None:
        if exc.auth:
            await asyncio.shield(self.lost("task", avatar_error(exc)))
            return
        if exc.gone:
            await asyncio.shield(self._gone(vendor, "task"))
            return
        log.warning("HeyGen task failed: %s", exc, extra={"sid": self.sid})
        error = ErrorEvent(code="avatar_speak_failed", message="the avatar could not say that; please try again")
        await self.bus.publish_event(self.sid, error)

    def _new_body(self, knowledge: Knowledge) -> dict[str, Any]:
        o = self.options
        body: dict[str, Any] = {
            "version": "v2",
            "quality": o.quality,
            "language": self.config.language,
            "activity_idle_timeout": o.idle_timeout_s,
            "video_encoding": o.video_encoding,
        }
        avatar_id = self.config.avatar_id or o.avatar_id
        if avatar_id:
            body["avatar_id"] = avatar_id
        voice: dict[str, Any] = {"rate": o.voice_rate}
        if self.config.voice_id or o.voice_id:
            voice["voice_id"] = self.config.voice_id or o.voice_id
        if o.voice_emotion:
            voice["emotion"] = o.voice_emotion
        body["voice"] = voice
        if knowledge.id:
            body["knowledge_base_id"] = knowledge.id
        elif knowledge.prompt:
            body["knowledge_base"] = knowledge.prompt
        return body
