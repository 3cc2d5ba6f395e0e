"""End of the user's speech → first avatar audio chunk leaving the gateway, with local providers.

Starts its own Redis, gateway, STT worker and avatar worker (real processes), streams spoken
questions at real-time pace through the real WebSocket, and times, per utterance, from the moment
the last speech frame was sent to the arrival of the first `avatar.audio` frame. Also reports the
hops in between and each process's resident memory.

    .venv/bin/python -m bench.e2e_latency [--n 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

from avatar_stack.client import Browser, create_session
from bench.local_stack import local_stack
from bench.measure import pct, rss_mb
from tests.room import trim_trailing_silence
from tests.speech import speech_pcm

QUESTIONS = [
    "What is avatar stack?",
    "How do I scale it?",
    "Which speech engines does it use?",
    "Hello there, how are you?",
    "Can it run without any keys?",
    "What is the capital of France?",
    "Tell me about the avatar providers.",
    "Who made this project?",
    "Does it work offline?",
    "Thank you very much.",
]




async def measure(base_url: str, n: int) -> dict[str, list[float]]:
    hops: dict[str, list[float]] = {"speech_end_to_final": [], "final_to_reply": [], "speech_end_to_first_audio": []}
    browser = Browser(await create_session(base_url))
    await browser.connect()
    await browser.wait_type("session.ready", 120)
    for i in range(n):
        text = QUESTIONS[i % len(QUESTIONS)]
        seen = len(browser.events)
        speech_end = await browser.stream(trim_trailing_silence(speech_pcm(text, pad_s=0.3)), trailing_silence_s=0.0)
        # Keep the microphone open (silence) while waiting, as a page would.
        silence = asyncio.create_task(browser.stream(b"", trailing_silence_s=30.0))
        try:
            final = await browser.wait_for(_new(browser, seen, "transcript.final"))
            audio = await browser.wait_for(_new(browser, seen, "avatar.audio"))
            reply = next(e for e in browser.events[seen:] if e["type"] == "avatar.reply")
            await browser.wait_for(_new(browser, seen, "avatar.stopped_talking"), 60)
        finally:
            silence.cancel()
            await asyncio.gather(silence, return_exceptions=True)
        hops["speech_end_to_final"].append(final["_rx"] - speech_end)
        hops["final_to_reply"].append(reply["_rx"] - final["_rx"])
        hops["speech_end_to_first_audio"].append(audio["_rx"] - speech_end)
        print(f"  {i + 1:2d}/{n} {text!r}: heard {final['text']!r}, first audio after "
              f"{audio['_rx'] - speech_end:.3f} s", file=sys.stderr)
    await browser.close()
    return hops


def _new(browser: Browser, seen: int, kind: str):
    """Matches an event of `kind` that arrived after the first `seen` events."""
    fresh = {id(e) for e in browser.events[:seen]}
    return lambda e: e["type"] == kind and id(e) not in fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10)
    args = parser.parse_args()
    with local_stack(SESSION_CREATE_RATE_PER_MIN="0") as stack:  # --n sessions from 127.0.0.1
        hops = asyncio.run(measure(stack.base_url, args.n))
        memory = {name: round(rss_mb(p.pid), 1) for name, p in stack.procs.items()}
        memory["redis"] = round(rss_mb(stack.redis.pid), 1)
    print(f"\n{'hop':28s} {'median':>8s} {'p95':>8s}  (seconds, n={args.n})")
    for name, values in hops.items():
        print(f"{name:28s} {statistics.median(values):8.3f} {pct(values, 0.95):8.3f}")
    print("\nresident memory (MB): " + ", ".join(f"{k} {v}" for k, v in memory.items()))
    print(json.dumps({"hops": {k: {"median": statistics.median(v), "p95": pct(v, 0.95)} for k, v in hops.items()},
                      "rss_mb": memory}))


if __name__ == "__main__":
    main()
