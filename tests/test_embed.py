"""Putting the avatar in someone else's product.

(a) a keyed gateway (GATEWAY_API_KEY): demo sessions are off unless GATEWAY_DEMO_SESSIONS, rate-limited
    and origin-checked when on; the bundled page starts a conversation through them, and says what to
    do without them
(b) <avatar-stack-avatar> in a page of another origin (examples/backend, which creates the sessions
    with the key) holds a spoken and a typed conversation with the local providers
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from avatar_stack.up import free_port
from tests.browser_util import launch, screenshot, silence_wav, static_server
from tests.conftest import Stack, scrape, start_stack
from tests.speech import speech_available, speech_wav
from tests.test_gateway import start_gateway

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "embed-test-key"
QUESTION = "What is avatar stack?"
LIVE_TIMEOUT_MS = 60_000
TURN_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def keyed_demo_gateway(redis_url: str) -> Iterator[Stack]:
    # Its own buckets (not Redis's): the test drains 127.0.0.1's, which later tests' gateways share.
    stack = start_gateway(
        redis_url, GATEWAY_API_KEY=API_KEY, GATEWAY_DEMO_SESSIONS="true", SESSION_CREATE_BURST="4",
        SESSION_CREATE_RATE_SCOPE="process",
    )
    yield stack
    stack.stop_all()


def test_demo_sessions_are_off_unless_enabled(redis_url: str):
    stack = start_gateway(redis_url, GATEWAY_API_KEY=API_KEY)
    try:
        assert httpx.post(f"{stack.base_url}/demo/sessions", json={}).status_code in (404, 405)  # no such route
        assert httpx.post(f"{stack.base_url}/v1/sessions", json={}).status_code == 401
    finally:
        stack.stop_all()


def test_demo_sessions_need_no_key_but_are_limited_and_origin_checked(keyed_demo_gateway: Stack):
    base = keyed_demo_gateway.base_url
    assert httpx.post(f"{base}/v1/sessions", json={}).status_code == 401  # the API itself stays keyed
    foreign = httpx.post(f"{base}/demo/sessions", json={}, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    created = httpx.post(f"{base}/demo/sessions", json={"language": "en"}, headers={"Origin": base})
    assert created.status_code == 201, created.text
    body = created.json()
    assert set(body) == {"session_id", "token", "ws_url"}
    # The session's own token ends it: the page needs no key for that either.
    sid = body["session_id"]
    ended = httpx.delete(f"{base}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {body['token']}"})
    assert ended.status_code == 204
    codes = [httpx.post(f"{base}/demo/sessions", json={}).status_code for _ in range(6)]
    assert codes.count(429) >= 1, codes  # burst of 4 per address, the keyed API's own limit
    assert httpx.post(f"{base}/demo/sessions", json={"surprise": 1}).status_code in (422, 429)


@pytest.mark.browser
def test_bundled_page_starts_on_a_keyed_gateway(redis_url: str, tmp_path):
    demo = start_gateway(redis_url, GATEWAY_API_KEY=API_KEY, GATEWAY_DEMO_SESSIONS="true")
    keyed = start_gateway(redis_url, GATEWAY_API_KEY=API_KEY)
    try:
        with launch(silence_wav(tmp_path / "silence.wav")) as page:
            page.goto(demo.base_url + "/")
            page.click("#start-btn")
            # A session was created (through /demo/sessions) and its socket opened: no workers run
            # here, so it waits for the avatar, which is as far as a gateway alone goes.
            page.wait_for_function("document.body.dataset.sessionId && window.__avatarStack.socket?.isOpen")
            assert page.evaluate("document.body.dataset.state") == "connecting"
            assert not page.locator("#banners [data-code]").count()

            page.goto(keyed.base_url + "/")
            page.click("#start-btn")
            page.wait_for_function("document.body.dataset.state === 'error'")
            banner = page.locator('#banners [data-code="unauthorized"]')
            assert "GATEWAY_DEMO_SESSIONS" in banner.inner_text() and "backend" in banner.inner_text()
            assert not [line for line in page.logs if line.startswith("pageerror")], page.logs
    finally:
        demo.stop_all()
        keyed.stop_all()


# ------------------------------------------------------------------------------ the widget


@pytest.fixture(scope="module")
def backend_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def keyed_stack(redis_url: str, backend_port: int) -> Iterator[Stack]:
    """The whole stack behind an API key, allowing the example backend's page (another origin)."""
    stack = start_stack(redis_url, GATEWAY_API_KEY=API_KEY, ALLOWED_ORIGINS=f"http://localhost:{backend_port}")
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def example_backend(keyed_stack: Stack, backend_port: int) -> Iterator[str]:
    """examples/backend/app.py as its own process: the customer's server, on its own origin."""
    env = {**os.environ, "GATEWAY_URL": keyed_stack.base_url, "GATEWAY_API_KEY": API_KEY}
    cmd = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(ROOT / "examples" / "backend")]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(backend_port), "--log-level", "warning"], env=env, cwd=ROOT
    )
    url = f"http://localhost:{backend_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{backend_port}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the example backend did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


COLLECT_EVENTS = """
window.widgetEvents = [];
document.addEventListener("DOMContentLoaded", () => {
  const el = document.querySelector("avatar-stack-avatar");
  for (const name of ["state", "ready", "transcript", "reply", "speaking", "error", "ended", "event"]) {
    el.addEventListener(`avatar-stack:${name}`, (e) => window.widgetEvents.push({name, detail: e.detail}));
  }
});
"""


