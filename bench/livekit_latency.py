"""End of the user's speech → first avatar audio heard in Chromium: the WebSocket voice vs LiveKit.

Runs the real stack twice (local STT, local avatar), once as is and once with its voice in a
LiveKit room on a real `livekit-server` (dev mode, loopback), and drives the real page in headless
Chromium whose fake microphone plays `--turns` spoken questions with `--gap` seconds of silence
after each. Per reply, on the page's clock: end of the user's speech (the page's voice detector)
→ first avatar audio heard (WebSocket: when its first chunk is scheduled to reach the speakers;
LiveKit: when the analyser on the received track first hears it). Plus what the page sees of the
audio: WebSocket chunks arriving after the previous one had finished playing (underruns, and the
gap they leave), and for LiveKit the receiver's RTP jitter and NetEQ concealment (underruns).

    .venv/bin/python -m bench.livekit_latency [--turns 10] [--gap 10] [--json out.json]

Needs a checkout (it uses the test helpers), Chromium, espeak-ng + sox and `make setup-livekit`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

from avatar_stack.up import free_port, redis_answers, redis_binary, start_redis
from bench.e2e_latency import trim_trailing_silence
from bench.measure import pct
from tests.browser_util import launch
from tests.conftest import start_stack
from tests.livekit_util import LiveKitServer, livekit_binary
from tests.speech import silence_pcm, speech_pcm

QUESTIONS = [
    "What is avatar stack?",
    "How do I scale it?",
    "Does it work offline?",
    "Can it run without any keys?",
    "Which speech engines does it use?",
    "Hello there, how are you?",
    "Tell me about the avatar providers.",
    "Who made this project?",
    "What is the capital of France?",
    "Thank you very much.",
]
LEAD_S = 0.06  # frontend/player.js: headroom before the first chunk of a burst

# Records every avatar.audio chunk's arrival on the page's socket (bounded), to replay the
# player's schedule offline: the page itself is not changed.
WS_TRACE = """(() => {
  const Native = window.WebSocket;
  const trace = (window.__wsTrace = []);
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (e) => {
        if (trace.length > 20000) return;
        const t = performance.now();
        if (typeof e.data !== 'string') { trace.push({t, bin: true}); return; }
        if (!e.data.includes('"avatar.audio"')) return;
        try {
          const m = JSON.parse(e.data);
          trace.push({t, reply: m.reply_id, samples: m.samples, rate: m.sample_rate});
        } catch { /* not ours */ }
      });
    }
  };
})();"""


def questions_wav(path: Path, turns: int, gap_s: float) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(silence_pcm(1.0))
        for i in range(turns):
            w.writeframes(trim_trailing_silence(speech_pcm(QUESTIONS[i % len(QUESTIONS)], pad_s=0.3)))
            w.writeframes(silence_pcm(gap_s))
    return path


def ws_underruns(trace: list[dict[str, Any]]) -> dict[str, float]:
    """The player's schedule replayed from arrival times: a chunk that arrives after the previous
    one of its reply finished playing is an underrun (an audible gap)."""
    chunks: list[tuple[str, float, float]] = []  # reply, arrival (ms), duration (ms)
    pending: dict[str, Any] | None = None
    for item in trace:
        if item.get("bin") and pending is not None:
            chunks.append((pending["reply"], item["t"], 1000 * pending["samples"] / pending["rate"]))
            pending = None
        elif not item.get("bin"):
            pending = item
    underruns, gap_ms, ends = 0, 0.0, {}
    for reply, arrival, duration in chunks:
        if reply not in ends:
            ends[reply] = arrival + LEAD_S * 1000 + duration
            continue
        if arrival > ends[reply] - 5:
            underruns += 1
            gap_ms += max(0.0, arrival - ends[reply])
            ends[reply] = arrival + LEAD_S * 1000 + duration
        else:
            ends[reply] += duration
    return {"chunks": len(chunks), "underruns": underruns, "gap_ms": round(gap_ms, 1)}


def run_path(name: str, redis_url: str, wav: Path, turns: int, gap_s: float, env: dict[str, str]) -> dict[str, Any]:
    stack = start_stack(redis_url, LOG_LEVEL="WARNING", **env)
    try:
        with launch(wav) as page:
            page.add_init_script(WS_TRACE)
            page.goto(stack.base_url + "/")
            page.click("#start-btn")
            page.wait_for_function("document.body.dataset.state === 'live'", timeout=120_000)
            if env:
                page.wait_for_function("__avatarStack.livekitVoice.state === 'connected'", timeout=30_000)
            deadline = time.monotonic() + turns * (gap_s + 3) + 60
            timings: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                timings = [t for t in page.evaluate("__avatarStack.timings") if t["source"] == "voice"]
                if len(timings) >= turns:
                    break
                page.wait_for_timeout(500)
            page.wait_for_function("document.body.dataset.avatarSpeaking === 'false'", timeout=60_000)
            out: dict[str, Any] = {"path": name, "heard_ms": [t["latency_ms"] for t in timings]}
            if env:
                out["receiver"] = page.evaluate("__avatarStack.voiceStats()")
            else:
                out["ws"] = ws_underruns(page.evaluate("window.__wsTrace"))
            print(f"[bench] {name}: {len(timings)} replies timed, {out['heard_ms']}", file=sys.stderr)
            return out
    finally:
        stack.stop_all()


def summary(result: dict[str, Any]) -> dict[str, Any]:
    heard = result["heard_ms"]
    row: dict[str, Any] = {
        "path": result["path"], "n": len(heard),
        "median_ms": round(statistics.median(heard)) if heard else None,
        "p95_ms": round(pct(heard, 0.95)) if heard else None,
    }
    if "ws" in result:
        row.update(jitter_ms=None, underruns=result["ws"]["underruns"], gap_ms=result["ws"]["gap_ms"],
                   chunks=result["ws"]["chunks"])
    elif result.get("receiver"):
        rx = result["receiver"]
        audible = max(0, rx["concealed_samples"] - rx["silent_concealed_samples"])
        row.update(jitter_ms=round(rx["jitter_ms"], 1), jitter_buffer_ms=round(rx["jitter_buffer_ms"], 1),
                   underruns=rx["concealment_events"], concealed_audible_ms=round(audible / 48),
                   packets_lost=rx["packets_lost"], packets=rx["packets_received"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--gap", type=float, default=10.0, help="seconds of silence after each question")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    binary = livekit_binary()
    if binary is None:
        raise SystemExit("needs livekit-server: make setup-livekit")
    workdir = Path(tempfile.mkdtemp(prefix="bench-livekit-"))
    wav = questions_wav(workdir / "questions.wav", args.turns, args.gap)
    redis_port = free_port()
    redis_proc = start_redis(redis_binary() or "redis-server", redis_port)
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    assert redis_answers(redis_url)
    server = LiveKitServer(binary)
    server.start()
    try:
        results = [
            run_path("websocket", redis_url, wav, args.turns, args.gap, {}),
            run_path("livekit", redis_url, wav, args.turns, args.gap, server.env()),
        ]
    finally:
        server.stop()
        redis_proc.terminate()
        with contextlib.suppress(Exception):
            redis_proc.wait(5)
    rows = [summary(r) for r in results]
    print("\nend of speech -> first avatar audio heard in Chromium (ms, page clock)")
    print(f"{'path':10s} {'n':>3s} {'median':>7s} {'p95':>6s}  audio the page saw")
    for row in rows:
        if row["path"] == "websocket":
            seen = f"{row['underruns']} late chunks of {row['chunks']} (gaps {row['gap_ms']} ms in all)"
        else:
            seen = (f"RTP jitter {row.get('jitter_ms')} ms, jitter buffer {row.get('jitter_buffer_ms')} ms, "
                    f"{row.get('underruns')} concealment events ({row.get('concealed_audible_ms')} ms audible), "
                    f"{row.get('packets_lost')} of {row.get('packets')} packets lost")
        print(f"{row['path']:10s} {row['n']:3d} {row['median_ms']!s:>7s} {row['p95_ms']!s:>6s}  {seen}")
    blob = {"rows": rows, "raw": results}
    print(json.dumps(blob))
    if args.json:
        args.json.write_text(json.dumps(blob, indent=2))


if __name__ == "__main__":
    main()
