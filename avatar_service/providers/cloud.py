"""The one lifecycle of a paid cloud avatar session (HeyGen, LiveAvatar); vendors are thin adapters.

Why one place: the rules that keep a vendor session from leaking or being paid for twice are the
same for every vendor, and they used to be written once per vendor:

- **Recorded before it is started.** The vendor id goes into the session hash and the deployment's
  ledger (`vendor_sessions:{vendor}` in Redis) as soon as the vendor hands it out, before the
  session is started, so a takeover resumes it and the reaper knows it is ours.
- **Resumed after a takeover.** A new owner probes the stored session (`_probe`) and reuses it; if
  it is gone, it is stopped and a fresh one is made.
- **Stopped on every ending path**, with the real reason: `stop()` maps the session's ended reason
  to an `EndReason`, each adapter maps that to its vendor's stop reason. A worker that hands a
  session back (SIGTERM) only `release()`s it: the session lives on for the next owner.
- **Vendor limits.** The duration limit of the start response is a deadline: the page is told
  `avatar_expiring` (non-fatal) `expiry_warning_s` before it, and at it the session ends cleanly
  (`avatar_time_limit`, or `avatar_sandbox_expired` for a sandbox), whichever side closes first.
  A vendor that ends a session for another reason (idle, credits) ends ours as `avatar_closed`;
  only a session that vanishes for no known reason is `avatar_lost`, an error.
- **Reaping.** The reaper (`avatar_service/reaper.py`) asks the adapter's `Reaping` for the
  sessions of the account this deployment could have started (every page, matched on source and
  mode) and stops only those in the ledger that no live session of ours points at. A session of
  another app or another deployment on the same account is never touched.

An adapter implements `_reserve` / `_start_reserved` (its two or three start calls), `_probe`,
`_stop_vendor`, `_run` (its keep-alive loop or socket, until the vendor ends the session) and the
speech methods of `AvatarSession`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Protocol

import orjson
import redis.asyncio as aioredis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.exceptions import RedisError

from avatar_service.driver import AvatarError
from avatar_service.providers.vendor_api import VendorApiError, VendorSession
from common import keys
from common.bus import Bus
from common.models import ErrorEvent, LiveKitInfo, SessionConfig, SessionReady
from common.sessions import STATE_ENDED, SessionStore
from common.settings import Settings

log = logging.getLogger(__name__)

LIMIT_SLACK_S = 5.0  # a vendor close this close to the known limit is the limit
SWITCH_MARGIN_S = 1.0  # a rollover moves the page over at the latest this long before the limit


class CloudSettings(BaseSettings):
    """`AVATAR_*` settings of the cloud lifecycle (every cloud vendor; not shared with other services)."""

    model_config = SettingsConfigDict(env_prefix="AVATAR_", env_file=".env", extra="ignore")

    rollover: bool = False  # start a fresh vendor session before the limit and move the page to it
    rollover_lead_s: float = Field(default=20.0, gt=0)  # how long before the limit the fresh one is started


class EndReason(StrEnum):
    """Why a vendor session ends: one set for every vendor; each adapter maps it to its stop reason."""

    USER_ENDED = "user_ended"  # DELETE, {"type": "end"}
    BROWSER_LEFT = "browser_left"
    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"  # our own SESSION_MAX_S
    TIME_LIMIT = "avatar_time_limit"  # the vendor's duration limit
    SANDBOX_EXPIRED = "avatar_sandbox_expired"
    VENDOR_CLOSED = "avatar_closed"  # the vendor ended it (idle, credits, its own reasons)
    LOST = "avatar_lost"  # gone for no known reason: an error
    ERROR = "server_error"  # any other failure of ours (start failed, stt/llm errors)
    REPLACED = "avatar_replaced"  # a stale session dropped for a fresh one
    ORPHAN = "orphan"  # the reaper: ours, but no live session owns it

    @classmethod
    def of_session(cls, ended_reason: str | None) -> EndReason:
        """The reason stored by `SessionStore.end` as an `EndReason`."""
        reason = ended_reason or ""
        if reason in ("deleted", "user_ended", "", "session_ended"):
            return cls.USER_ENDED
        with contextlib.suppress(ValueError):
            return cls(reason)
        return cls.ERROR if reason.startswith(("avatar", "stt", "llm", "redis")) else cls.USER_ENDED

    @property
    def expected(self) -> bool:
        return self not in (EndReason.LOST, EndReason.ERROR)


class VendorEnded(Exception):
    """Raised inside an adapter when the vendor has ended the session (its socket closed, a call said gone)."""


@dataclass(frozen=True)
class VendorHandle:
    """A started vendor session, as stored in the session hash for the next owner."""

    vendor_id: str
    livekit_url: str
    livekit_token: str  # the browser's (viewer) token: it goes to the page in `session.ready`
    ws_url: str | None = None  # LiveAvatar LITE: embeds a credential; internal only, never logged
    expires_at: float | None = None  # unix s: the vendor's duration limit, when it told us one
    agent_token: str | None = None  # a LiveKit token to publish into the room (FULL mode): internal

    def to_json(self) -> str:
        return orjson.dumps(self.__dict__).decode()

    @classmethod
    def from_json(cls, raw: str) -> VendorHandle | None:
        try:
            data = orjson.loads(raw)
            return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})
        except (orjson.JSONDecodeError, TypeError):
            return None


@dataclass(frozen=True)
class Fields:
    """The session-hash fields of one vendor (`{prefix}_session_id`, …)."""

    prefix: str

    @property
    def vendor_id(self) -> str:
        return f"{self.prefix}_session_id"

    @property
    def handle(self) -> str:
        return f"{self.prefix}_handle"  # VendorHandle JSON once started

    @property
    def started(self) -> str:
        return f"{self.prefix}_started"

    @property
    def all(self) -> tuple[str, ...]:
        return (self.vendor_id, self.handle, self.started)


class VendorLedger:
    """Every vendor session this deployment started and did not stop yet (Redis hash per vendor)."""

    def __init__(self, r: aioredis.Redis, vendor: str) -> None:
        self.r = r
        self.key = keys.vendor_sessions(vendor)

    async def record(self, vendor_id: str, sid: str, at: float | None = None) -> None:
        await self.r.hset(self.key, vendor_id, orjson.dumps({"sid": sid, "at": time.time() if at is None else at}))

    async def forget(self, vendor_id: str) -> None:
        await self.r.hdel(self.key, vendor_id)

    async def entries(self) -> dict[str, tuple[str, float]]:
        out: dict[str, tuple[str, float]] = {}
        for vid, raw in (await self.r.hgetall(self.key)).items():
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                data = orjson.loads(raw)
                out[vid.decode()] = (str(data["sid"]), float(data["at"]))
        return out


async def owner_is_live(r: aioredis.Redis, sid: str, vendor_id: str, fields: Fields) -> bool:
    """True while session `sid` is not ended and still points at `vendor_id`."""
    state, current = await r.hmget(keys.session(sid), keys.F_STATE, fields.vendor_id)
    return bool(state) and state.decode() != STATE_ENDED and current is not None and current.decode() == vendor_id


@dataclass(frozen=True)
class CloudOptions:
    """What the lifecycle needs from a vendor's settings."""

    keepalive_s: float
    expiry_warning_s: float = 30.0
    sandbox: bool = False
    rollover: bool = False
    rollover_lead_s: float = 20.0


