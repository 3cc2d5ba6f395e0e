"""The page in a real headless Chromium, its microphone fed from a WAV file.

(a) spoken question → final transcript → the local avatar's reply text and audible audio
(b) typed message, keyboard only → reply; `?debug=1` → the Latency panel's breakdown of a spoken reply
(c) cloud avatar path → livekit-client's room.connect is tried with the url and token handed out
(d) dropped WebSocket → reconnects to the same session, resuming after the last event
(e) microphone denied, no capacity (503) and server error events → banners

Every test leaves a screenshot in artifacts/browser-*.png. Waits are on page state, never sleeps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import time
import wave
from urllib.parse import parse_qs, urlparse

import pytest

from tests.browser_util import launch, require_vendor, screenshot, silence_wav, static_server
from tests.speech import silence_pcm, speech_available, speech_pcm, speech_wav

pytestmark = pytest.mark.browser

QUESTION = "What is avatar stack?"
LIVE_TIMEOUT_MS = 60_000  # the first session also waits for the workers' models
TURN_TIMEOUT_MS = 90_000  # speech recognition + reply + speech synthesis on a 2-core machine


def start_conversation(page, base_url: str) -> str:
    page.goto(base_url + "/")
    page.click("#start-btn")
    page.wait_for_function("document.body.dataset.state === 'live'", timeout=LIVE_TIMEOUT_MS)
    sid = page.evaluate("window.__avatarStack.sessionId")
    assert sid
    return sid


def wait_audio_heard(page, min_chunks: int = 1) -> None:
    """Audio really played: chunks finished on the Web Audio clock and the analyser saw signal."""
    page.wait_for_function(
        f"window.__avatarStack.audioChunksPlayed >= {min_chunks} && window.__avatarStack.maxPlaybackLevel > 0.005",
        timeout=TURN_TIMEOUT_MS,
    )


def end_conversation(page) -> None:
    page.click("#end-btn")
    page.wait_for_function("document.body.dataset.state === 'ended'", timeout=10_000)


def test_spoken_question_gets_spoken_reply(stack):
    if not speech_available():
        pytest.skip("needs espeak-ng and sox for the spoken question")
    wav = speech_wav(QUESTION, pad_s=1.0)
    with launch(wav) as page:
        start_conversation(page, stack.base_url)

        final = page.locator('#transcript li.user[data-final="true"]').first
        final.wait_for(timeout=TURN_TIMEOUT_MS)
        question = final.locator(".text").inner_text()
        # tiny.en hears espeak's "avatar stack" as "our task" even from the WAV itself: check the
        # words it does get right, which proves the captured audio is speech at the right rate.
        assert {"what", "is"} <= set(re.findall(r"[a-z]+", question.lower())), question

        reply = page.locator("#transcript li.avatar .text").first
        page.wait_for_function(
            "document.querySelector('#transcript li.avatar .text')?.textContent.trim().length > 0",
            timeout=TURN_TIMEOUT_MS,
        )
        wait_audio_heard(page)
        state = page.evaluate(
            """() => ({timings: __avatarStack.timings, played: __avatarStack.audioChunksPlayed,
                      level: __avatarStack.maxPlaybackLevel, sent: __avatarStack.framesSent})"""
        )
        screenshot(page, "browser-conversation")
        voice = [t for t in state["timings"] if t["source"] == "voice"]
        latency = (
            f"{voice[0]['latency_ms']} ms (final transcript at {voice[0]['final_ms']} ms, reply text at "
            f"{voice[0]['reply_ms']} ms, first audio chunk at {voice[0]['audio_ms']} ms)"
            if voice
            else "n/a"
        )
        print(
            f"\n[browser] end of speech -> first avatar audio heard: {latency}; "
            f"question {question!r}; reply {reply.inner_text()[:80]!r}; "
            f"chunks played {state['played']}, peak output RMS {state['level']:.3f}, mic frames sent {state['sent']}"
        )
        assert state["sent"] > 50  # ~1 s of 20 ms frames at least reached the socket

        page.set_viewport_size({"width": 390, "height": 844})
        screenshot(page, "browser-phone")
        end_conversation(page)
        assert not [line for line in page.logs if line.startswith("pageerror")], page.logs


PAGE_HOPS = ("speech_to_final", "final_to_reply", "reply_to_audio")  # add up to at most speech_to_heard
SERVER_HOPS = ("server_final_to_reply", "server_reply_to_audio")


def test_latency_panel_breaks_down_a_spoken_reply(stack):
    """`?debug=1` opens the Latency panel; a spoken question fills in every hop of its reply."""
    if not speech_available():
        pytest.skip("needs espeak-ng and sox for the spoken question")
    with launch(speech_wav(QUESTION, pad_s=1.0)) as page:
        page.goto(stack.base_url + "/?debug=1")
        panel = page.locator("#latency")
        assert panel.get_attribute("open") is not None
        assert panel.locator("table").is_visible()
        page.click("#start-btn")
        page.wait_for_function("document.body.dataset.state === 'live'", timeout=LIVE_TIMEOUT_MS)

        # The cells of the last reply fill in once its first audio is scheduled to be heard.
        panel.locator('td[data-metric="speech_to_heard"][data-col="last"][data-value]').wait_for(
            timeout=TURN_TIMEOUT_MS
        )
        stats = page.evaluate("window.__avatarStack.latency")
        last = stats["last"]
        print(f"\n[browser] latency breakdown of the spoken reply (ms): {last}")
        assert last["source"] == "voice" and last["avatar"] == "local", last
        assert last["speech_end"] == "vad", last  # the server VAD's end, mapped through the frames sent
        assert page.locator(f'#transcript li.avatar[data-reply-id="{last["reply_id"]}"]').count() == 1

        # Complete and consistent: page hops on the page clock, server hops on the server clock.
        for key in (*PAGE_HOPS, "speech_to_heard", *SERVER_HOPS):
            assert isinstance(last[key], int) and last[key] >= 0, (key, last)
        # The parts end at the first audio's arrival, the total when it is heard (scheduled
        # after it arrived); each is rounded to whole ms on its own.
        assert sum(last[key] for key in PAGE_HOPS) <= last["speech_to_heard"] + len(PAGE_HOPS) - 1, last

        # The panel shows the hook's numbers, and a median over the replies so far.
        assert stats["count"] >= 1
        for key in (*PAGE_HOPS, "speech_to_heard", *SERVER_HOPS):
            assert panel.locator(f'td[data-metric="{key}"][data-col="last"]').inner_text() == f"{last[key]} ms"
            median = stats["median"][key]
            assert median is not None and median >= 0, key
            assert panel.locator(f'td[data-metric="{key}"][data-col="median"]').inner_text() == f"{median} ms"
            if stats["count"] == 1:
                assert median == last[key], key
        assert panel.locator(".latency-count").inner_text() == str(stats["count"])
        screenshot(page, "browser-latency")

        # Keyboard: the "Latency" toggle closes and reopens the panel.
        panel.locator("summary").focus()
        page.keyboard.press("Enter")
        page.wait_for_function("!document.getElementById('latency').open")
        assert not panel.locator("table").is_visible()
        page.keyboard.press("Space")
        page.wait_for_function("document.getElementById('latency').open")

        # Narrow screen, dark mode: the table fits the width of a phone.
        page.emulate_media(color_scheme="dark")
        page.set_viewport_size({"width": 360, "height": 780})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        panel.scroll_into_view_if_needed()
        screenshot(page, "browser-latency-phone-dark")
        end_conversation(page)
        assert not [line for line in page.logs if line.startswith("pageerror")], page.logs

        # Without the flag the panel starts closed.
        page.goto(stack.base_url + "/")
        assert page.locator("#latency").get_attribute("open") is None


def test_typed_message_with_keyboard_only(stack, tmp_path):
    with launch(silence_wav(tmp_path / "silence.wav")) as page:
        page.goto(stack.base_url + "/")
        # Keyboard only: Tab past the skip link to Start, Enter starts.
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "start-btn"
        page.keyboard.press("Enter")
        page.wait_for_function("document.body.dataset.state === 'live'", timeout=LIVE_TIMEOUT_MS)
        assert page.evaluate("document.activeElement.id") == "end-btn"  # focus stays in the Start/End slot

        page.focus("#composer-input")
        page.keyboard.type("What can you do?")
        page.keyboard.press("Enter")
        sent = page.locator('#transcript li.user[data-source="text"]')
        sent.wait_for(timeout=5_000)
        assert sent.inner_text().endswith("What can you do?")
        assert page.input_value("#composer-input") == ""

        page.wait_for_function(
            "document.querySelector('#transcript li.avatar .text')?.textContent.trim().length > 0",
            timeout=TURN_TIMEOUT_MS,
        )
        wait_audio_heard(page)
        screenshot(page, "browser-typed")
        end_conversation(page)


def _fake_livekit_token() -> str:
    """A well-formed LiveKit-style JWT (signed with a throwaway secret)."""

    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    head = b64({"alg": "HS256", "typ": "JWT"})
    body = b64(
        {
            "sub": "browser",
            "iss": "test",
            "exp": int(time.time()) + 600,
            "video": {"roomJoin": True, "room": "avatar-room"},
        }
    )
    sig = hmac.new(b"test-secret", f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cloud_avatar_joins_livekit_room(tmp_path):
    require_vendor()
    url = f"ws://127.0.0.1:{_closed_port()}"
    token = _fake_livekit_token()
    with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(base + "/")
        page.wait_for_function("window.__avatarStack !== undefined")
        page.evaluate(
            "(lk) => window.__avatarStack.handleEvent({type: 'session.ready', provider: 'heygen', "
            "stt_provider: 'local', livekit: lk, id: '1-0', ts: Date.now()})",
            {"url": url, "token": token},
        )
        frame = page.locator("#avatar-frame")
        assert frame.get_attribute("data-livekit-url") == url
        assert frame.get_attribute("data-view") == "video"
        assert page.locator("#avatar-video").is_visible()

        # livekit-client loaded from its local npm build and really dialled the room with that token...
        page.wait_for_function("window.__avatarStack.livekit?.connectAttempts === 1", timeout=10_000)
        deadline = time.monotonic() + 15
        while not any(s.startswith(url) for s in sockets) and time.monotonic() < deadline:
            page.wait_for_timeout(50)  # lets Playwright deliver its websocket events
        dialled = [s for s in sockets if s.startswith(url)]
        assert dialled, sockets
        assert parse_qs(urlparse(dialled[0]).query)["access_token"] == [token]

        # ...and, with no LiveKit server there, the page says so instead of hanging.
        expect_banner(page, "avatar_video_failed", timeout=30_000)
        assert frame.get_attribute("data-livekit-state") == "failed"
        assert page.evaluate("window.__avatarStack.provider") == "heygen"
        screenshot(page, "browser-livekit")


def test_reconnects_to_same_session_without_losing_events(stack, tmp_path):
    with launch(silence_wav(tmp_path / "silence.wav")) as page:
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        sid = start_conversation(page, stack.base_url)

        page.fill("#composer-input", "Hello there")
        page.press("#composer-input", "Enter")
        wait_audio_heard(page)
        replies_before = page.locator("#transcript li.avatar").count()
        first_url = sockets[-1]
        assert "last_event" not in first_url

        last_seen = page.evaluate(
            "() => { const id = __avatarStack.socket.lastEventId; __avatarStack.ws.close(4000); return id; }"
        )
        assert last_seen
        page.wait_for_function("document.body.dataset.state === 'reconnecting'", timeout=5_000)
        expect_banner(page, "connection_lost")
        page.wait_for_function("document.body.dataset.state === 'live'", timeout=20_000)
        assert page.evaluate("window.__avatarStack.sessionId") == sid
        assert page.evaluate("window.__avatarStack.socket.reconnects") == 1
        assert parse_qs(urlparse(sockets[-1]).query)["last_event"] == [last_seen]
        assert page.locator('[data-code="connection_lost"]').count() == 0
        screenshot(page, "browser-reconnect")

        # Nothing was replayed, and the session still answers.
        assert page.locator("#transcript li.avatar").count() == replies_before
        page.fill("#composer-input", "Are you still there?")
        page.press("#composer-input", "Enter")
        page.wait_for_function(
            f"document.querySelectorAll('#transcript li.avatar').length > {replies_before}", timeout=TURN_TIMEOUT_MS
        )
        end_conversation(page)


def expect_banner(page, code: str, timeout: float = 10_000):
    banner = page.locator(f'#banners [data-code="{code}"]')
    banner.wait_for(state="visible", timeout=timeout)
    return banner


def test_error_banners(tmp_path):
    with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        # The person refuses the microphone, and every avatar is busy.
        page.add_init_script(
            "navigator.mediaDevices.getUserMedia = () => "
            "Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"
        )
        page.route(
            "**/v1/sessions",
            lambda route: route.fulfill(
                status=503, content_type="application/json", body='{"detail": "no avatar capacity"}'
            ),
        )
        page.goto(base + "/")
        page.click("#start-btn")
        page.wait_for_function("document.body.dataset.state === 'error'", timeout=10_000)
        mic = expect_banner(page, "mic_denied")
        assert "denied" in mic.inner_text()
        busy = expect_banner(page, "no_capacity")
        assert "busy" in busy.inner_text().lower()
        assert busy.get_attribute("role") == "alert"
        assert page.locator("#start-btn").is_visible()  # the person can try again

        # Server-sent errors: vendor capacity (fatal) and missing keys, each its own banner.
        page.evaluate(
            """() => {
              __avatarStack.handleEvent({type: 'error', code: 'vendor_capacity',
                message: 'HeyGen concurrency limit reached', fatal: true, id: '5-0', ts: Date.now()});
              __avatarStack.handleEvent({type: 'error', code: 'missing_api_key',
                message: 'HEYGEN_API_KEY is not set on the server', fatal: false, id: '6-0', ts: Date.now()});
            }"""
        )
        vendor = expect_banner(page, "vendor_capacity")
        assert "concurrency limit" in vendor.inner_text()
        assert "busy" in vendor.inner_text().lower()
        expect_banner(page, "missing_api_key")
        screenshot(page, "browser-errors")

        # Banners can be dismissed from the keyboard.
        vendor.locator("button.banner-close").focus()
        page.keyboard.press("Enter")
        vendor.wait_for(state="detached", timeout=5_000)


def local_avatar_with_tone(page, base: str) -> None:
    """A page whose local avatar is ready, and `tone(seq)`: one second of 220 Hz as reply r1's chunk."""
    page.goto(base + "/")
    page.click("#face")  # a user gesture: the page may now play audio
    page.evaluate(
        """() => {
          const s = window.__avatarStack;
          s.handleEvent({type: 'session.ready', provider: 'local', audio_sample_rate: 16000});
          window.tone = (seq) => {
            const pcm = new Int16Array(16000);
            for (let i = 0; i < pcm.length; i++) pcm[i] = 8000 * Math.sin(2 * Math.PI * 220 * i / 16000);
            s.handleAudio({type: 'avatar.audio', reply_id: 'r1', seq, sample_rate: 16000, samples: 16000,
                           mouth: Array(50).fill(0.8), mouth_hop_ms: 20}, pcm.buffer);
          };
        }"""
    )


