"""The Deepgram engine against the protocol fake (`tests/fakes/deepgram.py`), on loopback only.

The fake recognizes words from the audio itself (see its docstring), so every expectation below is
computed from the `Speech` that was sent: which words, and where they are in session time.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import pytest
from pydantic import SecretStr

from common.settings import Settings
from stt_service.engine import SttError, SttResult, utterance_id
from stt_service.providers.deepgram import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, DeepgramEngine, DeepgramStream
from tests.fakes.deepgram import FakeDeepgram, Speech

KEY = "dg-test-key-0123456789"
FAST: dict[str, Any] = {"keepalive_s": 0.5, "backoff_base_s": 0.01, "backoff_max_s": 0.05, "drain_timeout_s": 5.0}
GUARD_S = 20.0  # hang guard only: a broken engine fails fast instead of at pytest's timeout


def settings_for(fake: FakeDeepgram, key: str = KEY, **deepgram: Any) -> Settings:
    """Settings pointing at the fake; `deepgram_*` fields not yet in `Settings` are set by copy."""
    base = Settings(_env_file=None, deepgram_api_key=SecretStr(key), deepgram_url=fake.url)
    return base.model_copy(update=deepgram)


class Collector:
    """Reads a stream's results in the background so a test can wait for one of them."""

    def __init__(self, stream: DeepgramStream) -> None:
        self.items: list[SttResult] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: DeepgramStream) -> None:
        try:
            async for result in stream.results():
                self.items.append(result)
                self._changed.set()
        finally:
            self._changed.set()

    async def until(self, done: Callable[[list[SttResult]], bool]) -> None:
        async with asyncio.timeout(GUARD_S):
            while not done(self.items):
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"results ended early: {self.items}")
                self._changed.clear()
                await self._changed.wait()

    async def all(self) -> list[SttResult]:
        async with asyncio.timeout(GUARD_S):
            await self.task
        return self.items


def finals(results: list[SttResult]) -> list[SttResult]:
    return [r for r in results if r.kind == "final"]


async def transcribe(engine: DeepgramEngine, speech: Speech, *, start_offset_s: float = 0.0) -> list[SttResult]:
    stream = await engine.open("s1", language="en", start_offset_s=start_offset_s)
    results = Collector(stream)
    await stream.send(speech.pcm)
    await stream.close()
    return await results.all()


def assert_ordered(results: list[SttResult]) -> None:
    """Finals follow each other in session time; checkpoints never go back; finals precede them."""
    done = [r for r in results if r.kind == "final"]
    for a, b in itertools.pairwise(done):
        assert a.end_s <= b.start_s, (a, b)
    marks = [r.end_s for r in results if r.kind == "checkpoint"]
    assert marks == sorted(marks)
    for r in done:
        assert r.start_s <= r.end_s


# --- utterance assembly -----------------------------------------------------------------------


async def test_multi_segment_utterance_is_assembled_once() -> None:
    async with FakeDeepgram(KEY, words_per_final=2) as fake:
        speech = Speech().pause(0.5).say("the quick brown fox jumps").pause(1.5)
        results = await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech, start_offset_s=3.0)

    # Deepgram sent several is_final segments for the one utterance ...
    sent = fake.connections[0].sent_of("Results")
    segments = [m for m in sent if m["is_final"] and m["channel"]["alternatives"][0]["transcript"]]
    assert len(segments) == 3
    assert [m["speech_final"] for m in segments] == [False, False, True]
    # ... which become exactly one final with every word once.
    [final] = finals(results)
    first, last = speech.words[0], speech.words[-1]
    assert final.text == "the quick brown fox jumps"
    assert final.utterance_id == utterance_id(3.0 + first.start_s)
    assert final.start_s == pytest.approx(3.0 + first.start_s)
    assert final.end_s == pytest.approx(3.0 + last.end_s)
    # Interims show the utterance so far: each one a prefix of the final, never repeated words.
    interims = [r.text for r in results if r.kind == "interim"]
    assert interims and all(final.text.startswith(text) for text in interims)
    assert interims[-1] == final.text
    assert {r.utterance_id for r in results if r.kind == "interim"} == {final.utterance_id}
    # One barge-in signal, before any text; a checkpoint right after the final, at or past its end.
    kinds = [r.kind for r in results]
    assert kinds.count("speech_started") == 1
    assert kinds.index("speech_started") < kinds.index("interim")
    after = results[kinds.index("final") + 1]
    assert after.kind == "checkpoint" and after.end_s >= final.end_s
    assert_ordered(results)


