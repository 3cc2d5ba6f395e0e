"""The page in Chromium against a real LiveKit server, over real WebRTC.

Local avatar: the page joins the session's room with its subscribe-only token, plays the avatar's
voice track (measured by an analyser on the received track, not on our own Web Audio), moves the
face, goes quiet at once on barge-in, and cannot publish anything into the room.
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from tests.browser_util import launch, require_vendor, screenshot, silence_wav
from tests.conftest import Stack
from tests.livekit_util import LiveKitServer

pytestmark = pytest.mark.browser

LIVE_TIMEOUT_MS = 60_000
TURN_TIMEOUT_MS = 90_000


def run_async(coro):
    """Run a coroutine from a sync Playwright test (its thread already has an event loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def start_live(page, base_url: str) -> str:
    page.goto(base_url + "/")
    page.click("#start-btn")
    page.wait_for_function("document.body.dataset.state === 'live'", timeout=LIVE_TIMEOUT_MS)
    page.wait_for_function("window.__avatarStack.livekitVoice.state === 'connected'", timeout=30_000)
    return page.evaluate("window.__avatarStack.sessionId")


def type_message(page, text: str) -> None:
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def test_local_avatar_voice_plays_from_the_livekit_track(livekit_stack: Stack, tmp_path):
    require_vendor()
    with launch(silence_wav(tmp_path / "silence.wav")) as page:
        start_live(page, livekit_stack.base_url)
        assert page.evaluate("window.__avatarStack.livekit") is None  # not the cloud video path
        assert page.get_attribute("#avatar-frame", "data-view") == "face"
        type_message(page, "What is avatar stack?")
        page.wait_for_function(
            "__avatarStack.livekitVoice.tracks >= 1 && __avatarStack.maxPlaybackLevel > 0.01 "
            "&& document.body.dataset.avatarSpeaking === 'true' && __avatarStack.mouthOpen > 0.2",
            timeout=TURN_TIMEOUT_MS,
        )
        screenshot(page, "livekit-local-speaking")
        state = page.evaluate(
            """async () => ({voice: __avatarStack.livekitVoice, timings: __avatarStack.timings,
                   ws_chunks: __avatarStack.audioChunksReceived, rx: await __avatarStack.voiceStats()})"""
        )
        print(f"\n[browser/livekit] local voice: {state}")
        assert state["ws_chunks"] == 0  # no PCM came down the socket
        assert state["voice"]["mouthMessages"] >= 1 and state["rx"]["packets_received"] > 10
        page.wait_for_function("document.body.dataset.avatarSpeaking === 'false'", timeout=TURN_TIMEOUT_MS)
        assert page.evaluate("__avatarStack.timings.length") >= 1  # first audio heard was timed
        assert not [line for line in page.logs if line.startswith("pageerror")], page.logs


def test_barge_in_silences_the_livekit_voice(livekit_stack: Stack, tmp_path):
    require_vendor()
    with launch(silence_wav(tmp_path / "silence.wav")) as page:
        start_live(page, livekit_stack.base_url)
        type_message(page, "Tell me everything about avatar stack and how it scales.")
        page.wait_for_function("__avatarStack.lastPlaybackLevel > 0.02", timeout=TURN_TIMEOUT_MS)
        stop_ms = page.evaluate(
            """() => new Promise((resolve) => {
              const t0 = performance.now();
              document.getElementById('interrupt-btn').click();
              let quietSince = 0;
              const check = () => {
                const now = performance.now();
                if (__avatarStack.lastPlaybackLevel < 0.002) { quietSince ||= now; } else { quietSince = 0; }
                if (quietSince && now - quietSince > 200) resolve(quietSince - t0);
                else if (now - t0 > 5000) resolve(-1);
                else requestAnimationFrame(check);
              };
              check();
            })"""
        )
        print(f"\n[browser/livekit] interrupt -> the received track is silent after {stop_ms:.0f} ms")
        assert stop_ms >= 0, "the avatar's track went on after the interrupt"
        page.wait_for_function("document.body.dataset.avatarSpeaking === 'false'", timeout=5_000)
        page.wait_for_function("__avatarStack.mouthOpen < 0.05", timeout=2_000)


def test_the_page_cannot_publish_into_the_room(livekit_stack: Stack, livekit_server: LiveKitServer, tmp_path):
    require_vendor()
    with launch(silence_wav(tmp_path / "silence.wav")) as page:
        sid = start_live(page, livekit_stack.base_url)
        attempts = page.evaluate(
            """async () => {
              const room = __avatarStack.voiceRoom();
              const out = {perms: {publish: room.localParticipant.permissions?.canPublish,
                                   data: room.localParticipant.permissions?.canPublishData}};
              try { await room.localParticipant.setMicrophoneEnabled(true); out.mic = 'published'; }
              catch (e) { out.mic = String(e.message || e); }
              try { await room.localParticipant.publishData(new TextEncoder().encode('{"type":"x"}'),
                                                              {reliable: true}); out.data = 'sent'; }
              catch (e) { out.data = String(e.message || e); }
              return out;
            }"""
        )
        print(f"\n[browser/livekit] publish attempts with the page's token: {attempts}")
        assert attempts["perms"] == {"publish": False, "data": False}
        assert attempts["mic"] != "published"

        participants = run_async(livekit_server.participants(f"avatar-stack-{sid}"))
        viewers = [p for p in participants if p.identity.startswith("viewer-")]
        assert len(viewers) == 1, [p.identity for p in participants]
        assert not viewers[0].tracks and not viewers[0].permission.can_publish  # the server says so too
        assert not viewers[0].permission.can_publish_data
        screenshot(page, "livekit-no-publish")
