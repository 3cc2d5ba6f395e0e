"""On a real Redis Cluster (3 masters + 3 replicas): admission, SIGTERM hand-back, and a master
killed with `kill -9` mid-session while its replica is promoted.

The admission, hand-back, readiness and shared rate-limit tests are the single-node ones, imported
(here `redis_url` is the cluster's); each starts a stack of its own. The failover test prints one parseable line,
`FAULT-METRIC redis_cluster_master_kill9 …` (`pytest -s`), with what the failover cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import websockets

from common import keys
from common.bus import connect_url
from tests.client import Browser, create_session
from tests.cluster_util import LocalCluster
from tests.conftest import start_stack
from tests.speech import speech_available, speech_pcm
from tests.test_faults import GUARD_S, committed, metric, reconnect
from tests.test_scaling import (  # noqa: F401  (each runs here on the cluster)
    test_full_pool_gets_503_and_readyz_says_why,
    test_sigterm_hands_sessions_back_at_once,
)
from tests.test_scaling_out import (  # noqa: F401
    test_n_gateways_share_one_session_creation_limit_per_client,
    test_ready_while_redis_answers_full_pools_are_a_503_per_request,
)

pytestmark = pytest.mark.slow

SESSIONS = 6
GLOBAL_KEYS = (keys.JOBS_STT, keys.JOBS_AVATAR, keys.workers("stt"), keys.workers("avatar"), keys.SESSIONS_INDEX)


@pytest.fixture(scope="session")
def redis_url(redis_cluster: LocalCluster) -> str:
    return redis_cluster.url


async def _pump_silence(browser: Browser, stop: asyncio.Event) -> None:
    """A page's microphone in a quiet room: 20 ms frames in real time, until told or closed."""
    frame = bytes(640)
    with contextlib.suppress(websockets.ConnectionClosed, AttributeError):
        while not stop.is_set() and browser.close_code is None:
            await browser.ws.send(frame)
            await asyncio.sleep(0.02)


class _Microphones:
    """One silence pump per open page, each stoppable on its own (before real speech is sent)."""

    def __init__(self) -> None:
        self.stops: dict[int, asyncio.Event] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, page: Browser) -> None:
        stop = self.stops[id(page)] = asyncio.Event()
        self.tasks.append(asyncio.create_task(_pump_silence(page, stop)))

    async def stop(self, page: Browser | None = None) -> None:
        for key, stop in self.stops.items():
            if page is None or key == id(page):
                stop.set()
        await asyncio.sleep(0.05)


