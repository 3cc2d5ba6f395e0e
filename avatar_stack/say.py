"""`avatar-stack say FILE.wav`: a command-line browser. Streams a WAV in real time, prints events.

Exit codes: 0 after the avatar finished its reply, 1 on an `error` event, 2 on a timeout,
3 when the gateway cannot be reached or refuses the session.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import orjson
import websockets

from common.pcm import FRAME_BYTES, FRAME_MS, frames, read_wav_16k_mono

SILENCE = b"\x00" * FRAME_BYTES


async def say(path: str, url: str, *, timeout_s: float, api_key: str | None, quiet_audio: bool = True) -> int:
    pcm = read_wav_16k_mono(path)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        try:
            resp = await http.post("/v1/sessions", json={}, headers=headers)
        except httpx.HTTPError as exc:
            print(f"cannot reach the gateway at {url}: {exc}", file=sys.stderr)
            return 3
        if resp.status_code != 201:
            print(f"session refused ({resp.status_code}): {resp.text}", file=sys.stderr)
            return 3
        created = resp.json()
        sid, token = created["session_id"], created["token"]
        try:
            async with websockets.connect(f"{created['ws_url']}?token={token}", max_size=2**22) as ws:
                sender = asyncio.create_task(_stream(ws, pcm))
                try:
                    return await asyncio.wait_for(_receive(ws, quiet_audio), timeout_s)
                except TimeoutError:
                    print(f"timed out after {timeout_s:.0f} s without an avatar reply", file=sys.stderr)
                    return 2
                finally:
                    sender.cancel()
                    await asyncio.gather(sender, return_exceptions=True)
        finally:
            await http.delete(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"})


async def _stream(ws: websockets.ClientConnection, pcm: bytes) -> None:
    """Send the file as 20 ms frames at real-time pace, then silence, like an open microphone."""
    start = time.monotonic()
    sent = 0
    for frame in frames(pcm):
        await ws.send(frame)
        sent += 1
        await _pace(start, sent)
    while True:
        await ws.send(SILENCE)
        sent += 1
        await _pace(start, sent)


async def _pace(start: float, sent: int) -> None:
    delay = start + sent * FRAME_MS / 1000 - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _receive(ws: websockets.ClientConnection, quiet_audio: bool) -> int:
    heard_reply = False
    async for message in ws:
        if isinstance(message, bytes):
            continue  # the local avatar's speech audio, announced by the avatar.audio event
        event = orjson.loads(message)
        kind = event.get("type")
        if kind == "avatar.audio" and quiet_audio:
            event.pop("mouth", None)
        print(orjson.dumps(event).decode(), flush=True)
        if kind == "error":
            return 1
        if kind == "avatar.reply":
            heard_reply = True
        if kind == "avatar.stopped_talking" and heard_reply:
            return 0
        if kind == "session.ended":
            return 1
    return 1
