"""The local avatar: offline TTS whose audio and mouth timing go to a face drawn in the browser.

Speech is published chunk by chunk as piper synthesizes it (the first chunk leaves after the first
sentence, not the whole reply). Each chunk is an `avatar.audio` event with a mouth-openness
envelope, followed by its PCM as a binary frame. The worker keeps a clock of where the browser's
playback is, so it knows whether the avatar is still talking (for barge-in and for
`avatar.stopped_talking`).

Where the audio goes is an `AudioSink`: the bus (binary frames down the page's WebSocket) by
default, or the session's LiveKit room when `LIVEKIT_URL` and its key are set
(`avatar_service.livekit_room`). A room that cannot be joined is one `error` event, then the
WebSocket voice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

from avatar_service import livekit_room
from avatar_service.driver import Speech, sentences_of
from avatar_service.tts import PiperTts, wait_for_synthesis
from common.bus import Bus
from common.models import (
    AvatarAudio,
    AvatarPaused,
    AvatarResumed,
    AvatarStartedTalking,
    AvatarStoppedTalking,
    ErrorEvent,
    LiveKitInfo,
    SessionConfig,
    SessionReady,
)
from common.pcm import duration_s, mouth_envelope
from common.settings import Settings

SYNTHESIS_DRAIN_S = 3.0  # at close: the sentence piper is in the middle of (<1 s on 2 cores)
MOUTH_HOP_MS = 20
T = TypeVar("T")
log = logging.getLogger("avatar.local")


class AudioSink(Protocol):
    """Where one session's synthesized speech goes, chunk by chunk."""

    async def send(self, pcm: bytes, meta: AvatarAudio) -> None:
        """Queue one chunk (PCM16 mono at `meta.sample_rate`) to be played after the previous one."""

    def clear(self) -> None:
        """Barge-in: drop whatever has not been heard yet, at once."""

    def pause(self) -> None:
        """The user talks over the avatar: hold what is not heard yet (`resume` plays it on)."""

    def resume(self) -> None:
        """Play on from where `pause` held it."""


class BusAudioSink:
    """The default: `avatar.audio` + its PCM on the session's event stream, to the page's WebSocket
    (the page drops an interrupted reply's chunks itself)."""

    def __init__(self, bus: Bus, sid: str) -> None:
        self.bus = bus
        self.sid = sid

    async def send(self, pcm: bytes, meta: AvatarAudio) -> None:
        await self.bus.publish_event(self.sid, meta, pcm=pcm)

    def clear(self) -> None:
        return None

    def pause(self) -> None:
        return None  # the page freezes its own playback on `avatar.paused`

    def resume(self) -> None:
        return None


class LocalAvatarDriver:
    name = "local"

    def __init__(self, settings: Settings, bus: Bus, tts: PiperTts | None = None) -> None:
        self.settings = settings
        self.bus = bus
        if tts is None:  # loading blocks for ~1 s: construct the driver off the event loop
            tts = PiperTts(settings=settings)
            tts.warm_up()
        self.tts = tts
        self.rooms: set[livekit_room.AvatarRoom] = set()  # joined rooms, left when the worker stops

    async def open(self, session_id: str, config: SessionConfig, *, resumed: bool) -> LocalAvatarSession:
        return LocalAvatarSession(self, session_id)

    async def aclose(self) -> None:
        # A worker going away leaves its rooms but keeps them: the session's next owner rejoins.
        for room in list(self.rooms):
            await room.leave(delete_room=False)
        self.rooms.clear()
        if still := await asyncio.to_thread(wait_for_synthesis, SYNTHESIS_DRAIN_S):
            log.warning("%d piper synthesis thread(s) still running at close", still)


