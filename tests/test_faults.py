"""Faults injected on real processes: Redis restarting under a live stack, the gateway killed and
restarted mid-reply, an avatar worker killed mid-reply (local, and holding a live HeyGen session),
a browser that stops reading, a speech engine that stops reading, and the secrets of a full cloud
session.

Each scenario prints one parseable line, `FAULT-METRIC <scenario> recover_s=… lost=… duplicated=…`
(visible with `pytest -s`): the time to recover and what was lost or repeated, measured on the real
processes. Only generous hang guards are asserted on time; lost and duplicated must be 0.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import websockets

from avatar_stack.up import free_port, redis_answers, redis_binary
from common import keys
from common.bus import Bus, connect
from common.models import AvatarAudio, AvatarReply, UserTurn, turn_adapter
from common.pcm import FRAME_BYTES
from common.settings import Settings
from tests.client import Browser, Session, create_session
from tests.conftest import Stack, scrape, start_stack, worker_metrics_url
from tests.fakes.deepgram import FakeDeepgram, Speech
from tests.fakes.heygen import FakeHeyGen
from tests.speech import speech_available, speech_pcm
from tests.test_gateway import start_gateway

pytestmark = pytest.mark.slow

GUARD_S = 60.0  # hang guard for one expected event, never a latency requirement
RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 3.0)  # as the page's connection.js


def metric(scenario: str, **values: Any) -> None:
    """One parseable line per scenario for the reliability table (`pytest -s` shows it)."""
    fields = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"\nFAULT-METRIC {scenario} {fields}")


class RestartableRedis:
    """A private Redis without persistence that a test can restart on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="test-redis-restart-")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = redis_binary()
        assert binary
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


@pytest.fixture
def restartable_redis() -> Iterator[RestartableRedis]:
    server = RestartableRedis()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


async def test_redis_restart_ends_lost_sessions_clearly_and_service_recovers(restartable_redis: RestartableRedis):
    stack = await asyncio.to_thread(start_stack, restartable_redis.url)
    try:
        browser = await ready_page(stack)

        await asyncio.to_thread(restartable_redis.stop)
        await asyncio.sleep(1.0)  # the services notice and retry with backoff
        await asyncio.to_thread(restartable_redis.start)  # empty: every session's state is gone
        back_at = time.monotonic()

        # The page is told, instead of hanging on a session that no longer exists: either the
        # socket closes for a reconnect (1011) or the session is reported ended.
        told_at = time.monotonic()
        async with asyncio.timeout(60):
            while browser.close_code is None and not browser.of_type("session.ended"):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        told_s = time.monotonic() - told_at
        print(f"page told after {told_s:.1f} s (close code {browser.close_code})")
        assert browser.close_code in (None, 1000, 1011)
        if browser.close_code == 1011:
            again = Browser(browser.session)
            await again.connect()
            assert await again.wait_closed(15) in (4404, 1000)  # the session is gone: said clearly

        # Every service reconnected: a new session works end to end.
        await asyncio.to_thread(stack.wait_workers, "stt", 1, 60)
        await asyncio.to_thread(stack.wait_workers, "avatar", 1, 60)
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            assert (await http.get("/healthz")).status_code == 200
        fresh = await ready_page(stack)
        await fresh.send_json({"type": "text", "text": "hello"})
        await fresh.wait_type("avatar.reply", 30)
        metric(
            "redis_restart_empty", told_s=told_s,
            recover_s=time.monotonic() - back_at, close_code=browser.close_code,
        )
        await fresh.close()
        stack.assert_alive()
    finally:
        await asyncio.to_thread(stack.stop_all)


# --- helpers for the scenarios below -----------------------------------------------------------


def live(stack: Stack, prefix: str) -> list[str]:
    return [n for n, p in stack.procs.items() if n.startswith(prefix) and p.poll() is None]


def owner_process(stack: Stack, sid: str, field: str) -> tuple[str, str]:
    """(consumer name, process name) of the worker that owns the session for `field`."""
    owner = stack.redis().hget(keys.session(sid), field).decode()
    pid = int(owner.split("-")[-2])
    [name] = [n for n, p in stack.procs.items() if p.pid == pid and p.poll() is None]
    return owner, name


async def ready_page(stack: Stack) -> Browser:
    """A new session's page, connected and told `session.ready`."""
    browser = Browser(await create_session(stack.base_url))
    await browser.connect()
    await browser.wait_type("session.ready", GUARD_S)
    return browser


