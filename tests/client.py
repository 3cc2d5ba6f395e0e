"""A test browser: a real WebSocket client that streams PCM and collects the events it gets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets

from common.pcm import FRAME_BYTES, FRAME_MS, frames


@dataclass
class Session:
    session_id: str
    token: str
    ws_url: str


async def create_session(base_url: str, body: dict | None = None) -> Session:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        resp = await http.post("/v1/sessions", json=body or {})
        assert resp.status_code == 201, resp.text
        data = resp.json()
        return Session(data["session_id"], data["token"], data["ws_url"])


@dataclass
class Browser:
    """Collects every event; `audio_bytes` counts the binary audio it received."""

    session: Session
    ws: websockets.ClientConnection | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    audio_bytes: int = 0
    close_code: int | None = None
    _reader: asyncio.Task | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self, token: str | None = None, last_event: str | None = None, origin: str | None = None) -> None:
        """`origin`: the Origin header a browser page would send (none by default, like an SDK)."""
        url = f"{self.session.ws_url}?token={token if token is not None else self.session.token}"
        if last_event:
            url += f"&last_event={last_event}"
        self.ws = await websockets.connect(url, max_size=2**22, origin=origin)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self.audio_bytes += len(message)
                else:
                    event = orjson.loads(message)
                    event["_rx"] = time.monotonic()
                    self.events.append(event)
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self._changed.set()

    async def wait_for(self, predicate, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until an event matches `predicate`; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._reader is not None and self._reader.done()):
                raise AssertionError(f"no matching event; got {[e.get('type') for e in self.events]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def wait_type(self, kind: str, timeout_s: float = 60.0) -> dict[str, Any]:
        return await self.wait_for(lambda e: e.get("type") == kind, timeout_s)

    async def wait_closed(self, timeout_s: float = 10.0) -> int | None:
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout_s)
        return self.close_code

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == kind]

    async def stream(self, pcm: bytes, *, speed: float = 1.0, trailing_silence_s: float = 1.5) -> float:
        """Send PCM as 20 ms frames at `speed`x real time; returns the monotonic end time of the speech."""
        assert self.ws is not None
        start = time.monotonic()
        sent = 0
        chunks = frames(pcm)
        silence = [b"\x00" * FRAME_BYTES] * int(trailing_silence_s * 1000 / FRAME_MS)
        speech_end = start
        for i, frame in enumerate(chunks + silence):
            await self.ws.send(frame)
            sent += 1
            if i == len(chunks) - 1:
                speech_end = time.monotonic()
            delay = start + sent * FRAME_MS / 1000 / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        return speech_end

    async def send_json(self, payload: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(orjson.dumps(payload).decode())

    async def close(self, *, end: bool = True) -> None:
        """Leave like a page does: end the session (unless `end=False`), then close the socket."""
        if self.ws is not None:
            if end and self.close_code is None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await self.send_json({"type": "end"})
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
