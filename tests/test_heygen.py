"""The HeyGen avatar against the protocol fake (`tests/fakes/heygen.py`), on loopback only.

First the client, driver and reaper in this process (real Redis, the fake's call log as the
record); then the whole stack as real processes, with a test "page" that relays the avatar's
data-channel events the way `frontend/` does. Nothing here asserts on wall-clock time: intervals
are made short through settings, and every wait has a generous guard so a bug fails instead of
hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from avatar_service.providers.cloud import VendorLedger
from avatar_service.providers.heygen import (
    F_STARTED,
    F_VENDOR_ID,
    KB_KEY_PREFIX,
    AvatarError,
    HeyGenAvatarDriver,
    HeyGenAvatarSession,
    HeyGenClient,
    HeyGenError,
    HeyGenSettings,
    make_reaping,
    pack_sentences,
)
from avatar_service.reaper import reap_once, run_reaper
from common import keys
from common.bus import Bus
from common.models import SessionConfig
from common.sessions import SessionStore
from common.settings import Settings
from tests.client import Browser, create_session
from tests.conftest import ROOT, Stack, start_stack
from tests.fakes.heygen import FakeHeyGen
from tests.speech import speech_available, speech_pcm

KEY = "hg-test-key-5e1f0c9a7b"
GUARD_S = 30.0  # hang guard only
SETTLE_S = 0.1  # lets a request that was already on the wire reach the fake's log
SPEECH_MS = 5.0  # per character: a reply of ~400 characters is spoken in ~2 s
LONG_TEXT = " ".join(
    f"This is sentence number {i} of a long answer, and it goes on for a while to fill the limit."
    for i in range(40)
)


# ---------------------------------------------------------------- helpers


def settings_for(fake: FakeHeyGen, redis_url: str) -> Settings:
    """The shared settings of a test stack (HeyGen's own are `vendor_for`'s)."""
    return Settings(_env_file=None, redis_url=redis_url, avatar_provider="heygen", stt_provider="local")


def vendor_for(fake: FakeHeyGen, key: str = KEY, **heygen: Any) -> HeyGenSettings:
    """HeyGen's settings pointing at the fake; `heygen_x=…` sets `HEYGEN_X`."""
    fields = {"task_type": "repeat", **{k.removeprefix("heygen_"): v for k, v in heygen.items()}}
    return HeyGenSettings(_env_file=None, api_key=SecretStr(key), server_url=fake.url, avatar_id="Anna_public",
                          **fields)


async def until(condition: Callable[[], Any], guard_s: float = GUARD_S, step_s: float = 0.02) -> Any:
    """Poll until `condition()` is truthy; returns its value."""
    deadline = time.monotonic() + guard_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(step_s)
    return value


async def events_of(r: aioredis.Redis, sid: str) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"e"]) for _, fields in await r.xrange(keys.events(sid))]


@pytest.fixture
def fake() -> Iterator[FakeHeyGen]:
    with FakeHeyGen(api_key=KEY, speech_ms_per_char=1.0) as f:
        yield f


@pytest.fixture
async def r(clean_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(clean_redis)
    yield client
    await client.aclose()


class Rig:
    """A driver on real Redis, and sessions made the way the gateway makes them."""

    def __init__(self, fake: FakeHeyGen, r: aioredis.Redis, redis_url: str, **heygen: Any) -> None:
        self.fake = fake
        self.r = r
        self.settings = settings_for(fake, redis_url)
        self.vendor = vendor_for(fake, **heygen)
        self.bus = Bus(r, self.settings)
        self.store = SessionStore(r, self.bus)
        self.driver = HeyGenAvatarDriver(self.settings, self.bus, vendor=self.vendor)
        self.relays: list[asyncio.Task[None]] = []
        self.closers: list[Callable[[], Any]] = []

    async def new_sid(self) -> str:
        sid, _token = await self.store.create(SessionConfig())
        return sid

    async def open(self, sid: str | None = None, *, resumed: bool = False) -> HeyGenAvatarSession:
        return await self.driver.open(sid or await self.new_sid(), SessionConfig(), resumed=resumed)

    def vendor_id(self, session: HeyGenAvatarSession) -> str:
        assert session.vendor is not None
        return session.vendor.vendor_id

    def relay(self, session: HeyGenAvatarSession) -> None:
        """Relay the vendor's data-channel events to the session, as the page does."""

        async def run() -> None:
            sent = 0
            while True:
                events = self.fake.channel(self.vendor_id(session))
                for event in events[sent:]:
                    await session.on_vendor_event(event["type"], event)
                sent = len(events)
                await asyncio.sleep(0.01)

        self.relays.append(asyncio.create_task(run()))

    async def aclose(self) -> None:
        for task in self.relays:
            task.cancel()
        await asyncio.gather(*self.relays, return_exceptions=True)
        for close in self.closers:
            await close()
        await self.driver.aclose()


@pytest.fixture
async def rig(fake: FakeHeyGen, r: aioredis.Redis, clean_redis: str) -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**heygen: Any) -> Rig:
        made.append(Rig(fake, r, clean_redis, **heygen))
        return made[-1]

    yield make
    for one in made:
        await one.aclose()


# ---------------------------------------------------------------- client