def committed(browser: Browser) -> list[dict[str, Any]]:
    """The events a page counts as received. Like `frontend/connection.js`, an `avatar.audio`
    whose binary frame never came is not (its id is committed with the audio, so a resume
    replays both)."""
    events = [e for e in browser.events if "id" in e]
    expected = 2 * sum(e["samples"] for e in events if e["type"] == "avatar.audio")
    if events and events[-1]["type"] == "avatar.audio" and browser.audio_bytes < expected:
        events = events[:-1]
    return events


async def reconnect(session: Session, last_event: str, deadline: float) -> tuple[Browser, int]:
    """Reopen the session's socket like the page does (backoff), until `deadline`."""
    for attempt in itertools.count():
        browser = Browser(session)
        try:
            await browser.connect(last_event=last_event)
            return browser, attempt
        except (OSError, TimeoutError, websockets.InvalidHandshake):
            assert time.monotonic() < deadline, "could not reconnect within the grace period"
            await asyncio.sleep(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)])
    raise AssertionError("unreachable")


def user_turns(stack: Stack, sid: str) -> list[UserTurn]:
    turns = (turn_adapter.validate_json(f[b"t"]) for _, f in stack.redis().xrange(keys.turns(sid)))
    return [t for t in turns if isinstance(t, UserTurn)]


def stopped(reply_id: str):
    return lambda e: e.get("type") == "avatar.stopped_talking" and e["reply_id"] == reply_id


async def kill_the_avatar_owner(stack: Stack, wait_for: str) -> tuple[Browser, dict[str, Any], str, float]:
    """With a second avatar worker running, open a session, ask a question and, once `wait_for`
    arrives, kill -9 the worker that owns the session. Returns the page, its first
    `session.ready`, the killed owner and the time of the kill."""
    await asyncio.to_thread(stack.start, "avatar-worker")
    await asyncio.to_thread(stack.wait_workers, "avatar", 2)
    browser = Browser(await create_session(stack.base_url))
    await browser.connect()
    ready = await browser.wait_type("session.ready", GUARD_S)
    await browser.send_json({"type": "text", "text": "What is avatar stack?"})
    await browser.wait_type(wait_for, GUARD_S)
    owner, victim = owner_process(stack, browser.session.session_id, keys.F_AVATAR_OWNER)
    killed_at = time.monotonic()
    await asyncio.to_thread(stack.kill, victim)  # kill -9: the lease has to run out
    return browser, ready, owner, killed_at


# --- the gateway killed mid-reply ---------------------------------------------------------------


@pytest.mark.skipif(not speech_available(), reason="needs espeak-ng and sox")
async def test_gateway_killed_mid_reply_the_page_resumes_on_a_new_one_losing_nothing(redis_url: str) -> None:
    stack = await asyncio.to_thread(start_stack, redis_url)
    try:
        r = stack.redis()
        browser = await ready_page(stack)
        session, sid = browser.session, browser.session.session_id
        await browser.stream(speech_pcm("What is avatar stack?"))
        final_1 = await browser.wait_type("transcript.final", GUARD_S)
        await browser.wait_type("avatar.audio", GUARD_S)  # the avatar is mid-reply

        [gateway] = live(stack, "gateway")
        killed_at = time.monotonic()
        await asyncio.to_thread(stack.kill, gateway)  # kill -9: no close frame, no bookkeeping
        await browser.wait_closed(GUARD_S)
        before = committed(browser)
        restarted_at = time.monotonic()
        await asyncio.to_thread(stack.start, "gateway")  # the same settings, so the same port
        grace_s = float(stack.env.get("SESSION_GRACE_S", Settings().session_grace_s))
        again, attempts = await reconnect(session, before[-1]["id"], killed_at + grace_s)
        first = await again.wait_for(lambda e: True, GUARD_S)
        recover_s, outage_s = first["_rx"] - restarted_at, first["_rx"] - killed_at

        # The reply the crash cut off arrives whole: what was published meanwhile waited in Redis.
        await again.wait_for(stopped(f"r-{final_1['utterance_id']}"), GUARD_S)
        # The session goes on through the new gateway: speech up, transcript and spoken reply down.
        await again.stream(speech_pcm("How do I scale avatar stack?"))
        final_2 = await again.wait_for(lambda e: e.get("type") == "transcript.final", GUARD_S)
        await again.wait_for(stopped(f"r-{final_2['utterance_id']}"), GUARD_S)
        connected = r.zcount(keys.conns(sid), time.time(), "+inf")  # the killed one's until it expires

        entries = r.xrange(keys.events(sid))
        await again.wait_for(lambda e: e.get("id") == entries[-1][0].decode(), GUARD_S)
        after = committed(again)
        got = [e["id"] for e in before + after]
        published = [entry_id.decode() for entry_id, _ in entries]
        lost = len(set(published) - set(got))
        duplicated = len(got) - len(set(got))
        metric(
            "gateway_restart", recover_s=recover_s, outage_s=outage_s, reconnect_attempts=attempts,
            events=len(published), resumed=len(after), lost=lost, duplicated=duplicated,
            connected_count_after=connected,
        )
        # Every event of the session reached the page exactly once, in order, across both gateways.
        assert got == published
        assert lost == duplicated == 0
        # Every transcript the STT worker produced reached the page once; each was answered once.
        finals = [e for e in before + after if e["type"] == "transcript.final"]
        stream_finals = [i.decode() for i, f in entries if b'"type":"transcript.final"' in f[b"e"]]
        assert [f["id"] for f in finals] == stream_finals and len(finals) >= 2
        assert len({f["utterance_id"] for f in finals}) == len(finals)
        started = Counter(e["reply_id"] for e in before + after if e["type"] == "avatar.started_talking")
        assert all(n == 1 for n in started.values())
        # And no audio frame went missing or came twice.
        audio = [e for e in before + after if e["type"] == "avatar.audio"]
        assert len({(e["reply_id"], e["seq"]) for e in audio}) == len(audio)
        assert browser.audio_bytes + again.audio_bytes == 2 * sum(e["samples"] for e in audio)
        await again.close()
        stack.assert_alive()
    finally:
        await asyncio.to_thread(stack.stop_all)


