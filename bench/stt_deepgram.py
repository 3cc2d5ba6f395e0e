"""What the STT worker adds on top of Deepgram: from the fake Deepgram sending the result that
closes an utterance (`speech_final`, `from_finalize` or `UtteranceEnd`) to that utterance's
`transcript.final` arriving at the browser through the gateway.

Starts its own Redis, gateway and one STT worker (Deepgram provider, pointed at the protocol fake
of `tests/fakes/deepgram.py` on loopback) as real processes, and no avatar worker, so the CPU
goes to the STT path (admission control is off so the gateway takes sessions without one). For
each session count, that many test browsers stream fake speech at real-time pace through the real
WebSocket: several utterances with pauses, starts staggered over one utterance cycle. The fake (in
this process) stamps the closing message of every utterance with `time.monotonic()` as it sends
it; the browsers stamp each `transcript.final` as it arrives (`Browser._rx`, also monotonic).
Utterance texts carry the round, session and utterance number, so the two sides match by text.

The "worker" columns split that total: the event's `ts` (unix ms, stamped by the STT worker when it
builds `transcript.final`) against the fake's wall-clock send time, i.e. Deepgram socket -> event
built; the rest of the total is Redis -> gateway -> browser WebSocket. `ts` is whole milliseconds,
so that split is good to about a millisecond.

Every process here shares the machine's cores, the load generator too: the "others" column shows
how busy the rest of the machine was, which on a shared box moves the numbers more than anything.

    .venv/bin/python -m bench.stt_deepgram [--sessions 1,50] [--utterances 10] [--repeat 1] [--details f.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import uvloop
from websockets.asyncio.server import ServerConnection

from avatar_stack.client import Browser, create_session
from avatar_stack.up import free_port, redis_binary, start_redis
from bench.measure import busy_s, cpu_s, pct, rss_mb
from common import keys
from common.bus import connect_url
from tests.fakes.deepgram import FakeConnection, FakeDeepgram, Speech

KEY = "bench-deepgram-key"
WORDS = "what is the weather like".split()
PAUSE_S = 1.5  # silence after each utterance: endpointing (300 ms) and UtteranceEnd (1 s) both fire
WAIT_S = 120.0


# --- the fake, stamped ----------------------------------------------------------------------


@dataclass(frozen=True)
class Closed:
    """When the fake sent the message that closes one utterance."""

    mono: float  # time.monotonic(), comparable with Browser events' `_rx`
    wall: float  # time.time(), comparable with the events' `ts`
    connection: int


class TimedFakeDeepgram(FakeDeepgram):
    """The fake, plus: the send time of the result that closes each utterance, keyed by its text.

    An utterance is closed as the engine closes it: `is_final` pieces pile up until a
    `speech_final` or `from_finalize` result, or an `UtteranceEnd`, arrives with pieces pending.
    """

    def __init__(self, api_key: str) -> None:
        super().__init__(api_key)
        self.closed: dict[str, Closed] = {}
        self._pieces: dict[int, list[str]] = {}

    async def _send(self, ws: ServerConnection, conn: FakeConnection, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            self._note(conn.index, message, Closed(time.monotonic(), time.time(), conn.index))
            await super()._send(ws, conn, [message])

    def _note(self, index: int, message: dict[str, Any], stamp: Closed) -> None:
        pieces = self._pieces.setdefault(index, [])
        if message.get("type") == "Results" and message.get("is_final"):
            text = message["channel"]["alternatives"][0]["transcript"]
            if text:
                pieces.append(text)
            closes = message.get("speech_final") or message.get("from_finalize")
        else:
            closes = message.get("type") == "UtteranceEnd"
        if closes and pieces:
            self.closed[" ".join(pieces)] = stamp
            pieces.clear()


# --- one round: N sessions talking at once ---------------------------------------------------


@dataclass
class Round:
    sessions: int
    latencies: list[float] = field(default_factory=list)  # seconds, fake send -> browser receive
    in_worker: list[float] = field(default_factory=list)  # fake send -> event `ts` (ms resolution)
    samples: list[dict[str, Any]] = field(default_factory=list)  # one per utterance, for --details
    missing: int = 0  # utterances without a matching final at the browser
    wrong: int = 0  # finals whose text was not one utterance exactly
    rss_start_mb: dict[str, float] = field(default_factory=dict)  # before the round's sessions talk
    rss_peak_mb: dict[str, float] = field(default_factory=dict)  # the most while they talk
    cpu_pct: dict[str, float] = field(default_factory=dict)
    loop_lag_p99_ms: float = 0.0  # how late this process's own event loop woke up (measuring error)


def script(round_no: int, session: int, utterances: int, lead_s: float) -> tuple[Speech, list[str]]:
    """A session's audio: `utterances` questions, each tagged with who says it, each then a pause."""
    speech = Speech().pause(lead_s)
    texts = []
    for u in range(utterances):
        text = " ".join([f"r{round_no}s{session}u{u}", *WORDS])
        speech.say(text).pause(PAUSE_S)
        texts.append(text)
    return speech, texts


