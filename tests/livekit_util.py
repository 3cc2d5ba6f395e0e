"""A real `livekit-server` for tests: dev mode, loopback only, free ports, started and stopped here.

The binary comes from `make setup-livekit` (a pinned `go install`, into `.cache/bin/`), from
`LIVEKIT_SERVER_BIN`, or from PATH. Dev mode means the keys `devkey` / `secret` and no Redis;
`--node-ip 127.0.0.1` makes ICE offer loopback candidates only, so nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
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

    def start(self, timeout_s: float = 30.0, *, new_ports_if_taken: bool = True) -> None:
        """Ports picked free a moment ago can be taken by another process before the server binds
        them (seen in a full run: "bind: address already in use"): then it picks new ones, up to
        three times. A restart keeps its ports."""
        for attempt in range(3):
            try:
                return self._spawn(timeout_s)
            except RuntimeError:
                if not new_ports_if_taken or attempt == 2 or "address already in use" not in self.log_tail():
                    raise
            self.signal_port, self.tcp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM)
            self.udp_port = _free_port(socket.SOCK_DGRAM)

    def _spawn(self, timeout_s: float) -> None:
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

    def stop(self) -> None:
        """SIGTERM starts a graceful drain that can take many seconds; a second one forces it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for wait_s in (1.0, 5.0):
            proc.terminate()
            try:
                proc.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                pass
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
        self.start(timeout_s, new_ports_if_taken=False)

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

    async def participants(self, room: str) -> list:
        """RoomService's view of a room: who is in it, with their tracks and permissions."""
        from livekit import api

        lk = api.LiveKitAPI(self.http_url, self.api_key, self.api_secret)
        try:
            return list((await lk.room.list_participants(api.ListParticipantsRequest(room=room))).participants)
        finally:
            await lk.aclose()

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


class RoomListener:
    """A Python stand-in for the page in a room: subscribes to everything and records, per sender
    identity, the RMS of each received 10 ms audio frame and every data message (bounded)."""

    MAX_FRAMES = 60_000  # 10 minutes of 10 ms frames per sender

    def __init__(self) -> None:
        from livekit import rtc

        self.room = rtc.Room()
        self.levels: dict[str, list[float]] = {}
        self.data: list[tuple[str, str, dict]] = []  # (identity, topic, message)
        self.tracks: list[tuple[str, str]] = []  # (identity, kind) subscribed, in order
        self._streams: list = []
        self._tasks: set = set()
        self._changed: asyncio.Event | None = None
        self.room.on("track_subscribed", self._on_track)
        self.room.on("data_received", self._on_data)

    async def connect(self, url: str, token: str) -> None:
        await self.room.connect(url, token)

    def _on_track(self, track, publication, participant) -> None:
        from livekit import rtc

        self.tracks.append((participant.identity, "audio" if track.kind == rtc.TrackKind.KIND_AUDIO else "video"))
        self._notify()  # a wait on the tracks must not depend on frames arriving after them
        if track.kind != rtc.TrackKind.KIND_AUDIO:
            return
        stream = rtc.AudioStream(track, sample_rate=48_000, num_channels=1)
        self._streams.append(stream)
        task = asyncio.get_running_loop().create_task(self._read(participant.identity, stream))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, identity: str, stream) -> None:
        import numpy as np

        levels = self.levels.setdefault(identity, [])
        async for event in stream:
            samples = np.frombuffer(event.frame.data, dtype=np.int16).astype(np.float32)
            if len(levels) < self.MAX_FRAMES:
                levels.append(float(np.sqrt(np.mean(samples**2))) if samples.size else 0.0)
            self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _on_data(self, packet) -> None:
        import orjson

        try:
            message = orjson.loads(packet.data)
        except orjson.JSONDecodeError:
            message = {"raw": packet.data[:200].decode(errors="replace")}
        if len(self.data) < 10_000:
            who = packet.participant.identity if packet.participant else ""
            self.data.append((who, packet.topic or "", message))
        self._notify()

    def loud_frames(self, identity: str, threshold: float = 300.0) -> int:
        return sum(1 for level in self.levels.get(identity, []) if level > threshold)

    async def wait(self, predicate, timeout_s: float = 60.0, what: str = "condition") -> None:
        """Until `predicate()` holds, re-checked on every frame or message received."""
        changed = self._changed = self._changed or asyncio.Event()
        try:
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}") from None

    async def close(self) -> None:
        for stream in self._streams:
            with contextlib.suppress(Exception):
                await stream.aclose()
        for task in list(self._tasks):
            task.cancel()
        await self.room.disconnect()