async def test_two_utterances_and_silence_checkpoints() -> None:
    async with FakeDeepgram(KEY, words_per_final=3, silence_final_s=1.0) as fake:
        speech = Speech().say("good morning").pause(1.2).say("how are you today").pause(3.0)
        results = await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech)
    assert [f.text for f in finals(results)] == ["good morning", "how are you today"]
    assert [r.kind for r in results].count("speech_started") == 2
    # Silence after the last final is checkpointed too (Deepgram's empty finals).
    marks = [r.end_s for r in results if r.kind == "checkpoint"]
    assert marks[-1] > finals(results)[-1].end_s + 1.0
    assert_ordered(results)


async def test_utterance_end_closes_the_utterance_when_vad_never_endpoints() -> None:
    async with FakeDeepgram(KEY, speech_final=False) as fake:  # a noisy room: no speech_final at all
        speech = Speech().say("is anybody there").pause(1.5).say("hello").pause(1.5)
        results = await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech)
    sent = fake.connections[0].sent
    assert not any(m.get("speech_final") for m in sent)
    assert len(fake.connections[0].sent_of("UtteranceEnd")) == 2
    assert [f.text for f in finals(results)] == ["is anybody there", "hello"]
    assert [f.utterance_id for f in finals(results)] == [
        utterance_id(speech.words[0].start_s), utterance_id(speech.words[3].start_s),
    ]
    assert_ordered(results)


# --- control messages, chunking, query --------------------------------------------------------


async def test_a_finalize_without_an_answer_still_closes_the_utterance() -> None:
    """Deepgram may not answer `Finalize`: the words it already sent become the final."""
    async with FakeDeepgram(KEY) as fake:
        fake.answer_finalize = False
        engine = DeepgramEngine(settings_for(fake), **FAST, finalize_timeout_s=0.3)
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        await stream.send(Speech().say("hello world").pcm)  # "world" stays open: no endpoint
        await results.until(lambda items: any(r.kind == "interim" for r in items))
        await stream.finalize()
        await results.until(lambda items: bool(finals(items)))
        assert [f.text for f in finals(results.items)] == ["hello"]  # all it said: "world" never came
        conn = fake.connections[0]
        assert conn.controls.count("Finalize") == 1 and not any(r.get("from_finalize") for r in conn.sent_of("Results"))
        await stream.close()
        items = await results.all()
    assert len(finals(items)) == 2 and finals(items)[1].text == "world"  # CloseStream flushed the rest, once
    assert_ordered(items)


async def test_finalize_and_close_stream_are_sent_at_the_right_moments() -> None:
    async with FakeDeepgram(KEY) as fake:
        engine = DeepgramEngine(settings_for(fake), **FAST)
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        speech = Speech().say("hello world")  # ends mid-speech: no endpoint without Finalize
        await stream.send(speech.pcm)
        conn = await fake.wait_connections(1)
        # The fake hears a word when its burst ends: "world" stays open until Finalize.
        await results.until(lambda items: any(r.kind == "interim" and r.text == "hello" for r in items))
        assert "Finalize" not in conn.controls and not finals(results.items)

        await stream.finalize()
        await results.until(lambda items: bool(finals(items)))
        assert finals(results.items)[0].text == "hello world"
        assert conn.sent_of("Results")[-1]["from_finalize"] is True
        # Finalize went after all the audio, and only once.
        assert conn.controls.count("Finalize") == 1
        assert conn.frames.index("Finalize") > max(i for i, f in enumerate(conn.frames) if isinstance(f, int))
        assert conn.audio_bytes == len(speech.pcm)
        assert "CloseStream" not in conn.controls

        await stream.send(Speech().say("bye").pcm)
        await stream.close()
        items = await results.all()
    assert [f.text for f in finals(items)] == ["hello world", "bye"]  # the tail is flushed on close
    assert conn.frames[-1] == "CloseStream" and conn.controls.count("CloseStream") == 1
    assert conn.close_code == 1000 and conn.sent[-1]["type"] == "Metadata"
    assert len(fake.connections) == 1
    assert_ordered(items)