def test_a_reply_that_replaces_another_removes_it(tmp_path):
    """The user went on with a turn the avatar had begun to answer: one question, one answer."""
    with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        local_avatar_with_tone(page, base)
        page.evaluate(
            """() => {
              const s = window.__avatarStack;
              s.handleEvent({type: 'transcript.final', utterance_id: 'u1', text: 'How does that?'});
              s.handleEvent({type: 'avatar.reply', reply_id: 'r-u1', turn_id: 'u1', text: 'You said...'});
              s.handleEvent({type: 'transcript.final', utterance_id: 'u2', text: 'work with redis cluster'});
              s.handleEvent({type: 'avatar.reply', reply_id: 'r-u2', turn_id: 'u2', text: 'It does.',
                             replaces: 'r-u1'});
            }"""
        )
        assert page.locator('#transcript li.avatar[data-reply-id="r-u1"]').count() == 0
        assert page.locator('#transcript li.avatar[data-reply-id="r-u2"]').count() == 1
        assert page.locator("#transcript li[data-utterance-id]").count() == 2


def test_barge_in_silences_local_avatar_at_once(tmp_path):
    with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        local_avatar_with_tone(page, base)
        page.evaluate(
            """() => {
              const s = window.__avatarStack;
              s.handleEvent({type: 'avatar.reply', reply_id: 'r1', turn_id: 't1', text: 'A long answer.'});
              s.handleEvent({type: 'avatar.started_talking', reply_id: 'r1'});
              for (let seq = 0; seq < 3; seq++) tone(seq);  // 3 s queued back to back
            }"""
        )
        page.wait_for_function(
            "document.body.dataset.avatarSpeaking === 'true' && __avatarStack.lastPlaybackLevel > 0.05 "
            "&& __avatarStack.mouthOpen > 0.5",
            timeout=5_000,
        )
        assert page.evaluate("__avatarStack.audioChunksPlayed") == 0  # still on the first second
        screenshot(page, "browser-local-speaking")

        stop_ms = page.evaluate(
            """() => new Promise((resolve) => {
              const t0 = performance.now();
              __avatarStack.handleEvent({type: 'avatar.stopped_talking', reply_id: 'r1', interrupted: true});
              const check = () => (document.body.dataset.avatarSpeaking === 'false'
                                   && __avatarStack.lastPlaybackLevel < 0.001)
                ? resolve(performance.now() - t0) : requestAnimationFrame(check);
              check();
            })"""
        )
        print(f"\n[browser] barge-in -> local avatar silent after {stop_ms:.0f} ms")
        assert stop_ms < 250
        page.wait_for_function("__avatarStack.mouthOpen < 0.05", timeout=2_000)
        assert page.get_attribute('#transcript li.avatar[data-reply-id="r1"]', "data-interrupted") == "true"

        # A chunk of the interrupted reply that was already on its way is dropped, not played.
        dropped = page.evaluate(
            "() => { const before = __avatarStack.audioChunksDropped; tone(3); "
            "return __avatarStack.audioChunksDropped - before; }"
        )
        assert dropped == 1
        assert page.evaluate("document.body.dataset.avatarSpeaking") == "false"


