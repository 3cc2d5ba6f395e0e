"""The local STT engine alone: accuracy, model speed, and end-of-speech -> final latency.

- WER: each sentence (espeak-ng) + 1.5 s of silence through the engine as fast as it takes it;
  the finals against the sentence. The same audio through Whisper's full 30 s window is the
  reference for what the shortened encoder window costs in accuracy, if anything.
- RTF: seconds of model time per second of audio for the final's transcription (the utterance as
  the engine cuts it), with the shortened window and with the full one.
- Latency: the sentences fed at real-time pace in 20 ms frames, one session; from sending the frame
  that holds the last audible sample to the final's arrival.

    .venv/bin/python -m bench.stt_local [--n 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time

import numpy as np

from bench.measure import pct
from common.pcm import FRAME_BYTES, SAMPLE_RATE, pcm16_to_float
from common.settings import Settings
from stt_service.engine import SttResult
from stt_service.providers.local import FULL_ENCODER_FRAMES, PREROLL_S, VAD_WINDOW, LocalSttEngine
from tests.speech import silence_pcm, speech_pcm

SENTENCES = [
    "What is the capital of France",
    "Tell me a joke about penguins",
    "How far away is the moon from the earth",
    "Can you recommend a good book to read this weekend",
    "I would like to order a large pizza with mushrooms",
    "What time does the train leave for Boston tomorrow morning",
    "Please remind me to call my mother at six",
    "Why is the sky blue during the day",
    "How do I reset my password",
    "Turn off the lights in the living room",
    "What is the weather going to be like on Saturday",
    "Explain how photosynthesis works in simple terms for a curious child",
]
TRAILING_SILENCE_S = 1.5
PREROLL_SAMPLES = round(PREROLL_S * SAMPLE_RATE / VAD_WINDOW) * VAD_WINDOW  # as the engine rounds it
_DIGITS = "zero one two three four five six seven eight nine ten".split()


def words(text: str) -> list[str]:
    out = re.findall(r"[a-z0-9']+", text.lower())
    return [_DIGITS[int(w)] if w.isdigit() and int(w) <= 10 else w for w in out]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[:], i
        for j, h in enumerate(hyp, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (r != h))
    return row[-1]


def wer(pairs: list[tuple[str, str]]) -> float:
    errors = sum(edit_distance(words(ref), words(hyp)) for ref, hyp in pairs)
    return errors / sum(len(words(ref)) for ref, _ in pairs)




def speech_end_s(pcm: bytes) -> float:
    """Time of the last audible 10 ms (RMS above -50 dBFS): where the user stops speaking."""
    audio = pcm16_to_float(pcm)
    hop = SAMPLE_RATE // 100
    rms = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    loud = np.nonzero(rms > 10 ** (-50 / 20))[0]
    return (loud[-1] + 1) * hop / SAMPLE_RATE


async def watch_loop(lags: list[float], period: float = 0.005) -> None:
    """Record how much later than asked the loop wakes a sleeper: the longest stall of the loop."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - asked - period)


async def feed(
    engine: LocalSttEngine, pcm: bytes, *, realtime: bool
) -> tuple[list[tuple[float, SttResult]], list[float]]:
    """Send `pcm` in 20 ms frames; return (arrival time, result) pairs and each frame's send time."""
    stream = await engine.open("bench", language="en", start_offset_s=0.0)
    arrivals: list[tuple[float, SttResult]] = []

    async def collect() -> None:
        async for result in stream.results():
            arrivals.append((time.perf_counter(), result))

    reader = asyncio.create_task(collect())
    sent: list[float] = []
    start = time.perf_counter()
    for i, offset in enumerate(range(0, len(pcm), FRAME_BYTES)):
        if realtime:
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.perf_counter()))
        await stream.send(pcm[offset : offset + FRAME_BYTES])
        sent.append(time.perf_counter())
    await stream.close()
    await reader
    return arrivals, sent


async def measure(n: int, sessions: int) -> dict[str, object]:
    engine = LocalSttEngine(Settings(_env_file=None))
    await engine.load()
    whisper = engine.whisper
    sentences = SENTENCES[:n]
    clips = {text: speech_pcm(text) for text in sentences}

    # Accuracy, and the utterance audio the engine transcribes for its finals.
    engine_pairs, full_pairs, rtf_short, rtf_full = [], [], [], []
    for text in sentences:
        arrivals, _ = await feed(engine, clips[text] + silence_pcm(TRAILING_SILENCE_S), realtime=False)
        engine_pairs.append((text, " ".join(r.text for _, r in arrivals if r.kind == "final")))
        final = next((r for _, r in arrivals if r.kind == "final"), None)
        if final is None:
            continue
        # What the engine hands Whisper: pre-roll before the onset, up to the silence onset.
        first = max(0, round(final.start_s * SAMPLE_RATE) - PREROLL_SAMPLES)
        utterance = pcm16_to_float(clips[text])[first : round(final.end_s * SAMPLE_RATE)]
        seconds = len(utterance) / SAMPLE_RATE
        t0 = time.perf_counter()
        await asyncio.wrap_future(whisper.submit(utterance, "en"))
        rtf_short.append((time.perf_counter() - t0) / seconds)
        t0 = time.perf_counter()
        full = whisper.executor.submit(whisper._decode, utterance, "en", FULL_ENCODER_FRAMES)
        full_text = await asyncio.wrap_future(full)
        rtf_full.append((time.perf_counter() - t0) / seconds)
        full_pairs.append((text, full_text))

    # Latency at real-time pace, `sessions` at once (they share the one model thread), while
    # watching how late the event loop wakes up: model work must never run on it.
    lags: list[float] = []
    watching = asyncio.create_task(watch_loop(lags))
    latencies, interims = [], []
    for text in sentences:
        pcm = silence_pcm(0.5) + clips[text] + silence_pcm(TRAILING_SILENCE_S)
        end_frame = int(speech_end_s(pcm) * SAMPLE_RATE * 2) // FRAME_BYTES
        runs = await asyncio.gather(*(feed(engine, pcm, realtime=True) for _ in range(sessions)))
        for arrivals, sent in runs:
            finals = [at for at, r in arrivals if r.kind == "final"]
            interims.append(sum(r.kind == "interim" for _, r in arrivals))
            if finals:
                latencies.append(finals[0] - sent[end_frame])
    watching.cancel()
    await engine.aclose()

    report: dict[str, object] = {
        "sentences": len(sentences),
        "wer_engine": round(wer(engine_pairs), 3),
        "wer_full_window": round(wer(full_pairs), 3),
        "rtf_final_short_window": round(statistics.mean(rtf_short), 3),
        "rtf_final_full_window": round(statistics.mean(rtf_full), 3),
        "latency_median_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(pct(latencies, 0.95), 3),
        "latency_max_s": round(max(latencies), 3),
        "latencies_s": [round(x, 3) for x in latencies],
        "interims_per_utterance": round(statistics.mean(interims), 2),
        "sessions": sessions,
        "loop_lag_max_ms": round(max(lags) * 1000, 1),
        "loop_lag_p99_ms": round(pct(lags, 0.99) * 1000, 1),
        "end_silence_s": engine.end_silence_s,
        "misheard": [(ref, hyp) for ref, hyp in engine_pairs if words(ref) != words(hyp)],
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help=f"number of sentences (max {len(SENTENCES)})")
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions in the latency run")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    report = asyncio.run(measure(args.n, args.sessions))
    for key, value in report.items():
        print(f"{key:>24}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
