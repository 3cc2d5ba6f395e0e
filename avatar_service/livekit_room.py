"""The local avatar in a LiveKit room: its voice as an audio track, its mouth timing as data.

With `LIVEKIT_URL` + key + secret set, each session gets one room (named from the session id, so
a worker that takes the session over rejoins the same room). The avatar joins as
`avatar-stack-avatar` and publishes piper's PCM through an `rtc.AudioSource` in 20 ms frames,
paced by the source's small queue (real time); barge-in clears that queue. The page gets a
short-lived, room-scoped, subscribe-only token: it can listen, never publish.

Audio played from a WebRTC track is what Chromium's echo canceller uses as its reference, which
the WebSocket + Web Audio path is not: this is why the voice goes through LiveKit when it can.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import orjson

from common.models import AvatarAudio
from common.settings import Settings

if TYPE_CHECKING:
    from livekit import rtc

log = logging.getLogger("avatar.livekit")

AVATAR_IDENTITY = "avatar-stack-avatar"
MOUTH_TOPIC = "avatar.mouth"
FRAME_MS = 20
SOURCE_QUEUE_MS = 100  # audio inside the SDK's source at most: what a barge-in can still let out
MAX_BUFFER_S = 120.0  # audio waiting in our queue at most (a reply is synthesized faster than it plays)


class LiveKitUnavailable(Exception):
    """The avatar could not join its room; `code`/`message` are what the page is told."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def configured(settings: Settings) -> bool:
    return bool(settings.livekit_url and settings.livekit_api_key and settings.livekit_api_secret)


def room_name(settings: Settings, sid: str) -> str:
    """One room per session, the same for whichever worker owns it."""
    return f"{settings.livekit_room_prefix}{sid}"


def _token(settings: Settings, identity: str, room: str, *, publish: bool, ttl_s: float) -> str:
    from livekit import api

    assert settings.livekit_api_key and settings.livekit_api_secret
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_subscribe=not publish,
        can_publish=publish,
        can_publish_data=publish,
        can_update_own_metadata=False,
    )
    return (
        api.AccessToken(settings.livekit_api_key.get_secret_value(), settings.livekit_api_secret.get_secret_value())
        .with_identity(identity)
        .with_kind("agent" if publish else "standard")
        .with_ttl(timedelta(seconds=ttl_s))
        .with_grants(grants)
        .to_jwt()
    )


def viewer_token(settings: Settings, room: str) -> str:
    """The page's token: this room only, subscribe only, valid for `LIVEKIT_TOKEN_TTL_S` to join
    (LiveKit refreshes it for a connected client)."""
    identity = f"viewer-{secrets.token_hex(4)}"
    return _token(settings, identity, room, publish=False, ttl_s=settings.livekit_token_ttl_s)


def public_url(settings: Settings) -> str:
    return settings.livekit_public_url or settings.livekit_url


def _http_url(ws_url: str) -> str:
    if ws_url.startswith("ws"):
        return "http" + ws_url[2:]
    return ws_url


def _classify(exc: BaseException, url: str) -> LiveKitUnavailable:
    text = str(exc).lower()
    if any(word in text for word in ("401", "unauthorized", "invalid token", "signature", "api key")):
        return LiveKitUnavailable(
            "livekit_auth_failed",
            f"LiveKit at {url} refused the avatar's credentials (LIVEKIT_API_KEY / LIVEKIT_API_SECRET); "
            "the voice plays over the WebSocket instead",
        )
    return LiveKitUnavailable(
        "livekit_unreachable",
        f"LiveKit at {url} could not be reached; the voice plays over the WebSocket instead",
    )


@dataclass
class _Frame:
    pcm: bytes
    mouth: bytes | None  # the data message that goes out as this frame enters the source