def test_interim_text_is_provisional_and_finals_are_deduplicated(tmp_path):
    with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        page.goto(base + "/")
        page.wait_for_function("window.__avatarStack !== undefined")
        send = "(e) => window.__avatarStack.handleEvent(e)"
        page.evaluate(send, {"type": "transcript.interim", "utterance_id": "u1", "text": "what is"})
        item = page.locator('#transcript li[data-utterance-id="u1"]')
        assert item.get_attribute("data-final") == "false"
        assert item.get_attribute("aria-hidden") == "true"  # screen readers wait for the final
        assert item.evaluate("el => getComputedStyle(el.querySelector('.text')).fontStyle") == "italic"

        final = {
            "type": "transcript.final",
            "utterance_id": "u1",
            "text": "What is the weather?",
            "start_s": 0.5,
            "end_s": 1.7,
        }
        page.evaluate(send, final)
        page.evaluate(send, {"type": "transcript.interim", "utterance_id": "u1", "text": "late guess"})
        page.evaluate(send, final)  # repeated after a server failover
        assert page.locator("#transcript li.user").count() == 1
        assert item.get_attribute("data-final") == "true"
        assert item.locator(".text").inner_text() == "What is the weather?"
        assert item.get_attribute("aria-hidden") is None

        page.evaluate(send, {"type": "avatar.reply", "reply_id": "r1", "turn_id": "u1", "text": "Sunny."})
        page.evaluate(send, {"type": "avatar.reply", "reply_id": "r1", "turn_id": "u1", "text": "Sunny."})
        assert page.locator("#transcript li.avatar").count() == 1
        assert page.get_attribute("#transcript", "aria-live") == "polite"


