"""Semantic end of turn: has the user finished, or only paused mid-sentence?

A fixed silence cannot tell "So I was wondering … how many people can talk at once" from two
turns. Two signals decide instead, at each pause the engine reports (a segment `final`):

- **Audio**: Smart Turn v3.2 (Pipecat's BSD-2 ONNX model, shipped inside the `pipecat-ai` wheel
  and read from the installed package, never downloaded): prosody of the last 8 s of the turn →
  P(complete). It runs on CPU in ~0.1 s on one thread of this executor, off the event loop.
- **Words**: the transcript so far. A turn that ends on a connective, an article, a filler or a
  phrase that announces more ("I was wondering", "tell me about the") is incomplete whatever the
  audio says; one that ends in a question mark, or opens as a question ("is it …", "how does …")
  and ends in a full stop, is complete. Synthetic or flat speech fools the audio model; text
  rarely lies about a dangling "and".

The verdict is "complete" (answer now) or "incomplete" (wait for more speech, at most
`turn_max_wait_s`, then answer anyway). When the model is slow (an overloaded worker) or missing,
the words alone decide, so a turn is never held back by the detector itself.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Literal

import numpy as np

from common.pcm import SAMPLE_RATE, pcm16_to_float
from common.settings import Settings

log = logging.getLogger(__name__)

MODEL_PACKAGE = "pipecat-ai"
MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
WINDOW_S = 8  # the model sees the last 8 s of the turn, zero-padded in front
TRAILING_S = 0.2  # silence after the last word the model expects to hear
MODEL_TIMEOUT_S = 0.5  # a busier worker decides from the words alone rather than wait
MODEL_MAX_QUEUED = 2  # ... and so does one whose model thread already has this many pauses to judge

FRAME_S = 0.02
LEVEL_FLOOR_DB = -60.0  # frames quieter than this are silence, not speech

TextVerdict = Literal["incomplete", "complete", "weak_complete", "unknown"]

# English words after which a sentence almost never ends. Other languages use punctuation + audio.
_DANGLING = frozenset(
    """and or but so because cause the a an to of for with about in on at from by as if when while
    that which who whose what how why where whether is are was were am be been can could would
    should will shall do does did has have had my your our their his her its this these those
    like um uh er erm hmm than then into onto some any every each very really just also i we you
    me us them he she they it's i'm i'd we're you're there's let's not no between against
    through during before after until since unless although though whereas""".split()
)
# ... and those after which not even a question mark ends it: Whisper writes "What happens when?"
# and "Is it possible to?" for a speaker who paused there (other stranded prepositions, "Where is
# it from?", do end questions; "Who are you talking to?" waits `turn_max_wait_s` at worst).
_DANGLING_EVEN_ASKED = frozenset(
    """and or but because the a an if when while whether than although though unless whereas my
    your our their um uh er erm to""".split()
)
# Phrases that announce the rest of the sentence when they end the text without a question mark.
_ANNOUNCING = (
    "i was wondering", "i wonder", "wondering", "i'd like to know", "i would like to know",
    "i want to know", "i wanted to know", "i'd like to ask", "i want to ask", "let me ask",
    "my question is", "tell me", "can you tell me", "could you tell me", "do you know",
    "the thing is", "what i mean is", "i mean",
)
# How a question opens: an auxiliary before its subject ("is it", "can you"), or a question word
# and an auxiliary ("how does"). A recognizer that transcribes a question's rest alone, after the
# user paused, writes it as a statement ("Is it possible to? Run it without any keys."): the turn
# as a whole is still a question, and it is finished.
_AUXILIARIES = frozenset(
    "is are was were am do does did can could would will shall should may might must has have had".split()
)
_SUBJECTS = frozenset("i you we they it he she there this that".split())
_QUESTION_WORDS = frozenset("what which who whose how why where when".split())
_WORD = re.compile(r"[\w']+")


def _opens_a_question(words: list[str]) -> bool:
    if len(words) < 3:
        return False
    if words[0] in _AUXILIARIES:
        return words[1] in _SUBJECTS
    return words[0] in _QUESTION_WORDS and words[1] in _AUXILIARIES


def text_verdict(text: str) -> TextVerdict:
    """What the words alone say about whether `text` is a finished turn."""
    stripped = text.strip()
    if not stripped:
        return "unknown"
    if stripped.endswith(("...", "…", ",", "-", "—", ";", ":")):
        return "incomplete"
    words = _WORD.findall(stripped.lower())
    if not words:
        return "unknown"
    tail = " ".join(words[-6:])
    if any(tail == p or tail.endswith(" " + p) for p in _ANNOUNCING):
        return "incomplete"  # "Can you tell me?" still announces what the user wants to know
    if words[-1] in _DANGLING_EVEN_ASKED:
        return "incomplete"
    if stripped.endswith("?"):
        return "complete"
    if words[-1] in _DANGLING:
        return "incomplete"
    if stripped.endswith((".", "!")):
        return "complete" if _opens_a_question(words) else "weak_complete"
    return "unknown"


@dataclass(frozen=True)
class Verdict:
    complete: bool
    p_audio: float | None  # None: the audio model did not answer (absent, slow, failed)
    text: TextVerdict


def combine(text: TextVerdict, p_audio: float | None, threshold: float) -> bool:
    """Words first where they are sure; the audio decides where they are not."""
    if text == "incomplete":
        return False
    if text == "complete":
        return True
    if p_audio is None:  # no audio opinion: finish unless the words said otherwise
        return True
    if text == "weak_complete":  # "... the same time." — the audio may still veto a clear rise
        return p_audio >= threshold / 4
    return p_audio >= threshold


def model_path(settings: Settings) -> Path | None:
    """The Smart Turn ONNX file: `TURN_MODEL_FILE`, else the one inside the installed pipecat-ai wheel."""
    if settings.turn_model_file:
        return Path(settings.turn_model_file).expanduser()
    try:
        path = Path(str(distribution(MODEL_PACKAGE).locate_file(MODEL_FILE)))
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


class TurnDetector:
    """One per worker: the ONNX session on a single thread of its own (finals never queue behind
    Whisper), whatever number of sessions ask."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.enabled = settings.turn_detection == "smart"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="turn-model")
        self._session: object | None = None
        self._features: object | None = None
        self._loaded = False
        self.model_timeout_s = MODEL_TIMEOUT_S
        self._queued = 0  # judgements waiting for or running on the model thread
        self.skipped = 0  # pauses judged from the words alone because the model was busy

    async def load(self) -> None:
        """Load the model once, before the first session (a missing model is a warning, not fatal)."""
        if self._loaded or not self.enabled:
            return
        self._loaded = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        path = model_path(self.settings)
        if path is None or not path.is_file():
            log.warning("no Smart Turn model (install pipecat-ai or set TURN_MODEL_FILE): turns end on words alone")
            return
        import onnxruntime as ort
        from faster_whisper.feature_extractor import FeatureExtractor

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        # Whisper's log-mel front end with an 8 s window is exactly the model's input contract.
        self._features = FeatureExtractor(feature_size=80, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_S)
        self._probability(np.zeros(SAMPLE_RATE, dtype=np.float32))  # warm the kernels up
        log.info("turn model loaded from %s", path)

    def wants_audio(self, text: str) -> bool:
        """Whether `decide` would ask the model: the caller need not build the audio otherwise."""
        return self.enabled and self._session is not None and text_verdict(text) not in ("incomplete", "complete")

    async def decide(self, text: str, audio: np.ndarray | None) -> Verdict:
        verdict = text_verdict(text)
        if not self.enabled:
            return Verdict(True, None, verdict)
        p_audio = None
        if verdict not in ("incomplete", "complete") and audio is not None and self._session is not None:
            if self._queued >= MODEL_MAX_QUEUED:  # overloaded: bounded work, the words decide
                self.skipped += 1
            else:
                p_audio = await self._ask_model(audio)
        return Verdict(combine(verdict, p_audio, self.settings.turn_complete_threshold), p_audio, verdict)

    async def _ask_model(self, audio: np.ndarray) -> float | None:
        self._queued += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._probability, audio)
        future.add_done_callback(lambda _: self._release())
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.model_timeout_s)
        except TimeoutError:
            self.skipped += 1
            log.warning("turn model slower than %.1f s: deciding from the words", self.model_timeout_s)
            return None

    def _release(self) -> None:
        self._queued -= 1

    def _probability(self, audio: np.ndarray) -> float:
        """P(turn complete) for 16 kHz float audio ending where the user stopped (plus a little silence)."""
        n = WINDOW_S * SAMPLE_RATE
        audio = audio[-n:]
        window = np.zeros(n, dtype=np.float32)
        window[n - len(audio):] = audio
        window = (window - window.mean()) / np.sqrt(window.var() + 1e-7)
        features = self._features(window, padding=0)  # type: ignore[operator]  # (80, 800)
        out = self._session.run(None, {"input_features": features[None].astype(np.float32)})  # type: ignore[attr-defined]
        return float(np.asarray(out[0]).reshape(-1)[0])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Quiet:
    """How long the audio has been quiet since the last voice, relative to the voice heard: a
    frame is quiet when it is `below_db` under the loudest recent speech (or under `floor_db`), so
    a steady room noise counts as quiet once someone has spoken over it. Cheap: one RMS per batch.

    Deepgram decides the end of speech on its side (its endpointing, a round trip away); this lets
    the STT worker send `Finalize` as soon as the user has been quiet for a moment after a finished
    question (DEEPGRAM_EARLY_FINALIZE)."""

    def __init__(self, below_db: float = 20.0, floor_db: float = -75.0, decay_db_per_s: float = 2.5) -> None:
        self.below_db = below_db
        self.floor_db = floor_db
        self.decay_db_per_s = decay_db_per_s
        self.peak_db = float("-inf")
        self.quiet_s = 0.0

    def feed(self, pcm: bytes) -> float:
        """Take the next audio; returns the seconds of quiet up to its end."""
        seconds = len(pcm) / 2 / SAMPLE_RATE
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        level = -200.0
        if len(samples):  # per frame per session: one dot product (numpy's mean/sqrt/log10 took ~4x)
            level = 20 * math.log10(math.sqrt(float(np.dot(samples, samples)) / len(samples)) / 32768 + 1e-9)
        self.peak_db -= self.decay_db_per_s * seconds
        if level > max(self.peak_db - self.below_db, self.floor_db):
            self.peak_db = max(self.peak_db, level)
            self.quiet_s = 0.0
        else:
            self.quiet_s += seconds
        return self.quiet_s