# --- an avatar worker killed mid-reply, with a second one running ---------------------------------


async def test_avatar_worker_killed_mid_reply_the_other_one_answers_every_turn_once(redis_url: str) -> None:
    stack = await asyncio.to_thread(start_stack, redis_url)
    try:
        browser, ready_1, owner, killed_at = await kill_the_avatar_owner(stack, "avatar.audio")  # mid-reply
        sid = browser.session.session_id
        # The user asks again at once, while no worker holds the session: the turn waits in Redis.
        await browser.send_json({"type": "text", "text": "How do I scale avatar stack?"})
        ready_2 = await browser.wait_for(lambda e: e["type"] == "session.ready" and e["id"] != ready_1["id"], GUARD_S)
        takeover_s = ready_2["_rx"] - killed_at
        turns = user_turns(stack, sid)
        assert len(turns) == 2
        reply_2 = await browser.wait_for(
            lambda e: e["type"] == "avatar.reply" and e["turn_id"] == turns[1].turn_id, GUARD_S
        )
        answered_s = reply_2["_rx"] - killed_at
        await browser.wait_for(stopped(reply_2["reply_id"]), GUARD_S)
        # And it goes on: a turn after the takeover.
        await browser.send_json({"type": "text", "text": "Who are you?"})
        reply_3 = await browser.wait_for(
            lambda e: e["type"] == "avatar.reply" and e["turn_id"] not in (t.turn_id for t in turns), GUARD_S
        )
        await browser.wait_for(stopped(reply_3["reply_id"]), GUARD_S)
        new_owner, _ = owner_process(stack, sid, keys.F_AVATAR_OWNER)

        turn_ids = [t.turn_id for t in user_turns(stack, sid)]
        replies = browser.of_type("avatar.reply")
        per_turn = {t: {e["reply_id"] for e in replies if e["turn_id"] == t} for t in turn_ids}
        started = Counter(e["reply_id"] for e in browser.of_type("avatar.started_talking"))
        chunks = Counter((e["reply_id"], e["seq"]) for e in browser.of_type("avatar.audio"))
        lost = sum(1 for ids in per_turn.values() if not ids)
        duplicated = sum(n - 1 for n in started.values()) + sum(n - 1 for n in chunks.values())
        cut = [i for i, e in enumerate(browser.events) if stopped(f"r-{turn_ids[0]}")(e)]
        metric(
            "avatar_worker_kill9", recover_s=takeover_s, first_reply_after_kill_s=answered_s,
            lease_s=int(stack.env["JOB_LEASE_MS"]) / 1000, turns=len(turn_ids), lost=lost,
            duplicated=duplicated, cut_reply_stopped_talking=len(cut),
        )
        # The reply the kill cut is closed once (by the new owner, `interrupted`), before the next
        # reply starts, so the page does not leave it "speaking".
        assert len(cut) == 1
        next_start = browser.events.index(browser.of_type("avatar.started_talking")[1])
        assert cut[0] < next_start and browser.events[cut[0]]["interrupted"] is True
        assert new_owner != owner
        assert len(turn_ids) == 3 and lost == 0
        assert all(ids == {f"r-{t}"} for t, ids in per_turn.items())  # one reply per turn, its own
        assert duplicated == 0  # no reply started twice, no audio chunk repeated
        await browser.close()
        stack.assert_alive()
    finally:
        await asyncio.to_thread(stack.stop_all)


