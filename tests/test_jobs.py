"""The session-claiming job streams and the claim loop, against a real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from common import keys
from common.bus import Bus, connect_url
from common.jobs import JobStream
from common.models import SessionConfig, event_adapter, turn_adapter
from common.sessions import SessionStore
from common.settings import Settings
from common.worker import ClaimLoop

STREAM, GROUP = keys.JOBS_STT, keys.GROUP_STT


@pytest.fixture
async def r(clean_redis: str):
    client = connect_url(clean_redis)
    yield client
    await client.aclose()


def make_store(r: aioredis.Redis) -> SessionStore:
    return SessionStore(r, Bus(r, Settings(redis_url="redis://unused")))


async def test_claim_takes_only_the_room_it_has(r):
    for i in range(5):
        await JobStream.submit(r, STREAM, f"s{i}")
    a = JobStream(r, STREAM, GROUP, "a", lease_ms=10_000)
    b = JobStream(r, STREAM, GROUP, "b", lease_ms=10_000)
    await a.ensure_group()
    got_a = await a.claim(2, block_ms=100)
    got_b = await b.claim(10, block_ms=100)
    assert [j.session_id for j in got_a] == ["s0", "s1"]
    assert [j.session_id for j in got_b] == ["s2", "s3", "s4"]
    assert await a.claim(0, block_ms=100) == []


async def test_dead_consumer_is_taken_over_after_the_lease(r):
    await JobStream.submit(r, STREAM, "s1")
    dead = JobStream(r, STREAM, GROUP, "dead", lease_ms=200)
    live = JobStream(r, STREAM, GROUP, "live", lease_ms=200)
    await dead.ensure_group()
    [job] = await dead.claim(1, block_ms=100)
    assert await live.claim(1, block_ms=50) == []  # still within the lease
    await asyncio.sleep(0.3)
    [taken] = await live.claim(1, block_ms=50)
    assert taken.session_id == "s1" and taken.taken_over
    # The zombie's next heartbeat learns it lost the session, and does not steal it back.
    assert await dead.heartbeat([job]) == {job.entry_id}
    assert await live.heartbeat([taken]) == set()
    pending = await r.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
    assert [p["consumer"] for p in pending] == [b"live"]


async def test_heartbeat_keeps_the_lease(r):
    await JobStream.submit(r, STREAM, "s1")
    owner = JobStream(r, STREAM, GROUP, "owner", lease_ms=300)
    other = JobStream(r, STREAM, GROUP, "other", lease_ms=300)
    await owner.ensure_group()
    [job] = await owner.claim(1, block_ms=50)
    for _ in range(5):
        await asyncio.sleep(0.1)
        assert await owner.heartbeat([job]) == set()
    assert await other.claim(1, block_ms=50) == []


async def test_hand_back_is_claimable_at_once_and_done_removes(r):
    await JobStream.submit(r, STREAM, "s1")
    a = JobStream(r, STREAM, GROUP, "a", lease_ms=60_000)
    b = JobStream(r, STREAM, GROUP, "b", lease_ms=60_000)
    await a.ensure_group()
    [job] = await a.claim(1, block_ms=50)
    await a.hand_back(job)
    [again] = await b.claim(1, block_ms=50)
    assert again.session_id == "s1"
    await b.done(again)
    assert await r.xlen(STREAM) == 0
    assert await r.xpending_range(STREAM, GROUP, min="-", max="+", count=10) == []


async def test_claim_loops_never_exceed_capacity(r):
    store = make_store(r)
    sids = [(await store.create(SessionConfig()))[0] for _ in range(5)]
    for sid in sids:
        await JobStream.submit(r, STREAM, sid)
    release = {sid: asyncio.Event() for sid in sids}
    running: dict[str, set[str]] = {"w1": set(), "w2": set()}
    peak = {"w1": 0, "w2": 0}

    def serve_for(name: str):
        async def serve(job):
            running[name].add(job.session_id)
            peak[name] = max(peak[name], len(running[name]))
            try:
                await release[job.session_id].wait()
            finally:
                running[name].discard(job.session_id)
        return serve

    stop = asyncio.Event()
    loops = [
        ClaimLoop(r, store, stream=STREAM, group=GROUP, kind="stt", owner_field=keys.F_STT_OWNER,
                  capacity=2, lease_ms=5000, heartbeat_ms=100, serve=serve_for(name))
        for name in ("w1", "w2")
    ]
    tasks = [asyncio.create_task(loop.run(stop)) for loop in loops]
    try:
        await _until(lambda: sum(len(v) for v in running.values()) == 4)
        await asyncio.sleep(0.3)
        assert sum(len(v) for v in running.values()) == 4  # the fifth waits for room
        first = next(iter(running["w1"]))
        release[first].set()
        await _until(lambda: sum(len(v) for v in running.values()) == 4 and first not in running["w1"])
        assert set().union(*running.values()) == set(sids) - {first}
        assert peak == {"w1": 2, "w2": 2}
    finally:
        stop.set()
        for ev in release.values():
            ev.set()
        await asyncio.gather(*tasks)


async def test_end_is_idempotent_and_wakes_the_workers(r):
    store = make_store(r)
    sid, token = await store.create(SessionConfig())
    assert await store.check_token(sid, token) is True
    assert await store.check_token(sid, "wrong") is False
    assert await store.check_token("nope", token) is None
    assert await store.end(sid, "deleted") is True
    assert await store.end(sid, "deleted") is False
    events = [event_adapter.validate_json(f[b"e"]) for _, f in await r.xrange(keys.events(sid))]
    assert [e.type for e in events] == ["session.ended"]
    turns = [turn_adapter.validate_json(f[b"t"]) for _, f in await r.xrange(keys.turns(sid))]
    assert [t.type for t in turns] == ["session.end"]
    assert [f for _, f in await r.xrange(keys.audio(sid))] == [{b"end": b"deleted"}]
    for key in keys.all_session_keys(sid):
        ttl = await r.ttl(key)
        assert ttl == -2 or 0 < ttl <= 120


async def _until(predicate, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling another task's state
            await asyncio.sleep(0.02)


async def test_a_session_that_loses_redis_is_handed_back_not_dropped(r):
    from redis.exceptions import ConnectionError as RedisConnectionError

    store = make_store(r)
    sid, _ = await store.create(SessionConfig())
    await JobStream.submit(r, STREAM, sid)
    attempts: list[str] = []

    async def flaky_serve(job):
        attempts.append(job.session_id)
        if len(attempts) == 1:
            raise RedisConnectionError("connection reset")
        await asyncio.Event().wait()  # second time: serve on

    stop = asyncio.Event()
    loop = ClaimLoop(r, store, stream=STREAM, group=GROUP, kind="stt", owner_field=keys.F_STT_OWNER,
                     capacity=1, lease_ms=60_000, heartbeat_ms=100, serve=flaky_serve)
    task = asyncio.create_task(loop.run(stop))
    try:
        # Handed back with a huge idle time, it is re-claimed at once despite the long lease.
        await _until(lambda: len(attempts) == 2)
        assert attempts == [sid, sid]
        assert not await store.is_ended(sid)
    finally:
        stop.set()
        await task


async def test_a_late_hand_back_does_not_take_the_session_from_its_new_owner(r):
    await JobStream.submit(r, STREAM, "s1")
    old = JobStream(r, STREAM, GROUP, "old", lease_ms=200)
    new = JobStream(r, STREAM, GROUP, "new", lease_ms=200)
    await old.ensure_group()
    [job] = await old.claim(1, block_ms=50)
    await asyncio.sleep(0.3)  # the old owner stalled past its lease
    [taken] = await new.claim(1, block_ms=50)
    handed = await old.hand_back(job)
    pending = await r.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
    assert [p["consumer"] for p in pending] == [b"new"] and pending[0]["time_since_delivered"] < 200
    assert await new.claim(1, block_ms=50) == []  # not claimable again: it was not made idle
    assert await new.heartbeat([taken]) == set()
    assert handed is False


async def test_shutdown_stops_a_session_that_swallowed_its_cancel_and_hands_it_back(r):
    # On Python 3.11 a cancel that lands while redis-py's `asyncio.wait_for` around a send
    # completes is dropped; the session must stop anyway, before anyone else can take it over.
    store = make_store(r)
    sid, _ = await store.create(SessionConfig())
    await JobStream.submit(r, STREAM, sid)
    serving = asyncio.Event()
    cancels: list[int] = []

    async def deaf_serve(job):
        serving.set()
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancels.append(1)
                if len(cancels) > 1:
                    raise  # the first cancel is lost, as in wait_for

    stop = asyncio.Event()
    loop = ClaimLoop(r, store, stream=STREAM, group=GROUP, kind="stt", owner_field=keys.F_STT_OWNER,
                     capacity=1, lease_ms=60_000, heartbeat_ms=100, serve=deaf_serve)
    task = asyncio.create_task(loop.run(stop))
    await _until(serving.is_set)
    stop.set()
    async with asyncio.timeout(5):
        await task
    assert len(cancels) == 2 and not loop.active
    other = JobStream(r, STREAM, GROUP, "other", lease_ms=60_000)
    [again] = await other.claim(1, block_ms=50)  # handed back: claimable at once
    assert again.session_id == sid
