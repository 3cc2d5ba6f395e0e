"""Cloud avatars on the page for real: the HeyGen and LiveAvatar fakes put an avatar participant
(`heygen`) in their rooms on the test LiveKit server, and Chromium watches it over WebRTC.

Proved on the page: video frames advance, the avatar's audio plays, talking events arrive through
the data channel (and are relayed to the server), another participant's tracks are ignored, and
the page comes back after the LiveKit server restarts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.browser_util import launch, require_vendor, screenshot, silence_wav, static_server
from tests.conftest import start_stack
from tests.fakes.heygen import FakeHeyGen
from tests.fakes.liveavatar import SANDBOX_AVATAR, FakeLiveAvatar
from tests.fakes.room_avatar import RoomAvatarHost
from tests.livekit_util import LiveKitServer

pytestmark = pytest.mark.browser

LIVE_TIMEOUT_MS = 60_000
TURN_TIMEOUT_MS = 90_000

# The page's own view: frames decoded by the <video>, and the level of the <audio> element's stream.
WATCH = """() => {
  const video = document.getElementById('avatar-video');
  const audio = document.getElementById('avatar-audio');
  const w = window.__watch ||= {maxLevel: 0};
  if (audio.srcObject && !w.analyser) {
    const ctx = new AudioContext();
    w.analyser = ctx.createAnalyser();
    ctx.createMediaStreamSource(audio.srcObject).connect(w.analyser);
    w.buf = new Float32Array(w.analyser.fftSize);
    const tick = () => {
      w.analyser.getFloatTimeDomainData(w.buf);
      let s = 0; for (const v of w.buf) s += v * v;
      w.level = Math.sqrt(s / w.buf.length);
      w.maxLevel = Math.max(w.maxLevel, w.level);
      requestAnimationFrame(tick);
    };
    ctx.resume().then(tick);
  }
  const q = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : {totalVideoFrames: 0};
  return {frames: q.totalVideoFrames, width: video.videoWidth, height: video.videoHeight,
          maxLevel: w.maxLevel, state: document.getElementById('avatar-frame').dataset.livekitState,
          relayed: window.__avatarStack.livekit?.eventsRelayed ?? 0};
}"""

# The median colour along the middle row of the video as shown (the fakes' pattern has blue = 160).
# A median, not one pixel: the pattern's white bar sweeps across the frame and covers any one
# column in 3 frames of 80.
MIDDLE_ROW_COLOUR = """() => {
  const v = document.getElementById('avatar-video');
  const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0);
  const row = g.getImageData(0, c.height >> 1, c.width, 1).data;
  const median = (k) => {
    const values = [];
    for (let i = k; i < row.length; i += 4) values.push(row[i]);
    values.sort((a, b) => a - b);
    return values[values.length >> 1];
  };
  return [median(0), median(1), median(2)];
}"""


def watch(page) -> dict:
    return page.evaluate(WATCH)


def wait_frames_advance(page, more_than: int = 0, by: int = 10, timeout_ms: int = 30_000) -> dict:
    page.wait_for_function(
        f"() => (document.getElementById('avatar-video').getVideoPlaybackQuality?.().totalVideoFrames || 0) "
        f"> {more_than + by}",
        timeout=timeout_ms,
    )
    return watch(page)


@pytest.fixture(scope="module")
def room_avatars(livekit_server: LiveKitServer) -> Iterator[RoomAvatarHost]:
    host = RoomAvatarHost.for_server(livekit_server)
    yield host
    host.close()


def run_conversation(page, base_url: str, screenshot_name: str) -> dict:
    page.goto(base_url + "/")
    page.click("#start-btn")
    page.wait_for_function("document.body.dataset.state === 'live'", timeout=LIVE_TIMEOUT_MS)
    page.wait_for_function("window.__avatarStack.livekit?.state === 'connected'", timeout=30_000)
    first = wait_frames_advance(page)
    assert (first["width"], first["height"]) == (320, 240)
    watch(page)  # starts the audio meter
    page.fill("#composer-input", "What is avatar stack?")
    page.press("#composer-input", "Enter")
    page.wait_for_function("window.__watch.maxLevel > 0.02", timeout=TURN_TIMEOUT_MS)  # the avatar is heard
    # The avatar's talking events arrive through the data channel (HeyGen's are relayed to the server;
    # LiveAvatar's reach the worker over its own socket, so the page only sees them).
    page.wait_for_function("(window.__avatarStack.livekit?.eventsReceived || 0) >= 1", timeout=TURN_TIMEOUT_MS)
    later = wait_frames_advance(page, first["frames"])
    screenshot(page, screenshot_name)
    return later


def test_heygen_fake_avatar_plays_on_the_page(redis_url: str, room_avatars: RoomAvatarHost, tmp_path):
    require_vendor()
    with FakeHeyGen(api_key="hg-test-key", speech_ms_per_char=40.0, room_avatars=room_avatars) as fake:
        stack = start_stack(redis_url, **fake.stack_env(HEYGEN_TASK_TYPE="repeat"))
        try:
            with launch(silence_wav(tmp_path / "silence.wav")) as page:
                seen = run_conversation(page, stack.base_url, "livekit-cloud-heygen")
                print(f"\n[browser/livekit] HeyGen fake on the page: {seen}")
                [sid] = fake.open_sessions()
                avatar = room_avatars.avatars[sid]
                assert avatar.frames_published > 10 and avatar.loud_frames > 0
                assert any(e["type"] == "avatar_start_talking" for e in avatar.sent)
                pixel = page.evaluate(MIDDLE_ROW_COLOUR)
                assert abs(pixel[2] - 160) < 40, pixel  # the avatar's pattern, not a blank frame
        finally:
            stack.stop_all()


def test_liveavatar_fake_avatar_speaks_the_audio_it_was_sent(
    redis_url: str, room_avatars: RoomAvatarHost, tmp_path
):
    require_vendor()
    with FakeLiveAvatar(api_key="la-test-key", room_avatars=room_avatars) as fake:
        stack = start_stack(
            redis_url, AVATAR_PROVIDER="liveavatar", LIVEAVATAR_API_KEY="la-test-key",
            LIVEAVATAR_SERVER_URL=fake.url, LIVEAVATAR_AVATAR_ID=SANDBOX_AVATAR, LIVEAVATAR_SANDBOX="true",
        )
        try:
            with launch(silence_wav(tmp_path / "silence.wav")) as page:
                seen = run_conversation(page, stack.base_url, "livekit-cloud-liveavatar")
                print(f"\n[browser/livekit] LiveAvatar fake on the page: {seen}")
                session = fake.only()
                avatar = room_avatars.avatars[session.session_id]
                assert session.utterances and avatar.loud_frames > 10  # what the worker sent was heard
                assert [e["event_type"] for e in avatar.sent][:1] == ["avatar.speak_started"]
        finally:
            stack.stop_all()


def test_page_ignores_other_participants_and_comes_back_after_a_livekit_restart(
    private_livekit_server: LiveKitServer, tmp_path
):
    """No stack needed: the page is handed a room as a cloud provider's session.ready would."""
    require_vendor()
    server = private_livekit_server
    host = RoomAvatarHost.for_server(server)
    room = "restart-room"
    try:
        avatar = host.join(room)
        host.join(room, identity="intruder", color=(255, 0, 0))  # someone else, publishing red video
        with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
            page.goto(base + "/")
            page.wait_for_function("window.__avatarStack !== undefined")
            page.evaluate(
                "(lk) => window.__avatarStack.handleEvent({type: 'session.ready', provider: 'liveavatar', "
                "stt_provider: 'local', livekit: lk, id: '1-0', ts: Date.now()})",
                {"url": server.url, "token": host.viewer_token(room, "page")},
            )
            page.wait_for_function("window.__avatarStack.livekit?.state === 'connected'", timeout=30_000)
            before = wait_frames_advance(page)
            assert avatar.joined.wait(10)
            assert abs(page.evaluate(MIDDLE_ROW_COLOUR)[2] - 160) < 40  # the avatar's pattern, never the red one
            avatar.send({"event_type": "avatar.speak_started", "event_id": "e1"})
            page.wait_for_function("window.__avatarStack.livekit.eventsReceived >= 1", timeout=10_000)

            server.kill()  # the LiveKit server dies and comes back on the same ports
            page.wait_for_function(
                "['reconnecting', 'disconnected', 'failed'].includes(window.__avatarStack.livekit?.state)",
                timeout=30_000,
            )
            lost = page.evaluate("window.__avatarStack.livekit.state")
            server.start()
            avatar = host.join(room)  # the vendor's avatar rejoins its room
            host.join(room, identity="intruder", color=(255, 0, 0))
            page.wait_for_function("window.__avatarStack.livekit?.state === 'connected'", timeout=60_000)
            after = wait_frames_advance(page, watch(page)["frames"], timeout_ms=60_000)
            assert abs(page.evaluate(MIDDLE_ROW_COLOUR)[2] - 160) < 40
            frames = (before["frames"], after["frames"])
            print(f"\n[browser/livekit] restart: {lost!r} -> connected; frames before, after: {frames}")
            screenshot(page, "livekit-cloud-after-restart")
    finally:
        host.close()