class LiveKitAudioSink:
    """The local avatar's audio sink into a room: `send` queues a chunk, a pump plays it out.

    `send` returns at once unless `MAX_BUFFER_S` of audio is already waiting, so the speak loop
    keeps its own clock; `clear` drops everything not yet heard (barge-in)."""

    def __init__(self, room: rtc.Room, source: rtc.AudioSource, sample_rate: int) -> None:
        self.room = room
        self.source = source
        self.rate = sample_rate
        self.frame_samples = sample_rate * FRAME_MS // 1000
        self._frames: collections.deque[_Frame] = collections.deque()
        self._queued_samples = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._pump = asyncio.create_task(self._run(), name="livekit-audio-pump")
        self.frames_sent = 0
        self._failing = False
        self._reply: str | None = None  # the reply of the last chunk queued
        self._cut: collections.deque[str] = collections.deque(maxlen=32)  # replies cut by barge-in
        self._playing = asyncio.Event()  # cleared while paused: the pump holds what is not heard yet
        self._playing.set()

    async def send(self, pcm: bytes, meta: AvatarAudio) -> None:
        self._reply = meta.reply_id
        while self._queued_samples >= MAX_BUFFER_S * self.rate:
            self._space.clear()
            await self._space.wait()
        if meta.reply_id in self._cut:  # synthesized before the barge-in, sent after it: never heard
            return
        mouth = orjson.dumps(
            {
                "type": "avatar.mouth",
                "reply_id": meta.reply_id,
                "seq": meta.seq,
                "sample_rate": meta.sample_rate,
                "samples": meta.samples,
                "mouth": meta.mouth,
                "mouth_hop_ms": meta.mouth_hop_ms,
            }
        )
        step = self.frame_samples * 2
        for i in range(0, len(pcm), step):
            chunk = pcm[i : i + step]
            if len(chunk) < step:  # the source wants whole frames: pad the last with silence
                chunk = chunk + b"\x00" * (step - len(chunk))
            self._frames.append(_Frame(chunk, mouth if i == 0 else None))
            self._queued_samples += self.frame_samples
        self._wake.set()

    def clear(self) -> None:
        """Barge-in: what is queued here and inside the source is never heard, nor anything of
        the same reply that is still on its way."""
        if self._reply is not None:
            self._cut.append(self._reply)
        self._frames.clear()
        self._queued_samples = 0
        self._space.set()
        self._playing.set()
        self.source.clear_queue()

    def pause(self) -> None:
        """Hold the rest (the source's own small queue, ~SOURCE_QUEUE_MS, still plays out)."""
        self._playing.clear()

    def resume(self) -> None:
        self._playing.set()

    async def _run(self) -> None:
        from livekit import rtc

        while True:
            await self._playing.wait()
            if not self._frames:
                self._wake.clear()
                await self._wake.wait()
                continue
            frame = self._frames.popleft()
            self._queued_samples -= self.frame_samples
            self._space.set()
            if frame.mouth is not None:
                delay = self.source.queued_duration
                payload = frame.mouth[:-1] + b',"delay_ms":' + str(round(delay * 1000)).encode() + b"}"
                with contextlib.suppress(Exception):  # mouth timing is a nicety; the voice goes on
                    await self.room.local_participant.publish_data(payload, reliable=True, topic=MOUTH_TOPIC)
            try:
                await self.source.capture_frame(
                    rtc.AudioFrame(frame.pcm, self.rate, 1, self.frame_samples)
                )  # returns once the source's queue has room: this paces us in real time
                self.frames_sent += 1
            except Exception as exc:  # the room went away: drop audio rather than stall the reply
                if not self._failing:  # once per outage, not per frame
                    log.warning("livekit audio frames dropped: %s", type(exc).__name__)
                self._failing = True

    def attach(self, room: rtc.Room, source: rtc.AudioSource) -> None:
        """After a rejoin: the same queue plays into the new room's track."""
        self.room, self.source = room, source
        self._failing = False

    async def aclose(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        self._frames.clear()


class AvatarRoom:
    """The avatar's connection to one session's room. When LiveKit goes away (a server restart)
    the SDK first retries on its own (~10 attempts) and republishes the track; if it gives up
    (`disconnected`), we rejoin with backoff, same room and identity, for as long as the session
    lasts. Meanwhile audio is dropped; the page's livekit-client reconnects on its own and picks
    up the new track."""

    REJOIN_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 5.0)

    def __init__(self, settings: Settings, name: str, room: rtc.Room, sink: LiveKitAudioSink) -> None:
        self.settings = settings
        self.name = name
        self.room = room
        self.sink = sink
        self.rejoins = 0
        self._leaving = False
        self._rejoin: asyncio.Task | None = None
        self._watch(room)

    @classmethod
    async def join(cls, settings: Settings, name: str, sample_rate: int) -> AvatarRoom:
        """Join `name` as the avatar and publish the voice track; raise `LiveKitUnavailable`."""
        room, source = await _connect(settings, name, sample_rate)
        log.info("avatar joined livekit room %s", name)
        return cls(settings, name, room, LiveKitAudioSink(room, source, sample_rate))

    def _watch(self, room: rtc.Room) -> None:
        room.on("disconnected", lambda reason: self._on_disconnected(room, reason))
        room.on("connection_state_changed", lambda state: self._on_state(room, state))

    def _on_state(self, room: rtc.Room, state: int) -> None:
        """The SDK does not always say `disconnected`: when the room's event stream ends first, it
        only changes the state to DISCONNECTED. Either one means the room is gone."""
        from livekit import rtc

        if state == rtc.ConnectionState.CONN_DISCONNECTED:
            self._on_disconnected(room, "connection state disconnected")

    def _on_disconnected(self, room: rtc.Room, reason: object) -> None:
        if self._leaving or room is not self.room or (self._rejoin and not self._rejoin.done()):
            return
        log.warning("livekit room %s lost (%s); rejoining", self.name, reason)
        self._rejoin = asyncio.get_running_loop().create_task(self._rejoin_loop())

    async def _rejoin_loop(self) -> None:
        attempt = 0
        while not self._leaving:
            await asyncio.sleep(self.REJOIN_BACKOFF_S[min(attempt, len(self.REJOIN_BACKOFF_S) - 1)])
            attempt += 1
            try:
                room, source = await _connect(self.settings, self.name, self.sink.rate)
            except LiveKitUnavailable:
                continue
            if self._leaving:
                with contextlib.suppress(Exception):
                    await room.disconnect()
                return
            self.room = room
            self.sink.attach(room, source)
            self._watch(room)
            self.rejoins += 1
            log.info("avatar rejoined livekit room %s after %d attempt(s)", self.name, attempt)
            return

    def viewer_token(self) -> str:
        return viewer_token(self.settings, self.name)

    async def leave(self, *, delete_room: bool) -> None:
        """Leave the room; `delete_room` (the session ended) also disconnects the page."""
        self._leaving = True
        if self._rejoin is not None:
            self._rejoin.cancel()
        await self.sink.aclose()
        with contextlib.suppress(Exception):
            await self.room.disconnect()
        if delete_room:
            with contextlib.suppress(Exception):
                await delete(self.settings, self.name)


