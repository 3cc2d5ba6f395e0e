"""The local STT engine (Silero VAD + faster-whisper tiny.en) on synthetic speech.

Audio is fed in 20 ms frames as fast as the engine takes it: the engine must not depend on
real-time pacing, and no assertion here depends on wall-clock time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest

from common.pcm import FRAME_BYTES
from common.settings import Settings
from stt_service.engine import SttResult, utterance_id
from stt_service.providers.local import (
    RISE_INTERIM_S,
    SAMPLE_RATE,
    VAD_WINDOW,
    LocalSttEngine,
    _Segmenter,
    _Whisper,
    clean_transcript,
)
from tests.speech import silence_pcm, speech_available, speech_pcm

QUESTION = "What is the capital of France"
SECOND = "Tell me a joke about penguins"

needs_speech = pytest.mark.skipif(not speech_available(), reason="needs espeak-ng and sox")


@pytest.fixture(scope="module")
def engine() -> Iterator[LocalSttEngine]:
    """One engine (one model load) for the module; each test opens its own streams."""
    eng = LocalSttEngine(Settings(_env_file=None, local_stt_model="", local_stt_threads=2))
    yield eng
    eng.whisper.close()


async def transcribe(
    engine: LocalSttEngine,
    pcm: bytes,
    *,
    start_offset_s: float = 0.0,
    language: str = "en",
    finalize_after: int | None = None,
) -> list[SttResult]:
    """Feed `pcm` in 20 ms frames (finalizing after `finalize_after` bytes), close, return all results."""
    stream = await engine.open("test-session", language=language, start_offset_s=start_offset_s)
    results: list[SttResult] = []

    async def collect() -> None:
        async for result in stream.results():
            results.append(result)

    reader = asyncio.create_task(collect())
    for offset in range(0, len(pcm), FRAME_BYTES):
        if finalize_after is not None and offset == finalize_after:
            await stream.finalize()
        await stream.send(pcm[offset : offset + FRAME_BYTES])
    await stream.close()
    await asyncio.wait_for(reader, 60)
    return results


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_match(reference: str, hypothesis: str) -> float:
    """Share of the reference's words found in the hypothesis (case and punctuation ignored)."""
    ref, hyp = Counter(words(reference)), Counter(words(hypothesis))
    return sum((ref & hyp).values()) / sum(ref.values())


def finals(results: list[SttResult]) -> list[SttResult]:
    return [r for r in results if r.kind == "final"]


def assert_well_formed(results: list[SttResult]) -> None:
    """Checkpoints never go back; each final follows its speech_started and is checkpointed."""
    checkpoints = [r.end_s for r in results if r.kind == "checkpoint"]
    assert checkpoints == sorted(checkpoints)
    for i, result in enumerate(results):
        if result.kind == "final":
            assert any(r.kind == "speech_started" for r in results[:i])
            assert result.utterance_id == utterance_id(result.start_s)
            assert result.start_s < result.end_s
            assert any(r.kind == "checkpoint" and r.end_s >= result.end_s for r in results[i + 1 :])
        if result.kind == "interim":
            later = [r for r in results[i:] if r.kind == "final"]
            assert not later or later[0].utterance_id == result.utterance_id or not result.text


def test_clean_transcript_drops_hallucinations() -> None:
    assert clean_transcript("  What is the   capital of France? ") == "What is the capital of France?"
    for junk in ["", "  ", "you", "You.", "[BLANK_AUDIO]", "(music)", "...", " ?! ", "Thanks for watching!", "♪♪"]:
        assert clean_transcript(junk) == "", junk
    assert clean_transcript("[BLANK_AUDIO] hello there") == "hello there"
    assert clean_transcript("Is it possible to? Is it possible to?") == "Is it possible to?"  # doubled
    assert clean_transcript("No. No, I meant the other one.") == "No. No, I meant the other one."


