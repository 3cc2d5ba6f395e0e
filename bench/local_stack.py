"""The whole stack with local providers as real processes, for the benchmarks that talk to it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from avatar_stack.up import free_port, redis_binary, start_redis

SERVICES = ("gateway", "stt-worker", "avatar-worker")


@dataclass
class LocalStack:
    base_url: str
    procs: dict[str, subprocess.Popen]
    redis: subprocess.Popen


@contextlib.contextmanager
def local_stack(checkout: str | None = None, **env: str) -> Iterator[LocalStack]:
    """Redis on a free port, gateway + STT worker + avatar worker (local providers), ready to serve.

    `checkout`: run the services from another source tree (a "before" measurement); `-m` imports
    from the working directory first, so the processes start there."""
    port, redis_port = free_port(), free_port()
    redis_proc = start_redis(redis_binary() or "redis-server", redis_port)
    full_env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "GATEWAY_PORT": str(port),
                "STT_PROVIDER": "local", "AVATAR_PROVIDER": "local", "LOG_LEVEL": "WARNING",
                "SESSION_CREATE_RATE_PER_MIN": "0", **env}
    if checkout:
        full_env["PYTHONPATH"] = checkout
    procs = {name: subprocess.Popen([sys.executable, "-m", "avatar_stack.cli", name], env=full_env, cwd=checkout)
             for name in SERVICES}
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ready = httpx.get(f"{base_url}/readyz", timeout=1)
                pools = ready.json().get("pools", {}) if ready.status_code == 200 else {}
                if pools and all(p.get("has_room") for p in pools.values()):  # workers up too
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the stack did not start")
            time.sleep(0.1)
        yield LocalStack(base_url, procs, redis_proc)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(15)
        redis_proc.terminate()