def widget_events(page, name: str) -> list[dict]:
    return page.evaluate(f"window.widgetEvents.filter(e => e.name === {name!r}).map(e => e.detail)")


@pytest.mark.browser
def test_widget_on_another_origin_holds_a_conversation(keyed_stack: Stack, example_backend: str):
    if not speech_available():
        pytest.skip("needs espeak-ng and sox for the spoken question")
    with launch(speech_wav(QUESTION, pad_s=1.0)) as page:
        seen: list[str] = []
        page.on("response", lambda r: seen.append(r.url))
        bodies: list[str] = []
        page.on("response", lambda r: bodies.append(r.text()) if "/api/avatar-session" in r.url else None)
        page.add_init_script(COLLECT_EVENTS)
        page.goto(example_backend + "/")
        assert example_backend.split("//")[1] != keyed_stack.base_url.split("//")[1]  # another origin
        page.wait_for_function("customElements.get('avatar-stack-avatar') !== undefined")
        widget = page.locator("avatar-stack-avatar")
        widget.locator("button.start").click()  # Playwright's CSS pierces the open shadow root
        page.wait_for_function(
            "document.querySelector('avatar-stack-avatar').state === 'live'", timeout=LIVE_TIMEOUT_MS
        )
        ready = widget_events(page, "ready")
        assert ready and ready[0]["provider"] == "local" and ready[0]["session_id"]

        # Spoken: the fake microphone asks the question.
        page.wait_for_function(
            "window.widgetEvents.some(e => e.name === 'transcript' && e.detail.final && e.detail.text)",
            timeout=TURN_TIMEOUT_MS,
        )
        page.wait_for_function("window.widgetEvents.some(e => e.name === 'reply')", timeout=TURN_TIMEOUT_MS)
        page.wait_for_function(
            "(() => { const s = document.querySelector('avatar-stack-avatar').stats;"
            " return s.audioChunksPlayed >= 1 && s.maxPlaybackLevel > 0.005; })()",
            timeout=TURN_TIMEOUT_MS,
        )
        page.wait_for_function(
            "window.widgetEvents.some(e => e.name === 'speaking' && e.detail.speaking)", timeout=TURN_TIMEOUT_MS
        )
        final = next(t for t in widget_events(page, "transcript") if t["final"] and t["text"])
        assert "what" in final["text"].lower(), final
        first_reply = widget_events(page, "reply")[0]
        assert first_reply["text"].strip(), first_reply

        # Typed, through the element's API, once the avatar has finished its first answer.
        page.wait_for_function(
            "window.widgetEvents.filter(e => e.name === 'event' && e.detail.type === 'avatar.stopped_talking').length"
            " >= 1",
            timeout=TURN_TIMEOUT_MS,
        )
        assert page.evaluate("document.querySelector('avatar-stack-avatar').send('How does it scale?')")
        page.wait_for_function(
            "new Set(window.widgetEvents.filter(e => e.name === 'reply').map(e => e.detail.reply_id)).size >= 2",
            timeout=TURN_TIMEOUT_MS,
        )
        assert widget.locator(".caption").inner_text().strip()  # `captions` shows the conversation
        screenshot(page, "browser-widget-embedded")

        # Every server event also came as `avatar-stack:event`, with the protocol's fields.
        raw = widget_events(page, "event")
        assert {"session.ready", "transcript.final", "avatar.reply", "avatar.started_talking"} <= {
            e["type"] for e in raw
        }

        # The gateway timed the spoken turn: its VAD end of speech -> the reply's first audio sent.
        metrics = scrape(f"{keyed_stack.base_url}/metrics")
        count = metrics.get("avatar_stack_gateway_turn_speech_end_to_first_audio_seconds_count", 0)
        assert count >= 1, metrics
        mean = metrics["avatar_stack_gateway_turn_speech_end_to_first_audio_seconds_sum"] / count
        print(f"\n[widget] gateway: end of speech -> first audio, mean of {count:.0f}: {mean * 1000:.0f} ms")
        assert 0.1 < mean < 30, mean

        widget.locator("button.stop").click()
        page.wait_for_function("document.querySelector('avatar-stack-avatar').state === 'ended'")
        states = [s["state"] for s in widget_events(page, "state")]
        assert states[0] == "connecting" and "live" in states and states[-1] == "ended", states
        assert not widget_events(page, "error"), widget_events(page, "error")
        # The page got the widget from the gateway and its session from its own backend, never the key.
        assert any(u.startswith(keyed_stack.base_url + "/widget.js") for u in seen), seen
        assert bodies and all(API_KEY not in b for b in bodies)
        assert API_KEY not in page.content()
        assert not [line for line in page.logs if line.startswith("pageerror")], page.logs


@pytest.mark.browser
def test_widget_refused_on_an_origin_not_allowed(keyed_stack: Stack, backend_port: int, tmp_path):
    """A page whose origin is not in ALLOWED_ORIGINS cannot even load the widget's modules."""
    other = tmp_path / "site"
    other.mkdir()
    script = f'<script type="module" src="{keyed_stack.base_url}/widget.js" onerror="window.refused = true"></script>'
    (other / "index.html").write_text(f"{script}<avatar-stack-avatar></avatar-stack-avatar>")
    with static_server(other) as base, launch(silence_wav(tmp_path / "silence.wav")) as page:
        page.goto(base.replace("127.0.0.1", "localhost") + "/")  # localhost:<another port>: not allowed
        page.wait_for_function("window.refused === true")  # no CORS header for that origin
        assert page.evaluate("customElements.get('avatar-stack-avatar') === undefined")
