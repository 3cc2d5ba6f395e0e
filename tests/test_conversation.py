"""Turn-taking in a room, on the real stack (local Whisper + piper, real Redis, real processes).

Each test talks through `tests/room.Room`: one microphone stream at real-time pace that hears the
user (espeak-ng), noise, and — where said — the avatar's own voice played back into it, the way
laptop speakers leak into a microphone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest

from common.bus import dump
from common.models import UserSpeech
from tests.client import create_session
from tests.conftest import Stack, start_stack
from tests.room import Room, noise, said, since, speech
from tests.speech import speech_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not speech_available(), reason="needs espeak-ng and sox")]

LONG_QUESTION = "Tell me about the avatar providers."  # answered with ~10 s of speech


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    s = start_stack(redis_url, SESSION_IDLE_TIMEOUT_S="600")
    yield s
    s.stop_all()


async def open_room(stack: Stack, echo_db: float | None = None, echo_ms: int = 120) -> AsyncIterator[Room]:
    room = Room(await create_session(stack.base_url), 0.0 if echo_db is None else 10 ** (echo_db / 20), echo_ms)
    stop = asyncio.Event()
    task = asyncio.create_task(room.run(stop))
    assert await room.wait(lambda e: e["type"] == "session.ready", 60), "no session.ready"
    try:
        yield room
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def room(stack: Stack) -> AsyncIterator[Room]:
    async for r in open_room(stack):
        yield r


async def talking(room: Room, text: str = LONG_QUESTION) -> tuple[int, dict]:
    """Ask something with a long answer; returns once the avatar is audibly answering."""
    mark = len(room.events)
    await said(room, speech(text))
    started = await room.next("avatar.started_talking", mark, 30)
    assert started, "the avatar did not answer"
    await asyncio.sleep(1.5)  # into the reply
    return len(room.events), started


def stops(room: Room, mark: int) -> list[dict]:
    return [e for e in since(room, mark, "avatar.stopped_talking") if e.get("interrupted")]


async def test_a_pause_mid_sentence_does_not_end_the_turn(room: Room):
    mark = len(room.events)
    pause = np.zeros(int(0.9 * 16000), np.float32)
    end = await said(room, np.concatenate([speech("So I was wondering"), pause,
                                           speech("how many people can talk to one speech worker at the same time?")]))
    reply = await room.next("avatar.reply", mark, 30)
    assert reply is not None
    finals = since(room, mark, "transcript.final")
    assert len(finals) == 1, [f["text"] for f in finals]
    assert "wonder" in finals[0]["text"].lower() and "time" in finals[0]["text"].lower()
    assert reply["_rx"] > end  # answered after the user finished, not at the pause
    # The first half was shown as provisional text, never as a final of its own.
    interims = [e for e in since(room, mark, "transcript.interim") if e["_rx"] < finals[0]["_rx"]]
    assert any("wonder" in e["text"].lower() for e in interims)
    assert {e["utterance_id"] for e in interims} == {finals[0]["utterance_id"]}


async def test_backchannels_and_noise_over_the_avatar_do_not_stop_it(room: Room):
    mark, started = await talking(room)
    rng = np.random.default_rng(1)
    for sound in (speech("Mhm."), noise("thump", rng), speech("Yeah."), noise("white", rng)):
        await said(room, sound)
        await asyncio.sleep(0.8)
    stopped = await room.next("avatar.stopped_talking", mark, 40)
    assert stopped is not None and stopped["reply_id"] == started["reply_id"]
    heard = [(e["type"], e.get("text")) for e in room.events[mark:] if e["type"] != "avatar.audio"]
    assert stopped["interrupted"] is False, heard  # it finished its answer
    assert not since(room, mark, "avatar.reply"), "a backchannel became a turn"
    for ignored in since(room, mark, "transcript.ignored"):
        assert ignored["reason"] == "backchannel"


async def test_words_over_the_avatar_pause_it_then_the_question_stops_it(room: Room):
    mark, started = await talking(room)
    await said(room, speech("Wait, who made this project?"))
    stopped = await room.next("avatar.stopped_talking", mark, 15, lambda e: e.get("interrupted"))
    assert stopped is not None and stopped["reply_id"] == started["reply_id"]
    question = await room.next("transcript.final", mark, 30,
                               lambda e: any(w in e["text"].lower() for w in ("made", "project")))
    assert question is not None
    reply = await room.next("avatar.reply", mark, 30, lambda e: e["turn_id"] == question["utterance_id"])
    assert reply is not None and reply["reply_id"] != started["reply_id"]  # the question is answered
    # The words paused it, then the question stopped it. On a loaded machine the recognizer can
    # end "Wait," at its comma first: that final stopped the reply (paused by then or not), and the
    # reply begun for "Wait," either waited unheard while the user went on (the floor) or was on
    # air and the words paused it; the question is then answered as one, replacing that reply.
    paused = since(room, mark, "avatar.paused")
    if reply.get("replaces") is None:
        assert paused, "the words did not pause the avatar"
    for p in paused:
        if p["reply_id"] == started["reply_id"]:
            assert p["_rx"] <= stopped["_rx"]
        else:
            assert p["reply_id"] == reply.get("replaces"), (p, reply)
    assert reply.get("replaces") != started["reply_id"]
    assert not since(room, mark, "avatar.resumed")


async def test_a_false_interruption_resumes_where_it_paused(stack: Stack, room: Room):
    """Words that never become a turn (here: what the STT worker publishes for an interim,
    with no final after it) pause the avatar, which resumes after BARGE_IN_RESUME_S (2.5 s)."""
    mark, started = await talking(room)
    sid = room.session.session_id
    speech_msg = UserSpeech(utterance_id="u999999999", text="hold on there", started_at=int(time.time() * 1000))
    stack.redis().xadd(f"turns:{{{sid}}}", {"t": dump(speech_msg)})
    paused = await room.next("avatar.paused", mark, 10)
    resumed = await room.next("avatar.resumed", mark, 10)
    assert paused and resumed and paused["reply_id"] == resumed["reply_id"] == started["reply_id"]
    stopped = await room.next("avatar.stopped_talking", mark, 40)
    assert stopped is not None and stopped["interrupted"] is False  # it finished after resuming


async def test_the_avatars_own_voice_in_the_microphone_is_neither_barge_in_nor_turn(stack: Stack):
    # -15 dB: at -10 dB tiny.en mishears some echo fragments beyond recognition ("First speech to
    # attack" for "For speech to text"); bench/turns.py reports how often, per level.
    async for room in open_room(stack, echo_db=-15, echo_ms=60):
        mark = len(room.events)
        await said(room, speech(LONG_QUESTION))
        assert await room.next("avatar.started_talking", mark, 30)
        stopped = await room.next("avatar.stopped_talking", mark, 60)
        assert stopped is not None
        await room.quiet()
        await asyncio.sleep(2.0)  # the echo's last words reach the recognizer after the reply ends
        heard_log = [(e["type"], e.get("text"), e.get("reason")) for e in room.events[mark:]
                     if e["type"] in ("transcript.final", "transcript.ignored", "avatar.paused", "avatar.resumed",
                                      "avatar.stopped_talking", "avatar.reply")]
        assert not stops(room, mark), f"the avatar interrupted itself: {heard_log}"
        replies = {e["turn_id"] for e in since(room, mark, "avatar.reply")}
        assert len(replies) == 1, f"the avatar answered its own words: {replies}"
        heard = since(room, mark, "transcript.final")
        assert heard[1:], "the echo was not heard at all: this test proves nothing"
        ignored = {e["utterance_id"] for e in since(room, mark, "transcript.ignored") if e["reason"] == "echo"}
        assert {f["utterance_id"] for f in heard[1:]} <= ignored
