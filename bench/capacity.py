"""`avatar-stack bench`: per-hop latency of the whole pipeline, and how many sessions one machine holds.

N simulated browsers stream speech at real-time pace (20 ms frames, as the page sends) through the
real gateway, Redis, one STT worker (Deepgram provider) and one avatar worker (HeyGen provider),
all real processes. The vendors are the protocol fakes of `tests/fakes/` on loopback, in this
process, with fixed latencies of their own (`--deepgram-ms`, `--avatar-ms`) that are *not*
counted: the hops below are what our pipeline adds.

Hops, each stamped where it happens (monotonic clock, one machine):
- `frame→engine`: a browser sends an audio frame → the fake Deepgram has received its last byte
  (gateway → Redis → STT worker → Deepgram socket), for every frame.
- `final→browser`: the fake sends the result that closes an utterance → `transcript.final` reaches
  the browser (STT worker → Redis → gateway → browser socket).
- `final→avatar`: the same closing result → the fake HeyGen receives the `streaming.task` that
  speaks the answer (STT worker → `turns:{sid}` → avatar worker → vendor REST call).
- `turn→avatar`: the part of `final→avatar` after the STT worker published the turn (its event's
  server `ts`, whole milliseconds) — the avatar worker's own share.

`--search` looks for the largest N whose `frame→engine`, `final→browser` and `final→avatar` p99
all stay under `--budget-ms` (50): it doubles N until a round fails, then bisects. Every round
also checks that every utterance reached both the browser and the avatar exactly once and counts
frames dropped (browser bytes that never reached the engine, and the gateway's drop counter).

    avatar-stack bench --sessions 50,100            # fixed rounds
    avatar-stack bench --search --max 400           # capacity search
    avatar-stack bench --json results.json          # also write every number as JSON

Run it from a checkout after `make setup` (it uses the fakes in `tests/fakes/`).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gc
import json
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import orjson
import uvloop
from fastapi import Request
from fastapi.responses import JSONResponse
from websockets.asyncio.server import ServerConnection

from avatar_stack.client import Browser, create_session
from avatar_stack.up import free_port, redis_binary, start_redis
from bench.measure import busy_s, cpu_s, pct, rss_mb
from bench.stt_deepgram import PAUSE_S, WORDS, Closed, TimedFakeDeepgram, script, wait_ready
from common import keys
from common.bus import connect_url
from tests.cluster_util import LocalCluster
from tests.fakes.deepgram import FakeConnection, Speech
from tests.fakes.heygen import FakeHeyGen

DEEPGRAM_KEY = "bench-deepgram-key"
HEYGEN_KEY = "bench-heygen-key"
WAIT_S = 120.0
WARMUP_S = 1.0  # frames in a session's first second include its start-up (Deepgram handshake)
TAG = re.compile(r"^r(\d+)s(\d+)u(\d+)\b")
HOPS = ("frame→engine", "final→browser", "final→avatar", "turn→avatar")
BUDGETED = ("frame→engine", "final→browser", "final→avatar")
PROCESSES = ("gateway", "stt-worker", "avatar-worker", "redis", "bench")
STACK = PROCESSES[:-1]  # what a deployment runs; `bench` is the browsers and the vendor fakes


# --- the fakes, stamped ---------------------------------------------------------------------


class BenchDeepgram(TimedFakeDeepgram):
    """Also stamps every audio message it receives (bytes so far on that socket, monotonic time),
    and holds its results back by a fixed vendor latency."""

    def __init__(self, api_key: str, latency_ms: float) -> None:
        super().__init__(api_key)
        self.latency_s = latency_ms / 1000
        self.arrivals: dict[int, list[tuple[int, float]]] = {}

    def _audio_received(self, conn: FakeConnection, nbytes: int) -> None:
        now = time.monotonic()
        log = self.arrivals.setdefault(conn.index, [])
        log.append(((log[-1][0] if log else 0) + nbytes, now))

    async def _send(self, ws: ServerConnection, conn: FakeConnection, messages: list[dict[str, Any]]) -> None:
        if self.latency_s and messages:
            await asyncio.sleep(self.latency_s)
        await super()._send(ws, conn, messages)


class BenchHeyGen(FakeHeyGen):
    """Stamps each `streaming.task` as it arrives, keyed by the text it asks the avatar to answer,
    and answers every call after a fixed vendor latency."""

    def __init__(self, api_key: str, latency_ms: float) -> None:
        super().__init__(api_key, max_concurrent=100_000, speech_ms_per_char=1.0)
        self.latency_s = latency_ms / 1000
        self.tasks: dict[str, list[tuple[float, float]]] = {}  # text -> [(monotonic, unix)]

    async def _handle(self, request: Request, path: str) -> JSONResponse:
        if path == "v1/streaming.task":
            stamp = (time.monotonic(), time.time())
            body = json.loads(await request.body() or b"{}")
            self.tasks.setdefault(str(body.get("text", "")), []).append(stamp)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return await super()._handle(request, path)


class BenchBrowser(Browser):
    """A test browser that remembers when each frame left: (bytes sent so far, monotonic time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[int, float]] = []