class LocalAvatarSession:
    answers_itself = False

    def __init__(self, driver: LocalAvatarDriver, sid: str) -> None:
        self.driver = driver
        self.bus = driver.bus
        self.sid = sid
        self._interrupted: asyncio.Event | None = None
        self._clock: _PlaybackClock | None = None
        self._reply_id = ""
        self.room: livekit_room.AvatarRoom | None = None
        self.sink: AudioSink = BusAudioSink(self.bus, sid)

    async def start(self) -> None:
        settings = self.driver.settings
        livekit = None
        if livekit_room.configured(settings):
            livekit = await self._join_room()
        await self.bus.publish_event(
            self.sid,
            SessionReady(
                provider="local",
                stt_provider=settings.resolved_stt_provider(),
                audio_sample_rate=self.driver.tts.sample_rate,
                livekit=livekit,
            ),
        )

    async def _join_room(self) -> LiveKitInfo | None:
        """Join the session's room (again, after a takeover); on failure say so once and use the bus."""
        settings = self.driver.settings
        try:
            room = await livekit_room.AvatarRoom.join(
                settings, livekit_room.room_name(settings, self.sid), self.driver.tts.sample_rate
            )
        except livekit_room.LiveKitUnavailable as exc:
            log.warning("local avatar voice over the WebSocket: %s", exc.code, extra={"sid": self.sid})
            await self.bus.publish_event(self.sid, ErrorEvent(code=exc.code, message=exc.message, fatal=False))
            return None
        self.room = room
        self.driver.rooms.add(room)
        self.sink = room.sink
        return LiveKitInfo(url=livekit_room.public_url(settings), token=room.viewer_token())

    async def speak(self, reply_id: str, text: Speech, *, user_text: str | None = None) -> str:
        """Publish the reply chunk by chunk; return when the page has played it or on interrupt.

        `text` may be a stream of sentences: each is synthesized as soon as it arrives, while the
        page is still playing the previous one. Returns the sentences whose playback had begun.
        Interruption is cooperative (`interrupt()` sets a flag this loop watches) rather than
        task cancellation, so a barge-in never lands in the middle of a Redis call.
        """
        rate = self.driver.tts.sample_rate
        self._interrupted = interrupted = asyncio.Event()
        self._clock = clock = _PlaybackClock()
        self._reply_id = reply_id
        seq = 0
        starts: list[tuple[float, str]] = []  # (playback time it starts at, sentence)
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
                        await self.sink.send(pcm, event)
                        begins = clock.queue(duration_s(pcm, rate))
                        if first:
                            starts.append((begins, sentence))
                            first = False
                        seq += 1
                finally:
                    await chunks.aclose()
            await clock.played(interrupted)
        finally:
            await sentences.aclose()
            self._clock = None
        cut_at = clock.now() if interrupted.is_set() else float("inf")
        if seq:
            stopped = AvatarStoppedTalking(reply_id=reply_id, interrupted=interrupted.is_set())
            await self.bus.publish_event(self.sid, stopped)
        return " ".join(sentence for begins, sentence in starts if begins <= cut_at)

    async def pause(self) -> bool:
        """The page suspends its playback clock at once; chunks still arrive and wait there."""
        clock = self._clock
        if clock is None or clock.paused:
            return clock is not None
        clock.pause()
        self.sink.pause()
        await self.bus.publish_event(self.sid, AvatarPaused(reply_id=self._reply_id))
        return True

    async def resume(self) -> None:
        clock = self._clock
        if clock is None or not clock.paused:
            return
        clock.resume()
        self.sink.resume()
        await self.bus.publish_event(self.sid, AvatarResumed(reply_id=self._reply_id))

    async def interrupt(self) -> None:
        self.sink.clear()
        if self._interrupted is not None:
            self._interrupted.set()
            if self._clock is not None:
                self._clock.changed.set()

    async def on_user_speaking(self, speaking: bool) -> None:
        return None

    async def on_vendor_event(self, event: str, data: dict) -> None:
        return None

    async def stop(self, reason: str) -> None:
        room, self.room = self.room, None
        if room is not None:
            self.driver.rooms.discard(room)
            await room.leave(delete_room=True)


class _PlaybackClock:
    """Where the page's playback of this reply is, in playback seconds (wall time minus pauses).

    The page plays chunks back to back (a late chunk starts when it arrives) and freezes while
    paused, so this clock does the same: it tells when the reply has been heard to the end and
    which sentences had started when it was cut.
    """

    def __init__(self) -> None:
        self.ends = 0.0  # playback time at which everything queued so far has played
        self.paused_at: float | None = None
        self.shift = 0.0  # total time spent paused
        self.changed = asyncio.Event()  # paused, resumed or interrupted

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    def now(self) -> float:
        return (self.paused_at if self.paused_at is not None else time.monotonic()) - self.shift

    def queue(self, seconds: float) -> float:
        """A chunk of `seconds` joins the queue; returns the playback time it starts at."""
        begins = max(self.ends, self.now())
        self.ends = begins + seconds
        return begins

    def pause(self) -> None:
        self.paused_at = time.monotonic()
        self.changed.set()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.shift += time.monotonic() - self.paused_at
            self.paused_at = None
        self.changed.set()

    async def played(self, interrupted: asyncio.Event) -> None:
        """Until everything queued has been heard, or the reply is interrupted."""
        while not interrupted.is_set():
            self.changed.clear()
            left = None if self.paused else self.ends - self.now()
            if left is not None and left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


async def _next_or_interrupt(chunks: AsyncIterator[T], interrupted: asyncio.Event) -> T | None:
    """The next chunk, or None when the speech is over or was interrupted (whichever is first)."""
    nxt = asyncio.ensure_future(anext(chunks))
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({nxt, stop}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # handed over mid-reply: the generator must be idle to be closed
        nxt.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
            await nxt
        raise
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
