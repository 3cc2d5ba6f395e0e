"""Helpers for the browser tests: a headless Chromium with a fake microphone, a static server.

Chromium is Debian's (`/usr/bin/chromium`), never a Playwright download. The fake microphone
plays a WAV once (`%noloop`) and then digital silence, as if a person said it into the mic.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import threading
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONTEND = ROOT / "frontend"
ARTIFACTS = ROOT / "artifacts"

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The Chromium binary, or skip the test (with the fix) where this machine has none."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.skip("needs the playwright Python package (pip install -e '.[test]')")
    path = chromium_path()
    if not path:
        pytest.skip("needs Debian's chromium (apt-get install chromium); never `playwright install`")
    return path


def require_vendor() -> None:
    if not (FRONTEND / "node_modules" / "livekit-client" / "dist" / "livekit-client.umd.js").is_file():
        pytest.fail("livekit-client is not installed: run frontend/setup.sh")


def chromium_args(mic_wav: Path | None) -> list[str]:
    args = list(CHROMIUM_FLAGS)
    if mic_wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={mic_wav}%noloop")
    return args


def silence_wav(path: Path, seconds: float = 1.0) -> Path:
    """A silent 16 kHz mono WAV: without a file Chromium's fake mic beeps, which is not silence."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x00\x00" * int(16000 * seconds))
    return path


@contextlib.contextmanager
def launch(mic_wav: Path | None, *, viewport: dict | None = None) -> Iterator:
    """A fresh Chromium page (its own profile), its console and page errors collected in `page.logs`."""
    from playwright.sync_api import sync_playwright

    binary = require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=chromium_args(mic_wav))
        try:
            context = browser.new_context(viewport=viewport or {"width": 1200, "height": 820})
            page = context.new_page()
            page.logs = []
            page.on("console", lambda m: page.logs.append(f"console.{m.type}: {m.text}"))
            page.on("pageerror", lambda e: page.logs.append(f"pageerror: {e}"))
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def static_server(directory: Path = FRONTEND) -> Iterator[str]:
    """Serve `frontend/` alone (no gateway behind it) on a free loopback port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