def _problems(log: Path, sid: str = "") -> list[str]:
    """The warnings and errors a service logged (its JSON lines), and what it logged about `sid`,
    for a failure's report."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    # A traceback's last lines say what failed: keep a long line's head and its tail.
    return [line if len(line) <= 3000 else f"{line[:800]} … {line[-2200:]}" for line in lines
            if '"level":"warning"' in line or '"level":"error"' in line or (sid and sid in line)][-16:]


async def _ask(page: Browser, text: str = "hello", timeout_s: float = GUARD_S) -> float:
    """Type `text`; the seconds until the answer starts (`avatar.reply`). Returns once it has been
    spoken (`avatar.stopped_talking`), so the next question is a turn of its own."""
    known = {e["reply_id"] for e in page.of_type("avatar.reply")}
    t0 = time.monotonic()
    await page.send_json({"type": "text", "text": text})
    reply = await page.wait_for(lambda e: e.get("type") == "avatar.reply" and e["reply_id"] not in known, timeout_s)
    answered_s = reply["_rx"] - t0
    await page.wait_for(
        lambda e: e.get("type") == "avatar.stopped_talking" and e["reply_id"] == reply["reply_id"], timeout_s
    )
    return answered_s


async def test_a_master_killed_mid_session_leaves_other_sessions_untouched(private_redis_cluster: LocalCluster) -> None:
    cluster = private_redis_cluster
    stack = await asyncio.to_thread(start_stack, cluster.url)
    mics = _Microphones()
    browsers: list[Browser] = []
    try:
        # Sessions until at least two masters serve some: the victim's and another's.
        where: dict[str, int] = {}
        while len(browsers) < SESSIONS or len(set(where.values())) < 2:
            b = Browser(await create_session(stack.base_url))
            await b.connect()
            browsers.append(b)
            where[b.session.session_id] = await asyncio.to_thread(cluster.master_of, keys.session(b.session.session_id))
        for b in browsers:
            await b.wait_type("session.ready", GUARD_S)
        for b in browsers:
            mics.start(b)
        # Every session works before. One at a time: six piper syntheses at once in one avatar
        # worker have crashed onnxruntime here ("GetElementType is not implemented"), a local-voice
        # limit unrelated to Redis.
        before_s = [await _ask(b) for b in browsers]

        counts: dict[int, int] = {}
        for port in where.values():
            counts[port] = counts.get(port, 0) + 1
        victim = max(counts, key=lambda p: counts[p])
        hit = [b for b in browsers if where[b.session.session_id] == victim]
        spared = [b for b in browsers if where[b.session.session_id] != victim]
        globals_on_victim = [k for k in GLOBAL_KEYS if await asyncio.to_thread(cluster.master_of, k) == victim]
        seen_before = {b.session.session_id: [e["id"] for e in committed(b)] for b in browsers}
        errors_before = {b.session.session_id: len(b.of_type("error")) for b in browsers}

        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill9, victim)
        # A turn typed by every page at once, while the victim's replica is not yet promoted.
        asks = {b.session.session_id: asyncio.create_task(_ask(b)) for b in spared}
        promoted_s = await asyncio.to_thread(cluster.wait_promoted, victim)

        # Untouched: the other masters' sessions kept their sockets, saw no error, were answered.
        spared_s, spared_reconnects = [], 0
        for i, b in enumerate(spared):
            try:
                spared_s.append(await asks[b.session.session_id])
            except AssertionError:
                c, sid = cluster.client(), b.session.session_id
                print("STUCK", sid, c.hgetall(keys.session(sid)), c.xrange(keys.turns(sid)),
                      [e.get("type") for e in b.events[-3:]], b.close_code)
                # In Redis but not on the page: the gateway stalled; missing from Redis: the worker.
                print("EVENTS IN REDIS", [(eid, f.get(b"e", b"")[:60])
                                          for eid, f in c.xrevrange(keys.events(sid), count=8)])
                for name, log in stack.logs.items():
                    print(name.upper(), "LOG", _problems(log, sid))
                if b.close_code != 1011:
                    raise
                # The gateway met an unexpected error on this socket and said so (1011, logged above):
                # the page reconnects with `last_event` and the session goes on. Counted in the metric.
                page, _ = await reconnect(b.session, committed(b)[-1]["id"], time.monotonic() + 30)
                mics.start(page)
                browsers.append(page)
                spared[i], errors_before[sid] = page, 0
                spared_reconnects += 1
                spared_s.append(await _ask(page))
        for b in spared:
            assert b.close_code is None, f"a session on a surviving master lost its socket ({b.close_code})"
            assert len(b.of_type("error")) == errors_before[b.session.session_id]
            assert not b.of_type("session.ended")

        # Hit: each is resumed (its socket held, or a reconnect with `last_event`), or ended clearly.
        outcomes: dict[str, str] = {}
        resumed_s: list[float] = []
        first_after_kill_s = -1.0
        lost_events = 0
        pages: dict[str, Browser] = {}
        for b in hit:
            sid = b.session.session_id
            page = b
            if b.close_code is not None and not b.of_type("session.ended"):
                assert b.close_code == 1011, (
                    f"closed with {b.close_code}, not the reconnect code; last events "
                    f"{[(e.get('type'), e.get('id')) for e in b.events[-4:]]}, "
                    f"session {cluster.client().hgetall(keys.session(sid))}"
                )
                page, _ = await reconnect(b.session, committed(b)[-1]["id"], time.monotonic() + 30)
                mics.start(page)
                outcomes[sid] = "reconnected"
            if b.of_type("session.ended"):
                outcomes[sid] = "ended:" + b.of_type("session.ended")[-1].get("reason", "?")
                continue
            outcomes.setdefault(sid, "same_socket")
            if page.of_type("session.ended"):
                outcomes[sid] = "ended_after_reconnect:" + page.of_type("session.ended")[-1].get("reason", "?")
                continue
            if not resumed_s:
                first_after_kill_s = time.monotonic() - killed_at
            try:
                t = await _ask(page)
            except AssertionError:
                print("HIT FAILED", sid, page.of_type("error"), page.of_type("session.ended"), page.close_code)
                for name, log in stack.logs.items():
                    print(name.upper(), "LOG", _problems(log))
                raise
            resumed_s.append(t)
            pages[sid] = page
            # What the failover lost: events the page had received that the promoted replica
            # never got (Redis replication is asynchronous).
            kept = {i.decode() for i, _ in cluster.client().xrange(keys.events(sid))}  # a live node
            lost_events += len([i for i in seen_before[sid] if i not in kept])

        # The STT side of a hit session resumes too: speech after the failover is transcribed.
        heard = "skipped"
        if pages and speech_available():
            page = next(iter(pages.values()))
            n = len(page.of_type("transcript.final"))
            await mics.stop(page)  # one microphone per page: the speech is what it hears now
            await page.stream(speech_pcm("Tell me about green apples."))
            await page.wait_for(lambda _e: len(page.of_type("transcript.final")) > n, GUARD_S)
            heard = "yes"

        metric(
            "redis_cluster_master_kill9", sessions=len(browsers), hit=len(hit), spared=len(spared),
            promoted_s=promoted_s, spared_reply_s_max=max(spared_s), spared_reconnects=spared_reconnects,
            reply_s_before_max=max(before_s),
            hit_reply_s_max=max(resumed_s) if resumed_s else -1.0, hit_first_ask_after_kill_s=first_after_kill_s,
            outcomes=",".join(sorted(outcomes.values())), lost_events=lost_events,
            globals_on_victim=",".join(globals_on_victim) or "none", hit_stt_resumed=heard,
        )
        stack.assert_alive()
    finally:
        await mics.stop()
        for b in browsers:
            with contextlib.suppress(Exception):
                await b.close()
        await asyncio.to_thread(stack.stop_all)


async def test_no_command_fails_across_a_failover_healthy_master_or_not(private_redis_cluster: LocalCluster) -> None:
    """What every service sends (XADD, pipelines, blocking XREAD, HSET), from many tasks on one
    client, while a master is killed with `kill -9`: none fails. redis-py closes every connection
    of the client when it meets CLUSTERDOWN, and commands to the healthy masters then failed with
    AttributeError (`'NoneType' object has no attribute 'writelines'`) and pipelines with
    ConnectionError (about 100 per run): an avatar's reply stopped mid-sentence for good. The dead
    master's commands wait for its replica (within FAILOVER_S)."""
    cluster = private_redis_cluster
    r = connect_url(cluster.url)
    by_master: dict[int, list[str]] = {}
    n = 0
    while len(by_master) < 3 or any(len(v) < 3 for v in by_master.values()):  # 3 sessions per master
        sid, n = f"failover-{n}", n + 1
        sids = by_master.setdefault(cluster.master_of(keys.session(sid)), [])
        if len(sids) < 3:
            sids.append(sid)
    victim = next(iter(by_master))
    failures: list[tuple[str, str, str]] = []
    worst: dict[str, float] = {}
    stop, all_sent = asyncio.Event(), asyncio.Event()
    sent_once: set[tuple[str, str]] = set()

    async def send(sid: str, kind: str) -> None:
        side = "hit" if cluster.master_of(keys.session(sid)) == victim else "healthy"
        while not stop.is_set():
            began = time.monotonic()
            try:
                if kind == "xadd":
                    await r.xadd(keys.events(sid), {"e": b"{}"}, maxlen=100, approximate=True)
                elif kind == "pipeline":
                    async with r.pipeline(transaction=False) as pipe:
                        pipe.sadd(keys.answered(sid), "t1")
                        pipe.expire(keys.answered(sid), 60)
                        await pipe.execute()
                elif kind == "xread":
                    await r.xread({keys.events(sid): "$"}, count=64, block=500)
                else:
                    await r.hset(keys.session(sid), "f", "v")
                sent_once.add((sid, kind))
                if len(sent_once) == len(tasks):
                    all_sent.set()
            except Exception as exc:
                failures.append((side, kind, f"{type(exc).__name__}: {exc}"[:300]))
            worst[side] = max(worst.get(side, 0.0), time.monotonic() - began)
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(send(sid, kind)) for sids in by_master.values() for sid in sids
             for kind in ("xadd", "pipeline", "xread", "hset")]
    try:
        # A running service has read the slot map long before a master dies; on a loaded machine
        # 36 first commands can take over a second, and a client that never read it knows only the
        # node it was started from (here the victim).
        await asyncio.wait_for(all_sent.wait(), 30)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(cluster.kill9, victim)
        promoted_s = await asyncio.to_thread(cluster.wait_promoted, victim)
        await asyncio.sleep(3.0)  # the slot map is read again, the dead master's commands go on
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await r.aclose()
    metric("redis_cluster_failover_commands", tasks=len(tasks), promoted_s=promoted_s,
           worst_healthy_s=worst.get("healthy", -1.0), worst_hit_s=worst.get("hit", -1.0), failed=len(failures))
    assert not failures, failures[:5]
