"""Deepgram live speech-to-text through the real stack: gateway, STT worker and avatar worker as
processes, Redis in between, and the protocol fake (`tests/fakes/deepgram.py`) as Deepgram.

The fake runs in this test's event loop, so nothing here may block it: starting, stopping and
killing processes go through `asyncio.to_thread`. Every expectation is computed from the `Speech`
that was sent (its words and where they lie in the session's audio), never from wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from common import keys
from tests.client import Browser, create_session
from tests.conftest import Stack, start_stack
from tests.fakes.deepgram import FakeConnection, FakeDeepgram, Speech

pytestmark = pytest.mark.slow

KEY = "dg-stack-test-key-0123"
WAIT_S = 60.0  # hang guard for one expected event, not a latency requirement
LEASE_MS = 3000  # conftest's JOB_LEASE_MS: how long a killed worker's sessions stay claimed


@contextlib.asynccontextmanager
async def deepgram_stack(redis_url: str, fake: FakeDeepgram, *, key: str = KEY, **env: str) -> AsyncIterator[Stack]:
    """Gateway + STT worker (Deepgram, pointed at `fake`) + local avatar worker, as processes."""
    stack = await asyncio.to_thread(
        start_stack, redis_url,
        STT_PROVIDER="deepgram", DEEPGRAM_API_KEY=key, DEEPGRAM_URL=fake.url, AVATAR_PROVIDER="local", **env,
    )
    try:
        yield stack
    finally:
        await asyncio.to_thread(stack.stop_all)


@pytest.fixture
async def fake() -> AsyncIterator[FakeDeepgram]:
    async with FakeDeepgram(KEY) as server:
        yield server


async def open_browser(stack: Stack) -> Browser:
    browser = Browser(await create_session(stack.base_url))
    await browser.connect()
    ready = await browser.wait_type("session.ready", WAIT_S)
    assert ready["stt_provider"] == "deepgram"
    return browser


async def end_session(browser: Browser) -> None:
    """`{"type": "end"}`, then everything up to `session.ended` has arrived."""
    await browser.send_json({"type": "end"})
    await browser.wait_type("session.ended", WAIT_S)
    await browser.close()


def heard(conn: FakeConnection) -> list[str]:
    """Every word the fake recognized on one socket, from its `is_final` results, in order."""
    return [
        w["punctuated_word"]
        for m in conn.sent_of("Results") if m["is_final"]
        for w in m["channel"]["alternatives"][0]["words"]
    ]


async def stt_owner(stack: Stack, sid: str) -> str:
    return (await asyncio.to_thread(lambda: stack.redis().hget(keys.session(sid), keys.F_STT_OWNER))).decode()


async def kill_stt_owner(stack: Stack, sid: str) -> str:
    """kill -9 the STT worker that owns the session; returns the owner's consumer name."""
    owner = await stt_owner(stack, sid)
    pid = int(owner.split("-")[-2])
    [victim] = [name for name, proc in stack.procs.items() if proc.pid == pid]
    await asyncio.to_thread(stack.kill, victim)
    return owner


async def wait_closed(conn: FakeConnection) -> None:
    async with asyncio.timeout(WAIT_S):
        await conn.closed.wait()


# --- tests ------------------------------------------------------------------------------------


async def test_spoken_utterance_gives_one_final_with_every_word_and_one_reply(
    redis_url: str, fake: FakeDeepgram,
) -> None:
    speech = Speech().pause(0.4).say("please tell me about the quick brown fox").pause(1.5)
    async with deepgram_stack(redis_url, fake) as stack:
        browser = await open_browser(stack)
        await browser.stream(speech.pcm, trailing_silence_s=0.5)
        final = await browser.wait_type("transcript.final", WAIT_S)
        reply = await browser.wait_type("avatar.reply", WAIT_S)
        await browser.wait_type("avatar.stopped_talking", WAIT_S)
        await end_session(browser)

    # Deepgram answered in several `is_final` pieces (two words each) ...
    [conn] = fake.connections
    pieces = [m for m in conn.sent_of("Results") if m["is_final"] and m["channel"]["alternatives"][0]["transcript"]]
    assert len(pieces) == 4
    # ... which reach the browser as exactly one final, every word once, at the right session time.
    [only] = browser.of_type("transcript.final")
    assert only["id"] == final["id"]
    assert final["text"] == speech.text
    assert final["start_s"] == pytest.approx(speech.words[0].start_s, abs=0.002)
    assert final["end_s"] == pytest.approx(speech.words[-1].end_s, abs=0.002)
    # Interims came first, all of the same utterance, each a prefix of the final (no repeated words).
    position = browser.events.index(final)
    interims = browser.of_type("transcript.interim")
    assert interims and all(browser.events.index(e) < position for e in interims)
    assert {e["utterance_id"] for e in interims} == {final["utterance_id"]}
    assert all(speech.text.startswith(e["text"]) for e in interims)
    assert interims[-1]["text"] == speech.text
    # The avatar answered that final, once.
    assert [e["turn_id"] for e in browser.of_type("avatar.reply")] == [final["utterance_id"]]
    assert reply["text"]
    assert not browser.of_type("error")