async def test_audio_is_rechunked_into_20_to_100_ms_frames() -> None:
    async with FakeDeepgram(KEY) as fake:
        engine = DeepgramEngine(settings_for(fake), **FAST)
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        speech = Speech().say("one two three four").pause(1.0).say("five six").pause(0.5)
        pcm = speech.pcm
        sizes = [2, 6, 0, 640, 30, 4000, 2, 64000]  # tiny frames, empty calls and big blobs
        sent, i = 0, 0
        while sent < len(pcm):
            size = sizes[i % len(sizes)]
            await stream.send(pcm[sent : sent + size])
            sent, i = sent + size, i + 1
        await stream.close()
        items = await results.all()
    conn = fake.connections[0]
    assert 0 not in conn.chunk_sizes
    assert all(MIN_CHUNK_BYTES <= n <= MAX_CHUNK_BYTES and n % 2 == 0 for n in conn.chunk_sizes)
    assert len(pcm) <= conn.audio_bytes < len(pcm) + MIN_CHUNK_BYTES  # at most the final frame padded
    assert [f.text for f in finals(items)] == ["one two three four", "five six"]


async def test_query_parameters_and_auth_header() -> None:
    async with FakeDeepgram(KEY) as fake:
        settings = settings_for(
            fake, deepgram_model="nova-3-general", deepgram_endpointing_ms=450,
            deepgram_utterance_end_ms=1500, deepgram_keyterms="Deepgram, LiveKit avatar ,,",
        )
        engine = DeepgramEngine(settings, **FAST)
        stream = await engine.open("s1", language="de", start_offset_s=0.0)
        await stream.close()
    assert fake.connections[0].query == {
        "model": ["nova-3-general"],
        "language": ["de"],
        "encoding": ["linear16"],
        "sample_rate": ["16000"],
        "channels": ["1"],
        "interim_results": ["true"],
        "endpointing": ["450"],
        "utterance_end_ms": ["1500"],
        "vad_events": ["true"],
        "smart_format": ["true"],
        "punctuate": ["true"],
        "keyterm": ["Deepgram", "LiveKit avatar"],
    }
    [handshake] = fake.handshakes
    assert handshake.authorization == f"Token {KEY}" and handshake.status == 101


async def test_default_query_parameters() -> None:
    async with FakeDeepgram(KEY) as fake:
        stream = await DeepgramEngine(settings_for(fake), **FAST).open("s1", language="en", start_offset_s=0)
        await stream.close()
    query = fake.connections[0].query
    assert (query["model"], query["endpointing"], query["utterance_end_ms"]) == (["nova-3"], ["300"], ["1000"])
    assert "keyterm" not in query


# --- keeping the socket alive -----------------------------------------------------------------

PAUSE_S = 12.0  # longer than Deepgram's real 10 s idle timeout, and 8x the fake's 1.5 s here


async def test_long_pause_keeps_the_socket_open_with_keepalives() -> None:
    async with FakeDeepgram(KEY, idle_timeout_s=1.5) as fake:
        engine = DeepgramEngine(settings_for(fake), **{**FAST, "keepalive_s": 0.5})
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        first = Speech().say("are you there").pause(0.5)
        await stream.send(first.pcm)
        await results.until(lambda items: len(finals(items)) == 1)

        await asyncio.sleep(PAUSE_S)  # the user is silent and the browser sends nothing

        conn = fake.connections[0]
        assert not conn.closed.is_set()
        second = Speech().say("still here").pause(0.5)
        await stream.send(second.pcm)
        await stream.close()
        items = await results.all()
    assert len(fake.connections) == 1 and conn.close_code == 1000
    assert conn.controls.count("KeepAlive") >= PAUSE_S / 1.5  # far more than the idle timer allows to miss
    assert [f.text for f in finals(items)] == ["are you there", "still here"]
    # Deepgram's clock follows the audio, not the wall: the second utterance starts right after the first.
    assert finals(items)[1].start_s == pytest.approx(first.duration_s + second.words[0].start_s)


async def test_without_keepalive_the_idle_socket_is_closed_and_replaced() -> None:
    async with FakeDeepgram(KEY, idle_timeout_s=0.5) as fake:
        engine = DeepgramEngine(settings_for(fake), **{**FAST, "keepalive_s": None})
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        first = Speech().say("hello").pause(0.5)
        await stream.send(first.pcm)
        await results.until(lambda items: len(finals(items)) == 1)

        conn = fake.connections[0]
        async with asyncio.timeout(GUARD_S):
            await conn.closed.wait()
        assert (conn.close_code, conn.close_reason) == (1011, "NET-0001")
        assert "KeepAlive" not in conn.controls

        await fake.wait_connections(2)  # the engine reconnected on its own
        await stream.send(Speech().say("again").pause(0.5).pcm)
        await stream.close()
        items = await results.all()
    assert [f.text for f in finals(items)] == ["hello", "again"]