async def test_client_speaks_the_protocol(fake: FakeHeyGen) -> None:
    client = HeyGenClient(fake.url, KEY)
    try:
        token = await client.create_token()
        new = await client.new_session(token, {"version": "v2", "avatar_id": "Anna_public"})
        with pytest.raises(HeyGenError) as wrong_state:
            await client.task(new.session_id, "Too early.", "repeat")
        assert wrong_state.value.code == 400006
        await client.start(new.session_id, token)
        task = await client.task(new.session_id, "Hello there.", "repeat")
        assert task.task_id and task.duration_s > 0
        await client.keep_alive(new.session_id)
        await client.interrupt(new.session_id)
        assert [s.session_id for s in await client.list_sessions()] == [new.session_id]
        assert await client.stop(new.session_id) is True
        assert await client.stop(new.session_id) is False  # already gone: idempotent for callers
        assert await client.list_sessions() == []
    finally:
        await client.aclose()
    auth = [(c.path, c.auth) for c in fake.calls if c.status == 200]
    assert auth[:3] == [
        ("/v1/streaming.create_token", "api_key"), ("/v1/streaming.new", "bearer"), ("/v1/streaming.start", "bearer"),
    ]
    assert {a for p, a in auth[3:]} == {"api_key"}  # what any worker may do later needs no session token
    task_call = fake.calls_to("/v1/streaming.task")[-1]
    assert task_call.body == {
        "session_id": new.session_id, "text": "Hello there.", "task_type": "repeat", "task_mode": "async",
    }


async def test_client_classifies_errors_and_retries_only_what_is_safe(fake: FakeHeyGen) -> None:
    client = HeyGenClient(fake.url, KEY)
    bad = HeyGenClient(fake.url, "not-the-key")
    try:
        with pytest.raises(HeyGenError) as denied:
            await bad.create_token()
        assert denied.value.auth and not denied.value.transient
        fake.max_concurrent = 0
        with pytest.raises(HeyGenError) as full:
            await client.new_session(await client.create_token(), {"version": "v2"})
        assert full.value.capacity and not full.value.transient
        assert len(fake.calls_to("/v1/streaming.new")) == 1
        with pytest.raises(HeyGenError) as unknown:
            await client.keep_alive("no-such-session")
        assert unknown.value.gone
        fake.max_concurrent = 10
        sid = (await client.new_session(await client.create_token(), {"version": "v2"})).session_id
        fake.fail_next("/v1/streaming.keep_alive", 503)
        await client.keep_alive(sid)  # retried
        assert [c.status for c in fake.calls_to("/v1/streaming.keep_alive", sid)] == [503, 200]
        await client.start(sid)
        fake.fail_next("/v1/streaming.task", 503)
        with pytest.raises(HeyGenError) as outage:
            await client.task(sid, "Said once at most.", "repeat")  # never repeated: it could speak twice
        assert outage.value.transient
        assert len(fake.calls_to("/v1/streaming.task", sid)) == 1
    finally:
        await client.aclose()
        await bad.aclose()


def test_pack_sentences_keeps_every_word_under_the_limit() -> None:
    pieces = pack_sentences(LONG_TEXT, 300)
    assert len(pieces) > 1 and all(len(p) <= 300 for p in pieces)
    assert " ".join(pieces) == " ".join(LONG_TEXT.split())
    assert all(p.endswith(".") for p in pieces)  # cut at sentence boundaries


# ---------------------------------------------------------------- driver