async def test_rejected_api_key_is_one_fatal_error_and_ends_the_session(redis_url: str) -> None:
    async with FakeDeepgram("the-right-key") as fake, deepgram_stack(redis_url, fake, key="a-wrong-key") as stack:
        browser = Browser(await create_session(stack.base_url))
        await browser.connect()
        ended = await browser.wait_type("session.ended", WAIT_S)
        await browser.close()
        # Room for a retry storm to show itself: longer than a lease, several worker backoffs.
        await asyncio.sleep(3 * LEASE_MS / 1000)

    logs = "".join(path.read_text() for name, path in stack.logs.items() if name.startswith("stt-worker"))
    errors = browser.of_type("error")
    assert [(e["code"], e["message"], e["fatal"]) for e in errors] == [
        ("deepgram_auth", "Deepgram rejected the API key", True),
    ]
    assert ended["reason"] == "stt_failed"
    assert browser.events.index(errors[0]) < browser.events.index(ended)
    # One handshake, refused; never a socket; the key itself never reaches a log.
    assert [(h.status, h.authorization) for h in fake.handshakes] == [(401, "Token a-wrong-key")]
    assert fake.connections == []
    assert "a-wrong-key" not in logs


async def test_takeover_reopens_the_deepgram_socket_and_loses_no_words(redis_url: str, fake: FakeDeepgram) -> None:
    first = Speech().pause(0.3).say("good morning to you").pause(0.2)
    second = Speech().pause(0.3).say("tell me about green apples").pause(0.2)
    trailing_s = 1.5
    async with deepgram_stack(redis_url, fake) as stack:
        await asyncio.to_thread(stack.start, "stt-worker")
        await asyncio.to_thread(stack.wait_workers, "stt", 2)
        browser = await open_browser(stack)
        sid = browser.session.session_id

        await browser.stream(first.pcm, trailing_silence_s=trailing_s)
        final_1 = await browser.wait_type("transcript.final", WAIT_S)
        await browser.wait_for(lambda e: e.get("type") == "avatar.reply" and e["turn_id"] == final_1["utterance_id"])

        owner = await kill_stt_owner(stack, sid)  # mid-session
        await wait_closed(fake.connections[0])

        # The user keeps talking; the survivor takes over after the lease and carries on.
        await browser.stream(second.pcm, trailing_silence_s=trailing_s)
        final_2 = await browser.wait_for(
            lambda e: e.get("type") == "transcript.final" and e["utterance_id"] != final_1["utterance_id"]
        )
        await browser.wait_for(lambda e: e.get("type") == "avatar.reply" and e["turn_id"] == final_2["utterance_id"])
        new_owner = await stt_owner(stack, sid)
        await end_session(browser)

    assert new_owner != owner
    # The survivor opened a new socket, and the second utterance was heard there (and only there).
    assert len(fake.connections) == 2
    old, new = fake.connections
    assert old.close_code is None  # the dead worker never said goodbye
    assert heard(old) == first.text.split()
    assert heard(new) == second.text.split()
    # Every word reached the browser once, in order; session time runs on across the takeover.
    finals = browser.of_type("transcript.final")
    assert [f["text"] for f in finals] == [first.text, second.text]
    second_at = first.duration_s + trailing_s
    assert final_2["start_s"] == pytest.approx(second_at + second.words[0].start_s, abs=0.002)
    assert final_2["end_s"] == pytest.approx(second_at + second.words[-1].end_s, abs=0.002)
    # Each final answered once.
    assert final_1["utterance_id"] != final_2["utterance_id"]
    replies = [e["turn_id"] for e in browser.of_type("avatar.reply")]
    assert replies == [final_1["utterance_id"], final_2["utterance_id"]]