# --- reconnecting -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["abort", "1011"])
async def test_dropped_connection_mid_utterance_loses_no_words(how: Literal["abort", "1011"]) -> None:
    async with FakeDeepgram(KEY, words_per_final=2) as fake:
        speech = (
            Speech().pause(0.3).say("first we talk").pause(1.2)
            .say("then the line drops right in the middle").pause(1.2).say("and we go on").pause(1.2)
        )
        drop_at = speech.words[5].start_s + 0.1  # inside "line", after "then the" went final
        fake.drop_next(after_bytes=speech.byte_at(drop_at), how=how)
        offset = 7.5
        results = await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech, start_offset_s=offset)

    assert len(fake.connections) == 2 and fake.connections[0].dropped
    expected = ["first we talk", "then the line drops right in the middle", "and we go on"]
    assert [f.text for f in finals(results)] == expected
    starts = [speech.words[0], speech.words[3], speech.words[11]]
    assert [f.utterance_id for f in finals(results)] == [utterance_id(offset + w.start_s) for w in starts]
    assert [f.start_s for f in finals(results)] == pytest.approx([offset + w.start_s for w in starts])
    assert [r.kind for r in results].count("speech_started") == 3
    assert_ordered(results)
    if how == "1011":
        # The close frame came after the first final: only the audio after it is sent again.
        resent = fake.connections[1].audio_bytes
        assert resent <= len(speech.pcm) - speech.byte_at(speech.words[2].end_s)


async def test_replayed_final_is_not_repeated_when_the_drop_follows_it() -> None:
    async with FakeDeepgram(KEY) as fake:
        speech = Speech().say("short one").pause(1.2).say("second").pause(1.0)
        fake.drop_next(after_bytes=speech.byte_at(speech.words[1].end_s + 0.6), how="1011")
        results = await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech)
    assert [f.text for f in finals(results)] == ["short one", "second"]
    assert_ordered(results)


async def test_replay_from_inside_a_handled_word_does_not_repeat_it() -> None:
    # The utterance closes on UtteranceEnd right at its last word's end (1.03 s), inside a 50 ms
    # chunk: the replay after the drop starts at that chunk (1.00 s), with the word's last 30 ms.
    async with FakeDeepgram(KEY, speech_final=False, words_per_final=2) as fake:
        speech = Speech().pause(0.33).say("ab cd").pause(1.5).say("ef").pause(1.5)
        fake.drop_next(after_bytes=speech.byte_at(2.2), how="1011")
        results = await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech)
    assert fake.connections[1].sent_of("Results")[0]["channel"]["alternatives"][0]["words"]  # the fragment
    assert [f.text for f in finals(results)] == ["ab cd", "ef"]
    assert [r.kind for r in results].count("speech_started") == 2
    assert_ordered(results)


async def test_replay_buffer_is_bounded_without_losing_unsent_audio(caplog: pytest.LogCaptureFixture) -> None:
    # A 4 s monologue with no final until its end, sent in one call, against a 1 s replay buffer.
    async with FakeDeepgram(KEY, words_per_final=100) as fake:
        speech = Speech().say("one two three four five six seven eight nine ten").pause(0.5)
        engine = DeepgramEngine(settings_for(fake), **{**FAST, "replay_max_s": 1.0})
        results = await transcribe(engine, speech)
    assert "a reconnect now would lose" in caplog.text
    assert fake.connections[0].audio_bytes >= len(speech.pcm)  # all of it reached Deepgram
    assert [f.text for f in finals(results)] == [speech.text]


@pytest.mark.parametrize("control", ["Finalize", "CloseStream"])
async def test_a_control_lost_with_the_socket_is_sent_again(control: str) -> None:
    async with FakeDeepgram(KEY) as fake:
        fake.drop_next(at_control=control)
        engine = DeepgramEngine(settings_for(fake), **FAST)
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        speech = Speech().say("do not lose me")  # no trailing silence: only the control ends it
        await stream.send(speech.pcm)
        if control == "Finalize":
            await stream.finalize()
            await results.until(lambda items: bool(finals(items)))
        await stream.close()
        items = await results.all()
    first, second = fake.connections
    assert first.dropped and first.controls[-1] == control
    assert second.controls.count(control) == 1 and second.audio_bytes >= len(speech.pcm)
    assert [f.text for f in finals(items)] == ["do not lose me"]