async def test_avatar_worker_killed_with_a_live_heygen_session_resumes_it_and_leaks_nothing(redis_url: str) -> None:
    """The paid vendor session outlives the worker that opened it: the new owner must resume it
    (same HeyGen session, same LiveKit room for the page) and, at the end, stop it."""
    key = "hg-kill-key"
    with FakeHeyGen(api_key=key, speech_ms_per_char=2.0) as fake:
        stack = await asyncio.to_thread(
            start_stack, redis_url, **fake.stack_env(HEYGEN_TASK_TYPE="repeat", HEYGEN_KEEPALIVE_S="0.5")
        )
        try:
            browser, ready_1, _, killed_at = await kill_the_avatar_owner(stack, "avatar.reply")
            sid = browser.session.session_id
            [vendor_session] = fake.open_sessions()  # kill -9 stopped nothing: the same one is open
            await browser.send_json({"type": "text", "text": "How do I scale it?"})
            ready_2 = await browser.wait_for(
                lambda e: e["type"] == "session.ready" and e["id"] != ready_1["id"], GUARD_S
            )
            recover_s = ready_2["_rx"] - killed_at
            turn_2 = user_turns(stack, sid)[1]
            reply_2 = await browser.wait_for(
                lambda e: e["type"] == "avatar.reply" and e["turn_id"] == turn_2.turn_id, GUARD_S
            )
            await browser.wait_for(stopped(reply_2["reply_id"]), GUARD_S)
            assert fake.open_sessions() == [vendor_session]  # resumed, not replaced: one paid session
            assert ready_2["livekit"] == ready_1["livekit"]  # the page stays in the same room
            spoken = " ".join(c.body.get("text", "") for c in fake.calls_to("/v1/streaming.task", vendor_session))
            assert reply_2["text"][:24] in spoken  # the new owner spoke through the resumed session

            await browser.close()  # the user leaves: the vendor session must stop
            deadline = time.monotonic() + GUARD_S
            while fake.open_sessions():
                assert time.monotonic() < deadline, "the HeyGen session outlived ours"
                await asyncio.sleep(0.05)
            stopped_s = time.monotonic() - deadline + GUARD_S
        finally:
            await asyncio.to_thread(stack.stop_all)
    created = len(fake.calls_to("/v1/streaming.new"))
    assert created == 1
    metric("heygen_avatar_worker_kill9", recover_s=recover_s, vendor_sessions_created=created,
           stopped_after_end_s=stopped_s, leaked=0)


# --- a gateway killed with a socket open, then the page leaves for good ----------------------------


