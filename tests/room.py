"""A page in a room, for tests and benchmarks: one microphone that hears the user, noise and the
avatar's own loudspeaker.

It talks to the gateway like the page does (20 ms PCM16 frames at real-time pace over the real
WebSocket) and "plays" the avatar's audio as the page would (back to back, frozen while the
avatar is paused, cut on barge-in), mixing it back into the microphone attenuated and delayed,
as laptop speakers next to a microphone do. No browser needed; the echo is as late and as loud
as you say.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import soxr
import websockets

from common.pcm import FRAME_BYTES, SAMPLE_RATE
from tests.client import Session
from tests.speech import speech_pcm

FRAME = FRAME_BYTES // 2  # samples per 20 ms frame


def trim_trailing_silence(pcm: bytes, threshold_db: float = -45.0) -> bytes:
    """Cut after the last voiced 20 ms frame, so 'end of speech' is when the voice stops."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
    hop = 320
    n = len(samples) // hop
    rms = np.sqrt(np.mean(samples[: n * hop].reshape(n, hop) ** 2, axis=1))
    voiced = np.nonzero(20 * np.log10(rms + 1e-9) > threshold_db)[0]
    return pcm[: (int(voiced[-1]) + 1) * hop * 2] if len(voiced) else pcm


def noise(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A non-speech sound: broadband hiss, a door thump, keyboard clicks, a cough-like burst."""
    t = np.arange(int(0.35 * SAMPLE_RATE)) / SAMPLE_RATE
    if kind == "white":
        x = rng.normal(0, 0.15, len(t))
    elif kind == "thump":
        x = 0.6 * np.sin(2 * np.pi * 70 * t) * np.exp(-t * 18)
    elif kind == "keys":
        x = np.zeros(int(0.8 * SAMPLE_RATE))
        for start in rng.integers(0, len(x) - 200, 12):
            x[start:start + 120] += rng.normal(0, 0.3, 120) * np.exp(-np.arange(120) / 20)
    else:  # cough: a short noisy burst with a fast attack
        x = rng.normal(0, 0.3, len(t)) * np.exp(-t * 9) * (1 - np.exp(-t * 200))
    return np.clip(x, -1, 1).astype(np.float32)


def speech(text: str) -> np.ndarray:
    """espeak-ng's voice, cut after its last voiced frame (so 'end of speech' is when it stops)."""
    pcm = trim_trailing_silence(speech_pcm(text, pad_s=0.0))
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768


@dataclass
class Playback:
    """What the page does with the avatar's audio: plays it back to back, pauses, cuts on barge-in."""

    queue: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (reply id, 16 kHz samples)
    paused: bool = False
    played: list[np.ndarray] = field(default_factory=list)  # what reached the loudspeaker, per frame
    discarded: set[str] = field(default_factory=set)  # replies cut off: their late chunks are dropped

    def add(self, reply_id: str, pcm: bytes, rate: int) -> None:
        if reply_id in self.discarded:
            return
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768
        if rate != SAMPLE_RATE:
            samples = soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)
        self.queue.append((reply_id, samples))

    def cut(self, reply_id: str) -> None:
        self.queue = [(r, s) for r, s in self.queue if r != reply_id]
        self.discarded.add(reply_id)
        self.paused = False

    def tick(self) -> np.ndarray:
        """The next 20 ms the loudspeaker plays."""
        out = np.zeros(FRAME, dtype=np.float32)
        filled = 0
        while not self.paused and self.queue and filled < FRAME:
            reply_id, samples = self.queue[0]
            take = min(FRAME - filled, len(samples))
            out[filled:filled + take] = samples[:take]
            filled += take
            if take == len(samples):
                self.queue.pop(0)
            else:
                self.queue[0] = (reply_id, samples[take:])
        self.played.append(out)
        return out