async def talk(browser: Browser, speech: Speech, expected: int) -> None:
    await browser.stream(speech.pcm, trailing_silence_s=0.0)
    await browser.wait_for(lambda _e: len(browser.of_type("transcript.final")) >= expected, WAIT_S)


async def run_round(
    base_url: str, fake: TimedFakeDeepgram, pids: dict[str, int], round_no: int, n: int, utterances: int,
) -> Round:
    rng = random.Random(round_no)
    cycle_s = len(WORDS) * 0.4 + 0.3 + PAUSE_S  # one utterance and its pause
    scripts = [script(round_no, i, utterances, rng.uniform(0.0, cycle_s)) for i in range(n)]
    browsers = [Browser(await create_session(base_url)) for _ in range(n)]
    await asyncio.gather(*(b.connect() for b in browsers))
    result = Round(n, rss_start_mb={name: rss_mb(pid) for name, pid in pids.items()})
    sampler = asyncio.create_task(sample(pids, result))
    cpu_before = {name: cpu_s(pid) for name, pid in pids.items()} | {"bench": time.process_time(), "all": busy_s()}
    started = time.monotonic()
    try:
        await asyncio.gather(
            *(talk(b, speech, len(texts)) for b, (speech, texts) in zip(browsers, scripts, strict=True))
        )
    finally:
        elapsed = time.monotonic() - started
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        cpu_after = {name: cpu_s(pid) for name, pid in pids.items()} | {"bench": time.process_time(), "all": busy_s()}
        result.cpu_pct = {k: round(100 * (cpu_after[k] - cpu_before[k]) / elapsed, 1) for k in cpu_after}
        ours = sum(v for k, v in result.cpu_pct.items() if k != "all")
        result.cpu_pct["others"] = round(max(0.0, result.cpu_pct["all"] - ours), 1)
        await asyncio.gather(*(b.close() for b in browsers))
    for browser, (_, texts) in zip(browsers, scripts, strict=True):
        finals = {f["text"]: f for f in browser.of_type("transcript.final")}
        result.wrong += sum(1 for text in finals if text not in texts)
        for text in texts:
            final, sent = finals.get(text), fake.closed.get(text)
            if final is None or sent is None:
                result.missing += 1
                continue
            result.latencies.append(final["_rx"] - sent.mono)
            built = (final["ts"] + 0.5) / 1000  # `ts` is floored to the millisecond: centre it
            result.in_worker.append(built - sent.wall)
            result.samples.append({
                "text": text, "sent_s": round(sent.mono - started, 4), "connection": sent.connection,
                "total_ms": round((final["_rx"] - sent.mono) * 1000, 2),
                "worker_ms": round((built - sent.wall) * 1000, 2),
            })
    return result


async def sample(pids: dict[str, int], result: Round) -> None:
    """Peak resident memory of each process, and this loop's own wake-up lag, every 0.25 s."""
    lags: list[float] = []
    try:
        while True:
            for name, pid in pids.items():
                result.rss_peak_mb[name] = max(result.rss_peak_mb.get(name, 0.0), rss_mb(pid))
            before = time.monotonic()
            await asyncio.sleep(0.25)
            lags.append(time.monotonic() - before - 0.25)
    finally:
        result.loop_lag_p99_ms = round(1000 * pct(lags, 0.99), 1) if lags else 0.0










# --- the stack -------------------------------------------------------------------------------


