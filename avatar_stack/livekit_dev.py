"""`avatar-stack up` with a `livekit-server` on PATH: a dev-mode LiveKit for the local avatar's voice.

Only when `LIVEKIT_URL` is not set and `AVATAR_STACK_LIVEKIT` is not `off`: the server runs in
dev mode (keys `devkey` / `secret`), on loopback only, so nothing but this machine can use it.
Without the binary, `up` runs as before and the voice goes down the WebSocket.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import httpx

DEV_KEY, DEV_SECRET = "devkey", "secret"


def _port_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick(port: int, kind: int) -> int:
    """LiveKit's usual port if it is free, else any free one."""
    if _port_free(port, kind):
        return port
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wanted(env: dict[str, str]) -> str | None:
    """The binary to start, or None (LiveKit already configured, switched off, or not installed)."""
    if env.get("LIVEKIT_URL") or env.get("AVATAR_STACK_LIVEKIT", "").lower() in ("off", "0", "false", "no"):
        return None
    return shutil.which("livekit-server", path=env.get("PATH"))


def start(binary: str, timeout_s: float = 20.0) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start it and return the process and the settings that point the services at it."""
    port = _pick(7880, socket.SOCK_STREAM)
    tcp = _pick(7881, socket.SOCK_STREAM)
    udp = _pick(7882, socket.SOCK_DGRAM)
    body = (
        f"port: {port}\nrtc:\n  tcp_port: {tcp}\n  udp_port: {udp}\n  use_external_ip: false\n"
        "  enable_loopback_candidate: true\nlogging:\n  level: warn\n"
    )
    proc = subprocess.Popen(
        [binary, "--dev", "--bind", "127.0.0.1", "--node-ip", "127.0.0.1", "--config-body", body],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=0.5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("livekit-server did not start")
        time.sleep(0.1)
    env = {"LIVEKIT_URL": f"ws://127.0.0.1:{port}", "LIVEKIT_API_KEY": DEV_KEY, "LIVEKIT_API_SECRET": DEV_SECRET}
    return proc, env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM starts LiveKit's graceful drain (slow even when empty); a second SIGTERM forces it."""
    for wait_s in (1.0, 5.0):
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            pass
    proc.kill()
    proc.wait(5)