async def stream_all(browsers: list[BenchBrowser], pcms: list[bytes], frame_bytes: int = 640, phases: int = 4) -> None:
    """Every browser sends its audio as 20 ms frames at real-time pace.

    One clock for all of them instead of a timer per browser per frame: at 200 browsers that is
    200 wake-ups a second instead of 10 000, so the load generator leaves the cores to the
    pipeline. Browsers are spread over `phases` offsets within a frame so frames arrive spread
    out, as from independent pages, not all in the same instant.

    Each frame is one write of a ready-made WebSocket frame to the socket (`ws_frame`), not a
    `send` through the client library: the library's framing and masking per frame were half of
    this process's CPU, which on the same cores is taken from the stack under test.
    """
    frame_s = frame_bytes / 32000
    tick_s = frame_s / phases
    pcms = [pcm + b"\x00" * (-len(pcm) % frame_bytes) for pcm in pcms]  # a page sends whole frames
    frames = [[pcm[i:i + frame_bytes] for i in range(0, len(pcm), frame_bytes)] for pcm in pcms]
    header = ws_header(frame_bytes)
    start, tick = time.monotonic(), 0
    while True:
        phase, n = tick % phases, tick // phases
        busy = False
        for i in range(phase, len(browsers), phases):
            if n < len(frames[i]):
                busy = True
                browser, frame = browsers[i], frames[i][n]
                assert browser.ws is not None
                browser.ws.transport.writelines((header, frame))
                browser.sent.append(((browser.sent[-1][0] if browser.sent else 0) + len(frame), time.monotonic()))
        if not busy and all(n >= len(f) for f in frames):
            return
        tick += 1
        delay = start + tick * tick_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def machine_ms(repeat: int = 5) -> float:
    """The best of `repeat` runs of a fixed pure-Python loop (ms). A shared or throttled machine
    runs the same code slower from one hour to the next: rounds are comparable where this is."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        total = 0
        for i in range(200_000):
            total += i * i % 7
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 2)


def ws_header(nbytes: int) -> bytes:
    """The head of a client's binary WebSocket frame (RFC 6455 5.2) of `nbytes` < 64 KiB: FIN and
    opcode 2, the masked bit with a 16-bit length, and a zero masking key, so the payload is sent
    as it is. (A real page masks with a random key; the server unmasks either the same way.)"""
    assert 126 <= nbytes < 1 << 16
    return bytes((0x82, 0x80 | 126)) + nbytes.to_bytes(2, "big") + bytes(4)


async def relay_avatar_events(heygen: BenchHeyGen, browsers: list[BenchBrowser], every_s: float = 0.1) -> None:
    """What a page does for HeyGen: relay the vendor's LiveKit data-channel events
    (`avatar_start_talking` / `avatar_stop_talking`) up its socket, so each reply ends when the
    avatar stopped talking, not at the driver's fallback deadline (after which the next utterance
    would be taken as speech over the avatar). One loop for every page."""
    relayed: dict[str, int] = {}
    vendor_of: dict[int, str] = {}  # page -> its vendor session (from the token its session.ready names)
    while True:
        for browser in browsers:
            vendor_id = vendor_of.get(id(browser))
            if vendor_id is None:
                ready = next((e for e in browser.events if e.get("type") == "session.ready"), None)
                token = (ready or {}).get("livekit", {}).get("token")
                vendor_id = heygen.by_access_token(token) if token else None
                if vendor_id is None:
                    continue
                vendor_of[id(browser)] = vendor_id
            if browser.closed:
                continue
            events = heygen.channel(vendor_id)
            for event in events[relayed.get(vendor_id, 0):]:
                data = {k: v for k, v in event.items() if k != "type"}
                with contextlib.suppress(Exception):  # the page left meanwhile
                    await browser.send_json({"type": "avatar.event", "event": event["type"], **data})
            relayed[vendor_id] = len(events)
        await asyncio.sleep(every_s)


# --- one round ------------------------------------------------------------------------------


@dataclass
class Round:
    sessions: int
    hops_ms: dict[str, list[float]] = field(default_factory=lambda: {h: [] for h in HOPS})
    utterances: int = 0
    missing_finals: int = 0
    missing_avatar_calls: int = 0
    ignored: dict[str, int] = field(default_factory=dict)  # finals the avatar worker did not answer, by reason
    duplicate_avatar_calls: int = 0
    frames_sent: int = 0
    audio_s: float = 0.0  # seconds of audio the browsers sent
    frames_lost: int = 0  # sent by a browser, never received by the engine
    gateway_frames_dropped: float = 0.0  # the gateway's own counter (rate limit, bad frames)
    cpu_pct: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each process used in the round
    rss_mb: dict[str, float] = field(default_factory=dict)  # peak while talking
    rss_idle_mb: dict[str, float] = field(default_factory=dict)  # before the round's sessions existed
    breakdown_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # from the services' histograms
    loop_lag_p99_ms: float = 0.0
    machine_ms: float = 0.0  # a fixed pure-Python workload's time, just before the round (see `machine_ms`)
    seconds: float = 0.0

    def p(self, hop: str, q: float) -> float:
        values = self.hops_ms[hop]
        return pct(values, q) if values else float("nan")

    def passed(self, budget_ms: float) -> bool:
        complete = not (self.missing_finals or self.missing_avatar_calls or self.duplicate_avatar_calls)
        return complete and self.frames_lost == 0 and all(self.p(h, 0.99) < budget_ms for h in BUDGETED)

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "hops_ms"}
        out["hops"] = {
            h: {"n": len(v), "p50_ms": _r(self.p(h, 0.5)), "p95_ms": _r(self.p(h, 0.95)), "p99_ms": _r(self.p(h, 0.99)),
                "max_ms": _r(max(v) if v else float("nan"))}
            for h, v in self.hops_ms.items()
        }
        return out


def _r(x: float) -> float | None:
    return None if x != x else round(x, 2)


class Stack:
    """The services under test, the fakes they talk to, and how to read their CPU and memory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.pids: dict[str, int] = {}
        self.base_url = ""
        self.deepgram = BenchDeepgram(DEEPGRAM_KEY, args.deepgram_ms)
        self.heygen = BenchHeyGen(HEYGEN_KEY, args.avatar_ms)

    async def __aenter__(self) -> Stack:
        self.cluster: LocalCluster | None = None
        if self.args.redis == "cluster":  # N masters on this machine: the same cores, more processes
            self.cluster = LocalCluster(
                masters=self.args.cluster_masters, replicas_per_master=self.args.cluster_replicas
            )
            await asyncio.to_thread(self.cluster.start)
            self.redis_proc = None
            self.redis_url = redis_url = self.cluster.url
        else:
            self.redis_port = free_port()
            self.redis_proc = start_redis(redis_binary() or "redis-server", self.redis_port)
            self.redis_url = redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        await self.deepgram.__aenter__()
        self.heygen.start()
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        capacity = str(self.args.max + 16)
        env = {
            **{k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
            "REDIS_URL": redis_url, "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port),
            # Transport, not turn-taking: the fake's finals carry no punctuation and its spelled audio is
            # no speech for the turn model, so every utterance is a turn of its own (bench.turns measures turns).
            "TURN_DETECTION": "silence",
            "STT_PROVIDER": "deepgram", "DEEPGRAM_API_KEY": DEEPGRAM_KEY, "DEEPGRAM_URL": self.deepgram.url,
            "AVATAR_PROVIDER": "heygen", "HEYGEN_API_KEY": HEYGEN_KEY, "HEYGEN_SERVER_URL": self.heygen.url,
            "HEYGEN_AVATAR_ID": "Anna_public", "HEYGEN_TASK_TYPE": "talk", "HEYGEN_REAPER_INTERVAL_S": "0",
            "STT_CAPACITY": capacity, "AVATAR_CAPACITY": capacity, "ADMISSION_CONTROL": "false",
            "SESSION_CREATE_RATE_PER_MIN": "0", "SESSION_IDLE_TIMEOUT_S": "600",
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),  # the services' logs go to stderr
        }
        for name in ("gateway", "stt-worker", "avatar-worker"):
            self.procs[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "avatar_stack.cli", name, env=env
            )
        await wait_ready(self.base_url, redis_url, self.procs, kinds=("stt", "avatar"))
        self.pids = {name: p.pid for name, p in self.procs.items()}
        self.redis_pids = [p.pid for p in self.cluster.procs.values()] if self.cluster else [self.redis_proc.pid]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        await asyncio.gather(*(asyncio.wait_for(p.wait(), 20) for p in self.procs.values()), return_exceptions=True)
        self.heygen.stop()
        await self.deepgram.__aexit__()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
        else:
            self.redis_proc.terminate()
            self.redis_proc.wait(10)

    def forget_round(self) -> None:
        """Drop the fakes' stamps once a round is collected, so the heap stays the same size."""
        self.deepgram.arrivals.clear()
        self.deepgram.closed.clear()
        gc.unfreeze()
        gc.collect()

    def cpu(self) -> dict[str, float]:
        return {name: cpu_s(pid) for name, pid in self.pids.items()} | {
            "redis": sum(cpu_s(pid) for pid in self.redis_pids),  # every node of a cluster
            "bench": time.process_time(), "all": busy_s()}

    def rss(self) -> dict[str, float]:
        return {name: rss_mb(pid) for name, pid in self.pids.items()} | {
            "redis": sum(rss_mb(pid) for pid in self.redis_pids), "bench": rss_mb(os.getpid())}

    async def metrics(self) -> dict[str, float]:
        """The gateway's and the STT worker's Prometheus series, as {'name{labels}': value}."""
        r = connect_url(self.redis_url)
        try:
            adverts = [orjson.loads(v) for v in await r.hvals(keys.workers("stt"))]
        finally:
            await r.aclose()
        urls = [f"{self.base_url}/metrics"] + [
            f"http://127.0.0.1:{a['metrics_port']}/metrics" for a in adverts if a.get("metrics_port")
        ]
        out: dict[str, float] = {}
        async with httpx.AsyncClient(timeout=5) as http:
            for url in urls:
                for line in (await http.get(url)).text.splitlines():
                    if line and not line.startswith("#"):
                        name, _, value = line.rpartition(" ")
                        out[name] = out.get(name, 0.0) + float(value)
        return out