async def test_two_sessions_stream_concurrently_on_separate_sockets(redis_url: str, fake: FakeDeepgram) -> None:
    said = {
        "a": Speech().pause(0.3).say("alpha bravo charlie delta").pause(1.0),
        "b": Speech().pause(0.5).say("echo foxtrot golf hotel india").pause(1.0),
    }
    async with deepgram_stack(redis_url, fake) as stack:
        browsers = {name: await open_browser(stack) for name in said}
        await asyncio.gather(*(browsers[name].stream(s.pcm) for name, s in said.items()))
        await asyncio.gather(*(b.wait_type("transcript.final", WAIT_S) for b in browsers.values()))
        await asyncio.gather(*(end_session(b) for b in browsers.values()))

    for name, speech in said.items():
        assert [f["text"] for f in browsers[name].of_type("transcript.final")] == [speech.text]
        interims = browsers[name].of_type("transcript.interim")
        assert interims and all(speech.text.startswith(e["text"]) for e in interims)
    # One socket per session, each with only its own session's words.
    assert len(fake.connections) == 2
    assert sorted(" ".join(heard(c)) for c in fake.connections) == sorted(s.text for s in said.values())


async def test_silence_sends_finalize_and_session_end_sends_close_stream(redis_url: str, fake: FakeDeepgram) -> None:
    # The audio stops right after the last word: no silence for Deepgram to endpoint on.
    speech = Speech().pause(0.3).say("hello there friend")
    async with deepgram_stack(redis_url, fake) as stack:
        browser = await open_browser(stack)
        await browser.stream(speech.pcm, trailing_silence_s=0)
        final = await browser.wait_type("transcript.final", WAIT_S)
        conn = fake.connections[0]
        assert "CloseStream" not in conn.controls
        await end_session(browser)
        await wait_closed(conn)

    assert final["text"] == speech.text
    # The worker noticed the silence and asked for the final; Deepgram answered it from_finalize.
    closing = [m for m in conn.sent_of("Results") if m["from_finalize"]]
    assert len(closing) == 1 and closing[0]["channel"]["alternatives"][0]["transcript"]
    audio_at = [i for i, f in enumerate(conn.frames) if isinstance(f, int)]
    assert conn.frames.index("Finalize") > audio_at[-1]
    # The session's end closed the stream the documented way, and Deepgram closed normally.
    assert [c for c in conn.controls if c != "KeepAlive"] == ["Finalize", "CloseStream"]
    assert conn.frames[-1] == "CloseStream"
    assert conn.close_code == 1000
    assert browser.of_type("transcript.final") == [final]


async def test_owner_killed_mid_utterance_loses_and_repeats_no_words(redis_url: str, fake: FakeDeepgram) -> None:
    first = Speech().pause(0.3).say("good morning to you").pause(0.2)
    second = Speech().pause(0.3).say("please tell me all about green apples and red pears").pause(0.2)
    trailing_s = 1.5
    async with deepgram_stack(redis_url, fake) as stack:
        await asyncio.to_thread(stack.start, "stt-worker")
        await asyncio.to_thread(stack.wait_workers, "stt", 2)
        browser = await open_browser(stack)
        sid = browser.session.session_id
        await browser.stream(first.pcm, trailing_silence_s=trailing_s)
        final_1 = await browser.wait_type("transcript.final", WAIT_S)

        talking = asyncio.create_task(browser.stream(second.pcm, trailing_silence_s=trailing_s))
        # Kill the owner once Deepgram has sent pieces of the second utterance, before its final.
        await browser.wait_for(
            lambda e: e.get("type") == "transcript.interim" and e["utterance_id"] != final_1["utterance_id"]
            and len(e["text"].split()) >= 3
        )
        await kill_stt_owner(stack, sid)
        await talking
        final_2 = await browser.wait_for(
            lambda e: e.get("type") == "transcript.final" and e["utterance_id"] != final_1["utterance_id"]
        )
        await browser.wait_for(lambda e: e.get("type") == "avatar.reply" and e["turn_id"] == final_2["utterance_id"])
        await end_session(browser)

    old, new = fake.connections
    assert 0 < len(heard(old)) - len(first.words) < len(second.words)  # the old socket heard part of it
    assert heard(new) == second.text.split()  # the new one all of it, from the replayed audio
    assert [f["text"] for f in browser.of_type("transcript.final")] == [first.text, second.text]
    second_at = first.duration_s + trailing_s
    assert final_2["start_s"] == pytest.approx(second_at + second.words[0].start_s, abs=0.002)
    replies = [e["turn_id"] for e in browser.of_type("avatar.reply")]
    assert replies == [final_1["utterance_id"], final_2["utterance_id"]]
