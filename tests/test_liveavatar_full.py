"""LiveAvatar FULL mode: our STT's text goes to LiveAvatar's LLM over a real LiveKit room's data topics.

A real `livekit-server` (tests/livekit_util.py), the LiveAvatar fake whose avatar joins the session's
room as `heygen` and answers `avatar.speak_response` from the Context, and our driver in this
process (real Redis), joined as the agent with `livekit_agent_token`. Hang guards only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from avatar_service.providers._liveavatar_full import CONTEXT_KEY_PREFIX, DEFAULT_KNOWLEDGE_FILE
from avatar_service.providers.cloud import CloudSettings
from avatar_service.providers.liveavatar import LiveAvatarDriver, LiveAvatarSettings
from common import keys
from common.bus import Bus
from common.models import SessionConfig
from common.sessions import SessionStore
from common.settings import Settings
from tests.fakes.liveavatar import SANDBOX_AVATAR, FakeLiveAvatar
from tests.livekit_util import LiveKitServer

KEY = "la-full-test-key-9b3e"
GUARD_S = 30.0


async def until(condition: Callable[[], Any], guard_s: float = GUARD_S) -> Any:
    deadline = time.monotonic() + guard_s
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.02)
    return value


@pytest.fixture
def fake(livekit_server: LiveKitServer) -> Iterator[FakeLiveAvatar]:
    with FakeLiveAvatar(api_key=KEY, livekit=livekit_server, sandbox_limit_s=600) as f:
        yield f


@pytest.fixture
async def rig(fake: FakeLiveAvatar, clean_redis: str) -> AsyncIterator[tuple[LiveAvatarDriver, aioredis.Redis]]:
    r = aioredis.Redis.from_url(clean_redis)
    settings = Settings(_env_file=None, redis_url=clean_redis, avatar_provider="liveavatar", stt_provider="local")
    vendor = LiveAvatarSettings(_env_file=None, api_key=KEY, server_url=fake.url, avatar_id=SANDBOX_AVATAR,
                                mode="FULL", keepalive_s=0.5)
    driver = LiveAvatarDriver(settings, Bus(r, settings), vendor=vendor, cloud=CloudSettings(_env_file=None))
    yield driver, r
    await driver.aclose()
    await r.aclose()


async def events(r: aioredis.Redis, sid: str) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"e"]) for _, f in await r.xrange(keys.events(sid))]


async def new_session(driver: LiveAvatarDriver) -> Any:
    sid, _ = await SessionStore(driver.bus.r, driver.bus).create(SessionConfig())
    session = await driver.open(sid, SessionConfig(), resumed=False)
    await session.start()
    await until(lambda: session._room is not None)
    return session


async def test_full_mode_sends_what_the_user_said_to_liveavatars_llm_over_the_room(
    rig: tuple[LiveAvatarDriver, aioredis.Redis], fake: FakeLiveAvatar
) -> None:
    driver, r = rig
    session = await new_session(driver)
    assert session.answers_itself is True  # the worker passes the user's words; LiveAvatar answers
    vendor = fake.sessions[session.vendor.vendor_id]
    assert vendor.mode == "FULL" and vendor.request["avatar_persona"]["context_id"] in fake.contexts
    [ready] = [e for e in await events(r, session.sid) if e["type"] == "session.ready"]
    assert ready["livekit"]["avatar_identity"] == "heygen"
    assert await asyncio.wait_for(session.speak("r-t1", "What is avatar stack?", user_text="What is avatar stack?"),
                                  GUARD_S) is None
    [sent] = [c for c in vendor.control if c["event_type"] == "avatar.speak_response"]
    assert sent["text"] == "What is avatar stack?" and sent["session_id"] == vendor.session_id
    kinds = [e["type"] for e in await events(r, session.sid)]
    assert kinds.count("avatar.started_talking") == 1 and kinds.count("avatar.stopped_talking") == 1
    [reply] = [e for e in await events(r, session.sid) if e["type"] == "avatar.reply"]
    first_line = DEFAULT_KNOWLEDGE_FILE.read_text().strip().splitlines()[0][:40]
    assert first_line in reply["text"] and reply["turn_id"] == "t1"  # answered from the Context

    # barge-in and the listening pose
    answering = asyncio.create_task(session.speak("r-t2", "Tell me everything.", user_text="Tell me everything."))
    fake.answer_ms_per_char = 200.0  # a long answer
    await until(lambda: any(x["event_type"] == "avatar.speak_started" for x in vendor.responses[3:]))
    await session.on_user_speaking(True)
    await session.interrupt()
    await asyncio.wait_for(answering, GUARD_S)
    await until(lambda: {"avatar.interrupt", "avatar.start_listening"} <= {c["event_type"] for c in vendor.control})
    stopped = [e for e in await events(r, session.sid) if e["type"] == "avatar.stopped_talking"]
    assert stopped[-1]["interrupted"] is True
    await session.stop("test")
    assert vendor.status == "closed" and vendor.stop_reason == "USER_CLOSED"


async def test_the_context_is_created_once_and_cached_in_redis(
    rig: tuple[LiveAvatarDriver, aioredis.Redis], fake: FakeLiveAvatar
) -> None:
    driver, r = rig
    first, second = await new_session(driver), await new_session(driver)
    assert len(fake.contexts) == 1
    ids = {fake.sessions[s.vendor.vendor_id].request["avatar_persona"]["context_id"] for s in (first, second)}
    assert ids == set(fake.contexts)
    assert [await r.get(k) for k in await r.keys(f"{CONTEXT_KEY_PREFIX}*")] == [next(iter(ids)).encode()]
    await first.stop("test")
    await second.stop("test")


async def test_a_vendor_side_stop_in_full_mode_is_an_expected_end(
    rig: tuple[LiveAvatarDriver, aioredis.Redis], fake: FakeLiveAvatar
) -> None:
    driver, r = rig
    session = await new_session(driver)
    fake.expire(session.vendor.vendor_id, "NO_CREDITS")
    deadline = time.monotonic() + GUARD_S
    while not (ended := [e for e in await events(r, session.sid) if e["type"] == "session.ended"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert ended[0]["reason"] == "avatar_closed"
    assert not [e for e in await events(r, session.sid) if e["type"] == "error"]
    await session.stop("session_ended")
