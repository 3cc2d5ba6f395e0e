"""The test LiveKit server is real: two Python `livekit` rtc clients meet in a room through it.

One publishes a tone as an audio track and a data message; the other receives both. This is the
ground the LiveKit browser tests and the avatar worker's room stand on.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.livekit_util import LiveKitServer

RATE = 48_000
FRAME = RATE // 100  # 10 ms


def tone_frame(n: int):
    from livekit import rtc

    t = (np.arange(FRAME) + n * FRAME) / RATE
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    return rtc.AudioFrame(pcm.tobytes(), RATE, 1, FRAME)


async def test_rtc_clients_exchange_audio_and_data(livekit_server: LiveKitServer):
    from livekit import rtc

    room = "lk-selftest"
    sender, receiver = rtc.Room(), rtc.Room()
    got_track: asyncio.Future = asyncio.get_running_loop().create_future()
    got_data: asyncio.Future = asyncio.get_running_loop().create_future()

    @receiver.on("track_subscribed")
    def _on_track(track, publication, participant) -> None:
        if not got_track.done():
            got_track.set_result((track, participant.identity))

    @receiver.on("data_received")
    def _on_data(packet) -> None:
        if not got_data.done():
            got_data.set_result((packet.data, packet.topic, packet.participant.identity))

    await receiver.connect(livekit_server.url, livekit_server.token("listener", room, publish=False))
    await sender.connect(livekit_server.url, livekit_server.token("speaker", room))
    pump: asyncio.Task | None = None
    try:
        source = rtc.AudioSource(RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("voice", source)
        await sender.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )

        async def feed() -> None:
            n = 0
            while True:
                await source.capture_frame(tone_frame(n))  # paces itself: returns as the queue drains
                n += 1

        pump = asyncio.create_task(feed())
        remote, identity = await asyncio.wait_for(got_track, 20)
        assert identity == "speaker" and remote.kind == rtc.TrackKind.KIND_AUDIO

        stream = rtc.AudioStream(remote, sample_rate=RATE, num_channels=1)
        peak = 0.0
        async with asyncio.timeout(20):
            async for event in stream:
                samples = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.float32)
                peak = max(peak, float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0)
                if peak > 1000:  # the tone (RMS ~5600) came through Opus, not silence
                    break
        await stream.aclose()
        assert peak > 1000

        await sender.local_participant.publish_data(b'{"type":"hello"}', reliable=True, topic="selftest")
        data, topic, who = await asyncio.wait_for(got_data, 10)
        assert (data, topic, who) == (b'{"type":"hello"}', "selftest", "speaker")
    finally:
        if pump is not None:
            pump.cancel()
        await sender.disconnect()
        await receiver.disconnect()


async def test_subscribe_only_token_cannot_publish(livekit_server: LiveKitServer):
    """A viewer token (no publish grants) is refused by the server itself, not only by our page:
    its track publication fails, and its data messages never reach anyone."""
    from livekit import rtc

    room = "lk-no-publish"
    viewer, listener, avatar = rtc.Room(), rtc.Room(), rtc.Room()
    received: list[tuple[str, bytes]] = []
    marker: asyncio.Future = asyncio.get_running_loop().create_future()

    @listener.on("data_received")
    def _on_data(packet) -> None:
        received.append((packet.participant.identity, packet.data))
        if packet.data == b"marker" and not marker.done():
            marker.set_result(None)

    await listener.connect(livekit_server.url, livekit_server.token("listener", room, publish=False))
    await avatar.connect(livekit_server.url, livekit_server.token("avatar", room))
    await viewer.connect(livekit_server.url, livekit_server.token("viewer", room, publish=False))
    try:
        perms = viewer.local_participant.permissions
        assert not perms.can_publish and not perms.can_publish_data

        source = rtc.AudioSource(RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("sneaky", source)
        # The server never answers an unpermitted publication: the SDK gives up with an error.
        with pytest.raises(Exception, match=r"(?i)permission|denied|publication|timed out"):
            await asyncio.wait_for(viewer.local_participant.publish_track(track), 30)
        assert not listener.remote_participants["viewer"].track_publications

        for _ in range(3):
            await viewer.local_participant.publish_data(b"sneaky", reliable=True)
        await avatar.local_participant.publish_data(b"marker", reliable=True)
        await asyncio.wait_for(marker, 10)
        assert ("viewer", b"sneaky") not in received, received
    finally:
        for r in (viewer, listener, avatar):
            await r.disconnect()