def dropped(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("avatar_stack_gateway_audio_frames_dropped_total{"))


def histogram_quantile(before: dict[str, float], after: dict[str, float], name: str, q: float) -> float:
    """The q-quantile (ms) of what a Prometheus histogram observed between two scrapes: the upper
    bound of the bucket it falls in, as Prometheus's histogram_quantile would without interpolation."""
    buckets = []
    for key, value in after.items():
        if key.startswith(f"{name}_bucket{{") and 'le="+Inf"' not in key:
            le = float(key.split('le="', 1)[1].split('"', 1)[0])
            buckets.append((le, value - before.get(key, 0.0)))
    buckets.sort()
    total = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    if not total:
        return float("nan")
    for le, count in buckets:
        if count >= q * total:
            return le * 1000
    return float("inf")


BREAKDOWN = {  # inside `frame→engine`, from the services' own histograms (bucket bounds, ms)
    "gateway: frame → in Redis": "avatar_stack_gateway_audio_publish_seconds",
    "stt: in Redis → engine": "avatar_stack_stt_audio_to_engine_seconds",
    "gateway: event in Redis → page": "avatar_stack_gateway_event_delivery_seconds",
}


async def run_round(stack: Stack, round_no: int, n: int, utterances: int) -> Round:
    rng = random.Random(round_no)
    cycle_s = len(WORDS) * 0.4 + 0.3 + PAUSE_S
    scripts = [script(round_no, i, utterances, rng.uniform(0.0, cycle_s)) for i in range(n)]
    result = Round(n, rss_idle_mb={k: round(v, 1) for k, v in stack.rss().items()}, machine_ms=machine_ms())
    metrics_before = await stack.metrics()
    sessions = []
    for _ in range(n):  # one after another, as users arrive; gather would only measure the REST API
        sessions.append(await create_session(stack.base_url))
    browsers = [BenchBrowser(s) for s in sessions]
    await asyncio.gather(*(b.connect() for b in browsers))
    expected = n * utterances
    sampler = asyncio.create_task(sample(stack, result, browsers, expected))
    relay = asyncio.create_task(relay_avatar_events(stack.heygen, browsers))
    cpu_before, started = stack.cpu(), time.monotonic()
    # This process stamps both ends of every hop: a full collection of its (large) heap would
    # stall its loop for tens of ms and be counted as pipeline latency. Collect between rounds.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        await stream_all(browsers, [speech.pcm for speech, _ in scripts], frame_bytes=stack.args.frame_ms * 32)
        await asyncio.gather(*(
            wait_finals(b, len(texts)) for b, (_, texts) in zip(browsers, scripts, strict=True)
        ))
        await wait_avatar_calls(stack.heygen, [t for _, texts in scripts for t in texts])
    finally:
        result.seconds = round(time.monotonic() - started, 1)
        cpu_after = stack.cpu()
        sampler.cancel()
        relay.cancel()
        await asyncio.gather(sampler, relay, return_exceptions=True)
        result.cpu_pct = {k: round(100 * (cpu_after[k] - cpu_before[k]) / result.seconds, 1) for k in cpu_after}
        result.cpu_s = {k: round(cpu_after[k] - cpu_before[k], 3) for k in cpu_after}
        ended = time.monotonic()
        gc.enable()
        await asyncio.gather(*(b.close() for b in browsers), return_exceptions=True)
    metrics_after = await stack.metrics()
    result.gateway_frames_dropped = dropped(metrics_after) - dropped(metrics_before)
    result.breakdown_ms = {
        label: {f"p{round(q * 100)}": histogram_quantile(metrics_before, metrics_after, name, q) for q in (0.5, 0.99)}
        for label, name in BREAKDOWN.items()
    }
    collect(stack, result, round_no, browsers, scripts, ended)
    stack.forget_round()
    return result


