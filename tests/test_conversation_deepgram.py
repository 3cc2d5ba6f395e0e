"""Turn-taking with Deepgram (the protocol fake), on the real stack: Deepgram's own signals
(SpeechStarted on any sound, finals for whatever voice it hears) must not stop the avatar unless
the user's words do. In its own module: a second stack's STT worker must not share the Redis
with the local-STT stack of `test_conversation.py`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from common import keys
from tests.conftest import Stack
from tests.fakes.deepgram import FakeDeepgram, Speech
from tests.room import Room, said, since
from tests.test_conversation import open_room
from tests.test_deepgram_stack import deepgram_stack

pytestmark = pytest.mark.slow

DEEPGRAM_KEY = "dg-conversation-key-0123"


@pytest.fixture
async def deepgram(redis_url: str) -> AsyncIterator[tuple[FakeDeepgram, Stack]]:
    async with FakeDeepgram(DEEPGRAM_KEY) as fake, deepgram_stack(redis_url, fake, key=DEEPGRAM_KEY) as stack:
        yield fake, stack


@pytest.fixture
async def dg_room(deepgram: tuple[FakeDeepgram, Stack]) -> AsyncIterator[Room]:
    """No echo: mixing would blur the words the fake spells in the samples."""
    async for r in open_room(deepgram[1]):
        yield r


async def dg_talking(room: Room) -> tuple[int, dict]:
    mark = len(room.events)
    await said(room, Speech().say("tell me about the avatar providers").pcm)
    started = await room.next("avatar.started_talking", mark, 30)
    assert started, "the avatar did not answer"
    await asyncio.sleep(1.0)
    return len(room.events), started


async def test_deepgram_speech_started_for_a_noise_does_not_stop_the_avatar(
    deepgram: tuple[FakeDeepgram, Stack], dg_room: Room,
):
    fake, _ = deepgram
    mark, started = await dg_talking(dg_room)
    conn = fake.connections[-1]
    onsets = len(conn.sent_of("SpeechStarted"))
    await said(dg_room, Speech().noise(0.4).pcm)  # a door: Deepgram says SpeechStarted, then no words
    stopped = await dg_room.next("avatar.stopped_talking", mark, 60)
    assert stopped is not None and stopped["reply_id"] == started["reply_id"] and stopped["interrupted"] is False
    assert len(conn.sent_of("SpeechStarted")) > onsets  # the vendor did say "speech started"
    assert not since(dg_room, mark, "avatar.paused")


async def test_deepgram_finals_of_the_avatars_echo_are_not_turns(deepgram: tuple[FakeDeepgram, Stack]):
    fake, stack = deepgram
    async for dg_room in open_room(stack, echo_db=-10, echo_ms=120):
        mark = len(dg_room.events)
        await said(dg_room, Speech().say("tell me about the avatar providers").pcm)
        reply = await dg_room.next("avatar.reply", mark, 30)
        assert reply is not None, "the avatar did not answer"
        # From its first word, the avatar's voice in the microphone is transcribed, as Deepgram would.
        fake.hear_foreign(reply["text"])
        stopped = await dg_room.next("avatar.stopped_talking", mark, 60)
        assert stopped is not None and stopped["interrupted"] is False
        await dg_room.quiet()
        # The echo's last final comes once Deepgram's endpoint follows its last word; the avatar
        # worker's verdict on it a moment later: wait for both rather than for a fixed time.
        echoed = await dg_room.next(
            "transcript.final", mark, 15, lambda e, own=reply["turn_id"]: e["utterance_id"] != own)
        assert echoed, "no echo was transcribed: this test proves nothing"
        ignored = await dg_room.next("transcript.ignored", mark, 15, lambda e: e["reason"] == "echo")
        heard = [(e["type"], e.get("utterance_id"), e.get("text") or e.get("reason"))
                 for e in dg_room.events[mark:] if e["type"] in ("transcript.final", "transcript.ignored")]
        assert ignored is not None, f"the echo guard never fired: {heard}"
        await asyncio.sleep(1.0)  # an answer to it would have begun by now
        others = [e for e in since(dg_room, mark, "avatar.reply") if e["reply_id"] != reply["reply_id"]]
        assert not others, f"the avatar answered its own echo: {heard}"


async def test_deepgram_words_over_the_avatar_stop_it(deepgram: tuple[FakeDeepgram, Stack], dg_room: Room):
    mark, started = await dg_talking(dg_room)
    await said(dg_room, Speech().say("wait how do i scale it").pcm)
    paused = await dg_room.next("avatar.paused", mark, 10)
    stopped = await dg_room.next("avatar.stopped_talking", mark, 15, lambda e: e.get("interrupted"))
    assert paused is not None and stopped is not None and stopped["reply_id"] == started["reply_id"]
    answer = await dg_room.next("avatar.reply", mark, 30)
    assert answer is not None and "scale" in answer["text"].lower()


async def test_deepgram_one_word_that_asks_for_the_floor_pauses_the_avatar(
    deepgram: tuple[FakeDeepgram, Stack], dg_room: Room,
):
    """"Stop" alone is a barge-in cue: its interim pauses the avatar before the final stops it
    (any other single word waits for its final, as `BARGE_IN_MIN_WORDS` is 2)."""
    mark, started = await dg_talking(dg_room)
    await said(dg_room, Speech().say("stop").pcm)
    stopped = await dg_room.next("avatar.stopped_talking", mark, 15, lambda e: e.get("interrupted"))
    assert stopped is not None and stopped["reply_id"] == started["reply_id"]
    paused = since(dg_room, mark, "avatar.paused")
    assert paused, "the avatar was stopped by the final only: the cue's interim did not pause it"
    assert dg_room.events.index(paused[0]) < dg_room.events.index(stopped)


async def test_a_turn_cut_at_its_pause_is_continued_and_answered_once(
    deepgram: tuple[FakeDeepgram, Stack], dg_room: Room,
):
    """The recognizer ends a question at its pause ("how does that?"), the avatar starts to answer;
    the user goes on: that answer is dropped and forgotten, and both turns are answered as one."""
    _, stack = deepgram
    mark = len(dg_room.events)
    await said(dg_room, Speech().say("how does that?").pause(0.7).say("work with redis cluster").pcm)
    answer = await dg_room.next("avatar.reply", mark, 30, lambda e: e.get("replaces"))
    finals = since(dg_room, mark, "transcript.final")
    assert answer is not None, "the two turns were answered apart: " + str(
        [(e["type"], e.get("text") or e.get("reply_id"), e["ts"]) for e in dg_room.events[mark:]])
    assert len(finals) == 2 and finals[0]["text"] == "how does that?"
    assert answer["replaces"] == f"r-{finals[0]['utterance_id']}" and answer["turn_id"] == finals[1]["utterance_id"]
    await dg_room.next("avatar.stopped_talking", mark, 60, lambda e: e["reply_id"] == answer["reply_id"])
    history = [m.decode() for m in stack.redis().lrange(keys.history(dg_room.session.session_id), 0, -1)]
    users = [m for m in history if '"role":"user"' in m]
    assert len(users) == 1 and "how does that? work with redis cluster" in users[0], history


async def test_deepgram_is_finalized_once_a_quiet_user_has_finished(redis_url: str):
    """Deepgram's own endpointing set to 3 s: a complete question is still closed a moment after
    the user goes quiet (the worker sends `Finalize`), an unfinished phrase is not."""
    async with FakeDeepgram(DEEPGRAM_KEY) as fake, deepgram_stack(
        redis_url, fake, key=DEEPGRAM_KEY, DEEPGRAM_ENDPOINTING_MS="3000", DEEPGRAM_EARLY_FINALIZE="true"
    ) as stack:
        async for room in open_room(stack):
            mark = len(room.events)
            await said(room, Speech().say("so i was wondering,").pcm)
            held = await room.next("transcript.interim", mark, 30, lambda e: "wondering," in e.get("text", ""))
            assert held is not None
            conn = fake.connections[-1]
            # Its final came from Deepgram's own end of speech (endpointing or UtteranceEnd), not
            # from an early Finalize.
            await _until(lambda c=conn: bool(c.sent_of("UtteranceEnd")) or any(
                m.get("speech_final") for m in c.sent_of("Results")), 30)
            assert "Finalize" not in conn.controls
            assert not since(room, mark, "avatar.reply")  # held: the sentence goes on

            await said(room, Speech().say("what is redis?").pcm)
            answer = await room.next("avatar.reply", mark, 30)
            assert answer is not None
            assert "Finalize" in conn.controls
            closing = [m for m in conn.sent_of("Results") if m.get("from_finalize")]
            assert closing and "redis?" in closing[-1]["channel"]["alternatives"][0]["transcript"]
            final = next(e for e in since(room, mark, "transcript.final"))
            assert final["text"].startswith("so i was wondering,") and final["text"].endswith("what is redis?")


async def test_deepgram_is_not_finalized_early_while_the_avatar_talks(redis_url: str):
    """What is heard while the avatar talks may be its own voice: even a finished question is
    left to Deepgram's endpoint then (the echo guard judges the piece Deepgram cuts)."""
    async with FakeDeepgram(DEEPGRAM_KEY) as fake, deepgram_stack(
        redis_url, fake, key=DEEPGRAM_KEY, DEEPGRAM_ENDPOINTING_MS="1500"
    ) as stack:
        async for room in open_room(stack):
            mark, _ = await dg_talking(room)
            conn = fake.connections[-1]
            await said(room, Speech().say("what is redis?").pcm)
            final = await room.next("transcript.final", mark, 30, lambda e: "redis?" in e.get("text", ""))
            assert final is not None
            assert "Finalize" not in conn.controls
            closing = [m for m in conn.sent_of("Results") if "redis?" in m["channel"]["alternatives"][0]["transcript"]]
            assert closing and not any(m.get("from_finalize") for m in closing)


async def _until(check, timeout_s: float) -> None:
    """Poll what the fake recorded (it has no event to wait on)."""
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