def test_speaking_over_the_avatar_stops_it(stack, tmp_path):
    """End-to-end barge-in: the question, a pause, then more speech while the avatar answers."""
    if not speech_available():
        pytest.skip("needs espeak-ng and sox")
    wav = tmp_path / "barge-in.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(speech_pcm("What is the capital of France?", pad_s=1.0))
        w.writeframes(silence_pcm(2.0))  # the avatar starts answering in here
        w.writeframes(speech_pcm("Wait, stop please.", pad_s=0.5))
    with launch(wav) as page:
        start_conversation(page, stack.base_url)
        interrupted = page.locator('#transcript li.avatar[data-interrupted="true"]')
        interrupted.wait_for(timeout=TURN_TIMEOUT_MS)
        # The cut reply is silent at once; what plays next (if anything) is the answer to the barge-in.
        page.wait_for_function(
            "document.body.dataset.avatarSpeaking === 'false' "
            "|| document.querySelectorAll('#transcript li.avatar').length >= 2", timeout=2_000)
        assert page.evaluate("__avatarStack.audioChunksReceived") >= 1  # it was speaking when cut in
        barge = page.evaluate("__avatarStack.bargeIns")
        onset_to_quiet = barge[0]["after_voice_onset_ms"]
        print(f"\n[browser] user starts speaking over the avatar -> its audio stops: {onset_to_quiet} ms")
        screenshot(page, "browser-barge-in")
        end_conversation(page)