class Reaping(Protocol):
    """A vendor's side of reaping, implemented by its adapter."""

    name: str  # the ledger's vendor name
    fields: Fields
    interval_s: float
    grace_s: float
    errors: tuple[type[Exception], ...]

    async def list_own_sessions(self) -> list[VendorSession]:
        """Active sessions of the account that this deployment could have started (every page)."""

    async def stop_session(self, vendor_id: str, reason: EndReason) -> bool: ...

    async def aclose(self) -> None: ...


class CloudDriver:
    """What every cloud driver holds: the bus, the store, the sessions it serves."""

    name: ClassVar[str] = "cloud"

    def __init__(self, settings: Settings, bus: Bus) -> None:
        self.settings = settings
        self.bus = bus
        self.store = SessionStore(bus.r, bus)
        self.ledger = VendorLedger(bus.r, self.name)
        self.served: set[CloudSession] = set()

    async def aclose(self) -> None:
        """Worker shutdown: let go of every session here, never stop them (they are handed back)."""
        sessions = list(self.served)
        for session in sessions:
            session.release()
        links = [s._link for s in sessions if s._link is not None]
        if links:  # let each link close its socket / leave its room before the loop goes
            await asyncio.wait(links, timeout=5.0)
        await self._close_clients()

    async def _close_clients(self) -> None:
        return None


