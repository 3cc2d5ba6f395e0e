"""The cloud-avatar lifecycle (`providers/cloud.py`) with LiveAvatar's adapter, in this process (and
one test through the whole stack).

Real Redis, the LiveAvatar fake on loopback (written from the vendor's contract: an account-wide,
paged session list; duration limits that close the socket; the state/buffer event stream), and a
tiny tone generator instead of piper. Waits have hang guards only; nothing asserts on speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import redis.asyncio as aioredis

from avatar_service.providers.cloud import CloudSettings, EndReason, VendorLedger
from avatar_service.providers.liveavatar import (
    LiveAvatarClient,
    LiveAvatarDriver,
    LiveAvatarError,
    LiveAvatarSession,
    LiveAvatarSettings,
    make_reaping,
)
from avatar_service.reaper import reap_once
from common import keys
from common.bus import Bus, connect_url
from common.models import SessionConfig
from common.pcm import StreamResampler
from common.sessions import SessionStore
from common.settings import Settings
from tests.client import Browser, create_session
from tests.conftest import start_stack
from tests.fakes.liveavatar import SANDBOX_AVATAR, FakeLiveAvatar
from tests.fakes.llm import FakeLlm

KEY = "la-test-key-lifecycle-41c2"
LLM_KEY = "sk-llm-lifecycle-5d0e"
GUARD_S = 20.0
TTS_RATE = 22_050


class ToneTts:
    """Stands in for piper: 60 ms of tone per word, in 20 ms chunks."""

    sample_rate = TTS_RATE

    async def stream(self, text: str, *, chunk_ms: int = 20) -> AsyncIterator[bytes]:
        n = TTS_RATE * 60 // 1000 * max(1, len(text.split()))
        tone = (np.sin(np.arange(n) * 2 * np.pi * 220 / TTS_RATE) * 8000).astype("<i2").tobytes()
        step = TTS_RATE * chunk_ms // 1000 * 2
        for i in range(0, len(tone), step):
            yield tone[i:i + step]
            await asyncio.sleep(0)


async def until(condition: Callable[[], Any], guard_s: float = GUARD_S) -> Any:
    deadline = time.monotonic() + guard_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)
    return value


@pytest.fixture
def fake() -> Iterator[FakeLiveAvatar]:
    with FakeLiveAvatar(api_key=KEY, sandbox_limit_s=600) as f:
        yield f


@pytest.fixture
async def r(clean_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_url(clean_redis)
    yield client
    await client.aclose()


class Rig:
    def __init__(self, fake: FakeLiveAvatar, r: aioredis.Redis, redis_url: str, cloud: CloudSettings | None = None,
                 **extra: Any) -> None:
        self.fake = fake
        self.r = r
        self.settings = Settings(_env_file=None, redis_url=redis_url, avatar_provider="liveavatar",
                                 stt_provider="local")
        self.vendor = LiveAvatarSettings(_env_file=None, api_key=KEY, server_url=fake.url, avatar_id=SANDBOX_AVATAR,
                                         **{k.removeprefix("liveavatar_"): v for k, v in extra.items()})
        self.bus = Bus(r, self.settings)
        self.store = SessionStore(r, self.bus)
        self.driver = LiveAvatarDriver(self.settings, self.bus, tts=ToneTts(), vendor=self.vendor,  # type: ignore
                                       cloud=cloud or CloudSettings(_env_file=None))

    async def session(self) -> LiveAvatarSession:
        sid, _ = await self.store.create(SessionConfig())
        session = await self.driver.open(sid, SessionConfig(), resumed=False)
        await session.start()
        return session

    async def events(self, sid: str) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"e"]) for _, f in await self.r.xrange(keys.events(sid))]

    async def wait_event(self, sid: str, kind: str) -> dict[str, Any]:
        deadline = time.monotonic() + GUARD_S
        while True:
            found = [e for e in await self.events(sid) if e["type"] == kind]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no {kind}"
            await asyncio.sleep(0.02)


@pytest.fixture
async def rig(fake: FakeLiveAvatar, r: aioredis.Redis, clean_redis: str) -> AsyncIterator[Callable[..., Rig]]:
    made: list[Rig] = []

    def make(**extra: Any) -> Rig:
        made.append(Rig(fake, r, clean_redis, **extra))
        return made[-1]

    yield make
    for one in made:
        await one.driver.aclose()


# ---------------------------------------------------------------- ownership


async def test_reaper_reads_every_page_and_stops_only_our_orphans(
    rig: Callable[..., Rig], fake: FakeLiveAvatar, r: aioredis.Redis
) -> None:
    h = rig(liveavatar_reaper_grace_s=60)
    live = await h.session()  # ours, live: kept
    ledger = VendorLedger(r, "liveavatar")
    foreign = [fake.add_session(age_s=900 + i, source=src) for i, src in
               enumerate(["DEMO", "APP", "EMBED"] * 5)]  # the customer's other apps
    foreign += [fake.add_session(age_s=900 + i, source="API") for i in range(8)]  # another deployment's
    orphans = []
    for i in range(3):  # ours: recorded by workers that died; their sessions ended or vanished
        vid = fake.add_session(age_s=800 - i)
        sid, _ = await h.store.create(SessionConfig())
        await h.store.set_fields(sid, **{"liveavatar_session_id": vid})
        await h.store.end(sid, "deleted")
        await ledger.record(vid, sid, at=time.time() - 800)
        orphans.append(vid)
    crashed = fake.add_session(age_s=700)
    await ledger.record(crashed, "lost-with-redis", at=time.time() - 700)
    young = fake.add_session(age_s=1)  # ours, recorded a moment ago: maybe still starting
    await ledger.record(young, "starting-session")
    assert len(fake.active()) > 20  # more than one page of 20
    target = make_reaping(h.settings, h.vendor)
    assert target is not None
    try:
        reaped = await reap_once(target, r=r)
    finally:
        await target.aclose()
    assert sorted(reaped) == sorted([*orphans, crashed])
    assert all(fake.sessions[v].status == "started" for v in foreign)  # nothing foreign stopped
    assert fake.sessions[live.vendor.vendor_id].status == "started"  # type: ignore[union-attr]
    assert fake.sessions[young].status == "started"
    assert {fake.sessions[v].stop_reason for v in reaped} == {"ZOMBIE_SESSION_REAP"}
    assert set(await ledger.entries()) == {live.vendor.vendor_id, young}  # type: ignore[union-attr]
    lists = [c for c in fake.calls if c.path == "/v1/sessions" and c.method == "GET"]
    assert lists  # paged: our client asked for pages until `next` ran out
    await live.stop("test")


async def test_stop_removes_the_ledger_entry_and_the_hash_fields(rig: Callable[..., Rig], r: aioredis.Redis) -> None:
    h = rig()
    session = await h.session()
    vid = session.vendor.vendor_id  # type: ignore[union-attr]
    assert vid in await VendorLedger(r, "liveavatar").entries()  # recorded at start
    await h.store.end(session.sid, "browser_left")
    await session.stop("session_ended")
    assert vid not in await VendorLedger(r, "liveavatar").entries()
    assert h.fake.sessions[vid].stop_reason == "USER_DISCONNECTED"
    assert "liveavatar_session_id" not in (await h.store.get(session.sid) or {})


# ---------------------------------------------------------------- vendor limits


async def test_the_duration_limit_warns_the_page_then_ends_cleanly(rig: Callable[..., Rig]) -> None:
    h = rig(liveavatar_max_session_s=2, liveavatar_expiry_warning_s=1)
    session = await h.session()
    warning = await h.wait_event(session.sid, "error")
    assert warning["code"] == "avatar_expiring" and warning["fatal"] is False
    ended = await h.wait_event(session.sid, "session.ended")
    assert ended["reason"] == "avatar_time_limit"
    await session.stop("session_ended")
    codes = [e["code"] for e in await h.events(session.sid) if e["type"] == "error"]
    assert codes == ["avatar_expiring"]  # no avatar_lost: an expected end
    assert h.fake.sessions[session.vendor.vendor_id].stop_reason == "MAX_DURATION_REACHED"  # type: ignore[union-attr]
    assert len(h.fake.sessions) == 1  # no reconnect storm, no second session


@pytest.mark.parametrize(("sandbox", "reason"), [(False, "avatar_closed"), (True, "avatar_sandbox_expired")])
async def test_a_vendor_side_close_is_an_expected_end_with_its_reason(
    rig: Callable[..., Rig], sandbox: bool, reason: str
) -> None:
    h = rig(liveavatar_sandbox=sandbox)
    session = await h.session()
    vid = session.vendor.vendor_id  # type: ignore[union-attr]
    await until(lambda: h.fake.sessions[vid].ws is not None)
    h.fake.expire(vid, "NO_CREDITS" if not sandbox else "MAX_DURATION_REACHED")
    ended = await h.wait_event(session.sid, "session.ended")
    assert ended["reason"] == reason
    assert not [e for e in await h.events(session.sid) if e["type"] == "error"]
    await session.stop("session_ended")
    assert h.fake.sessions[vid].sockets == 1  # it did not reconnect to a closed session


async def test_rollover_moves_the_page_to_a_fresh_session_without_losing_a_turn(
    rig: Callable[..., Rig], fake: FakeLiveAvatar, r: aioredis.Redis
) -> None:
    # limit 8 s, lead 5 s: the fresh session is started at ~3 s, while the reply below still plays
    h = rig(cloud=CloudSettings(_env_file=None, rollover=True, rollover_lead_s=5), liveavatar_max_session_s=8)
    session = await h.session()
    first = session.vendor.vendor_id  # type: ignore[union-attr]
    reply = " ".join(f"word{i}" for i in range(80))  # ≈ 4.8 s of speech
    said = await asyncio.wait_for(session.speak("r-1", reply), GUARD_S)
    assert said == reply  # the reply in flight was not cut
    await until(lambda: session.vendor.vendor_id != first)  # type: ignore[union-attr]
    second = session.vendor.vendor_id  # type: ignore[union-attr]
    await until(lambda: fake.sessions[first].status == "closed")
    readies = [e for e in await h.events(session.sid) if e["type"] == "session.ready"]
    assert [x["livekit"]["token"] for x in readies] == ["lk-client-" + first, "lk-client-" + second]
    assert await asyncio.wait_for(session.speak("r-2", "Still here."), GUARD_S) == "Still here."
    assert fake.sessions[second].of_type("agent.speak_end")  # the next turn went to the fresh session
    assert fake.sessions[first].of_type("agent.speak_end")  # the first one was spoken to its end
    assert not [e for e in await h.events(session.sid) if e["type"] in ("error", "session.ended")]
    assert set(await VendorLedger(r, "liveavatar").entries()) == {second}
    assert (await h.store.get(session.sid) or {})["liveavatar_session_id"] == second
    await session.stop("test")
    assert fake.sessions[second].status == "closed"


# ---------------------------------------------------------------- talking state, barge-in, listening


@pytest.mark.parametrize(("speak_events", "state_events"), [(False, True), (True, False)])
async def test_talking_state_comes_from_either_event_stream(
    rig: Callable[..., Rig], fake: FakeLiveAvatar, speak_events: bool, state_events: bool
) -> None:
    fake.speak_events, fake.state_events = speak_events, state_events
    # A huge grace makes the "no end event" fallback slower than the guard: only a real end ends it.
    h = rig(liveavatar_stop_grace_s=60, liveavatar_connect_timeout_s=5)
    session = await h.session()
    said = await asyncio.wait_for(session.speak("r-1", "Hello there. How are you today?"), GUARD_S)
    assert said == "Hello there. How are you today?"
    kinds = [e["type"] for e in await h.events(session.sid)]
    assert kinds.count("avatar.started_talking") == 1 and kinds.count("avatar.stopped_talking") == 1
    await session.stop("test")


async def test_interrupt_is_acknowledged_by_audio_buffer_cleared(rig: Callable[..., Rig], fake: FakeLiveAvatar) -> None:
    h = rig()
    session = await h.session()
    vid = session.vendor.vendor_id  # type: ignore[union-attr]
    long_text = " ".join(f"Sentence number {i} goes on for a while." for i in range(40))
    speaking = asyncio.create_task(session.speak("r-1", long_text))
    await h.wait_event(session.sid, "avatar.started_talking")
    await session.interrupt()
    said = await asyncio.wait_for(speaking, GUARD_S)
    assert len(said) < len(long_text)
    vendor = fake.sessions[vid]
    # The driver waits CLEAR_ACK_TIMEOUT_S for the ack; on a loaded box the fake (on this same loop)
    # may record it a moment later.
    [interrupt] = await until(lambda: vendor.of_type("agent.interrupt"))
    cleared = await until(lambda: vendor.events("agent.audio_buffer_cleared"))
    assert [c["source_event_id"] for c in cleared] == [interrupt.event_id]
    assert session._cleared.is_set()
    # the next reply is heard in full
    assert await asyncio.wait_for(session.speak("r-2", "Yes?"), GUARD_S) == "Yes?"
    await session.stop("test")


async def test_the_listening_pose_follows_the_user(rig: Callable[..., Rig], fake: FakeLiveAvatar) -> None:
    h = rig()
    session = await h.session()
    vendor = fake.sessions[session.vendor.vendor_id]  # type: ignore[union-attr]
    await session.on_user_speaking(True)
    await session.on_user_speaking(True)  # once per change
    await until(lambda: vendor.of_type("agent.start_listening"))
    await session.on_user_speaking(False)
    await until(lambda: vendor.of_type("agent.stop_listening"))
    assert [r.type for r in vendor.received if "listening" in r.type] == ["agent.start_listening",
                                                                           "agent.stop_listening"]
    states = [e["new_state"] for e in vendor.events("agent.state_updated")]
    assert states[-2:] == ["listening", "idle"]
    assert await session.pause() is False
    await session.resume()
    await session.stop("test")


async def test_h264_by_default_and_the_start_response_is_read_strictly(
    rig: Callable[..., Rig], fake: FakeLiveAvatar
) -> None:
    h = rig()
    session = await h.session()
    vendor = fake.sessions[session.vendor.vendor_id]  # type: ignore[union-attr]
    assert vendor.request["video_settings"]["encoding"] == "H264"
    await session.stop("test")
    client = LiveAvatarClient(fake.url, KEY)
    try:
        _vid, token = await client.create_token({"mode": "FULL", "avatar_id": SANDBOX_AVATAR})
        with pytest.raises(LiveAvatarError, match="ws_url"):  # FULL has none: never the string "None"
            await client.start(token)
    finally:
        await client.aclose()


# ---------------------------------------------------------------- pieces


def test_streaming_resampler_leaves_no_seams_at_chunk_edges() -> None:
    tone = (np.sin(np.arange(TTS_RATE) * 2 * np.pi * 440 / TTS_RATE) * 10000).astype("<i2")
    whole = StreamResampler(TTS_RATE, 24_000)
    reference = np.frombuffer(whole.push(tone.tobytes()) + whole.flush(), dtype="<i2").astype(float)
    streamed = StreamResampler(TTS_RATE, 24_000)
    pieces = b"".join(streamed.push(tone[i:i + 441].tobytes()) for i in range(0, len(tone), 441)) + streamed.flush()
    got = np.frombuffer(pieces, dtype="<i2").astype(float)
    assert abs(len(got) - len(reference)) <= 2
    n = min(len(got), len(reference))
    assert np.max(np.abs(got[:n] - reference[:n])) < 60  # the same signal, no restart at 441-sample edges


def test_end_reasons_are_one_set_from_the_stored_reason() -> None:
    assert EndReason.of_session("deleted") is EndReason.USER_ENDED
    assert EndReason.of_session("browser_left") is EndReason.BROWSER_LEFT
    assert EndReason.of_session("avatar_time_limit") is EndReason.TIME_LIMIT
    assert EndReason.of_session("stt_auth") is EndReason.ERROR
    assert EndReason.TIME_LIMIT.expected and not EndReason.LOST.expected


# ---------------------------------------------------------------- every vendor call of one session


async def test_the_calls_of_three_turns_with_a_barge_in_and_a_vendor_side_expiry(
    rig: Callable[..., Rig], fake: FakeLiveAvatar
) -> None:
    h = rig(liveavatar_keepalive_s=0.3)
    session = await h.session()
    vid = session.vendor.vendor_id  # type: ignore[union-attr]
    vendor = fake.sessions[vid]
    assert await session.speak("r-1", "Hello there.") == "Hello there."
    long_text = " ".join(f"Sentence {i} of a long answer." for i in range(30))
    speaking = asyncio.create_task(session.speak("r-2", long_text))
    await until(lambda: vendor.of_type("agent.speak")[1:] and vendor.events("agent.state_updated")[2:])
    await session.on_user_speaking(True)  # the user talks over the avatar: listening pose, barge-in
    await session.interrupt()
    await asyncio.wait_for(speaking, GUARD_S)
    await session.on_user_speaking(False)
    assert await session.speak("r-3", "Anything else?") == "Anything else?"
    await until(lambda: vendor.of_type("session.keep_alive"))
    fake.expire(vid)  # the vendor's duration limit
    ended = await h.wait_event(session.sid, "session.ended")
    await session.stop("session_ended")  # what the worker does once the session ended
    rest = [f"{c.method} {c.path}" for c in fake.calls if c.session_id == vid or c.path == "/v1/sessions/token"]
    socket: list[str] = []
    for r in vendor.received:
        if not socket or socket[-1] != r.type or r.type != "agent.speak":
            socket.append(r.type)
    print("\nREST:", rest, "\nWS commands:", socket, "\nWS events:",
          list(dict.fromkeys(e["type"] for e in vendor.sent)), "\nended:", ended["reason"])
    assert rest == ["POST /v1/sessions/token", "POST /v1/sessions/start", "POST /v1/sessions/stop"]
    assert ended["reason"] == "avatar_closed"  # fake.expire without a known limit: the vendor's own end
    assert socket[:2] == ["agent.speak", "agent.speak_end"] and "agent.interrupt" in socket
    assert socket.index("agent.start_listening") < socket.index("agent.interrupt") < socket.index(
        "agent.stop_listening")


# ---------------------------------------------------------------- through the whole stack
@pytest.mark.slow
async def test_the_vendors_time_limit_is_an_expected_end_through_the_whole_stack(redis_url: str) -> None:
    """A short `max_session_duration`: the page is warned, then the session ends with the real
    reason; the worker neither reconnects to the closed session nor reports `avatar_lost`."""
    # Its own module-less stack: a module-scoped stack elsewhere would claim this session's job.
    with FakeLiveAvatar(api_key=KEY) as fake, FakeLlm(api_key=LLM_KEY, token_delay_s=0.01) as llm:
        stack = start_stack(
            redis_url, AVATAR_PROVIDER="liveavatar", LIVEAVATAR_API_KEY=KEY, LIVEAVATAR_SERVER_URL=fake.url,
            LIVEAVATAR_AVATAR_ID=SANDBOX_AVATAR, LIVEAVATAR_MAX_SESSION_S="6", LIVEAVATAR_EXPIRY_WARNING_S="4",
            LLM_BASE_URL=llm.url, LLM_API_KEY=LLM_KEY, LLM_MODEL="fake-model",
        )
        try:
            llm.script(["Short answer."])
            browser = Browser(await create_session(stack.base_url))
            await browser.connect()
            await browser.wait_type("session.ready", GUARD_S)
            await browser.send_json({"type": "text", "text": "hello"})  # a turn before the limit is answered
            await browser.wait_type("avatar.stopped_talking", GUARD_S)
            warning = await browser.wait_type("error", GUARD_S)
            assert warning["code"] == "avatar_expiring" and warning["fatal"] is False
            ended = await browser.wait_type("session.ended", GUARD_S)
            assert ended["reason"] == "avatar_time_limit"
            [vendor] = fake.sessions.values()
            await until(lambda: vendor.status == "closed")
            assert vendor.stop_reason == "MAX_DURATION_REACHED"
            assert [e["code"] for e in browser.of_type("error")] == ["avatar_expiring"]  # no avatar_lost
            assert vendor.sockets == 1  # no reconnect to a session that ended
            await browser.close()
        finally:
            stack.stop_all()