def _percentile_of_sorted(values: np.ndarray, q: float) -> float:
    """`np.percentile(values, 100 * q)` (linear interpolation) of values already sorted."""
    at = q * (len(values) - 1)
    lo = int(at)
    hi = min(lo + 1, len(values) - 1)
    return float(values[lo] + (values[hi] - values[lo]) * (at - lo))


class AudioTail:
    """The last few seconds of a session's audio, by session time, for the turn model and levels.

    One contiguous buffer, so any span of it is one slice (a level is read several times a second
    per speaker; walking a list of 20 ms chunks for it was most of its cost). Bounded: `keep_s` of
    PCM, plus at most TRIM_SLACK_S that is dropped in one step (one memmove per half second, not
    one per frame).
    """

    TRIM_SLACK_S = 0.5

    def __init__(self, keep_s: float = WINDOW_S + 1.0) -> None:
        self.keep = int(keep_s * SAMPLE_RATE) * 2
        self._slack = int(self.TRIM_SLACK_S * SAMPLE_RATE) * 2
        self._pcm = bytearray()
        self.end_s = 0.0  # session time at the end of what is held
        self.arrivals: deque[tuple[float, float]] = deque(maxlen=2048)  # (session end_s, unix time received)

    @property
    def nbytes(self) -> int:
        return len(self._pcm)

    @property
    def held_from(self) -> float:
        """Session time at the start of what is held."""
        return self.end_s - len(self._pcm) / 2 / SAMPLE_RATE

    def append(self, pcm: bytes, end_s: float) -> None:
        self._pcm += pcm
        self.end_s = end_s
        self.arrivals.append((end_s, time.time()))
        if len(self._pcm) > self.keep + self._slack:
            del self._pcm[: len(self._pcm) - self.keep]

    def received_at_ms(self, t: float) -> int:
        """Unix ms when session audio time `t` reached this worker: audio comes in real time, so
        that is about when it was spoken (the avatar worker tells echo from speech with it)."""
        for end_s, wall in reversed(self.arrivals):
            if end_s <= t:
                return round((wall + (t - end_s)) * 1000)
        if self.arrivals:
            end_s, wall = self.arrivals[0]
            return round((wall - (end_s - t)) * 1000)
        return round(time.time() * 1000)

    def level_db(self, start_s: float, end_s: float) -> float | None:
        """How loud the speech in [start_s, end_s] is: the 90th percentile of its 20 ms frames'
        level (dBFS), over what is still held; None where nothing there is above the floor. The
        loudest tenth, so a user who speaks over a quieter echo for part of it sets the level."""
        start_s, end_s = max(start_s, self.held_from), min(end_s, self.end_s)
        if end_s - start_s < FRAME_S:
            return None
        pcm = self._between(start_s, end_s)
        hop = round(FRAME_S * SAMPLE_RATE)
        n = len(pcm) // 2 // hop
        if n == 0:
            return None
        # Several times a second per speaker: plain array steps, not np.percentile (~5x slower here).
        frames = np.frombuffer(pcm, dtype="<i2", count=n * hop).astype(np.float32).reshape(n, hop)
        rms = np.sqrt(np.einsum("ij,ij->i", frames, frames) / hop) / 32768.0
        levels = 20 * np.log10(rms + 1e-9)
        voiced = np.sort(levels[levels > LEVEL_FLOOR_DB])
        return round(_percentile_of_sorted(voiced, 0.9), 1) if len(voiced) else None

    def _between(self, start_s: float, end_s: float) -> bytes:
        """The PCM held from `start_s` to `end_s` (as much of it as is held)."""
        held_from = self.held_from
        lo = max(0, round((start_s - held_from) * SAMPLE_RATE) * 2)
        hi = min(len(self._pcm), round((end_s - held_from) * SAMPLE_RATE) * 2)
        return bytes(self._pcm[lo:hi]) if hi > lo else b""

    def span(self, start_s: float, end_s: float) -> np.ndarray:
        """Audio from session time `start_s` to `end_s`, as much of it as is held (float samples)."""
        return pcm16_to_float(self._between(start_s, end_s))