async def test_gives_up_after_limited_retries_with_a_non_fatal_error() -> None:
    async with FakeDeepgram(KEY) as fake:
        engine = DeepgramEngine(settings_for(fake), **{**FAST, "max_attempts": 3})
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        await stream.send(Speech().say("hello").pcm)
        await results.until(lambda items: bool(items))
        fake.reject_next(503, times=10)  # Deepgram stays down ...
        await fake.disconnect(0)  # ... after dropping the live socket
        with pytest.raises(SttError) as raised:
            await results.all()
    assert (raised.value.code, raised.value.fatal) == ("deepgram_unavailable", False)
    assert [h.status for h in fake.handshakes] == [101, 503, 503, 503]


async def test_a_socket_that_always_dies_on_the_same_audio_is_not_retried_forever() -> None:
    async with FakeDeepgram(KEY) as fake:
        speech = Speech().say("poison in this sentence").pause(0.2)
        for _ in range(10):
            fake.drop_next(after_bytes=speech.byte_at(0.6))  # no final before it: no progress
        engine = DeepgramEngine(settings_for(fake), **{**FAST, "max_attempts": 3})
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        await stream.send(speech.pcm)
        with pytest.raises(SttError) as raised:
            await results.all()
    assert (raised.value.code, raised.value.fatal) == ("deepgram_unavailable", False)
    assert len(fake.connections) == 4  # the first socket and three retries


async def test_transient_handshake_failures_are_retried() -> None:
    async with FakeDeepgram(KEY) as fake:
        fake.reject_next(503, times=2)
        speech = Speech().say("third time lucky").pause(0.5)
        results = await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech)
    assert [h.status for h in fake.handshakes] == [503, 503, 101]
    assert [f.text for f in finals(results)] == ["third time lucky"]


# --- permanent failures -----------------------------------------------------------------------


async def test_bad_key_is_one_fatal_error_after_one_handshake() -> None:
    async with FakeDeepgram(KEY) as fake:
        engine = DeepgramEngine(settings_for(fake, key="wrong-key"), **FAST)
        with pytest.raises(SttError) as raised:
            await engine.open("s1", language="en", start_offset_s=0.0)
        await engine.aclose()
    assert (raised.value.code, raised.value.fatal) == ("deepgram_auth", True)
    assert raised.value.message == "Deepgram rejected the API key"
    assert [h.status for h in fake.handshakes] == [401]
    assert not fake.connections


async def test_bad_settings_are_one_fatal_error() -> None:
    async with FakeDeepgram(KEY) as fake:
        engine = DeepgramEngine(settings_for(fake, deepgram_utterance_end_ms=500), **FAST)
        with pytest.raises(SttError) as raised:
            await engine.open("s1", language="en", start_offset_s=0.0)
    assert (raised.value.code, raised.value.fatal) == ("deepgram_bad_request", True)
    assert "utterance_end_ms" in raised.value.message
    assert [h.status for h in fake.handshakes] == [400]


async def test_key_rejected_on_reconnect_is_fatal_without_retries() -> None:
    async with FakeDeepgram(KEY) as fake:
        engine = DeepgramEngine(settings_for(fake), **FAST)
        stream = await engine.open("s1", language="en", start_offset_s=0.0)
        results = Collector(stream)
        fake.api_key = "rotated"  # the key was revoked while the session ran
        await fake.disconnect(0)
        with pytest.raises(SttError) as raised:
            await results.all()
    assert (raised.value.code, raised.value.fatal) == ("deepgram_auth", True)
    assert [h.status for h in fake.handshakes] == [101, 401]


async def test_open_gives_up_when_deepgram_stays_down() -> None:
    async with FakeDeepgram(KEY) as fake:
        fake.reject_next(503, times=10)
        engine = DeepgramEngine(settings_for(fake), **{**FAST, "max_attempts": 2})
        with pytest.raises(SttError) as raised:
            await engine.open("s1", language="en", start_offset_s=0.0)
    assert (raised.value.code, raised.value.fatal) == ("deepgram_unavailable", False)
    assert [h.status for h in fake.handshakes] == [503, 503, 503]


