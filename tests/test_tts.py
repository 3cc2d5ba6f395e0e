"""Local piper TTS: real audio, sentence-by-sentence streaming, and prompt cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from avatar_service.tts import FIRST_CHUNK_MS, PiperTts, default_voice_paths, wait_for_synthesis
from common.settings import Settings

pytestmark = pytest.mark.slow

THREE_SENTENCES = "This is the first sentence. Here comes the second one. And this is the last."
LONG_TEXT = " ".join(f"This is sentence number {n} of a long reply." for n in range(1, 16))


@pytest.fixture(scope="module")
def tts() -> PiperTts:
    return PiperTts()


def _samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def _tts_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "piper-tts"]


def _assert_producers_exit(timeout_s: float = 5.0) -> None:
    """What the avatar worker waits for at close (`wait_for_synthesis`), and no thread behind its back."""
    assert wait_for_synthesis(timeout_s) == 0, "a synthesis thread was left running"
    assert not _tts_threads(), "a synthesis thread was left running"


class _GatedVoice:
    """Wraps the piper voice: after the first sentence, synthesis waits until `gate` is set.

    The test opens the gate when the first chunk arrives. If `stream()` waited for the whole
    reply, the gate would time out (`timed_out`) before any chunk came.
    """

    def __init__(self, voice: object) -> None:
        self._voice = voice
        self.config = voice.config  # type: ignore[attr-defined]
        self.gate = threading.Event()
        self.sentences = 0
        self.timed_out = False

    def synthesize(self, text: str, syn_config: object = None) -> Iterator[object]:
        for chunk in self._voice.synthesize(text, syn_config):  # type: ignore[attr-defined]
            if self.sentences >= 1 and not self.gate.wait(5):
                self.timed_out = True
            self.sentences += 1
            yield chunk


def test_sentence_is_real_speech(tts: PiperTts) -> None:
    pcm = tts.synthesize_all("Hello, I am the local avatar voice.")
    assert tts.sample_rate == 22050
    assert len(pcm) % 2 == 0
    seconds = len(pcm) / 2 / tts.sample_rate
    assert 1.0 < seconds < 5.0
    audio = _samples(pcm)
    assert np.abs(audio).max() > 0.3
    assert np.sqrt(np.mean(audio**2)) > 0.02


def test_configured_voice_path_is_used() -> None:
    model, config = default_voice_paths(Settings())
    custom = PiperTts(settings=Settings(local_tts_voice=str(model)))
    assert custom.model_path == model
    assert default_voice_paths(Settings(local_tts_voice=str(model))) == (model, config)  # config = model + ".json"
    assert custom.sample_rate == 22050


async def test_first_chunk_arrives_before_the_rest_is_synthesized(
    tts: PiperTts, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated = _GatedVoice(tts._voice)
    monkeypatch.setattr(tts, "_voice", gated)
    chunks: list[bytes] = []
    async for chunk in tts.stream(THREE_SENTENCES, chunk_ms=200):
        gated.gate.set()
        chunks.append(chunk)
    assert not gated.timed_out, "the first chunk waited for later sentences"
    assert gated.sentences == 3
    first_bytes = tts.sample_rate * FIRST_CHUNK_MS // 1000 * 2
    chunk_bytes = tts.sample_rate * 200 // 1000 * 2
    assert len(chunks[0]) == first_bytes
    assert all(0 < len(c) <= chunk_bytes and len(c) % 2 == 0 for c in chunks)
    seconds = sum(len(c) for c in chunks) / 2 / tts.sample_rate
    assert 3.0 < seconds < 10.0
    assert len(chunks) >= seconds / 0.2


async def test_aclose_stops_synthesis_and_frees_the_thread(tts: PiperTts) -> None:
    stream = tts.stream(LONG_TEXT)
    first = await asyncio.wait_for(anext(stream), 10)
    assert first
    await asyncio.sleep(0.5)  # let the producer fill the queue and wait for room
    await asyncio.wait_for(stream.aclose(), 5)
    await asyncio.to_thread(_assert_producers_exit)
    assert tts.synthesize_all("Still working.")


async def test_cancelling_the_consumer_stops_synthesis(tts: PiperTts) -> None:
    got_first = asyncio.Event()

    async def speak() -> int:
        n = 0
        async for _ in tts.stream(LONG_TEXT):
            n += 1
            got_first.set()
            await asyncio.sleep(0.2)  # paced like real-time playback
        return n

    task = asyncio.create_task(speak())
    await asyncio.wait_for(got_first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await asyncio.to_thread(_assert_producers_exit)
    chunks = [c async for c in tts.stream("The next reply still works.")]
    assert chunks


async def test_concurrent_streams_both_finish(tts: PiperTts) -> None:
    async def collect(text: str) -> bytes:
        return b"".join([c async for c in tts.stream(text)])

    a, b = await asyncio.wait_for(
        asyncio.gather(collect("One reply. With two sentences."), collect("Another reply, at the same time.")), 30
    )
    assert len(a) > tts.sample_rate and len(b) > tts.sample_rate
    _assert_producers_exit()


async def test_synthesis_errors_reach_the_consumer(tts: PiperTts, monkeypatch: pytest.MonkeyPatch) -> None:
    class _Broken:
        config = tts._voice.config

        def synthesize(self, text: str, syn_config: object = None) -> Iterator[object]:
            raise RuntimeError("model exploded")

    monkeypatch.setattr(tts, "_voice", _Broken())
    with pytest.raises(RuntimeError, match="model exploded"):
        async for _ in tts.stream("Hello."):
            pass
    _assert_producers_exit()


async def test_empty_text_yields_nothing(tts: PiperTts) -> None:
    assert [c async for c in tts.stream("   ")] == []
    assert tts.synthesize_all("") == b""
