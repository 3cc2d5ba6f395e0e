"""LiveAvatar FULL mode: LiveAvatar's own LLM answers from a Context (what HeyGen's `talk` + knowledge base did).

`LIVEAVATAR_MODE=FULL`. The session is made with `avatar_persona.context_id` (`LIVEAVATAR_CONTEXT_ID`,
or a Context created once from the knowledge file and its id cached in Redis). The worker joins the
session's LiveKit room with `livekit_agent_token` (the `livekit` Python SDK) and sends our STT's
final text as `avatar.speak_response` on the `agent-control` data topic; the avatar's answer and
its talking state come back on `agent-response` (`avatar.speak_started` / `avatar.transcription` /
`avatar.speak_ended`, `session.stopped`). Barge-in is `avatar.interrupt`, the listening pose
`avatar.start_listening` / `avatar.stop_listening`; keep-alives go over REST. The lifecycle (record,
resume, limits, stop with the reason, reaping) is `cloud.py`'s. LITE (our brain answers) is the
default; this module is the FULL variant of the LiveAvatar adapter, not a provider of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis

from avatar_service.driver import AvatarError, Speech, sentences_of
from avatar_service.providers.cloud import CloudSession, EndReason, VendorEnded, VendorHandle
from avatar_service.providers.vendor_api import VendorApiError
from common.models import AvatarReply, AvatarStartedTalking, AvatarStoppedTalking, SessionConfig

if TYPE_CHECKING:
    from avatar_service.providers.liveavatar import LiveAvatarClient, LiveAvatarDriver

log = logging.getLogger(__name__)

CONTROL_TOPIC = "agent-control"
RESPONSE_TOPIC = "agent-response"
CONTEXT_KEY_PREFIX = "liveavatar:context:"  # + digest of the prompt -> Context id
CONTEXT_LOCK_S = 15
DEFAULT_KNOWLEDGE_FILE = Path(__file__).resolve().parent.parent / "knowledge.md"
START_TIMEOUT_S = 30.0  # from speak_response to the avatar starting its answer (its LLM + TTS)
MAX_ANSWER_S = 120.0  # an answer that never reports its end is taken as spoken after this long


class Contexts:
    """`LIVEAVATAR_CONTEXT_ID`, else one Context per knowledge-file prompt, created once, id cached in Redis."""

    def __init__(self, r: aioredis.Redis, client: LiveAvatarClient, context_id: str, knowledge_file: str) -> None:
        self.r = r
        self.client = client
        self.context_id = context_id
        self.path = Path(knowledge_file) if knowledge_file else DEFAULT_KNOWLEDGE_FILE

    async def resolve(self) -> str:
        if self.context_id:
            return self.context_id
        prompt = (await asyncio.to_thread(self.path.read_text, encoding="utf-8")).strip()
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        key = CONTEXT_KEY_PREFIX + digest
        for _ in range(CONTEXT_LOCK_S * 5):
            cached = await self.r.get(key)
            if cached:
                return cached.decode()
            if await self.r.set(f"{key}:lock", "1", nx=True, ex=CONTEXT_LOCK_S):
                try:
                    context_id = await self.client.create_context(f"avatar-stack {digest}", prompt)
                finally:
                    await self.r.delete(f"{key}:lock")
                await self.r.set(key, context_id)
                log.info("created LiveAvatar context %s from %s", context_id, self.path)
                return context_id
            await asyncio.sleep(0.2)  # another worker is creating it
        raise TimeoutError("the LiveAvatar context was not created in time")


@dataclass
class _Answer:
    reply_id: str
    event_id: str
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    started: bool = False
    ended: bool = False
    interrupted: bool = False
    text: str = ""


class LiveAvatarFullSession(CloudSession):
    """One session in FULL mode: LiveAvatar's LLM writes the answer from the Context."""

    label = "LiveAvatar"
    answers_itself = True

    def __init__(self, driver: LiveAvatarDriver, sid: str, config: SessionConfig, options: Any) -> None:
        from avatar_service.providers.liveavatar import LiveAvatarError

        self.error_type = LiveAvatarError
        super().__init__(driver, sid, config, options)
        self.options = driver.options
        self.client = driver.client
        self.contexts = driver.contexts
        self._room: Any = None
        self._answer: _Answer | None = None
        self._listening = False

    # ---- lifecycle (the adapter's part of cloud.py)

    async def _reserve(self) -> tuple[str, Any]:
        o = self.options
        persona: dict[str, Any] = {"context_id": await self.contexts.resolve(), "language": self.config.language}
        if self.config.voice_id or o.voice_id:
            persona["voice_id"] = self.config.voice_id or o.voice_id
        body: dict[str, Any] = {
            "mode": "FULL", "avatar_id": self.config.avatar_id or o.avatar_id, "is_sandbox": o.sandbox,
            "video_settings": {"quality": o.quality, "encoding": o.encoding}, "avatar_persona": persona,
        }
        if o.max_session_s:
            body["max_session_duration"] = o.max_session_s
        return await self.client.create_token(body)

    async def _start_reserved(self, vendor_id: str, pending: Any) -> VendorHandle:
        handle = await self.client.start(pending, lite=False)
        if not handle.agent_token:
            raise self.error_type("/v1/sessions/start", 200, None, "response without livekit_agent_token")
        return handle

    async def _probe(self, handle: VendorHandle) -> None:
        await self.client.keep_alive(handle.vendor_id)

    async def _stop_vendor(self, vendor_id: str, reason: EndReason) -> bool:
        from avatar_service.providers.liveavatar import STOP_REASONS

        return await self.client.stop(vendor_id, STOP_REASONS[reason])

    def _avatar_error(self, exc: VendorApiError) -> AvatarError:
        from avatar_service.providers.liveavatar import avatar_error

        return avatar_error(exc)

    def _ready(self, handle: VendorHandle) -> Any:
        from avatar_service.providers.liveavatar import AVATAR_IDENTITY

        ready = super()._ready(handle)
        ready.livekit.avatar_identity = AVATAR_IDENTITY
        return ready

    def _cut_reply(self) -> None:
        answer = self._answer
        if answer is not None:
            answer.interrupted = True
            answer.changed.set()

    async def _run(self, handle: VendorHandle) -> None:
        """In the room as the agent: read `agent-response`; REST keep-alives; the vendor ending it ends ours."""
        from livekit import rtc

        room = rtc.Room()
        stopped = asyncio.Event()

        @room.on("data_received")
        def _on_data(packet: Any) -> None:
            if packet.topic == RESPONSE_TOPIC:
                with contextlib.suppress(orjson.JSONDecodeError, TypeError):
                    event = orjson.loads(packet.data)
                    if isinstance(event, dict) and self._on_event(event):
                        stopped.set()

        @room.on("disconnected")
        def _on_disconnected(*_args: Any) -> None:
            stopped.set()

        try:
            await room.connect(handle.livekit_url, handle.agent_token or "")
        except Exception:
            with contextlib.suppress(Exception):
                await asyncio.shield(room.disconnect())
            raise
        self._room = room
        keepalive = asyncio.create_task(self._keepalive(handle))
        try:
            await stopped.wait()
        finally:
            self._room = None
            keepalive.cancel()
            with contextlib.suppress(Exception):
                await asyncio.shield(room.disconnect())
        try:
            await self.client.keep_alive(handle.vendor_id)
        except self.error_type as exc:
            if getattr(exc, "gone", False):
                raise VendorEnded("the vendor stopped the session") from None
        await self.lost("left the LiveKit room")

    async def _keepalive(self, handle: VendorHandle) -> None:
        while True:
            await asyncio.sleep(self.options.keepalive_s)
            try:
                await self.client.keep_alive(handle.vendor_id)
            except self.error_type as exc:
                log.warning("LiveAvatar keep-alive failed: %s", exc, extra={"sid": self.sid})

    def _on_event(self, event: dict[str, Any]) -> bool:
        """One `agent-response` event; True when the vendor says the session stopped."""
        kind = event.get("event_type") or event.get("type")
        answer = self._answer
        if kind == "session.stopped":
            return True
        if answer is None:
            return False
        if kind == "avatar.speak_started":
            answer.started = True
        elif kind in ("avatar.speak_ended", "avatar.speak_interrupted"):
            answer.ended = True
        elif kind == "avatar.transcription" and isinstance(event.get("text"), str):
            answer.text = (answer.text + " " + event["text"]).strip()[:4000]
        answer.changed.set()
        return False

    async def _send(self, event_type: str, **payload: Any) -> str:
        event_id = uuid.uuid4().hex
        message = {"event_type": event_type, "event_id": event_id, **payload}
        if self.vendor is not None:
            message["session_id"] = self.vendor.vendor_id
        room = self._room
        if room is None:
            raise ConnectionError("not in the avatar's room")
        await room.local_participant.publish_data(orjson.dumps(message), reliable=True, topic=CONTROL_TOPIC)
        return event_id

    # ---- speech

    async def _speak(self, reply_id: str, text: Speech, *, user_text: str | None = None) -> str | None:
        """Hand what the user said to LiveAvatar's LLM; return once its answer was spoken (or cut)."""
        said = user_text if user_text is not None else " ".join([s async for s in sentences_of(text)])
        for _ in range(int(START_TIMEOUT_S * 10)):  # the room is joined right after start
            if self._room is not None or self._stopped or self._released or self._ending:
                break
            await asyncio.sleep(0.1)
        answer = self._answer = _Answer(reply_id, "")
        try:
            answer.event_id = await self._send("avatar.speak_response", text=said)
        except (ConnectionError, RuntimeError, Exception) as exc:  # the SDK raises its own errors
            log.warning("could not send the text to LiveAvatar: %s", type(exc).__name__, extra={"sid": self.sid})
            self._answer = None
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        announced = False
        shown = ""
        while not (answer.ended or answer.interrupted):
            if answer.started and not announced:
                announced = True
                deadline = loop.time() + MAX_ANSWER_S
                await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply_id))
            if answer.text != shown:
                shown = answer.text
                await self._show(reply_id, shown)
            if loop.time() >= deadline:
                log.info("no end of LiveAvatar's answer; taking it as spoken", extra={"sid": self.sid})
                break
            answer.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(answer.changed.wait(), deadline - loop.time())
        if self._answer is answer:
            self._answer = None
        if answer.started or announced:
            if not announced:
                await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply_id))
            if answer.text and answer.text != shown:
                await self._show(reply_id, answer.text)
            await self.bus.publish_event(self.sid, AvatarStoppedTalking(reply_id=reply_id,
                                                                          interrupted=answer.interrupted))
        return None

    async def _show(self, reply_id: str, text: str) -> None:
        """The avatar's answer as it is transcribed, for the page (our brain wrote none)."""
        await self.bus.publish_event(self.sid, AvatarReply(reply_id=reply_id, turn_id=reply_id.removeprefix("r-"),
                                                           text=text))

    async def interrupt(self) -> None:
        answer = self._answer
        if answer is None or answer.interrupted:
            return
        answer.interrupted = True
        answer.changed.set()
        with contextlib.suppress(Exception):
            await self._send("avatar.interrupt")

    async def on_user_speaking(self, speaking: bool) -> None:
        if speaking == self._listening or self._room is None:
            return
        self._listening = speaking
        with contextlib.suppress(Exception):
            await self._send("avatar.start_listening" if speaking else "avatar.stop_listening")