def test_turn_state_pause_resume_and_echo_safe_output(tmp_path):
    """listening → thinking → speaking on the page; a pause freezes the voice and a resume continues
    it; the local voice plays through the in-page WebRTC loopback (the path echo cancellation sees);
    a final judged to be echo disappears from the transcript."""
    with static_server() as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        local_avatar_with_tone(page, base)
        page.evaluate("() => { __avatarStack.handleEvent({type: 'transcript.final', utterance_id: 'u1', "
                      "text: 'What is it?', start_s: 0, end_s: 1}); }")
        page.wait_for_function("__avatarStack.turnState === 'thinking'", timeout=2_000)
        assert page.locator("#turn-state").inner_text() == "Thinking…"
        page.evaluate("() => { __avatarStack.handleEvent({type: 'avatar.started_talking', reply_id: 'r1'}); "
                      "for (let seq = 0; seq < 3; seq++) tone(seq); }")
        page.wait_for_function("__avatarStack.turnState === 'speaking' && __avatarStack.lastPlaybackLevel > 0.05",
                               timeout=5_000)
        page.wait_for_function("__avatarStack.audioOutput === 'loopback'", timeout=5_000)
        screenshot(page, "browser-turn-speaking")

        page.evaluate("__avatarStack.handleEvent({type: 'avatar.paused', reply_id: 'r1'})")
        page.wait_for_function("__avatarStack.lastPlaybackLevel < 0.001 && __avatarStack.turnState === 'listening'",
                               timeout=2_000)
        played_while_paused = page.evaluate("__avatarStack.audioChunksPlayed")
        page.wait_for_timeout(600)  # paused really holds: nothing more is played meanwhile
        assert page.evaluate("__avatarStack.audioChunksPlayed") == played_while_paused
        assert page.evaluate("__avatarStack.audioChunksDropped") == 0  # kept, not thrown away

        page.evaluate("__avatarStack.handleEvent({type: 'avatar.resumed', reply_id: 'r1'})")
        page.wait_for_function("__avatarStack.lastPlaybackLevel > 0.05 && __avatarStack.turnState === 'speaking'",
                               timeout=2_000)

        page.evaluate("() => { __avatarStack.handleEvent({type: 'transcript.final', utterance_id: 'u2', "
                      "text: 'a long answer', start_s: 2, end_s: 3}); "
                      "__avatarStack.handleEvent({type: 'transcript.ignored', utterance_id: 'u2', reason: 'echo'}); }")
        assert page.locator('#transcript li[data-utterance-id="u2"]').count() == 0
        assert page.locator('#transcript li[data-utterance-id="u1"]').count() == 1
