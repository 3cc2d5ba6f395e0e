"""A cloud vendor's avatar participant, for real, in a room on the test LiveKit server.

The HeyGen and LiveAvatar fakes use it to do what the vendors do once a session starts: join the
session's room as the avatar (identity `heygen`, reference §2.4/§3.2), publish a video track (a
synthetic 320x240 moving pattern at 15 fps) and an audio track (the speech it was sent, or a tone
while the fake's timeline says it talks), and send the vendor's data-channel events. Pages and
tests then see real WebRTC media and real data packets, not stubs.

All participants run on one asyncio loop in a thread of their own (the fakes serve HTTP from
theirs); every public method is thread-safe and returns without waiting for the network.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import orjson

log = logging.getLogger("tests.room_avatar")

VENDOR_IDENTITY = "heygen"  # HeyGen IA and LiveAvatar's own rooms: the web SDKs filter tracks by it
WIDTH, HEIGHT, FPS = 320, 240, 15
AUDIO_RATE = 24_000  # LiveAvatar LITE audio (PCM16 24 kHz mono); HeyGen's own voice too
FRAME_MS = 10
MAX_AUDIO_S = 120  # queued speech per avatar at most


@dataclass
class RoomAvatar:
    """One vendor avatar in one room. `events()` (optional) returns the vendor's data-channel events
    due so far, a stable prefix (HeyGen's timeline): each is sent once, and the avatar talks (a
    tone) between a `*start_talking` and its `*stop_talking`."""

    host: RoomAvatarHost
    room_name: str
    identity: str = VENDOR_IDENTITY
    events: Callable[[], list[dict[str, Any]]] | None = None
    topic: str = ""
    speaking_events: tuple[str, str] = ("avatar.speak_started", "avatar.speak_ended")
    color: tuple[int, int, int] | None = None  # a solid frame instead of the moving pattern
    frames_published: int = 0
    audio_frames: int = 0
    loud_frames: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)
    _polled: int = 0  # how many of `events()` were sent
    joined: threading.Event = field(default_factory=threading.Event)
    _audio: collections.deque = field(default_factory=collections.deque)  # (event_id, pcm 10 ms)
    _talking_tone: bool = False
    _current: str | None = None  # the utterance being heard
    _ended: set[str] = field(default_factory=set)  # utterances whose sender said they are complete
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _room: Any = None
    _source: Any = None

    # ---- thread-safe API (the fakes' threads)

    def say(self, pcm: bytes, event_id: str) -> None:
        """Queue speech (PCM16 mono at 24 kHz) to be heard on the audio track, in order."""
        step = AUDIO_RATE * FRAME_MS // 1000 * 2
        chunks = [pcm[i : i + step].ljust(step, b"\x00") for i in range(0, len(pcm), step)]
        self.host.call(lambda: self._queue(event_id, chunks))

    def end(self, event_id: str) -> None:
        """The utterance is complete: once its audio has been heard, the speech-ended event goes out."""
        self.host.call(lambda: self._ended.add(event_id))

    def interrupt(self) -> None:
        self.host.call(self._interrupt)

    def send(self, event: dict[str, Any]) -> None:
        self.host.call(lambda: self.host.loop.create_task(self._send(event)))

    # ---- on the host's loop

    def _queue(self, event_id: str, chunks: list[bytes]) -> None:
        if len(self._audio) + len(chunks) <= MAX_AUDIO_S * 1000 // FRAME_MS:
            self._audio.extend((event_id, c) for c in chunks)

    def _interrupt(self) -> None:
        self._audio.clear()
        if self._source is not None:
            self._source.clear_queue()
        if self._current is not None:
            self._ended.add(self._current)

    async def _send(self, event: dict[str, Any]) -> None:
        if self._room is None:
            return
        self.sent.append(event)
        with contextlib.suppress(Exception):
            await self._room.local_participant.publish_data(orjson.dumps(event), reliable=True, topic=self.topic)

    async def run(self) -> None:
        from livekit import rtc

        room = rtc.Room()
        await room.connect(self.host.url, self.host.token(self.identity, self.room_name))
        video = rtc.VideoSource(WIDTH, HEIGHT)
        audio = rtc.AudioSource(AUDIO_RATE, 1, queue_size_ms=100)
        self._source = audio
        await room.local_participant.publish_track(
            rtc.LocalVideoTrack.create_video_track("avatar-video", video),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA),
        )
        await room.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("avatar-audio", audio),
            rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
        )
        self._room = room
        self.joined.set()
        self._tasks = [asyncio.create_task(self._video(video)), asyncio.create_task(self._speak(audio))]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            self._room = None
            await room.disconnect()

    async def _video(self, source) -> None:
        """A moving diagonal pattern with a sweeping bar: every frame differs from the last."""
        from livekit import rtc

        y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
        base = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
        base[..., 3] = 255
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while True:
            frame = base.copy()
            if self.color is not None:
                frame[..., :3] = self.color
            else:
                frame[..., 0] = ((x + 4 * n) % 256).astype(np.uint8)
                frame[..., 1] = ((y + 2 * n) % 256).astype(np.uint8)
                frame[..., 2] = 160
                bar = (4 * n) % WIDTH
                frame[:, bar : bar + 12, :3] = 255
            source.capture_frame(rtc.VideoFrame(WIDTH, HEIGHT, rtc.VideoBufferType.RGBA, frame.tobytes()))
            self.frames_published += 1
            n += 1
            await asyncio.sleep(max(0.0, start + n / FPS - loop.time()))

    async def _speak(self, source) -> None:
        """10 ms frames in real time: queued speech, else a tone while talking, else silence."""
        from livekit import rtc

        samples = AUDIO_RATE * FRAME_MS // 1000
        t = np.arange(samples) / AUDIO_RATE
        silence = bytes(samples * 2)
        n = 0
        while True:
            if self.events is not None and n % 5 == 0:
                await self._poll_events()
            if self._audio:
                event_id, pcm = self._audio.popleft()
                if event_id != self._current:
                    await self._speech_ended()
                    self._current = event_id
                    await self._send({"event_type": self.speaking_events[0], "event_id": event_id})
            else:
                if self._current in self._ended:
                    await self._speech_ended()
                if self._talking_tone:
                    tone = 6000 * np.sin(2 * np.pi * 330 * (t + n * FRAME_MS / 1000))
                    pcm = tone.astype(np.int16).tobytes()
                else:
                    pcm = silence
            if pcm is not silence:
                self.loud_frames += 1
            await source.capture_frame(rtc.AudioFrame(pcm, AUDIO_RATE, 1, samples))
            self.audio_frames += 1
            n += 1

    async def _speech_ended(self) -> None:
        if self._current is not None:
            self._ended.discard(self._current)
            await self._send({"event_type": self.speaking_events[1], "event_id": self._current})
            self._current = None

    async def _poll_events(self) -> None:
        assert self.events is not None
        due = await asyncio.to_thread(self.events)
        for event in due[self._polled :]:
            self._polled += 1
            kind = event.get("type", "")
            if kind.endswith("start_talking"):
                self._talking_tone = True
            elif kind.endswith("stop_talking"):
                self._talking_tone = False
            await self._send(event)


class RoomAvatarHost:
    """Where the fakes' avatar participants live: the test LiveKit server's url and dev keys, and
    one loop thread. `join()` / `leave()` are called from the fakes' request handlers."""

    def __init__(self, url: str, api_key: str, api_secret: str) -> None:
        self.url = url
        self.api_key = api_key
        self.api_secret = api_secret
        self.avatars: dict[str, RoomAvatar] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="room-avatars", daemon=True)
        self._thread.start()
        self._runs: dict[str, asyncio.Future] = {}

    @classmethod
    def for_server(cls, server) -> RoomAvatarHost:
        """For a `tests.livekit_util.LiveKitServer`."""
        return cls(server.url, server.api_key, server.api_secret)

    def call(self, fn: Callable[[], Any]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def token(self, identity: str, room: str, *, publish: bool = True, ttl_s: int = 6 * 3600) -> str:
        from livekit import api

        grants = api.VideoGrants(room_join=True, room=room, can_publish=publish, can_publish_data=publish,
                                 can_subscribe=True)
        return (
            api.AccessToken(self.api_key, self.api_secret).with_identity(identity)
            .with_ttl(timedelta(seconds=ttl_s)).with_grants(grants).to_jwt()
        )

    def viewer_token(self, room: str, identity: str) -> str:
        """What the vendor hands the page: join this room, watch, publish nothing."""
        return self.token(identity, room, publish=False)

    def join(self, room: str, **options: Any) -> RoomAvatar:
        """Put a vendor avatar into `room` (returns at once; `avatar.joined` is set once it is in)."""
        identity = options.get("identity", VENDOR_IDENTITY)
        key = room if identity == VENDOR_IDENTITY else f"{room}/{identity}"  # the fakes look up by room
        self.leave(key)
        avatar = RoomAvatar(self, room, **options)
        self.avatars[key] = avatar
        self._runs[key] = asyncio.run_coroutine_threadsafe(self._run(avatar), self.loop)
        return avatar

    async def _run(self, avatar: RoomAvatar) -> None:
        try:
            await avatar.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a test server restart: the vendor's avatar is gone, like a real one
            log.warning("room avatar in %s ended: %s", avatar.room_name, exc)

    def leave(self, key: str) -> None:
        """`key`: the room (the vendor's avatar), or `room/identity` for another participant."""
        avatar = self.avatars.pop(key, None)
        run = self._runs.pop(key, None)
        if avatar is not None and run is not None:
            self.loop.call_soon_threadsafe(run.cancel)

    def close(self) -> None:
        runs = list(self._runs.values())
        for room in list(self.avatars):
            self.leave(room)
        for run in runs:
            with contextlib.suppress(Exception):
                run.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