async def test_missing_key_fails_without_connecting() -> None:
    async with FakeDeepgram(KEY) as fake:
        settings = Settings(_env_file=None, deepgram_api_key=None, deepgram_url=fake.url)
        with pytest.raises(SttError) as raised:
            await DeepgramEngine(settings, **FAST).open("s1", language="en", start_offset_s=0.0)
    assert raised.value.code == "deepgram_auth" and raised.value.fatal
    assert not fake.handshakes


async def test_api_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeDeepgram(KEY) as fake:
        fake.drop_next(after_bytes=0)
        speech = Speech().say("secret stuff").pause(0.5)
        await transcribe(DeepgramEngine(settings_for(fake), **FAST), speech)
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.server"))
    assert "Authorization" in ours  # the client's handshake was logged ...
    assert KEY not in ours  # ... without the key


# --- concurrency ------------------------------------------------------------------------------


async def test_two_sessions_stream_concurrently_on_separate_sockets() -> None:
    async with FakeDeepgram(KEY) as fake:
        engine = DeepgramEngine(settings_for(fake), **FAST)
        a = await engine.open("a", language="en", start_offset_s=0.0)
        b = await engine.open("b", language="es", start_offset_s=2.0)
        ra, rb = Collector(a), Collector(b)
        speech_a = Speech().say("alpha bravo charlie").pause(1.2).say("delta").pause(1.2)
        speech_b = Speech().say("uno dos").pause(1.2).say("tres cuatro cinco").pause(1.2)

        async def stream(s: DeepgramStream, pcm: bytes) -> None:
            for i in range(0, len(pcm), 640):  # 20 ms frames, interleaved between the sessions
                await s.send(pcm[i : i + 640])
                await asyncio.sleep(0)
            await s.close()

        await asyncio.gather(stream(a, speech_a.pcm), stream(b, speech_b.pcm))
        items_a, items_b = await ra.all(), await rb.all()
        await engine.aclose()
    assert [f.text for f in finals(items_a)] == ["alpha bravo charlie", "delta"]
    assert [f.text for f in finals(items_b)] == ["uno dos", "tres cuatro cinco"]
    assert finals(items_b)[0].utterance_id == utterance_id(2.0 + speech_b.words[0].start_s)
    assert sorted(c.param("language") for c in fake.connections) == ["en", "es"]
    assert sorted(c.audio_bytes for c in fake.connections) == sorted([len(speech_a.pcm), len(speech_b.pcm)])


# --- the fake itself --------------------------------------------------------------------------


async def test_fake_ignores_unknown_controls_and_closes_on_empty_frames() -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    async with FakeDeepgram(KEY) as fake:
        url = f"{fake.url}?model=nova-3&encoding=linear16&sample_rate=16000&interim_results=true"
        async with connect(url, additional_headers={"Authorization": f"Token {KEY}"}) as ws:
            await ws.send('{"type":"Whatever"}')
            await ws.send(Speech().say("hi").pcm)
            await ws.send(b"")
            with pytest.raises(ConnectionClosedError):
                while True:
                    await ws.recv()
    conn = fake.connections[0]
    assert conn.controls == ["Whatever"] and conn.frames[-1] == 0
    assert conn.close_code == 1011


async def test_fake_interims_on_a_clock_carry_the_words_ended_by_each_tick() -> None:
    from websockets.asyncio.client import connect

    speech = Speech(word_s=0.3, gap_s=0.1).say("one two three four five").pause(0.5)
    async with FakeDeepgram(KEY, words_per_final=10, interim_every_s=1.0) as fake:
        url = f"{fake.url}?model=nova-3&encoding=linear16&sample_rate=16000&interim_results=true&endpointing=300"
        async with connect(url, additional_headers={"Authorization": f"Token {KEY}"}) as ws:
            await ws.send(speech.pcm)
            await ws.send('{"type":"CloseStream"}')
            results = [m async for m in _messages(ws) if m.get("type") == "Results"]
    interims = [(r["start"] + r["duration"], r["channel"]["alternatives"][0]["transcript"])
                for r in results if not r["is_final"]]
    # Words end at 0.3, 0.7, 1.1, 1.5, 1.9 s: ticks at 1 s and 2 s.
    assert interims == [(1.0, "one two"), (2.0, "one two three four five")]
    closing = [r["channel"]["alternatives"][0]["transcript"] for r in results if r["is_final"]]
    assert closing[0] == "one two three four five"
    assert fake.connections[0].controls == ["CloseStream"]


async def _messages(ws) -> AsyncIterator[dict[str, Any]]:
    """The fake's JSON messages until it closes."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                yield json.loads(message)
    except ConnectionClosed:
        return