def test_segmenter_cuts_long_speech_into_bounded_utterances() -> None:
    """Endless speech is cut at MAX_UTTERANCE_S: a final each time, the next utterance starting there."""
    seg = _Segmenter(0, end_silence_s=0.4, interim_every_s=0.7)
    window = np.zeros(VAD_WINDOW, dtype=np.float32)
    events = [e for _ in range(int(65 * SAMPLE_RATE / VAD_WINDOW)) for e in seg.push(window, 0.9)]
    starts = [e.index for e in events if e.kind == "start"]
    ends = [e for e in events if e.kind == "end"]
    assert len(ends) == 2 and len(starts) == 3
    assert [e.index for e in ends] == starts[1:]  # no gap, no overlap
    assert all(e.audio is not None and len(e.audio) <= seg.max_samples for e in ends)


def test_segmenter_needs_sustained_speech_and_silence() -> None:
    seg = _Segmenter(0, end_silence_s=0.4, interim_every_s=0.7)
    window = np.zeros(VAD_WINDOW, dtype=np.float32)

    def feed(prob: float, n: int) -> list[str]:
        return [e.kind for _ in range(n) for e in seg.push(window, prob)]

    assert "start" not in feed(0.9, 3) + feed(0.1, 40)  # a 96 ms click is not speech
    assert feed(0.9, 10).count("start") == 1
    assert feed(0.1, 5) == ["silence"]  # 160 ms of silence: not the end yet
    assert feed(0.9, 1) == ["resume"]
    kinds = feed(0.1, 20)
    assert kinds[0] == "silence" and kinds.count("end") == 1


def test_the_first_interims_come_early_then_at_the_usual_pace() -> None:
    """A barge-in is judged by its first words, and a two-word cue by its second: the first two
    interims are FIRST_INTERIM_S apart, the rest `interim_every_s`."""
    seg = _Segmenter(0, end_silence_s=0.4, interim_every_s=0.7)
    window = np.zeros(VAD_WINDOW, dtype=np.float32)
    due_at: list[float] = []
    for _ in range(int(3.0 * SAMPLE_RATE / VAD_WINDOW)):
        for event in seg.push(window, 0.9):
            if event.kind == "interim":
                due_at.append(seg.since_interim / SAMPLE_RATE)
                seg.interim_started()
    assert [round(s, 2) for s in due_at[:4]] == [0.35, 0.35, 0.70, 0.70], due_at


def test_a_voice_rising_over_the_utterance_gets_an_interim_soon() -> None:
    """The avatar's echo starts an utterance; the user talking over it is louder. Their words get
    an interim RISE_INTERIM_S after the rise, not at the next INTERIM_EVERY_S; a steady level does not."""
    def interims_at(loud_from_s: float | None) -> list[float]:
        seg = _Segmenter(0, end_silence_s=0.4, interim_every_s=0.7)
        at: list[float] = []
        for i in range(int(3.0 * SAMPLE_RATE / VAD_WINDOW)):
            t = i * VAD_WINDOW / SAMPLE_RATE
            gain = 0.2 if loud_from_s is not None and t >= loud_from_s else 0.02
            window = (gain * np.sin(np.arange(VAD_WINDOW) / 3.0)).astype(np.float32)
            for event in seg.push(window, 0.9):
                if event.kind == "interim":
                    at.append(round(t, 2))
                    seg.interim_started()
        return at

    steady, rising = interims_at(None), interims_at(1.7)
    after = next(t for t in steady if t >= 1.7)
    sooner = next(t for t in rising if t >= 1.7)
    assert sooner < after and sooner <= 1.7 + 0.1 + RISE_INTERIM_S, (steady, rising)
    assert [t for t in steady if t < 1.7] == [t for t in rising if t < 1.7]  # the same before the rise


@pytest.mark.slow
@needs_speech
async def test_one_utterance(engine: LocalSttEngine) -> None:
    speech = speech_pcm(QUESTION)
    results = await transcribe(engine, speech + silence_pcm(1.5))
    assert_well_formed(results)
    [final] = finals(results)
    assert word_match(QUESTION, final.text) >= 0.7, final.text
    started = [r for r in results if r.kind == "speech_started"]
    assert started and results.index(started[0]) < results.index(final)
    speech_end = len(speech) / 2 / SAMPLE_RATE - 0.5  # speech_pcm pads 0.5 s on each side
    assert 0.3 <= final.start_s <= 0.9
    assert speech_end - 0.4 <= final.end_s <= speech_end + 0.4
    assert sum(r.kind == "checkpoint" for r in results) >= 2