async def wait_ready(
    base_url: str, redis_url: str, procs: dict[str, asyncio.subprocess.Process], kinds: tuple[str, ...] = ("stt",)
) -> None:
    r = connect_url(redis_url)
    try:
        async with asyncio.timeout(WAIT_S), httpx.AsyncClient(base_url=base_url, timeout=1) as http:
            while True:
                for name, proc in procs.items():
                    if proc.returncode is not None:
                        raise SystemExit(f"{name} exited with {proc.returncode}")
                try:
                    healthy = (await http.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    healthy = False
                fresh = []
                for kind in kinds:
                    workers = [orjson.loads(w) for w in await r.hvals(keys.workers(kind))]
                    fresh.append(any(time.time() - w["ts"] < 3 for w in workers))
                if healthy and all(fresh):
                    return
                await asyncio.sleep(0.1)
    finally:
        await r.aclose()


async def measure(redis_url: str, redis_pid: int, counts: list[int], utterances: int) -> list[Round]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    async with TimedFakeDeepgram(KEY) as fake:
        env = {
            **{k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
            "REDIS_URL": redis_url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
            # Transport, not turn-taking: the fake's finals carry no punctuation and its spelled audio is
            # no speech for the turn model, so every utterance is a turn of its own (bench.turns measures turns).
            "TURN_DETECTION": "silence",
            "STT_PROVIDER": "deepgram", "DEEPGRAM_API_KEY": KEY, "DEEPGRAM_URL": fake.url,
            "STT_CAPACITY": str(max(counts) + 8), "ADMISSION_CONTROL": "false",
            "SESSION_IDLE_TIMEOUT_S": "600", "LOG_LEVEL": "WARNING",
            "SESSION_CREATE_RATE_PER_MIN": "0",  # every session comes from 127.0.0.1 at once
        }
        procs = {
            name: await asyncio.create_subprocess_exec(sys.executable, "-m", "avatar_stack.cli", name, env=env)
            for name in ("gateway", "stt-worker")
        }
        try:
            await wait_ready(base_url, redis_url, procs)
            pids = {name: p.pid for name, p in procs.items()} | {"redis": redis_pid}
            rounds = []
            for round_no, n in enumerate(counts, 1):
                print(f"  {n} session(s) x {utterances} utterances ...", file=sys.stderr)
                rounds.append(await run_round(base_url, fake, pids, round_no, n, utterances))
            return rounds
        finally:
            for proc in procs.values():
                if proc.returncode is None:
                    proc.terminate()
            await asyncio.gather(*(asyncio.wait_for(p.wait(), 15) for p in procs.values()))


def report(rounds: list[Round]) -> None:
    ms = 1000
    print("\nfake Deepgram sends an utterance's closing result -> transcript.final at the browser (ms)")
    print(f"{'sessions':>8s} {'finals':>6s} {'median':>7s} {'p99':>7s} {'max':>7s} | "
          f"{'worker med':>10s} {'worker p99':>10s} | {'stt RSS MB':>10s} {'gw RSS MB':>10s} | "
          f"{'stt CPU':>7s} {'gw CPU':>7s} {'redis':>6s} {'bench':>6s} {'others':>6s} | {'lag p99':>7s}")
    for r in rounds:
        lat, inner = r.latencies, r.in_worker
        print(
            f"{r.sessions:8d} {len(lat):6d} {statistics.median(lat) * ms:7.1f} {pct(lat, 0.99) * ms:7.1f} "
            f"{max(lat) * ms:7.1f} | {statistics.median(inner) * ms:10.1f} {pct(inner, 0.99) * ms:10.1f} | "
            f"{rss(r, 'stt-worker'):>10s} {rss(r, 'gateway'):>10s} | "
            f"{r.cpu_pct['stt-worker']:6.0f}% {r.cpu_pct['gateway']:6.0f}% {r.cpu_pct['redis']:5.0f}% "
            f"{r.cpu_pct['bench']:5.0f}% {r.cpu_pct['others']:5.0f}% | {r.loop_lag_p99_ms:7.1f}"
        )
        if r.missing or r.wrong:
            print(f"{'':8s} !! {r.missing} utterance(s) without their final, {r.wrong} final(s) with other text")
    print(
        "(worker = fake send -> event built in the STT worker; RSS = before -> peak while talking; CPU = share of\n"
        f" one core while talking, {os.cpu_count()} cores; bench = browsers + fake, this process; others = every"
        " other process\n on the machine; lag p99 = how late this process's event loop woke, in ms: measuring error)"
    )
    print(json.dumps({"stt_deepgram": [{
        "sessions": r.sessions, "finals": len(r.latencies), "missing": r.missing, "wrong": r.wrong,
        "median_ms": round(statistics.median(r.latencies) * ms, 1), "p99_ms": round(pct(r.latencies, 0.99) * ms, 1),
        "max_ms": round(max(r.latencies) * ms, 1),
        "worker_median_ms": round(statistics.median(r.in_worker) * ms, 1),
        "worker_p99_ms": round(pct(r.in_worker, 0.99) * ms, 1),
        "rss_start_mb": {k: round(v, 1) for k, v in r.rss_start_mb.items()},
        "rss_peak_mb": {k: round(v, 1) for k, v in r.rss_peak_mb.items()},
        "cpu_pct": r.cpu_pct, "bench_loop_lag_p99_ms": r.loop_lag_p99_ms,
    } for r in rounds]}))


def rss(r: Round, name: str) -> str:
    return f"{r.rss_start_mb[name]:.0f}->{r.rss_peak_mb[name]:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,50", help="comma-separated concurrent session counts")
    parser.add_argument("--utterances", type=int, default=10, help="utterances per session")
    parser.add_argument("--repeat", type=int, default=1, help="run the whole list this many times")
    parser.add_argument("--details", help="write every utterance's timings to this JSON file")
    args = parser.parse_args()
    counts = [int(c) for c in args.sessions.split(",")] * args.repeat
    redis_port = free_port()
    redis_proc = start_redis(redis_binary() or "redis-server", redis_port)
    try:
        rounds = uvloop.run(
            measure(f"redis://127.0.0.1:{redis_port}/0", redis_proc.pid, counts, args.utterances)
        )
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
    report(rounds)
    if args.details:
        with open(args.details, "w") as f:
            json.dump([{"sessions": r.sessions, "utterances": r.samples} for r in rounds], f, indent=1)


if __name__ == "__main__":
    main()
