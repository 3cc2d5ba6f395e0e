"""A Python client of the gateway: create a session, open its WebSocket, stream audio, read events.

What `avatar-stack say`, the benchmarks and the tests use; also a starting point for your own
server-side or script clients (see examples/client.py):

    session = await create_session("http://127.0.0.1:8000", api_key="...")   # GATEWAY_API_KEY, if set
    conv = Conversation(session)
    await conv.connect()
    await conv.send_text("What is avatar stack?")
    reply = await conv.wait_type("avatar.reply")
    await conv.close()

Message shapes: `common/models.py` (JSON Schema in docs/protocol.schema.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets

from common.pcm import FRAME_BYTES, FRAME_MS, frames

SILENCE_FRAME = b"\x00" * FRAME_BYTES


class SessionRefused(Exception):
    """The gateway did not create the session (`status`: the HTTP status; `detail`: its reason)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"session refused ({status}): {detail}")
        self.status = status
        self.detail = detail


@dataclass
class Session:
    """What `POST /v1/sessions` returns: all a page or client needs (never the API key)."""

    session_id: str
    token: str
    ws_url: str


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def create_session(
    base_url: str, body: dict | None = None, *, api_key: str | None = None, timeout_s: float = 10
) -> Session:
    """`POST /v1/sessions`; raises SessionRefused unless it answers 201."""
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as http:
        resp = await http.post("/v1/sessions", json=body or {}, headers=auth_headers(api_key))
        if resp.status_code != 201:
            raise SessionRefused(resp.status_code, resp.text)
        data = resp.json()
        return Session(data["session_id"], data["token"], data["ws_url"])


async def end_session(base_url: str, session: Session) -> int:
    """`DELETE /v1/sessions/{sid}` with the session's own token; returns the HTTP status."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        resp = await http.delete(f"/v1/sessions/{session.session_id}", headers=auth_headers(session.token))
        return resp.status_code


@dataclass
class Conversation:
    """One session's WebSocket: collects every event (`events`, each with `_rx`, the monotonic time it
    arrived); `audio_bytes` counts the binary audio it received."""

    session: Session
    ws: websockets.ClientConnection | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    audio_bytes: int = 0
    close_code: int | None = None
    on_event: Callable[[dict[str, Any]], None] | None = None
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
                    if self.on_event is not None:
                        self.on_event(event)
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            self._changed.set()

    @property
    def closed(self) -> bool:
        return self._reader is not None and self._reader.done()

    async def changed(self, timeout_s: float) -> None:
        """Wait until an event arrives or the socket closes (or `timeout_s` passes)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def wait_for(self, predicate, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until an event matches `predicate`; returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                raise AssertionError(f"no matching event; got {[e.get('type') for e in self.events]}")
            await self.changed(remaining)

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
        silence = [SILENCE_FRAME] * int(trailing_silence_s * 1000 / FRAME_MS)
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

    async def send_text(self, text: str) -> None:
        """A typed turn."""
        await self.send_json({"type": "text", "text": text})

    async def close(self, *, end: bool = True) -> None:
        """Leave like a page does: end the session (unless `end=False`), then close the socket."""
        if self.ws is not None:
            if end and self.close_code is None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await self.send_json({"type": "end"})
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


Browser = Conversation  # what the tests call it: a browser without a page
