"""A real `livekit-server` for tests: dev mode, loopback only, free ports, started and stopped here.

The binary comes from `make setup-livekit` (a pinned `go install`, into `.cache/bin/`), from
`LIVEKIT_SERVER_BIN`, or from PATH. Dev mode means the keys `devkey` / `secret` and no Redis;
`--node-ip 127.0.0.1` makes ICE offer loopback candidates only, so nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
CACHED_BINARY = ROOT / ".cache" / "bin" / "livekit-server"
DEV_KEY = "devkey"
DEV_SECRET = "secret"
LOG_DIR = ROOT / "artifacts" / "logs"


def livekit_binary() -> str | None:
    """Where the server binary is: `LIVEKIT_SERVER_BIN`, the project cache, then PATH."""
    explicit = os.environ.get("LIVEKIT_SERVER_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if os.access(CACHED_BINARY, os.X_OK):
        return str(CACHED_BINARY)
    return shutil.which("livekit-server")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_yaml(signal_port: int, tcp_port: int, udp_port: int) -> str:
    """The server's config: one signal port, one ICE/TCP port, one muxed ICE/UDP port."""
    return (
        f"port: {signal_port}\n"
        "rtc:\n"
        f"  tcp_port: {tcp_port}\n"
        f"  udp_port: {udp_port}\n"
        "  use_external_ip: false\n"
        "  enable_loopback_candidate: true\n"
        "logging:\n"
        "  level: info\n"
    )


@dataclass
class LiveKitServer:
    """One `livekit-server --dev` process; `restart()` brings it back on the same ports."""

    binary: str
    signal_port: int = field(default_factory=lambda: _free_port(socket.SOCK_STREAM))
    tcp_port: int = field(default_factory=lambda: _free_port(socket.SOCK_STREAM))
    udp_port: int = field(default_factory=lambda: _free_port(socket.SOCK_DGRAM))
    api_key: str = DEV_KEY
    api_secret: str = DEV_SECRET
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        """What clients dial (the SDKs append `/rtc`)."""
        return f"ws://127.0.0.1:{self.signal_port}"

    @property
    def http_url(self) -> str:
        """Where RoomService (Twirp over HTTP) answers."""
        return f"http://127.0.0.1:{self.signal_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"livekit-{self.signal_port}.log"
        log = open(self.log_path, "ab")  # the child inherits it; ours is closed right after the spawn
        body = config_yaml(self.signal_port, self.tcp_port, self.udp_port)
        self.proc = subprocess.Popen(
            [self.binary, "--dev", "--bind", "127.0.0.1", "--node-ip", "127.0.0.1", "--config-body", body],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """The root path answers `OK` once the server accepts signal connections."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"livekit-server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.http_url + "/", timeout=0.5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"livekit-server did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """As a crash: no goodbye to the participants."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self, timeout_s: float = 30.0) -> None:
        self.stop()
        self.start(timeout_s)

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def token(self, identity: str, room: str, *, publish: bool = True, ttl_s: int = 600) -> str:
        """An access token for `room` signed with the dev key (tests only)."""
        from datetime import timedelta

        from livekit import api

        grants = api.VideoGrants(
            room_join=True, room=room, can_subscribe=True, can_publish=publish, can_publish_data=publish
        )
        return (
            api.AccessToken(self.api_key, self.api_secret)
            .with_identity(identity)
            .with_ttl(timedelta(seconds=ttl_s))
            .with_grants(grants)
            .to_jwt()
        )

    def env(self) -> dict[str, str]:
        """The settings that point a stack at this server."""
        return {"LIVEKIT_URL": self.url, "LIVEKIT_API_KEY": self.api_key, "LIVEKIT_API_SECRET": self.api_secret}


@contextlib.contextmanager
def running_livekit(binary: str) -> Iterator[LiveKitServer]:
    server = LiveKitServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()