class CloudSession(ABC):
    """One user session's vendor avatar on the worker that owns the session."""

    label: ClassVar[str] = "cloud"  # for logs: "LiveAvatar", "HeyGen"
    error_type: ClassVar[type[VendorApiError]] = VendorApiError

    def __init__(self, driver: CloudDriver, sid: str, config: SessionConfig, options: CloudOptions) -> None:
        self.driver = driver
        self.sid = sid
        self.config = config
        self.cloud = options
        self.bus = driver.bus
        self.store = driver.store
        self.ledger = driver.ledger
        self.fields = Fields(driver.name)
        self.vendor: VendorHandle | None = None
        self._link: asyncio.Task[None] | None = None
        self._stopped = False
        self._released = False
        self._ending = False
        self._replies = 0  # `speak` calls in progress: a rollover waits for them
        self._quiet = asyncio.Event()  # no reply in progress
        self._quiet.set()
        self._not_switching = asyncio.Event()  # a new reply waits while the page moves to a fresh session
        self._not_switching.set()

    answers_itself: bool = False

    # ---- the adapter's part

    @abstractmethod
    async def _reserve(self) -> tuple[str, Any]:
        """Create the vendor session up to the point it has an id (not started: nothing to pay yet)."""

    @abstractmethod
    async def _start_reserved(self, vendor_id: str, pending: Any) -> VendorHandle:
        """Start what `_reserve` made; the handle carries the LiveKit url/token and the duration limit."""

    @abstractmethod
    async def _probe(self, handle: VendorHandle) -> None:
        """Raise the vendor's error if the session cannot be resumed (a keep-alive)."""

    @abstractmethod
    async def _stop_vendor(self, vendor_id: str, reason: EndReason) -> bool:
        """Stop the vendor session; False if the vendor says it was already gone."""

    @abstractmethod
    async def _run(self, handle: VendorHandle) -> None:
        """Hold the session while served (keep-alives, socket); raise `VendorEnded` if the vendor ended it."""

    @abstractmethod
    async def _speak(self, reply_id: str, text: Any, *, user_text: str | None = None) -> str | None:
        """The vendor's `speak`."""

    async def _switched(self, old: VendorHandle, new: VendorHandle) -> None:
        """A rollover moved the session to `new`: reset per-connection state (LiveAvatar: the socket)."""
        return None

    @abstractmethod
    def _avatar_error(self, exc: VendorApiError) -> AvatarError:
        """What the user is told when starting failed."""

    @abstractmethod
    def _cut_reply(self) -> None:
        """Make a running `speak` return at once (the session is released or ending)."""

    # ---- the AvatarSession protocol

    async def start(self) -> None:
        """Resume the stored vendor session if it is alive, else create one; publish `session.ready`."""
        try:
            self.vendor = await self._resume() or await self._create()
        except self.error_type as exc:
            log.error("starting the %s avatar failed: %s", self.label, exc, extra={"sid": self.sid})
            error = self._avatar_error(exc)
            with contextlib.suppress(RedisError):
                await self.bus.publish_event(self.sid, error.event())
            raise error from None
        self._serve(self.vendor)
        await self.bus.publish_event(self.sid, self._ready(self.vendor))

    async def stop(self, reason: str) -> None:
        """Stop the vendor session for good, with the session's real end reason; idempotent.
        A failed stop leaves the ledger entry, so the reaper stops it later."""
        if self._stopped:
            return
        self._stopped = True
        self.release()
        if self._link is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._link
        vendor_id = self.vendor.vendor_id if self.vendor else await self._stored(self.fields.vendor_id)
        if not vendor_id:
            return
        end = EndReason.of_session(await self._stored(keys.F_ENDED_REASON))
        try:
            stopped = await self._stop_vendor(vendor_id, end)
        except self.error_type as exc:
            log.error("could not stop %s session %s (%s); the reaper will", self.label, vendor_id, exc,
                      extra={"sid": self.sid})
            return
        log.info("%s %s session %s (%s)", "stopped" if stopped else "found already gone", self.label, vendor_id,
                 end.value, extra={"sid": self.sid})
        await self._forget(vendor_id)

    def release(self) -> None:
        """This worker no longer serves the session (ended, handed back or lost): let go, never stop."""
        self._released = True
        if self._link is not None and self._link is not asyncio.current_task():
            self._link.cancel()
        self.driver.served.discard(self)
        self._cut_reply()

    async def speak(self, reply_id: str, text: Any, *, user_text: str | None = None) -> str | None:
        """Say a reply (see `AvatarSession.speak`); never across a rollover's switch, so no turn is lost."""
        await self._not_switching.wait()
        self._replies += 1
        self._quiet.clear()
        try:
            return await self._speak(reply_id, text, user_text=user_text)
        finally:
            self._replies -= 1
            if self._replies == 0:
                self._quiet.set()

    async def pause(self) -> bool:
        """A cloud avatar cannot stop being heard and continue later."""
        return False

    async def resume(self) -> None:
        return None

    async def on_vendor_event(self, event: str, data: dict) -> None:
        return None

    # ---- endings

    async def ended_by_vendor(self, why: str) -> None:
        """The vendor ended the session: an expected end with its reason, unless nothing explains it."""
        await self._end(self._vendor_end_reason(), why)

    def _vendor_end_reason(self) -> EndReason:
        expires = self.vendor.expires_at if self.vendor else None
        if self.cloud.sandbox:
            return EndReason.SANDBOX_EXPIRED
        if expires is not None and time.time() >= expires - LIMIT_SLACK_S:
            return EndReason.TIME_LIMIT
        return EndReason.VENDOR_CLOSED

    async def lost(self, why: str, error: AvatarError | None = None) -> None:
        """The vendor session died under us for no known reason: tell the user, end the session."""
        error = error or AvatarError("avatar_lost", "the avatar session ended unexpectedly")
        await self._end(EndReason.LOST, why, error)

    async def _end(self, reason: EndReason, why: str, error: AvatarError | None = None) -> None:
        if self._ending or self._stopped:
            return
        self._ending = True
        self._cut_reply()
        level = logging.ERROR if error is not None else logging.INFO
        log.log(level, "%s session ended (%s: %s); ending the session", self.label, reason.value, why,
                extra={"sid": self.sid})
        code = error.code if error is not None else reason.value
        with contextlib.suppress(RedisError):
            if error is not None:
                await self.bus.publish_event(self.sid, error.event())
            await self.store.end(self.sid, code)

    # ---- internals

    def _ready(self, handle: VendorHandle) -> SessionReady:
        return SessionReady(
            provider=self.driver.name, stt_provider=self.driver.settings.resolved_stt_provider(),
            livekit=LiveKitInfo(url=handle.livekit_url, token=handle.livekit_token),
        )

    def _serve(self, handle: VendorHandle) -> None:
        """Hold the session from now until this worker stops serving it, however that happens."""
        self._link = asyncio.create_task(self._supervise(handle), name=f"{self.driver.name}:{self.sid}")
        self.driver.served.add(self)
        owner = asyncio.current_task()
        if owner is not None:
            owner.add_done_callback(lambda _task: self.release())

    async def _supervise(self, handle: VendorHandle) -> None:
        """Run the adapter's link for the current vendor session; watch its limit; roll over to a
        fresh session when the watch hands one over."""
        while True:
            run = asyncio.create_task(self._run(handle))
            watch = asyncio.create_task(self._watch_limit(handle))
            try:
                done, _ = await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                run.cancel()
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(run), 5.0)  # its socket / room closes first
                raise
            if run in done:
                watch.cancel()
                exc = run.exception() if not run.cancelled() else None
                if isinstance(exc, VendorEnded) and not (self._released or self._stopped):
                    await asyncio.shield(self.ended_by_vendor(str(exc)))
                elif exc is not None:
                    log.error("%s link failed: %r", self.label, exc, extra={"sid": self.sid})
                return
            fresh = watch.result()
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run
            if fresh is not None and (self._released or self._stopped):  # let go meanwhile: not needed
                self._not_switching.set()
                await asyncio.shield(self._discard(fresh.vendor_id, EndReason.REPLACED, keep_fields=True))
                return
            if fresh is None:
                return
            handle = await asyncio.shield(self._switch(handle, fresh))

    async def _watch_limit(self, handle: VendorHandle) -> VendorHandle | None:
        """Before the vendor's duration limit: a fresh session (rollover), or a warning to the page;
        at the limit, end the session cleanly. Returns the fresh session to move to, if any."""
        if handle.expires_at is None:  # no known limit: nothing to watch
            await asyncio.Event().wait()
        assert handle.expires_at is not None
        if self.cloud.rollover:  # never in the first half of a session's life: no storm of rollovers
            lead = min(self.cloud.rollover_lead_s, max(0.0, handle.expires_at - time.time()) / 2)
            await _sleep_until(handle.expires_at - lead)
            fresh = await self._fresh_session()
            if fresh is not None:
                # A turn that arrives from now on waits and is spoken by the fresh session; the reply
                # being spoken finishes on this one (its link still runs).
                self._not_switching.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._quiet.wait(), max(0.0, handle.expires_at - SWITCH_MARGIN_S
                                                                   - time.time()))
                return fresh
        warn_at = handle.expires_at - self.cloud.expiry_warning_s
        await _sleep_until(warn_at)
        left = max(0, round(handle.expires_at - time.time()))
        with contextlib.suppress(RedisError):
            await self.bus.publish_event(self.sid, ErrorEvent(
                code="avatar_expiring", fatal=False,
                message=f"the avatar session reaches its time limit in {left} s",
            ))
        await _sleep_until(handle.expires_at)
        await asyncio.shield(self._end(self._vendor_end_reason(), "duration limit reached"))
        return None

    async def _fresh_session(self) -> VendorHandle | None:
        """A new vendor session for a rollover, recorded in the ledger (a worker dying now leaks nothing:
        the session hash does not point at it, so the reaper stops it after its grace)."""
        try:
            vendor_id, pending = await self._reserve()
            await self.ledger.record(vendor_id, self.sid)
            try:
                return await self._start_reserved(vendor_id, pending)
            except self.error_type:
                await self._discard(vendor_id, EndReason.ERROR, keep_fields=True)
                raise
        except self.error_type as exc:
            log.warning("%s rollover failed (%s); the session ends at its limit", self.label, exc,
                        extra={"sid": self.sid})
            return None

    async def _switch(self, old: VendorHandle, new: VendorHandle) -> VendorHandle:
        """Move the session (and the page, with a new `session.ready`) to `new`; stop `old`."""
        try:
            self.vendor = new
            await self.store.set_fields(self.sid, **{self.fields.vendor_id: new.vendor_id,
                                                     self.fields.handle: new.to_json(), self.fields.started: "1"})
            await self._switched(old, new)
            await self.bus.publish_event(self.sid, self._ready(new))
            log.info("rolled %s session %s over to %s", self.label, old.vendor_id, new.vendor_id,
                     extra={"sid": self.sid})
        finally:
            self._not_switching.set()
        await self._discard(old.vendor_id, EndReason.REPLACED, keep_fields=True)
        return new

    async def _resume(self) -> VendorHandle | None:
        """The vendor session a previous owner left in the session hash, if it is still alive."""
        record = await self.store.get(self.sid) or {}
        vendor_id = record.get(self.fields.vendor_id)
        if not vendor_id:
            return None
        handle = VendorHandle.from_json(record.get(self.fields.handle, "")) if record.get(
            self.fields.started) == "1" else None
        if handle is not None and handle.vendor_id == vendor_id:
            if handle.expires_at is not None and handle.expires_at <= time.time():
                log.info("%s session %s is past its time limit; not resuming it", self.label, vendor_id,
                         extra={"sid": self.sid})
            else:
                try:
                    await self._probe(handle)
                except self.error_type as exc:
                    if getattr(exc, "auth", False):
                        raise
                    log.warning("%s session %s cannot be resumed (%s); starting a new one", self.label, vendor_id,
                                exc, extra={"sid": self.sid})
                else:
                    log.info("resumed %s session %s", self.label, vendor_id, extra={"sid": self.sid})
                    return handle
        await self._discard(vendor_id, EndReason.REPLACED)
        return None

    async def _create(self) -> VendorHandle:
        vendor_id, pending = await self._reserve()
        # Recorded before it is started: a takeover resumes or stops it, the reaper knows it is ours.
        await self.ledger.record(vendor_id, self.sid)
        await self.store.set_fields(self.sid, **{self.fields.vendor_id: vendor_id, self.fields.started: "0"})
        try:
            handle = await self._start_reserved(vendor_id, pending)
        except self.error_type:
            await self._discard(vendor_id, EndReason.ERROR)
            raise
        await self.store.set_fields(self.sid, **{self.fields.handle: handle.to_json(), self.fields.started: "1"})
        log.info("started %s session %s%s", self.label, vendor_id,
                 f" (limit in {handle.expires_at - time.time():.0f} s)" if handle.expires_at else "",
                 extra={"sid": self.sid})
        return handle

    async def _discard(self, vendor_id: str, reason: EndReason, *, keep_fields: bool = False) -> None:
        """Drop a vendor session we will not use; if stopping fails the ledger keeps it for the reaper.
        `keep_fields`: the session hash already points at another vendor session (rollover)."""
        try:
            await self._stop_vendor(vendor_id, reason)
        except self.error_type as exc:
            log.warning("could not stop %s session %s (%s)", self.label, vendor_id, exc, extra={"sid": self.sid})
            if not keep_fields:
                with contextlib.suppress(RedisError):
                    await self.bus.r.hdel(keys.session(self.sid), *self.fields.all)
            return
        await self._forget(vendor_id, keep_fields=keep_fields)

    async def _forget(self, vendor_id: str, *, keep_fields: bool = False) -> None:
        with contextlib.suppress(RedisError):
            if not keep_fields:
                await self.bus.r.hdel(keys.session(self.sid), *self.fields.all)
            await self.ledger.forget(vendor_id)

    async def _stored(self, name: str) -> str | None:
        with contextlib.suppress(RedisError):
            raw = await self.bus.r.hget(keys.session(self.sid), name)
            return raw.decode() if raw else None
        return None


async def _sleep_until(deadline: float) -> None:
    """Sleep to a wall-clock deadline (the vendor's limit is wall-clock), re-reading the clock each step."""
    for _ in range(1_000_000):
        left = deadline - time.time()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 30.0))


def background(coro_fn: Callable[[], Awaitable[None]], tasks: set[asyncio.Task[None]], limit: int = 4) -> None:
    """Fire a short vendor call without making the caller wait; at most `limit` in flight."""
    if len(tasks) >= limit:
        return
    task = asyncio.create_task(coro_fn())  # type: ignore[arg-type]
    tasks.add(task)
    task.add_done_callback(tasks.discard)
