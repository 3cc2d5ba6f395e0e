"""The local avatar's LiveKit voice survives a LiveKit server restart.

The avatar worker rejoins the session's room by itself (backoff), the page's livekit-client
reconnects on its own, picks up the new track, and the next reply is heard. A module of its own:
it runs its own stack against a LiveKit server it may kill.
"""

from __future__ import annotations

import pytest

from tests.browser_util import launch, require_vendor, screenshot, silence_wav
from tests.conftest import start_stack
from tests.livekit_util import LiveKitServer
from tests.test_browser_livekit import TURN_TIMEOUT_MS, start_live, type_message

pytestmark = pytest.mark.browser


def test_local_voice_comes_back_after_a_livekit_restart(
    redis_url: str, private_livekit_server: LiveKitServer, tmp_path
):
    require_vendor()
    server = private_livekit_server
    stack = start_stack(redis_url, **server.env())
    try:
        with launch(silence_wav(tmp_path / "silence.wav")) as page:
            start_live(page, stack.base_url)
            type_message(page, "Hello there")
            page.wait_for_function(
                "__avatarStack.livekitVoice.tracks >= 1 && __avatarStack.maxPlaybackLevel > 0.01",
                timeout=TURN_TIMEOUT_MS,
            )
            page.wait_for_function("document.body.dataset.avatarSpeaking === 'false'", timeout=TURN_TIMEOUT_MS)

            server.kill()  # a crash: nobody is told goodbye
            page.wait_for_function(
                "['reconnecting', 'disconnected', 'failed'].includes(__avatarStack.livekitVoice.state)",
                timeout=30_000,
            )
            server.start()  # same ports, empty: no rooms, nobody in them
            page.wait_for_function(
                "__avatarStack.livekitVoice.state === 'connected' && __avatarStack.livekitVoice.tracks >= 2",
                timeout=60_000,
            )
            type_message(page, "Are you still there?")
            page.wait_for_function("__avatarStack.lastPlaybackLevel > 0.02", timeout=TURN_TIMEOUT_MS)
            voice = page.evaluate("__avatarStack.livekitVoice")
            print(f"\n[browser/livekit] after a LiveKit restart the local voice plays again: {voice}")
            assert page.evaluate("__avatarStack.audioChunksReceived") == 0  # still LiveKit, not the socket
            screenshot(page, "livekit-local-after-restart")
    finally:
        stack.stop_all()