async def wait_finals(browser: BenchBrowser, expected: int) -> None:
    await browser.wait_for(lambda _e: len(browser.of_type("transcript.final")) >= expected, WAIT_S)


async def wait_avatar_calls(heygen: BenchHeyGen, texts: list[str], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    # The fake runs in its own thread: poll its record rather than share an event across loops.
    while time.monotonic() < deadline and any(t not in heygen.tasks for t in texts):  # noqa: ASYNC110
        await asyncio.sleep(0.1)


async def sample(stack: Stack, result: Round, browsers: list[BenchBrowser], expected: int) -> None:
    """Peak memory every 0.25 s, this loop's own lag (the measuring error), progress every 2 s."""
    lags: list[float] = []
    last_print = time.monotonic()
    try:
        while True:
            for name, mb in stack.rss().items():
                result.rss_mb[name] = round(max(result.rss_mb.get(name, 0.0), mb), 1)
            before = time.monotonic()
            await asyncio.sleep(0.25)
            lags.append(time.monotonic() - before - 0.25)
            if before - last_print >= 2.0:
                last_print = before
                finals = sum(len(b.of_type("transcript.final")) for b in browsers)
                print(f"    {result.sessions} sessions: {finals}/{expected} finals, "
                      f"{sum(len(t) for t in stack.heygen.tasks.values())} avatar calls", file=sys.stderr)
    finally:
        result.loop_lag_p99_ms = round(1000 * pct(lags, 0.99), 1) if lags else 0.0


def collect(stack: Stack, result: Round, round_no: int, browsers: list[BenchBrowser],
            scripts: list[tuple[Speech, list[str]]], ended: float) -> None:
    """Match what each side stamped, by utterance text (and socket → session by its first text)."""
    hops = result.hops_ms
    conn_of: dict[int, int] = {}
    for text, closed in stack.deepgram.closed.items():
        m = TAG.match(text)
        if m and int(m.group(1)) == round_no:
            conn_of.setdefault(int(m.group(2)), closed.connection)
    for i, (browser, (_, texts)) in enumerate(zip(browsers, scripts, strict=True)):
        result.utterances += len(texts)
        finals = {f["text"]: f for f in browser.of_type("transcript.final")}
        for text in texts:
            closed: Closed | None = stack.deepgram.closed.get(text)
            final = finals.get(text)
            calls = stack.heygen.tasks.get(text, [])
            if final is None or closed is None:
                result.missing_finals += 1
            else:
                hops["final→browser"].append(1000 * (final["_rx"] - closed.mono))
            if not calls:
                result.missing_avatar_calls += 1
            else:
                result.duplicate_avatar_calls += len(calls) - 1
                if closed is not None:
                    hops["final→avatar"].append(1000 * (calls[0][0] - closed.mono))
                if final is not None:
                    hops["turn→avatar"].append(1000 * calls[0][1] - final["ts"] - 0.5)
        for event in browser.of_type("transcript.ignored"):
            result.ignored[event["reason"]] = result.ignored.get(event["reason"], 0) + 1
        result.frames_sent += len(browser.sent)
        result.audio_s += (browser.sent[-1][0] if browser.sent else 0) / 32000
        arrivals = stack.deepgram.arrivals.get(conn_of.get(i, -1), [])
        received = arrivals[-1][0] if arrivals else 0
        # Frames still in flight when the page left are not lost: count those sent ≥ 1 s before.
        due = [b for b, at in browser.sent if at <= ended - 1.0]
        result.frames_lost += max(0, due[-1] - received) // (stack.args.frame_ms * 32) if due else 0
        hops["frame→engine"].extend(frame_latencies(browser.sent, arrivals))


def frame_latencies(sent: list[tuple[int, float]], arrivals: list[tuple[int, float]]) -> list[float]:
    """For each frame a browser sent, how long until the engine had its last byte (ms).

    Per frame, not per chunk received: audio held back to fill a bigger chunk counts against the
    frames that waited, not only the one that completed the chunk.
    """
    if not sent or not arrivals:
        return []
    received = [b for b, _ in arrivals]
    warm = sent[0][1] + WARMUP_S
    out = []
    for end, at in sent:
        k = bisect.bisect_left(received, end)
        if k < len(arrivals) and at >= warm:
            out.append(1000 * (arrivals[k][1] - at))
    return out


# --- rounds, search, report -------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> list[Round]:
    rounds: list[Round] = []
    async with Stack(args) as stack:
        round_no = 0
        if args.warmup:
            # Not reported: a fresh stack's first sessions also pay for first-time work (code paths
            # run for the first time, connection pools and Redis memory growing), which would make
            # whichever round comes first look slower than it is.
            print(f"  warm-up: {args.warmup} sessions x 1 utterance ...", file=sys.stderr)
            await run_round(stack, 0, args.warmup, 1)
            await asyncio.sleep(2.0)

        async def one(n: int) -> Round:
            nonlocal round_no
            round_no += 1
            print(f"  round {round_no}: {n} sessions x {args.utterances} utterances ...", file=sys.stderr)
            r = await run_round(stack, round_no, n, args.utterances)
            rounds.append(r)
            print("  " + line(r, args.budget_ms), file=sys.stderr)
            await asyncio.sleep(2.0)  # let the sessions end and the vendor sessions stop
            return r

        if not args.search:
            for n in args.sessions:
                await one(n)
            return rounds
        good, bad, n = 0, None, args.start
        while n <= args.max:
            if (await one(n)).passed(args.budget_ms):
                good, n = n, n * 2
            else:
                bad = n
                break
        if good and bad is None and good < args.max:
            bad = args.max + 1
            if (await one(args.max)).passed(args.budget_ms):
                good = args.max
        while bad is not None and good and bad - good > max(5, good // 10):
            mid = (good + bad) // 2
            if (await one(mid)).passed(args.budget_ms):
                good = mid
            else:
                bad = mid
        args.capacity = good
    return rounds


def line(r: Round, budget_ms: float) -> str:
    hops = "  ".join(f"{h} p50 {r.p(h, 0.5):.1f} p99 {r.p(h, 0.99):.1f}" for h in BUDGETED)
    return f"{r.sessions:4d} sessions: {hops} ms -> {'PASS' if r.passed(budget_ms) else 'FAIL'}"


def report(rounds: list[Round], args: argparse.Namespace) -> dict[str, Any]:
    print(f"\nper-hop latency (ms), {os.cpu_count()} cores, vendor latency excluded "
          f"(fake Deepgram {args.deepgram_ms} ms, fake HeyGen {args.avatar_ms} ms)")
    print(f"{'sessions':>8s} | " + " | ".join(f"{h:^20s}" for h in HOPS) + " | lost/sent frames | ok?")
    print(f"{'':8s} | " + " | ".join(f"{'p50':>6s} {'p95':>6s} {'p99':>6s}" for _ in HOPS) + " |")
    for r in rounds:
        cells = " | ".join(f"{r.p(h, .5):6.1f} {r.p(h, .95):6.1f} {r.p(h, .99):6.1f}" for h in HOPS)
        print(f"{r.sessions:8d} | {cells} | {r.frames_lost:>6d}/{r.frames_sent:<9d} | "
              f"{'PASS' if r.passed(args.budget_ms) else 'FAIL'}")
    print("\ninside the hops, from the services' own histograms (ms, bucket upper bounds: p50 / p99)")
    print(f"{'sessions':>8s} | " + " | ".join(f"{label:^30s}" for label in BREAKDOWN))
    for r in rounds:
        cells = " | ".join(f"{r.breakdown_ms[b]['p50']:>13g} / {r.breakdown_ms[b]['p99']:<14g}" for b in BREAKDOWN)
        print(f"{r.sessions:8d} | {cells}")
    print("\nCPU (% of one core while talking) and peak RSS (MB; idle before the round)")
    print(f"{'sessions':>8s} | " + " | ".join(f"{p:^19s}" for p in (*PROCESSES, "others")))
    for r in rounds:
        ours = sum(v for k, v in r.cpu_pct.items() if k != "all")
        others = max(0.0, r.cpu_pct.get("all", 0.0) - ours)
        cells = " | ".join(f"{r.cpu_pct.get(p, 0):5.0f}% {r.rss_idle_mb.get(p, 0):5.0f}->{r.rss_mb.get(p, 0):<5.0f}"
                           for p in PROCESSES)
        print(f"{r.sessions:8d} | {cells} | {others:5.0f}%")
    print(f"\nCPU per 20 ms of audio (µs; browsers sent {args.frame_ms} ms frames; all each process did in the round),")
    print("sessions per core and memory per session (peak RSS over idle) of the stack: gateway + stt + avatar + redis")
    print(f"{'sessions':>8s} | " + " | ".join(f"{p:>13s}" for p in (*STACK, "stack", "bench"))
          + " | sessions/core | MB/session")
    for r in rounds:
        frames = max(1.0, r.audio_s / 0.02)  # 20 ms units, whatever the frame size
        per_frame = {p: 1e6 * r.cpu_s.get(p, 0.0) / frames for p in (*STACK, "bench")}
        stack_us = sum(per_frame[p] for p in STACK)
        cores = sum(r.cpu_pct.get(p, 0.0) for p in STACK) / 100
        mb = sum(r.rss_mb.get(p, 0.0) - r.rss_idle_mb.get(p, 0.0) for p in STACK) / max(1, r.sessions)
        cells = " | ".join(f"{per_frame[p]:10.1f} µs" for p in STACK)
        print(f"{r.sessions:8d} | {cells} | {stack_us:10.1f} µs | {per_frame['bench']:10.1f} µs | "
              f"{r.sessions / cores if cores else 0:13.0f} | {mb:10.2f} | machine {r.machine_ms} ms")
    for r in rounds:
        if r.missing_finals or r.missing_avatar_calls or r.duplicate_avatar_calls or r.gateway_frames_dropped:
            print(f"  !! {r.sessions} sessions: {r.missing_finals} finals and {r.missing_avatar_calls} avatar calls "
                  f"missing, {r.duplicate_avatar_calls} duplicated, {r.gateway_frames_dropped:.0f} frames dropped; "
                  f"finals the avatar worker ignored: {r.ignored or 'none'}")
    out = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {"redis": args.redis, "cluster_masters": args.cluster_masters,
                     "cluster_replicas": args.cluster_replicas, "utterances": args.utterances,
                     "budget_ms": args.budget_ms, "frame_ms": args.frame_ms,
                     "deepgram_ms": args.deepgram_ms, "avatar_ms": args.avatar_ms},
        "rounds": [r.summary() for r in rounds],
    }
    if args.search:
        out["capacity"] = args.capacity
        print(f"\ncapacity: {args.capacity} concurrent sessions with every budgeted hop's p99 under "
              f"{args.budget_ms:.0f} ms and nothing lost")
    print(json.dumps(out))
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="avatar-stack bench")
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--sessions", default="10,50", help="comma-separated concurrent session counts")
    parser.add_argument("--search", action="store_true", help="search for the largest N within the budget")
    parser.add_argument("--start", type=int, default=25, help="first N of the search")
    parser.add_argument("--max", type=int, default=400, help="largest N to try")
    parser.add_argument("--utterances", type=int, default=4, help="utterances per session per round")
    parser.add_argument("--budget-ms", type=float, default=50.0, help="p99 budget of each hop")
    parser.add_argument("--deepgram-ms", type=float, default=0.0, help="fake Deepgram's own latency")
    parser.add_argument("--avatar-ms", type=float, default=0.0, help="fake HeyGen's own latency")
    parser.add_argument("--redis", choices=("node", "cluster"), default="node",
                        help="one Redis, or a Redis Cluster started on this machine (the same cores)")
    parser.add_argument("--cluster-masters", type=int, default=3, help="masters of --redis cluster")
    parser.add_argument("--cluster-replicas", type=int, default=0, help="replicas per master of --redis cluster")
    parser.add_argument("--warmup", type=int, default=20, help="sessions of an unreported first round (0: none)")
    parser.add_argument("--frame-ms", type=int, default=20, choices=(20, 40, 60, 100),
                        help="audio per WebSocket message a browser sends (the page sends 20 ms)")
    parser.add_argument("--json", help="write the results to this file too")
    return parser


def run(args: argparse.Namespace) -> int:
    args.sessions = [int(c) for c in str(args.sessions).split(",") if c]
    args.max = max(args.max, *args.sessions) if not args.search else args.max
    args.capacity = 0
    rounds = uvloop.run(bench(args))
    out = report(rounds, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def main() -> None:
    sys.exit(run(build_parser().parse_args()))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