async def _connect(settings: Settings, name: str, sample_rate: int) -> tuple[rtc.Room, rtc.AudioSource]:
    """A connected room with the voice track published; raises `LiveKitUnavailable`."""
    from livekit import rtc

    url = settings.livekit_url
    token = _token(settings, AVATAR_IDENTITY, name, publish=True, ttl_s=6 * 3600)
    room = rtc.Room()
    try:
        await asyncio.wait_for(
            room.connect(
                url, token, rtc.RoomOptions(auto_subscribe=False, connect_timeout=settings.livekit_connect_timeout_s)
            ),
            settings.livekit_connect_timeout_s * 2,
        )
        source = rtc.AudioSource(sample_rate, 1, queue_size_ms=SOURCE_QUEUE_MS)
        track = rtc.LocalAudioTrack.create_audio_track("avatar-voice", source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE, dtx=False, red=True)
        await asyncio.wait_for(room.local_participant.publish_track(track, options), 15)
    except (Exception, TimeoutError) as exc:
        with contextlib.suppress(Exception):
            await room.disconnect()
        err = _classify(exc, url)
        log.warning("livekit room not joined: %s (%s)", err.code, type(exc).__name__)
        raise err from None
    return room, source


async def delete(settings: Settings, name: str) -> None:
    from livekit import api

    assert settings.livekit_api_key and settings.livekit_api_secret
    lk = api.LiveKitAPI(
        _http_url(settings.livekit_url),
        settings.livekit_api_key.get_secret_value(),
        settings.livekit_api_secret.get_secret_value(),
    )
    try:
        await lk.room.delete_room(api.DeleteRoomRequest(room=name))
    finally:
        await lk.aclose()