@pytest.mark.slow
@needs_speech
async def test_two_utterances(engine: LocalSttEngine) -> None:
    pcm = speech_pcm(QUESTION) + silence_pcm(1.5) + speech_pcm(SECOND) + silence_pcm(1.5)
    results = await transcribe(engine, pcm)
    assert_well_formed(results)
    first, second = finals(results)
    assert first.utterance_id < second.utterance_id
    assert first.end_s < second.start_s
    assert word_match(QUESTION, first.text) >= 0.7, first.text
    assert word_match(SECOND, second.text) >= 0.7, second.text
    assert sum(r.kind == "speech_started" for r in results) == 2


@pytest.mark.slow
async def test_silence_only(engine: LocalSttEngine) -> None:
    rng = np.random.default_rng(7)
    hiss = (rng.standard_normal(4 * SAMPLE_RATE) * 30).astype("<i2").tobytes()  # about -60 dBFS
    results = await transcribe(engine, silence_pcm(2.0) + hiss)
    assert not [r for r in results if r.kind in ("final", "speech_started", "interim")]
    checkpoints = [r.end_s for r in results if r.kind == "checkpoint"]
    assert len(checkpoints) >= 3 and checkpoints == sorted(checkpoints)
    assert checkpoints[-1] > 5.0


@pytest.mark.slow
@needs_speech
async def test_finalize_mid_utterance(engine: LocalSttEngine) -> None:
    speech = speech_pcm(QUESTION)
    cut = (len(speech) * 3 // 4) // FRAME_BYTES * FRAME_BYTES  # still speaking here
    pcm = speech[:cut] + silence_pcm(1.5)
    results = await transcribe(engine, pcm, finalize_after=cut)
    assert_well_formed(results)
    [final] = finals(results)
    assert final.text
    assert final.end_s <= cut / 2 / SAMPLE_RATE + 1e-6  # ended by finalize(), not by the silence after


@pytest.mark.slow
@needs_speech
async def test_replay_gives_the_same_ids(engine: LocalSttEngine) -> None:
    pcm = silence_pcm(0.3) + speech_pcm(QUESTION) + silence_pcm(1.5) + speech_pcm(SECOND) + silence_pcm(1.0)
    first = finals(await transcribe(engine, pcm, start_offset_s=4.2))
    again = finals(await transcribe(engine, pcm, start_offset_s=4.2))
    assert len(first) == 2
    assert [(f.utterance_id, f.start_s, f.end_s, f.text) for f in first] == [
        (f.utterance_id, f.start_s, f.end_s, f.text) for f in again
    ]


@pytest.mark.slow
@needs_speech
@pytest.mark.parametrize("offset", [12.0, 7.013])
async def test_start_offset_shifts_timestamps(engine: LocalSttEngine, offset: float) -> None:
    pcm = speech_pcm(QUESTION) + silence_pcm(1.5)
    [base] = finals(await transcribe(engine, pcm))
    results = await transcribe(engine, pcm, start_offset_s=offset)
    assert_well_formed(results)
    [shifted] = finals(results)
    # 12.0 s is a whole number of VAD windows: an exact shift; otherwise within one window (32 ms).
    tolerance = 1e-6 if offset == 12.0 else VAD_WINDOW / SAMPLE_RATE + 1e-6
    assert abs(shifted.start_s - base.start_s - offset) <= tolerance
    assert abs(shifted.end_s - base.end_s - offset) <= tolerance
    assert all(r.end_s >= offset for r in results if r.kind == "checkpoint")


@pytest.mark.slow
@needs_speech
async def test_bad_input_and_other_languages(engine: LocalSttEngine) -> None:
    """Odd-length and empty sends are harmless; an English-only model transcribes "fr" as English."""
    speech = speech_pcm(SECOND) + silence_pcm(1.5)
    stream = await engine.open("odd", language="fr-FR", start_offset_s=0.0)
    reader = asyncio.create_task(_collect(stream.results()))
    await stream.send(b"")
    for offset in range(0, len(speech), FRAME_BYTES):
        await stream.send(speech[offset : offset + FRAME_BYTES] + b"\x7f")  # a stray trailing byte
    await stream.send(b"\x01")
    await stream.close()
    results = await asyncio.wait_for(reader, 60)
    [final] = finals(results)
    assert word_match(SECOND, final.text) >= 0.7, final.text
    await stream.send(b"\x00\x00")  # after close: ignored
    await stream.finalize()


async def _collect(results) -> list[SttResult]:  # type: ignore[no-untyped-def]
    return [r async for r in results]


@pytest.mark.slow
@needs_speech
async def test_falling_behind_drops_oldest_audio_but_keeps_time_and_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transcriber slower than the audio: send() stays short, audio is dropped, the clock holds."""
    engine = LocalSttEngine(Settings(_env_file=None))
    slow = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    async def no_load() -> None:
        return None

    def slow_submit(audio: np.ndarray, language: str | None, *, urgent: bool) -> concurrent.futures.Future[str]:
        return slow.submit(lambda: (time.sleep(2.5), "slow words")[1])

    monkeypatch.setattr(engine.whisper, "load", no_load)
    monkeypatch.setattr(engine.whisper, "submit", slow_submit)
    utterance = speech_pcm(SECOND) + silence_pcm(1.5)
    pcm = utterance * 4
    stream = await engine.open("slow", language="en", start_offset_s=0.0)
    reader = asyncio.create_task(_collect(stream.results()))
    longest_send = 0.0
    for offset in range(0, len(pcm), FRAME_BYTES):
        began = time.perf_counter()
        await stream.send(pcm[offset : offset + FRAME_BYTES])
        longest_send = max(longest_send, time.perf_counter() - began)
    await stream.close()
    results = await asyncio.wait_for(reader, 60)
    slow.shutdown()

    assert stream.dropped_s > 0 and engine.dropped_s == stream.dropped_s
    assert longest_send < 5  # bounded by SEND_WAIT_S (1 s), with slack for a loaded machine
    checkpoints = [r.end_s for r in results if r.kind == "checkpoint"]
    assert checkpoints == sorted(checkpoints)
    # Dropped audio still counts: the clock reaches the end (less the idle pre-roll held back).
    assert len(pcm) / 2 / SAMPLE_RATE - 0.5 <= checkpoints[-1] <= len(pcm) / 2 / SAMPLE_RATE
    kinds = [r.kind for r in results if r.kind in ("speech_started", "final")]
    assert kinds[0] == "speech_started" and "final" in kinds
    assert all(a != b for a, b in itertools.pairwise(kinds))  # started, final, started, final...


def test_finals_jump_ahead_of_waiting_interims(monkeypatch: pytest.MonkeyPatch) -> None:
    """With sessions sharing the model thread, a final never waits behind queued interims."""
    whisper = _Whisper(Settings(_env_file=None))
    gate, order = threading.Event(), []

    def fake_transcribe(audio: np.ndarray, language: str | None) -> str:
        gate.wait(10)
        order.append(int(audio[0]))
        return ""

    monkeypatch.setattr(whisper, "_transcribe", fake_transcribe)
    running = whisper.submit(np.zeros(1, dtype=np.float32), "en")
    while not running.running():
        time.sleep(0.001)
    queued = [whisper.submit(np.full(1, i, dtype=np.float32), "en", urgent=i == 3) for i in (1, 2, 3)]
    assert queued[1].cancel()  # a stale interim, dropped before it ran
    gate.set()
    concurrent.futures.wait([running, queued[0], queued[2]], timeout=10)
    whisper.close()
    assert order == [0, 3, 1]
