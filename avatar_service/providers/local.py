"""The local avatar: offline TTS whose audio and mouth timing go to a face drawn in the browser.

Speech is published chunk by chunk as piper synthesizes it (the first chunk leaves after the first
sentence, not the whole reply). Each chunk is an `avatar.audio` event with a mouth-openness
envelope, followed by its PCM as a binary frame. The worker keeps a clock of where the browser's
playback is, so it knows whether the avatar is still talking (for barge-in and for
`avatar.stopped_talking`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TypeVar

from avatar_service.driver import Speech, sentences_of
from avatar_service.tts import PiperTts
from common.bus import Bus
from common.models import (
    AvatarAudio,
    AvatarStartedTalking,
    AvatarStoppedTalking,
    SessionConfig,
    SessionReady,
)
from common.pcm import duration_s, mouth_envelope
from common.settings import Settings

MOUTH_HOP_MS = 20
T = TypeVar("T")


class LocalAvatarDriver:
    name = "local"

    def __init__(self, settings: Settings, bus: Bus, tts: PiperTts | None = None) -> None:
        self.settings = settings
        self.bus = bus
        if tts is None:  # loading blocks for ~1 s: construct the driver off the event loop
            tts = PiperTts(settings=settings)
            tts.warm_up()
        self.tts = tts

    async def open(self, session_id: str, config: SessionConfig, *, resumed: bool) -> LocalAvatarSession:
        return LocalAvatarSession(self, session_id)

    async def aclose(self) -> None:
        return None


class LocalAvatarSession:
    answers_itself = False

    def __init__(self, driver: LocalAvatarDriver, sid: str) -> None:
        self.driver = driver
        self.bus = driver.bus
        self.sid = sid
        self._interrupted: asyncio.Event | None = None

    async def start(self) -> None:
        await self.bus.publish_event(
            self.sid,
            SessionReady(
                provider="local",
                stt_provider=self.driver.settings.resolved_stt_provider(),
                audio_sample_rate=self.driver.tts.sample_rate,
            ),
        )

    async def speak(self, reply_id: str, text: Speech, *, user_text: str | None = None) -> str:
        """Publish the reply chunk by chunk; return when the page has played it or on interrupt.

        `text` may be a stream of sentences: each is synthesized as soon as it arrives, while the
        page is still playing the previous one. Returns the sentences whose playback had begun.
        Interruption is cooperative (`interrupt()` sets a flag this loop watches) rather than
        task cancellation, so a barge-in never lands in the middle of a Redis call.
        """
        rate = self.driver.tts.sample_rate
        self._interrupted = interrupted = asyncio.Event()
        playback_ends = 0.0
        seq = 0
        starts: list[tuple[float, str]] = []  # (when the page starts playing it, sentence)
        sentences = sentences_of(text)
        try:
            while not interrupted.is_set():
                sentence = await _next_or_interrupt(sentences, interrupted)
                if sentence is None:
                    break
                chunks = self.driver.tts.stream(sentence)
                first = True
                try:
                    while not interrupted.is_set():
                        pcm = await _next_or_interrupt(chunks, interrupted)
                        if pcm is None:
                            break
                        if seq == 0:
                            await self.bus.publish_event(self.sid, AvatarStartedTalking(reply_id=reply_id))
                        event = AvatarAudio(
                            reply_id=reply_id, seq=seq, sample_rate=rate, samples=len(pcm) // 2,
                            mouth=mouth_envelope(pcm, rate, MOUTH_HOP_MS), mouth_hop_ms=MOUTH_HOP_MS,
                        )
                        await self.bus.publish_event(self.sid, event, pcm=pcm)
                        # The page plays chunks back to back; a late chunk starts when it arrives.
                        begins = max(playback_ends, time.monotonic())
                        if first:
                            starts.append((begins, sentence))
                            first = False
                        playback_ends = begins + duration_s(pcm, rate)
                        seq += 1
                finally:
                    await chunks.aclose()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), max(0.0, playback_ends - time.monotonic()))
        finally:
            await sentences.aclose()
        cut_at = time.monotonic() if interrupted.is_set() else float("inf")
        if seq:
            stopped = AvatarStoppedTalking(reply_id=reply_id, interrupted=interrupted.is_set())
            await self.bus.publish_event(self.sid, stopped)
        return " ".join(sentence for begins, sentence in starts if begins <= cut_at)

    async def interrupt(self) -> None:
        if self._interrupted is not None:
            self._interrupted.set()

    async def on_vendor_event(self, event: str, data: dict) -> None:
        return None

    async def stop(self, reason: str) -> None:
        return None


async def _next_or_interrupt(chunks: AsyncIterator[T], interrupted: asyncio.Event) -> T | None:
    """The next chunk, or None when the speech is over or was interrupted (whichever is first)."""
    nxt = asyncio.ensure_future(anext(chunks))
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if not nxt.done():
        nxt.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await nxt
        return None
    try:
        return nxt.result()
    except StopAsyncIteration:
        return None


def make_driver(settings: Settings, bus: Bus) -> LocalAvatarDriver:
    return LocalAvatarDriver(settings, bus)