class Room:
    """One page in a room: a microphone that hears the user, noise and the avatar's loudspeaker."""

    def __init__(self, session: Session, echo_gain: float, echo_ms: int) -> None:
        self.session = session
        self.echo_gain = echo_gain
        self.echo_frames = round(echo_ms / 20)
        self.ws: Any = None
        self.events: list[dict[str, Any]] = []
        self.playback = Playback()
        self.user: list[np.ndarray] = []  # PCM16 still to say, frame by frame
        self.said = asyncio.Event()  # set when the last queued user frame has been sent
        self.changed = asyncio.Event()
        self._pending_audio: dict[str, Any] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self.ws = await websockets.connect(f"{self.session.ws_url}?token={self.session.token}", max_size=2**22)
        reader = asyncio.create_task(self._read())
        try:
            await self._mic(stop)
        finally:
            reader.cancel()
            await self.ws.close()

    def say(self, audio: np.ndarray | bytes) -> None:
        """Queue speech: float samples, or PCM16 bytes sent exactly as they are while no echo
        overlaps them (the Deepgram fake spells words in the samples)."""
        pcm = np.frombuffer(audio, dtype="<i2") if isinstance(audio, bytes) else (
            np.clip(audio, -1, 1) * 32767).astype("<i2")
        self.said.clear()
        self.user.extend(np.array_split(pcm, max(1, int(np.ceil(len(pcm) / FRAME)))))

    async def _mic(self, stop: asyncio.Event) -> None:
        start, sent = time.monotonic(), 0
        silence = np.zeros(FRAME, dtype="<i2")
        while not stop.is_set():
            self.playback.tick()
            lag = len(self.playback.played) - 1 - self.echo_frames
            echo = self.echo_gain * self.playback.played[lag] if lag >= 0 else None
            if len(self.playback.played) > 200:
                del self.playback.played[:100]
            voice = self.user.pop(0) if self.user else silence
            if echo is None or not echo.any():
                frame = np.zeros(FRAME, dtype="<i2")
                frame[: len(voice)] = voice
            else:
                mixed = echo.copy()
                mixed[: len(voice)] += voice.astype(np.float32) / 32767
                frame = (np.clip(mixed, -1, 1) * 32767).astype("<i2")
            await self.ws.send(frame.tobytes())
            if not self.user:
                self.said.set()
            sent += 1
            delay = start + sent * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _read(self) -> None:
        async for message in self.ws:
            now = time.monotonic()
            if isinstance(message, bytes):
                meta = self._pending_audio
                if meta is not None:
                    self.playback.add(meta["reply_id"], message, meta["sample_rate"])
                self._pending_audio = None
                continue
            event = orjson.loads(message)
            event["_rx"] = now
            self.events.append(event)
            kind = event["type"]
            if kind == "avatar.audio":
                self._pending_audio = event
            elif kind == "avatar.paused":
                self.playback.paused = True
            elif kind == "avatar.resumed":
                self.playback.paused = False
            elif kind == "avatar.stopped_talking" and event.get("interrupted"):
                self.playback.cut(event["reply_id"])
            self.changed.set()

    async def wait(self, predicate, timeout_s: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass

    async def next(self, kind: str, mark: int, timeout_s: float, where=None) -> dict[str, Any] | None:
        """The first `kind` event after the first `mark` events (that `where` accepts), or None."""
        def match(e: dict[str, Any]) -> bool:
            return e["type"] == kind and (where is None or where(e))

        found = await self.wait(lambda e: match(e) and self.events.index(e) >= mark, timeout_s)
        return found

    async def quiet(self, timeout_s: float = 30.0) -> None:
        """Until the avatar has stopped talking and its loudspeaker is silent (echo tail included)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            talking = any(e["type"] == "avatar.started_talking" for e in self.events) and self._talking()
            if not talking and not self.playback.queue:
                await asyncio.sleep(0.6)
                if not self.playback.queue:
                    return
            await asyncio.sleep(0.1)

    def _talking(self) -> bool:
        started = {e["reply_id"] for e in self.events if e["type"] == "avatar.started_talking"}
        stopped = {e["reply_id"] for e in self.events if e["type"] == "avatar.stopped_talking"}
        return bool(started - stopped)


async def said(room: Room, audio: np.ndarray | bytes) -> float:
    """Say `audio` into the room; returns the monotonic time its last frame was sent."""
    room.say(audio)
    await room.said.wait()
    return time.monotonic()


def since(room: Room, mark: int, kind: str) -> list[dict[str, Any]]:
    return [e for e in room.events[mark:] if e["type"] == kind]