async def test_start_creates_the_session_and_publishes_only_what_the_browser_needs(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    h = rig(heygen_task_type="talk", heygen_quality="high", heygen_voice_emotion="Friendly")
    session = await h.open()
    await session.start()
    vendor_id = h.vendor_id(session)
    assert fake.paths()[-3:] == ["/v1/streaming.create_token", "/v1/streaming.new", "/v1/streaming.start"]
    new = fake.calls_to("/v1/streaming.new")[-1].body
    [kb_id] = fake.knowledge_bases
    assert new == {
        "version": "v2", "quality": "high", "language": "en", "activity_idle_timeout": 300, "video_encoding": "H264",
        "avatar_id": "Anna_public", "voice": {"rate": 1.0, "emotion": "Friendly"}, "knowledge_base_id": kb_id,
    }
    assert "avatar-stack" in fake.knowledge_bases[kb_id]["prompt"]  # the bundled knowledge file
    [ready] = await events_of(r, session.sid)
    assert ready["type"] == "session.ready" and ready["provider"] == "heygen"
    assert ready["livekit"] == {"url": fake.livekit_url, "token": fake.session(vendor_id).access_token}
    record = await h.store.get(session.sid)
    assert record is not None and record[F_VENDOR_ID] == vendor_id and record[F_STARTED] == "1"
    secrets = [KEY, *fake.issued_tokens]
    dumped = orjson.dumps([ready, record]).decode()
    assert not any(secret in dumped for secret in secrets)
    await session.stop("test")
    await session.stop("test")
    assert fake.session(vendor_id).status == "closed"
    assert len(fake.calls_to("/v1/streaming.stop", vendor_id)) == 1
    assert F_VENDOR_ID not in (await h.store.get(session.sid) or {})


async def test_knowledge_base_is_created_once_and_cached_in_redis(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis, tmp_path
) -> None:
    prompt = tmp_path / "prompt.md"
    prompt.write_text("You are a helpful kiosk avatar for a museum.")
    for _ in range(2):  # two drivers: two workers sharing one Redis
        h = rig(heygen_task_type="talk", heygen_kb_prompt_file=str(prompt))
        for _ in range(2):
            session = await h.open()
            await session.start()
            await session.stop("test")
    [kb_id] = fake.knowledge_bases
    assert len(fake.calls_to("/v1/streaming/knowledge_base/create")) == 1
    assert fake.knowledge_bases[kb_id]["prompt"] == prompt.read_text()
    assert [await r.get(k) for k in await r.keys(f"{KB_KEY_PREFIX}*")] == [kb_id.encode()]
    assert {c.body["knowledge_base_id"] for c in fake.calls_to("/v1/streaming.new")} == {kb_id}
    # A configured id is used as it is; `repeat` needs no knowledge base at all.
    fake.knowledge_bases["kb-configured"] = {"name": "mine", "prompt": "p"}
    for heygen, expected in (({"heygen_task_type": "talk"}, "kb-configured"), ({}, None)):
        h = rig(**heygen)
        h.vendor = h.vendor.model_copy(update={"knowledge_base_id": "kb-configured"})
        h.driver = HeyGenAvatarDriver(h.settings, h.bus, vendor=h.vendor)
        session = await h.open()
        await session.start()
        assert fake.calls_to("/v1/streaming.new")[-1].body.get("knowledge_base_id") == expected
        await session.stop("test")
    assert len(fake.calls_to("/v1/streaming/knowledge_base/create")) == 1


async def test_repeat_splits_long_text_and_speaks_it_in_order(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    h = rig(heygen_task_max_chars=300)
    fake.speech_ms_per_char = 0.2
    session = await h.open()
    await session.start()
    h.relay(session)
    await asyncio.wait_for(session.speak("r-1", LONG_TEXT), GUARD_S)
    tasks = fake.calls_to("/v1/streaming.task", h.vendor_id(session))
    assert len(tasks) > 1 and all(len(t.body["text"]) <= 300 and t.body["task_type"] == "repeat" for t in tasks)
    assert " ".join(t.body["text"] for t in tasks) == " ".join(LONG_TEXT.split())
    # Each piece was sent after the one before had been spoken: the avatar never had a queue.
    spoken = fake.session(h.vendor_id(session)).tasks
    assert all(a.end <= b.start for a, b in itertools.pairwise(spoken))
    talking = [(e["type"], e.get("interrupted")) for e in await events_of(r, session.sid) if "talking" in e["type"]]
    assert talking == [("avatar.started_talking", None), ("avatar.stopped_talking", False)]


async def test_talk_sends_what_the_user_said_once(rig: Callable[..., Rig], fake: FakeHeyGen) -> None:
    h = rig(heygen_task_type="talk")
    session = await h.open()
    await session.start()
    assert session.answers_itself
    h.relay(session)
    await asyncio.wait_for(session.speak("r-1", "A local reply. In two sentences.", user_text="What is this?"), GUARD_S)
    await asyncio.wait_for(session.speak("r-2", "No user text given: this is taken as the user's."), GUARD_S)
    tasks = fake.calls_to("/v1/streaming.task", h.vendor_id(session))
    assert [(t.body["task_type"], t.body["text"]) for t in tasks] == [
        ("talk", "What is this?"), ("talk", "No user text given: this is taken as the user's."),
    ]


async def test_speak_ends_on_the_relayed_stop_not_on_the_estimate(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    h = rig()
    fake.reported_ms_per_char = 100_000.0  # the vendor's estimate: hours; the speech itself: milliseconds
    session = await h.open()
    await session.start()
    h.relay(session)
    await asyncio.wait_for(session.speak("r-1", "Short and sweet."), GUARD_S)
    await asyncio.wait_for(session.speak("r-2", "And another one."), GUARD_S)
    talking = [(e["type"], e["reply_id"]) for e in await events_of(r, session.sid) if "talking" in e["type"]]
    assert talking == [
        ("avatar.started_talking", "r-1"), ("avatar.stopped_talking", "r-1"),
        ("avatar.started_talking", "r-2"), ("avatar.stopped_talking", "r-2"),
    ]


async def test_speak_falls_back_to_the_estimate_when_nothing_is_relayed(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    h = rig(heygen_stop_grace_s=0.05)
    session = await h.open()
    await session.start()
    await asyncio.wait_for(session.speak("r-1", "Nobody relays my events."), GUARD_S)
    talking = [(e["type"], e.get("interrupted")) for e in await events_of(r, session.sid) if "talking" in e["type"]]
    assert talking == [("avatar.started_talking", None), ("avatar.stopped_talking", False)]


async def test_interrupt_cuts_the_avatar_short(rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis) -> None:
    h = rig()
    session = await h.open()
    await session.start()
    vendor_id = h.vendor_id(session)
    await session.interrupt()  # nothing is being said: no vendor call
    assert fake.calls_to("/v1/streaming.interrupt") == []
    fake.speech_ms_per_char = 1000.0  # minutes of speech
    h.relay(session)
    speaking = asyncio.create_task(session.speak("r-1", "A very long answer that nobody wants to hear out."))
    await until(lambda: any(e["type"] == "avatar_start_talking" for e in fake.channel(vendor_id)))
    await session.interrupt()
    await asyncio.wait_for(speaking, GUARD_S)
    assert len(fake.calls_to("/v1/streaming.interrupt", vendor_id)) == 1
    assert fake.session(vendor_id).tasks[0].interrupted
    stopped = [e for e in await events_of(r, session.sid) if e["type"] == "avatar.stopped_talking"]
    assert [(e["reply_id"], e["interrupted"]) for e in stopped] == [("r-1", True)]


async def test_interrupt_while_the_task_is_on_its_way(rig: Callable[..., Rig], fake: FakeHeyGen) -> None:
    """The barge-in beats the task response: the vendor is interrupted as soon as it took the task."""
    h = rig()
    session = await h.open()
    await session.start()
    fake.speech_ms_per_char = 1000.0
    speaking = asyncio.create_task(session.speak("r-1", "First piece. Second piece."))
    await asyncio.sleep(0)  # speak is now waiting for the task response
    await session.interrupt()
    await asyncio.wait_for(speaking, GUARD_S)
    paths = [p for p in fake.paths(h.vendor_id(session)) if p != "/v1/streaming.keep_alive"]
    assert paths[-2:] == ["/v1/streaming.task", "/v1/streaming.interrupt"]


async def test_keepalive_runs_while_served_and_stops_with_the_session(
    rig: Callable[..., Rig], fake: FakeHeyGen
) -> None:
    h = rig(heygen_keepalive_s=0.05)
    fake.idle_timeout_s = 1.0  # the vendor would close an idle session fast
    session = await h.open()
    await session.start()
    vendor_id = h.vendor_id(session)
    await until(lambda: len(fake.calls_to("/v1/streaming.keep_alive", vendor_id)) >= 30)  # well past 1 s
    assert fake.session(vendor_id).status == "connected"
    await session.stop("test")
    await asyncio.sleep(SETTLE_S)
    count = len(fake.calls_to("/v1/streaming.keep_alive", vendor_id))
    await asyncio.sleep(0.3)
    assert len(fake.calls_to("/v1/streaming.keep_alive", vendor_id)) == count


async def test_handing_a_session_back_stops_keepalives_but_not_the_avatar(
    rig: Callable[..., Rig], fake: FakeHeyGen
) -> None:
    h = rig(heygen_keepalive_s=0.05)
    handed_back = asyncio.Event()
    opened: list[HeyGenAvatarSession] = []

    async def serve() -> None:  # what the worker's per-session task does, up to a hand-back
        session = await h.open()
        opened.append(session)
        await session.start()
        await handed_back.wait()

    task = asyncio.create_task(serve())
    await until(lambda: opened and opened[0].vendor and fake.calls_to("/v1/streaming.keep_alive"))
    handed_back.set()
    await task
    await asyncio.sleep(SETTLE_S)
    vendor_id = h.vendor_id(opened[0])
    count = len(fake.calls_to("/v1/streaming.keep_alive", vendor_id))
    await asyncio.sleep(0.3)
    assert len(fake.calls_to("/v1/streaming.keep_alive", vendor_id)) == count
    assert fake.session(vendor_id).status == "connected"
    assert fake.calls_to("/v1/streaming.stop") == []


async def test_a_new_owner_resumes_the_live_vendor_session(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    first = await rig().open()
    await first.start()
    first.release()  # the first worker is gone without stopping it
    vendor_id = first.vendor.vendor_id if first.vendor else ""
    second = await rig().open(first.sid, resumed=True)
    await second.start()
    assert second.vendor == first.vendor
    assert len(fake.calls_to("/v1/streaming.new")) == 1
    assert fake.paths(vendor_id)[-1] == "/v1/streaming.keep_alive"  # the probe
    ready = [e for e in await events_of(r, first.sid) if e["type"] == "session.ready"]
    assert len(ready) == 2 and ready[0]["livekit"] == ready[1]["livekit"]
    await second.stop("test")
    assert fake.open_sessions() == []


async def test_a_new_owner_replaces_a_vendor_session_that_is_gone(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    first = await rig().open()
    await first.start()
    first.release()
    old = first.vendor.vendor_id if first.vendor else ""
    fake.close(old)  # e.g. its idle timeout passed while no worker held it
    second = await rig().open(first.sid, resumed=True)
    await second.start()
    assert second.vendor is not None and second.vendor.vendor_id != old
    assert (await second.store.get(first.sid) or {})[F_VENDOR_ID] == second.vendor.vendor_id
    ready = [e for e in await events_of(r, first.sid) if e["type"] == "session.ready"]
    assert ready[-1]["livekit"]["token"] == fake.session(second.vendor.vendor_id).access_token
    assert fake.open_sessions() == [second.vendor.vendor_id]
    await second.stop("test")


async def test_when_no_replacement_can_be_had_the_error_is_clear_and_nothing_leaks(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    first = await rig().open()
    await first.start()
    first.release()
    fake.close(first.vendor.vendor_id if first.vendor else "")
    fake.max_concurrent = 0
    second = await rig().open(first.sid, resumed=True)
    with pytest.raises(AvatarError) as failed:
        await second.start()
    assert (failed.value.code, failed.value.fatal) == ("avatar_capacity", True)
    errors = [e for e in await events_of(r, first.sid) if e["type"] == "error"]
    assert errors == [{
        "type": "error", "code": "avatar_capacity", "message": "all avatars are busy, try again shortly",
        "fatal": True, "ts": errors[0]["ts"],
    }]
    assert fake.open_sessions() == []
    assert F_VENDOR_ID not in (await second.store.get(first.sid) or {})


async def test_a_failed_start_stops_the_vendor_session_it_created(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    session = await rig().open()
    fake.fail_next("/v1/streaming.start", 500)
    with pytest.raises(AvatarError) as failed:
        await session.start()
    assert failed.value.code == "avatar_unavailable"
    [created] = fake.sessions
    assert fake.session(created).status == "closed"
    assert F_VENDOR_ID not in (await session.store.get(session.sid) or {})


async def test_a_bad_api_key_is_a_clear_fatal_error(
    fake: FakeHeyGen, r: aioredis.Redis, clean_redis: str
) -> None:
    h = Rig(fake, r, clean_redis)
    h.vendor = vendor_for(fake, key="revoked-key-0000")
    h.driver = HeyGenAvatarDriver(h.settings, h.bus, vendor=h.vendor)
    session = await h.open()
    with pytest.raises(AvatarError) as failed:
        await session.start()
    assert (failed.value.code, failed.value.fatal) == ("avatar_auth", True)
    [error] = await events_of(r, session.sid)
    assert error["code"] == "avatar_auth" and "revoked-key" not in orjson.dumps(error).decode()
    assert fake.sessions == {}
    await h.aclose()


async def test_a_vendor_session_that_dies_ends_our_session(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    h = rig(heygen_keepalive_s=0.05)
    session = await h.open()
    await session.start()
    fake.close(h.vendor_id(session))
    await until(lambda: session._ending)
    record = await until_record(h.store, session.sid, lambda rec: rec.get(keys.F_STATE) == "ended")
    assert record[keys.F_ENDED_REASON] == "avatar_lost"
    assert [e["code"] for e in await events_of(r, session.sid) if e["type"] == "error"] == ["avatar_lost"]


async def until_record(store: SessionStore, sid: str, ok: Callable[[dict[str, str]], bool]) -> dict[str, str]:
    deadline = time.monotonic() + GUARD_S
    while True:
        record = await store.get(sid) or {}
        if ok(record):
            return record
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.02)


async def test_the_duration_limit_warns_the_page_then_ends_cleanly(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    fake.duration_limit_s = 2  # `session_duration_limit`: the fake closes the session then
    h = rig(heygen_keepalive_s=0.1, heygen_expiry_warning_s=1)
    session = await h.open()
    await session.start()
    vendor_id = h.vendor_id(session)
    ended = await until_event(r, session.sid, "session.ended")
    assert ended["reason"] == "avatar_time_limit"  # the real reason, not "ended unexpectedly"
    await session.stop("session_ended")
    errors = [e for e in await events_of(r, session.sid) if e["type"] == "error"]
    assert [(e["code"], e["fatal"]) for e in errors] == [("avatar_expiring", False)]
    assert fake.session(vendor_id).status == "closed"
    assert vendor_id not in await VendorLedger(r, "heygen").entries()


async def test_listening_pose_while_the_user_talks(rig: Callable[..., Rig], fake: FakeHeyGen) -> None:
    h = rig()
    session = await h.open()
    await session.start()
    vendor_id = h.vendor_id(session)
    await session.on_user_speaking(True)
    await until(lambda: fake.calls_to("/v1/streaming.start_listening", vendor_id))
    await session.on_user_speaking(False)
    await until(lambda: fake.calls_to("/v1/streaming.stop_listening", vendor_id))
    assert await session.pause() is False
    await session.stop("test")


async def until_event(r: aioredis.Redis, sid: str, kind: str) -> dict[str, Any]:
    deadline = time.monotonic() + GUARD_S
    while not (found := [e for e in await events_of(r, sid) if e["type"] == kind]):
        assert time.monotonic() < deadline, f"no {kind}"
        await asyncio.sleep(0.02)
    return found[-1]


# ---------------------------------------------------------------- reaper


async def test_reaper_stops_only_our_orphans(rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis) -> None:
    h = rig()
    ledger = VendorLedger(r, "heygen")
    live = await h.open()
    await live.start()  # ours, owned by a live session: kept
    live.release()
    foreign = fake.add_session(age_s=600)  # on the key but not started by this deployment: never stopped
    ended_sid = await h.new_sid()  # ours, owned by a session that has ended: stopped
    owned_by_ended = fake.add_session(age_s=600)
    await ledger.record(owned_by_ended, ended_sid, at=time.time() - 600)
    await h.store.set_fields(ended_sid, **{F_VENDOR_ID: owned_by_ended})
    await h.store.end(ended_sid, "deleted")
    crashed = fake.add_session(age_s=600)  # ours: recorded, then Redis lost the session hash
    await ledger.record(crashed, "no-such-session", at=time.time() - 600)
    young = fake.add_session(age_s=1)  # ours, recorded a moment ago: maybe still being started, kept
    await ledger.record(young, "no-such-session")
    reaped = await reap_once(await _reaping(h), grace_s=60, r=r)
    assert sorted(reaped) == sorted([owned_by_ended, crashed])
    assert sorted(fake.open_sessions()) == sorted([h.vendor_id(live), foreign, young])
    assert set(await ledger.entries()) == {h.vendor_id(live), young}  # what was stopped is forgotten


async def _reaping(h: Rig) -> Any:
    target = make_reaping(h.settings, h.vendor)
    assert target is not None
    h.closers.append(target.aclose)
    return target


async def test_run_reaper_passes_at_start_then_periodically(
    fake: FakeHeyGen, r: aioredis.Redis, clean_redis: str
) -> None:
    settings = settings_for(fake, clean_redis)
    target = make_reaping(settings, vendor_for(fake, reaper_interval_s=0.1, reaper_grace_s=0.0))
    ledger = VendorLedger(r, "heygen")
    stop = asyncio.Event()
    early = fake.add_session(age_s=600)
    await ledger.record(early, "gone-session", at=time.time() - 600)
    foreign = fake.add_session(age_s=600)
    reaper = asyncio.create_task(run_reaper(r, settings, stop, target=target))
    await until(lambda: fake.session(early).status == "closed")
    late = fake.add_session()
    await ledger.record(late, "gone-session")
    await until(lambda: fake.session(late).status == "closed")
    assert fake.session(foreign).status != "closed"
    stop.set()
    await asyncio.wait_for(reaper, GUARD_S)


# ---------------------------------------------------------------- the whole stack


class Page:
    """What `frontend/` does for a cloud avatar: join the room `session.ready` names and relay its
    data-channel events up the browser socket (`{"type": "avatar.event", "event": …, …data}`)."""

    def __init__(self, browser: Browser, fake: FakeHeyGen) -> None:
        self.browser = browser
        self.fake = fake
        self._task: asyncio.Task[None] | None = None

    def vendor_id(self) -> str | None:
        ready = self.browser.of_type("session.ready")
        return self.fake.by_access_token(ready[-1]["livekit"]["token"]) if ready else None

    async def _run(self) -> None:
        relayed: dict[str, int] = {}
        while True:
            vendor_id = self.vendor_id()
            if vendor_id is not None:
                events = self.fake.channel(vendor_id)
                for event in events[relayed.get(vendor_id, 0):]:
                    data = {k: v for k, v in event.items() if k != "type"}
                    await self.browser.send_json({"type": "avatar.event", "event": event["type"], **data})
                relayed[vendor_id] = len(events)
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Page:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


class StackRun:
    """A stack with its fake, and every event any test browser saw (for the secrets check)."""

    def __init__(self, stack: Stack, fake: FakeHeyGen) -> None:
        self.stack = stack
        self.fake = fake
        self.browsers: list[Browser] = []

    async def browser(self) -> Browser:
        browser = Browser(await create_session(self.stack.base_url))
        self.browsers.append(browser)
        await browser.connect()
        return browser

    def owner(self, sid: str) -> str:
        raw = self.stack.redis().hget(keys.session(sid), keys.F_AVATAR_OWNER)
        return raw.decode() if raw else ""

    def owner_process(self, sid: str) -> str:
        pid = int(self.owner(sid).split("-")[-2])
        [name] = [n for n, p in self.stack.procs.items() if p.pid == pid and p.poll() is None]
        return name

    def vendor_id(self, sid: str) -> str:
        return self.stack.redis().hget(keys.session(sid), F_VENDOR_ID).decode()

    async def delete(self, browser: Browser) -> None:
        s = browser.session
        async with httpx.AsyncClient(base_url=self.stack.base_url) as http:
            resp = await http.delete(f"/v1/sessions/{s.session_id}", headers={"Authorization": f"Bearer {s.token}"})
        assert resp.status_code == 204

    def assert_no_secrets(self) -> None:
        """The API key and HeyGen session tokens are in no event and no log line of any process."""
        secrets = [KEY, *self.fake.issued_tokens]
        assert len(secrets) > 1
        events = orjson.dumps([e for b in self.browsers for e in b.events]).decode()
        for secret in secrets:
            assert secret not in events
        for name, path in self.stack.logs.items():
            text = path.read_text(errors="replace")
            for secret in secrets:
                assert secret not in text, f"a secret is in the log of {name}"


def heygen_stack(redis_url: str, fake: FakeHeyGen, **env: str) -> Iterator[StackRun]:
    stack = start_stack(redis_url, **fake.stack_env(**env))
    try:
        yield StackRun(stack, fake)
    finally:
        stack.stop_all()


def non_keepalive(fake: FakeHeyGen, vendor_id: str) -> list[str]:
    return [p.removeprefix("/v1/streaming.") for p in fake.paths(vendor_id) if p != "/v1/streaming.keep_alive"]


def replies_said(fake: FakeHeyGen, vendor_id: str) -> list[str]:
    return [c.body["text"] for c in fake.calls_to("/v1/streaming.task", vendor_id)]


@pytest.fixture(scope="class")
def conversation(redis_url: str) -> Iterator[StackRun]:
    with FakeHeyGen(api_key=KEY, speech_ms_per_char=SPEECH_MS) as fake:
        yield from heygen_stack(
            redis_url, fake, HEYGEN_TASK_TYPE="repeat", HEYGEN_KEEPALIVE_S="0.3", SESSION_GRACE_S="1",
        )


@pytest.fixture(scope="class")
def takeover(redis_url: str) -> Iterator[StackRun]:
    with FakeHeyGen(api_key=KEY, speech_ms_per_char=SPEECH_MS) as fake:
        yield from heygen_stack(
            redis_url, fake, HEYGEN_KEEPALIVE_S="0.5", HEYGEN_REAPER_INTERVAL_S="0.5", HEYGEN_REAPER_GRACE_S="5",
        )


@pytest.mark.slow
class TestConversation:
    """`repeat` mode, so what the avatar is asked to say is exactly the reply the page shows."""

    @pytest.fixture
    def run(self, conversation: StackRun) -> StackRun:
        return conversation

    async def test_three_turns_with_a_barge_in_then_delete(self, run: StackRun) -> None:
        fake = run.fake
        first_call = len(fake.calls)
        fake.reported_ms_per_char = 100_000.0  # only relayed events can end a reply in time
        try:
            browser = await run.browser()
            async with Page(browser, fake) as page:
                ready = await browser.wait_type("session.ready")
                vendor_id = page.vendor_id()
                assert vendor_id is not None and ready["provider"] == "heygen"
                assert ready["livekit"] == {"url": fake.livekit_url, "token": fake.session(vendor_id).access_token}

                def talking(kind: str, seen: int) -> Callable[[dict[str, Any]], bool]:
                    return lambda _: len(browser.of_type(f"avatar.{kind}_talking")) > seen

                await browser.send_json({"type": "text", "text": "What is avatar stack?"})
                await browser.wait_for(talking("stopped", 0))
                fake.speech_ms_per_char = 1000.0  # a reply of minutes, to be cut short
                await browser.send_json({"type": "text", "text": "How do I scale avatar stack?"})
                await browser.wait_for(talking("started", 1))
                await browser.send_json({"type": "interrupt"})
                await browser.wait_for(talking("stopped", 1))
                fake.speech_ms_per_char = SPEECH_MS
                await browser.send_json({"type": "text", "text": "Which providers does avatar-stack support?"})
                await browser.wait_for(talking("stopped", 2))
                started = browser.of_type("avatar.started_talking")
                stopped = browser.of_type("avatar.stopped_talking")
                assert [e["reply_id"] for e in started] == [e["reply_id"] for e in stopped]
                assert [e["interrupted"] for e in stopped] == [False, True, False]
                await until(lambda: len(fake.calls_to("/v1/streaming.keep_alive", vendor_id)) >= 3)
        finally:
            fake.reported_ms_per_char = None
            fake.speech_ms_per_char = SPEECH_MS

        replies = [e["text"] for e in browser.of_type("avatar.reply")]
        assert len(replies) == 3
        assert " ".join(replies_said(fake, vendor_id)) == " ".join(replies)  # in order, once each
        assert {c.body["task_type"] for c in fake.calls_to("/v1/streaming.task", vendor_id)} == {"repeat"}
        assert non_keepalive(fake, vendor_id) == ["new", "start", "task", "task", "interrupt", "task"]

        await run.delete(browser)
        await browser.wait_type("session.ended")
        await until(lambda: fake.session(vendor_id).status == "closed")
        assert non_keepalive(fake, vendor_id)[-1] == "stop"
        assert fake.session(vendor_id).closed_reason == "stopped"
        await asyncio.sleep(SETTLE_S)
        keepalives = len(fake.calls_to("/v1/streaming.keep_alive", vendor_id))
        await asyncio.sleep(1.0)  # three keep-alive intervals
        assert len(fake.calls_to("/v1/streaming.keep_alive", vendor_id)) == keepalives
        log = [f"{c.method} {c.path} {c.body.get('task_type', '')}".rstrip() for c in fake.calls[first_call:]]
        print("\nHeyGen calls of the session:\n" + "\n".join(log))
        await browser.close()

    @pytest.mark.skipif(not speech_available(), reason="needs espeak-ng and sox")
    async def test_the_user_speaking_over_the_avatar_interrupts_it(self, run: StackRun) -> None:
        fake = run.fake
        browser = await run.browser()
        async with Page(browser, fake) as page:
            await browser.wait_type("session.ready")
            fake.speech_ms_per_char = 1000.0
            try:
                await browser.send_json({"type": "text", "text": "What is avatar stack?"})
                await browser.wait_type("avatar.started_talking")
                await browser.stream(speech_pcm("Wait, stop please."), trailing_silence_s=0.5)
                stopped = await browser.wait_type("avatar.stopped_talking")
            finally:
                fake.speech_ms_per_char = SPEECH_MS
            assert stopped["interrupted"] is True
            assert "interrupt" in non_keepalive(fake, page.vendor_id() or "")
        await run.delete(browser)
        await browser.close()

    async def test_keepalives_hold_off_the_vendor_idle_timeout(self, run: StackRun) -> None:
        fake = run.fake
        browser = await run.browser()
        async with Page(browser, fake) as page:
            await browser.wait_type("session.ready")
            vendor_id = page.vendor_id() or ""
            fake.idle_timeout_s = 1.0
            try:
                await until(lambda: len(fake.calls_to("/v1/streaming.keep_alive", vendor_id)) >= 10)  # ~3 s
                assert fake.session(vendor_id).status == "connected"
                await browser.send_json({"type": "text", "text": "Who are you?"})
                stopped = await browser.wait_type("avatar.stopped_talking")
            finally:
                fake.idle_timeout_s = None
            assert stopped["interrupted"] is False and browser.of_type("error") == []
        await run.delete(browser)
        await browser.close()

    async def test_a_page_that_relays_nothing_still_gets_answers(self, run: StackRun) -> None:
        browser = await run.browser()
        await browser.wait_type("session.ready")
        run.fake.speech_ms_per_char = 1.0
        try:
            # One after the other: a turn typed while the avatar talks would interrupt it (by design).
            for n, text in enumerate(("Who are you?", "What can you do?"), start=1):
                await browser.send_json({"type": "text", "text": text})
                await browser.wait_for(lambda _, n=n: len(browser.of_type("avatar.stopped_talking")) == n)
        finally:
            run.fake.speech_ms_per_char = SPEECH_MS
        assert [e["interrupted"] for e in browser.of_type("avatar.stopped_talking")] == [False, False]
        await run.delete(browser)
        await browser.close()

    async def test_leaving_the_page_stops_the_avatar_after_the_grace_period(self, run: StackRun) -> None:
        browser = await run.browser()
        await browser.wait_type("session.ready")
        vendor_id = run.vendor_id(browser.session.session_id)
        await browser.close()
        await until(lambda: run.fake.session(vendor_id).status == "closed")
        assert run.fake.session(vendor_id).closed_reason == "stopped"
        assert non_keepalive(run.fake, vendor_id)[-1] == "stop"

    async def test_all_avatars_busy_is_a_clear_error_not_a_retry_loop(self, run: StackRun) -> None:
        fake = run.fake
        news = len(fake.calls_to("/v1/streaming.new"))
        fake.max_concurrent = len(fake.open_sessions())
        try:
            browser = await run.browser()
            error = await browser.wait_type("error")
            await browser.wait_type("session.ended")
        finally:
            fake.max_concurrent = 100
        assert (error["code"], error["message"], error["fatal"]) == (
            "avatar_capacity", "all avatars are busy, try again shortly", True,
        )
        await asyncio.sleep(1.0)
        assert [c.status for c in fake.calls_to("/v1/streaming.new")[news:]] == [400]
        await browser.close()

    async def test_a_rejected_api_key_is_a_clear_error(self, run: StackRun) -> None:
        fake = run.fake
        fake.api_key = "the-key-was-rotated"
        try:
            browser = await run.browser()
            error = await browser.wait_type("error")
            await browser.wait_type("session.ended")
        finally:
            fake.api_key = KEY
        assert (error["code"], error["fatal"]) == ("avatar_auth", True)
        await browser.close()

    def test_no_secret_in_any_event_or_log(self, run: StackRun) -> None:
        run.assert_no_secrets()


def reaper_wired() -> bool:
    """The worker runs `run_reaper` once `avatar_service/main.py` starts it (see the reaper's docstring)."""
    return "run_reaper" in (ROOT / "avatar_service" / "main.py").read_text()


@pytest.mark.slow
class TestTakeover:
    """`talk` mode (the default), several avatar workers, and workers that stop or die mid-session."""

    @pytest.fixture
    def run(self, takeover: StackRun) -> StackRun:
        return takeover

    async def talk(self, browser: Browser, text: str) -> dict[str, Any]:
        before = len(browser.of_type("avatar.stopped_talking"))
        await browser.send_json({"type": "text", "text": text})
        return await browser.wait_for(
            lambda e: e["type"] == "avatar.stopped_talking" and len(browser.of_type("avatar.stopped_talking")) > before
        )

    def spare(self, run: StackRun) -> None:
        live = sum(1 for n, p in run.stack.procs.items() if n.startswith("avatar") and p.poll() is None)
        run.stack.start("avatar-worker")
        run.stack.wait_workers("avatar", live + 1)

    async def test_sigterm_hands_the_session_back_and_another_worker_resumes_it(self, run: StackRun) -> None:
        fake = run.fake
        browser = await run.browser()
        async with Page(browser, fake):
            first = await browser.wait_type("session.ready")
            sid = browser.session.session_id
            vendor_id = run.vendor_id(sid)
            await self.talk(browser, "What is avatar stack?")
            [kb_id] = fake.knowledge_bases  # talk mode: made from the bundled file on first use
            new = fake.calls_to("/v1/streaming.new", vendor_id)
            assert [c.body["knowledge_base_id"] for c in new] == [kb_id]
            assert fake.calls_to("/v1/streaming.task", vendor_id)[0].body["task_type"] == "talk"

            self.spare(run)
            owner = run.owner(sid)
            run.stack.kill(run.owner_process(sid), signal.SIGTERM)  # a graceful shutdown: hand-back
            await browser.wait_for(lambda e: e["type"] == "session.ready" and e is not first)
            assert run.owner(sid) not in ("", owner)
            assert browser.of_type("session.ready")[-1]["livekit"] == first["livekit"]  # the same room
            keepalives = len(fake.calls_to("/v1/streaming.keep_alive", vendor_id))
            await until(lambda: len(fake.calls_to("/v1/streaming.keep_alive", vendor_id)) > keepalives + 2)
            await self.talk(browser, "How do I scale it?")
            assert fake.session(vendor_id).status == "connected"
            assert non_keepalive(fake, vendor_id) == ["new", "start", "task", "task"]  # no second session, no stop
            assert browser.of_type("error") == []
        await run.delete(browser)
        await until(lambda: fake.session(vendor_id).status == "closed")
        await browser.close()

    async def test_kill_9_the_survivor_resumes_the_vendor_session(self, run: StackRun) -> None:
        fake = run.fake
        self.spare(run)
        browser = await run.browser()
        async with Page(browser, fake):
            first = await browser.wait_type("session.ready")
            sid = browser.session.session_id
            vendor_id = run.vendor_id(sid)
            news = len(fake.calls_to("/v1/streaming.new"))
            run.stack.kill(run.owner_process(sid))  # kill -9: no hand-back, the lease runs out
            await browser.wait_for(lambda e: e["type"] == "session.ready" and e is not first)
            assert browser.of_type("session.ready")[-1]["livekit"] == first["livekit"]
            await self.talk(browser, "Who are you?")
            assert len(fake.calls_to("/v1/streaming.new")) == news
            assert fake.session(vendor_id).status == "connected"
        await run.delete(browser)
        await until(lambda: fake.session(vendor_id).status == "closed")
        await browser.close()

    async def test_kill_9_with_the_vendor_session_gone_the_survivor_replaces_it(self, run: StackRun) -> None:
        fake = run.fake
        self.spare(run)
        browser = await run.browser()
        async with Page(browser, fake) as page:
            first = await browser.wait_type("session.ready")
            sid = browser.session.session_id
            old = run.vendor_id(sid)
            run.stack.kill(run.owner_process(sid))
            fake.close(old)  # the vendor ended it meanwhile
            await browser.wait_for(lambda e: e["type"] == "session.ready" and e is not first)
            new = page.vendor_id()
            assert new not in (None, old) and run.vendor_id(sid) == new
            await self.talk(browser, "What can you do?")
            assert {old, new} & set(fake.open_sessions()) == {new}
        await run.delete(browser)
        await until(lambda: fake.session(new or "").status == "closed")
        await browser.close()

    @pytest.mark.skipif(not reaper_wired(), reason="avatar_service/main.py does not start run_reaper yet")
    async def test_the_worker_reaps_orphaned_vendor_sessions(self, run: StackRun) -> None:
        fake = run.fake
        browser = await run.browser()
        await browser.wait_type("session.ready")
        mine = run.vendor_id(browser.session.session_id)
        orphan = fake.add_session(age_s=600)  # ours: recorded by a worker that died, no live session owns it
        run.stack.redis().hset(keys.vendor_sessions("heygen"), orphan, orjson.dumps({"sid": "gone", "at": 0}))
        foreign = fake.add_session(age_s=600)  # another app's session on the same key
        await until(lambda: fake.session(orphan).status == "closed")
        assert fake.session(mine).status == "connected"  # owned by a live session: never reaped
        assert fake.session(foreign).status != "closed"  # not ours: never reaped
        await run.delete(browser)
        await browser.close()

    def test_no_secret_in_any_event_or_log(self, run: StackRun) -> None:
        run.assert_no_secrets()


async def test_the_calls_of_three_turns_with_a_barge_in_and_a_vendor_side_expiry(
    rig: Callable[..., Rig], fake: FakeHeyGen, r: aioredis.Redis
) -> None:
    fake.duration_limit_s = 4
    h = rig(heygen_keepalive_s=0.3, heygen_expiry_warning_s=1)
    session = await h.open()
    await session.start()
    vid = h.vendor_id(session)
    h.relay(session)
    await session.speak("r-1", "Hello there.")
    speaking = asyncio.create_task(session.speak("r-2", LONG_TEXT[:800]))
    await until(lambda: fake.calls_to("/v1/streaming.task", vid)[1:])
    await session.on_user_speaking(True)
    await session.interrupt()
    await asyncio.wait_for(speaking, GUARD_S)
    await session.on_user_speaking(False)
    await session.speak("r-3", "Anything else?")
    ended = await until_event(r, session.sid, "session.ended")  # the duration limit
    await session.stop("session_ended")
    calls = [c.path.removeprefix("/v1/") for c in fake.calls if c.session_id == vid or "token" in c.path]
    compact = [p for i, p in enumerate(calls) if i == 0 or p != calls[i - 1] or p != "streaming.keep_alive"]
    print("\nHeyGen calls:", compact, "\nended:", ended["reason"])
    assert ended["reason"] == "avatar_time_limit"
    assert compact[:3] == ["streaming.create_token", "streaming.new", "streaming.start"]
    assert "streaming.interrupt" in compact and compact.count("streaming.task") == 3
    assert {"streaming.start_listening", "streaming.stop_listening"} <= set(compact)  # fire-and-forget calls
    assert compact[-1] == "streaming.stop"