async def test_a_killed_gateways_sockets_stop_counting_and_sessions_end_after_the_grace_period(
    redis_url: str,
) -> None:
    """A killed gateway never removes its sockets' presence entries; they expire instead. A page
    that never comes back, and one that reconnects to a new gateway and then leaves for good, both
    end after the grace period (before, a leaked socket count kept them, and a paid vendor avatar,
    alive until the idle timeout)."""
    grace_s, refresh_s = 2.0, 0.5  # presence expires 3 refreshes (1.5 s) after the last one
    stack = await asyncio.to_thread(
        start_stack, redis_url, SESSION_GRACE_S=str(grace_s), BROWSER_PRESENCE_REFRESH_S=str(refresh_s)
    )
    try:
        r = stack.redis()

        async def ended_within(sid: str, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s  # the idle timeout (300 s) would be the leak
            while r.hget(keys.session(sid), keys.F_STATE) != b"ended":
                assert time.monotonic() < deadline, "the session outlived its page"
                await asyncio.sleep(0.1)
            assert r.hget(keys.session(sid), keys.F_ENDED_REASON) == b"browser_left"
            assert not r.exists(keys.conns(sid))  # presence of an ended session is deleted

        browser, gone = [Browser(await create_session(stack.base_url)) for _ in range(2)]
        session, sid = browser.session, browser.session.session_id
        for page in (browser, gone):
            await page.connect()
            await page.wait_type("session.ready", GUARD_S)
        [gateway] = live(stack, "gateway")
        killed_at = time.monotonic()
        await asyncio.to_thread(stack.kill, gateway)  # kill -9: its sockets are never removed
        await browser.wait_closed(GUARD_S)
        await asyncio.to_thread(stack.start, "gateway")
        again, _ = await reconnect(session, browser.events[-1]["id"], time.monotonic() + GUARD_S)

        # The page that never came back: its entry expired, then the grace period ran.
        await ended_within(gone.session.session_id, GUARD_S)
        gone_s = time.monotonic() - killed_at
        # The page that came back and stays (sending nothing) keeps its session: its new gateway
        # refreshes the entry, while the dead one's expired long ago.
        await asyncio.sleep(3 * refresh_s + grace_s + 1.5)
        assert r.hget(keys.session(sid), keys.F_STATE) == b"live"
        async with httpx.AsyncClient(base_url=stack.base_url) as http:
            auth = {"Authorization": f"Bearer {session.token}"}
            assert (await http.get(f"/v1/sessions/{sid}", headers=auth)).json()["connected"] is True

        left_at = time.monotonic()
        await again.close(end=False)  # the page leaves for good
        await ended_within(sid, GUARD_S)
        left_s = time.monotonic() - left_at
        metric("gateway_kill9_presence", never_back_ended_s=gone_s, left_ended_s=left_s, grace_s=grace_s)
        assert left_s >= grace_s
        stack.assert_alive()
    finally:
        await asyncio.to_thread(stack.stop_all)


async def test_presence_lost_with_a_failed_over_master_does_not_end_a_session_its_page_is_rejoining(
    redis_url: str,
) -> None:
    """A Redis failover can promote a replica that never got the page's latest presence entry
    (replication is asynchronous), so `conns:{sid}` is gone while the page is reconnecting. The
    session must still get the whole grace period from when its worker last saw the page, not end
    at once for a page that "left" when the session was created (the cluster-faults flake)."""
    grace_s, refresh_s = 6.0, 0.5
    stack = await asyncio.to_thread(
        start_stack, redis_url, SESSION_GRACE_S=str(grace_s), BROWSER_PRESENCE_REFRESH_S=str(refresh_s)
    )
    try:
        r = stack.redis()
        browser = await ready_page(stack)
        session, sid = browser.session, browser.session.session_id
        await asyncio.sleep(grace_s + 0.5)  # the session is older than its grace period
        [gateway] = live(stack, "gateway")
        await asyncio.to_thread(stack.kill, gateway)  # no clean drop: `disconnected_at` stays old
        await browser.wait_closed(GUARD_S)
        r.delete(keys.conns(sid))  # what the promoted replica lacks
        await asyncio.to_thread(stack.start, "gateway")
        again, _ = await reconnect(session, browser.events[-1]["id"], time.monotonic() + GUARD_S)
        await asyncio.sleep(3 * refresh_s + 1.0)
        assert r.hget(keys.session(sid), keys.F_STATE) == b"live", r.hget(keys.session(sid), keys.F_ENDED_REASON)
        assert not [e for e in again.events if e["type"] == "session.ended"]
        await again.close(end=True)
        stack.assert_alive()
    finally:
        await asyncio.to_thread(stack.stop_all)


# --- a browser that stops reading ---------------------------------------------------------------

PCM_BYTES = 128 * 1024  # one audio event's frame (random: deflate cannot shrink it)
FLOOD_EVENTS = 1700  # ≈ 218 MB in all: well over the memory bound, within EVENTS_STREAM_MAXLEN
RSS_BOUND_MB = 100.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def slow_client_closes(base_url: str) -> float:
    async with httpx.AsyncClient(base_url=base_url) as http:
        text = (await http.get("/metrics")).text
    found = re.search(r"^avatar_stack_gateway_slow_client_closes_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


class RawPage:
    """A socket that reads only when told to, and keeps ids and frame sizes (not the audio)."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.ids: list[str] = []  # committed like the page: an audio event once its frame came
        self.frame_sizes: Counter[int] = Counter()
        self.close_code: int | None = None
        self._audio_id: str | None = None

    @classmethod
    async def open(cls, session: Session, last_event: str = "") -> RawPage:
        url = f"{session.ws_url}?token={session.token}" + (f"&last_event={last_event}" if last_event else "")
        # max_queue=4: once 4 messages wait unread, the client stops reading its socket.
        return cls(await websockets.connect(url, max_queue=4, compression=None, max_size=2**22))

    async def read_all(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.frame_sizes[len(message)] += 1
                    if self._audio_id is not None:
                        self.ids.append(self._audio_id)
                        self._audio_id = None
                    continue
                event = orjson.loads(message)
                if event["type"] == "avatar.audio":
                    self._audio_id = event["id"]
                else:
                    self.ids.append(event["id"])
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code


async def test_stalled_browser_is_closed_with_4408_and_holds_no_memory(clean_redis: str) -> None:
    stack = await asyncio.to_thread(start_gateway, clean_redis, BROWSER_SEND_TIMEOUT_S="2")
    settings = Settings(_env_file=None, redis_url=clean_redis)
    r = connect(settings)
    bus = Bus(r, settings)
    stalled_session = await create_session(stack.base_url)
    sid = stalled_session.session_id
    try:
        [gateway] = live(stack, "gateway")
        pid = stack.procs[gateway].pid
        other = Browser(await create_session(stack.base_url))
        other_sid = other.session.session_id
        await other.connect()
        stalled = await RawPage.open(stalled_session)  # connects, then does not read
        await bus.publish_event(other_sid, AvatarReply(reply_id="r-warm", turn_id="t-warm", text="warm up"))
        await other.wait_type("avatar.reply", GUARD_S)
        baseline = peak = rss_mb(pid)

        async def sample_rss() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_mb(pid))
                await asyncio.sleep(0.05)

        ticks: dict[str, float] = {}
        ticking = asyncio.Event()
        ticking.set()

        async def tick_other_session() -> None:
            """The other session's events, while the flood and the stall go on."""
            for i in itertools.count():
                if not ticking.is_set():
                    return
                text = f"tick {i}"
                ticks[text] = time.monotonic()
                await bus.publish_event(other_sid, AvatarReply(reply_id=f"r-tick{i}", turn_id="t-tick", text=text))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample_rss())
        ticker = asyncio.create_task(tick_other_session())
        pcm = os.urandom(PCM_BYTES)
        mouth = [0.5] * (PCM_BYTES // 2 // 24 // 20)
        published: list[str] = []
        flood_at = time.monotonic()
        for seq in range(FLOOD_EVENTS):
            event = AvatarAudio(
                reply_id="r-flood", seq=seq, sample_rate=24000, samples=PCM_BYTES // 2, mouth=mouth, mouth_hop_ms=20
            )
            published.append((await bus.publish_event(sid, event, pcm=pcm)).decode())
        published_mb = FLOOD_EVENTS * PCM_BYTES / 2**20

        # The gateway gives up on the socket that does not read (and counts it) ...
        deadline = time.monotonic() + GUARD_S
        while await slow_client_closes(stack.base_url) < 1:
            assert time.monotonic() < deadline, "the stalled socket was never closed"
            await asyncio.sleep(0.1)
        closed_after_s = time.monotonic() - flood_at
        ticking.clear()
        await ticker
        # ... while the other session got each of its events promptly all along.
        last_tick = max(ticks, key=ticks.__getitem__)
        await other.wait_for(lambda e: e.get("text") == last_tick, GUARD_S)
        delays = {e["text"]: e["_rx"] - ticks[e["text"]] for e in other.of_type("avatar.reply") if e["text"] in ticks}
        assert delays.keys() == ticks.keys()
        assert max(delays.values()) < 5.0, delays  # a hang guard: these normally take milliseconds

        # The stalled page reads again: what it had been sent, then the 4408 close behind it.
        await asyncio.wait_for(stalled.read_all(), GUARD_S)
        assert stalled.close_code == 4408
        assert stalled.ids, "the stalled page got nothing before it stalled"
        # It reconnects after the last event it got whole and receives the rest, without a gap.
        resumed_at = time.monotonic()
        again = await RawPage.open(stalled_session, last_event=stalled.ids[-1])
        reading = asyncio.create_task(again.read_all())
        deadline = time.monotonic() + GUARD_S
        while not again.ids or again.ids[-1] != published[-1]:
            assert time.monotonic() < deadline and not reading.done(), "the rest never arrived"
            await asyncio.sleep(0.05)
        recover_s = time.monotonic() - resumed_at
        await again.ws.close()
        await reading
        sampler.cancel()
        received = stalled.ids + again.ids
        lost = len(set(published) - set(received))
        duplicated = len(received) - len(set(received))
        assert received == published and lost == duplicated == 0
        assert set(stalled.frame_sizes) | set(again.frame_sizes) == {PCM_BYTES}

        # The session's stream itself is bounded (the publisher trims it), whatever the page does.
        maxlen = settings.events_stream_maxlen
        for i in range(maxlen + 500):
            await bus.publish_event(sid, AvatarReply(reply_id="r-bound", turn_id="t-bound", text=f"{i}"))
        xlen = await r.xlen(keys.events(sid))
        growth = peak - baseline
        metric(
            "stalled_browser", recover_s=recover_s, closed_after_s=closed_after_s, close_code=stalled.close_code,
            published_mb=published_mb, sent_before_stall=len(stalled.ids), rss_baseline_mb=baseline,
            rss_growth_mb=growth, other_session_max_delay_s=max(delays.values()), xlen=xlen, maxlen=maxlen,
            lost=lost, duplicated=duplicated,
        )
        assert growth < RSS_BOUND_MB
        assert xlen <= maxlen + 100  # approximate trimming cuts whole stream nodes (≤ 100 entries)
        await other.close()
        stack.assert_alive()
    finally:
        await r.delete(keys.events(sid))  # ~200 MB of Redis memory
        await r.aclose()
        await asyncio.to_thread(stack.stop_all)


# --- a speech engine that stops reading ----------------------------------------------------------


def frames_trimmed(stt_metrics_url: str) -> int:
    return int(scrape(stt_metrics_url).get("avatar_stack_stt_audio_frames_trimmed_total", 0))


async def test_a_stalled_speech_engine_holds_bounded_audio_and_counts_what_it_trims(redis_url: str) -> None:
    """Deepgram stops reading one session's socket while its user talks on. The STT worker holds
    a bounded amount (the replay bound and its read queue), the rest waits in the bounded audio
    stream, and what MAXLEN trims is counted; the other session keeps its pace; afterwards the
    stalled session goes on, and every frame was either delivered or counted as trimmed."""
    key = "dg-stall-key"
    async with FakeDeepgram(key, recv_buffer_bytes=4096) as fake:
        stack = await asyncio.to_thread(
            start_stack, redis_url,
            STT_PROVIDER="deepgram", DEEPGRAM_API_KEY=key, DEEPGRAM_URL=fake.url, AVATAR_PROVIDER="local",
            AUDIO_STREAM_MAXLEN="50", DEEPGRAM_REPLAY_MAX_S="1",
        )
        browsers: list[Browser] = []
        try:
            stt_metrics = worker_metrics_url(stack, "stt")
            for _ in range(2):
                browsers.append(await ready_page(stack))
            slow, other = browsers
            slow_conn = await fake.wait_connections(1)
            await fake.wait_connections(2)
            fake.stall(slow_conn.index)

            talk = Speech().pause(0.2)
            for _ in range(5):
                talk = talk.say("one two three four five six seven eight").pause(0.5)
            pcm = talk.pcm[: len(talk.pcm) // FRAME_BYTES * FRAME_BYTES]
            streaming = asyncio.create_task(slow.stream(pcm, speed=1.2, trailing_silence_s=0))
            await asyncio.sleep(3.0)
            await other.stream(Speech().pause(0.2).say("please tell me about elephants").pause(1.5).pcm)
            heard = await other.wait_type("transcript.final", GUARD_S)  # served while the other stalls
            assert "elephants" in heard["text"].lower()
            await streaming
            assert stack.redis().xlen(keys.audio(slow.session.session_id)) <= 250  # MAXLEN ~ 50, in nodes of 100
            received_at_stall_end = slow_conn.audio_bytes

            fake.resume(slow_conn.index)
            deadline = time.monotonic() + GUARD_S
            while slow_conn.audio_bytes + FRAME_BYTES * frames_trimmed(stt_metrics) != len(pcm):
                assert time.monotonic() < deadline, (slow_conn.audio_bytes, frames_trimmed(stt_metrics), len(pcm))
                await asyncio.sleep(0.2)
            trimmed = frames_trimmed(stt_metrics)
            held_s = (slow_conn.audio_bytes - received_at_stall_end) / 32000
            assert trimmed > 0  # the stall reached Redis: the worker stopped taking audio ...
            assert held_s < 12.0  # ... after holding a bounded amount (replay 1 s + queue 4 s + stream + sockets)
            assert slow_conn.close_code is None and len(fake.connections) == 2  # no reconnect, no replay

            await slow.stream(Speech().pause(0.2).say("tell me about green apples").pause(1.5).pcm)
            await slow.wait_for(
                lambda e: e.get("type") == "transcript.final" and "green apples" in e["text"].lower(),
                GUARD_S,
            )
        finally:
            for browser in browsers:
                await browser.close()
            await asyncio.to_thread(stack.stop_all)
    log = "".join(path.read_text(errors="replace") for name, path in stack.logs.items() if name.startswith("stt"))
    assert "trimmed before the engine read them" in log and slow.session.session_id in log
    metric("stalled_engine", talked_s=len(pcm) / 32000, held_s=held_s, trimmed_frames=trimmed,
           lost_uncounted=0)


# --- secrets in a full cloud session --------------------------------------------------------------


def assert_no_secret_anywhere(stack: Stack, browsers: list[Browser], secrets: dict[str, str]) -> int:
    """No secret in any event a page got or any line any process logged; returns bytes scanned.
    Failures name the secret, never print it."""
    scanned = 0
    events = orjson.dumps([e for b in browsers for e in b.events]).decode()
    assert events.count('"type"') > 3  # a whole session's worth was captured
    for label, secret in secrets.items():
        assert secret not in events, f"the {label} is in an event"
    logs = {name: path.read_text(errors="replace") for name, path in stack.logs.items()}
    assert any(b.session.session_id in text for text in logs.values() for b in browsers)  # this session's logs
    for name, text in logs.items():
        scanned += len(text)
        for label, secret in secrets.items():
            assert secret not in text, f"the {label} is in the log of {name}"
    return scanned + len(events)


async def rest_calls_with_the_token(stack: Stack, session: Session) -> None:
    """The token also travels as a bearer header: read the session, then delete it."""
    auth = {"Authorization": f"Bearer {session.token}"}
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        assert (await http.get(f"/v1/sessions/{session.session_id}", headers=auth)).status_code == 200
        assert (await http.delete(f"/v1/sessions/{session.session_id}", headers=auth)).status_code == 204


async def test_no_secret_in_any_log_or_event_of_a_full_deepgram_session(redis_url: str) -> None:
    key = "dg-scan-key-5d0e7c2a91"
    speech = Speech().pause(0.3).say("please tell me about the quick brown fox").pause(1.5)
    async with FakeDeepgram(key) as fake:
        stack = await asyncio.to_thread(
            start_stack, redis_url,
            STT_PROVIDER="deepgram", DEEPGRAM_API_KEY=key, DEEPGRAM_URL=fake.url, AVATAR_PROVIDER="local",
        )
        try:
            browser = Browser(await create_session(stack.base_url))
            await browser.connect()
            await browser.wait_type("session.ready", GUARD_S)
            await browser.stream(speech.pcm, trailing_silence_s=0.5)
            final = await browser.wait_type("transcript.final", GUARD_S)
            await browser.wait_for(stopped(f"r-{final['utterance_id']}"), GUARD_S)
            await browser.close(end=False)  # the page reloads: the token is in a second socket URL
            again, _ = await reconnect(browser.session, browser.events[-1]["id"], time.monotonic() + GUARD_S)
            await rest_calls_with_the_token(stack, browser.session)
            await again.wait_type("session.ended", GUARD_S)
            await again.close()
        finally:
            await asyncio.to_thread(stack.stop_all)  # every process has written its last line
    assert fake.handshakes and {h.authorization for h in fake.handshakes} == {f"Token {key}"}  # the key was used ...
    scanned = assert_no_secret_anywhere(  # ... and is nowhere else
        stack, [browser, again], {"Deepgram API key": key, "session token": browser.session.token}
    )
    metric("secrets_deepgram_session", scanned_bytes=scanned, logs=len(stack.logs), leaked=0)


async def test_no_secret_in_any_log_or_event_of_a_full_heygen_session(redis_url: str) -> None:
    key = "hg-scan-key-8a41f6b0c3"
    with FakeHeyGen(api_key=key, speech_ms_per_char=2.0) as fake:
        stack = await asyncio.to_thread(
            start_stack, redis_url, **fake.stack_env(HEYGEN_TASK_TYPE="repeat", HEYGEN_KEEPALIVE_S="0.5")
        )
        try:
            browser = Browser(await create_session(stack.base_url))
            await browser.connect()
            ready = await browser.wait_type("session.ready", GUARD_S)
            assert ready["provider"] == "heygen" and ready["livekit"]["token"]
            await browser.send_json({"type": "text", "text": "What is avatar stack?"})
            reply = await browser.wait_type("avatar.reply", GUARD_S)
            await browser.wait_for(stopped(reply["reply_id"]), GUARD_S)
            await browser.close(end=False)
            again, _ = await reconnect(browser.session, browser.events[-1]["id"], time.monotonic() + GUARD_S)
            await rest_calls_with_the_token(stack, browser.session)
            await again.wait_type("session.ended", GUARD_S)
            await again.close()
            deadline = time.monotonic() + GUARD_S
            while fake.open_sessions():  # the worker stopped the vendor session (and logged it)
                assert time.monotonic() < deadline, "the HeyGen session was never stopped"
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(stack.stop_all)
    secrets = {"HeyGen API key": key, "session token": browser.session.token}
    secrets |= {f"HeyGen session token {i}": t for i, t in enumerate(fake.issued_tokens)}
    assert len(secrets) > 2
    scanned = assert_no_secret_anywhere(stack, [browser, again], secrets)
    metric("secrets_heygen_session", scanned_bytes=scanned, logs=len(stack.logs), leaked=0)
