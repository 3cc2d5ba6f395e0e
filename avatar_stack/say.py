"""`avatar-stack say FILE.wav`: a command-line browser. Streams a WAV in real time, prints events.

It streams the whole file (every question in it), then an open microphone's silence, and exits
once the conversation has settled: the file is sent, every final transcript has been answered (or
ignored), the avatar is not talking, and nothing came for `settle_s`.

Exit codes: 0 after the avatar's last reply, 1 on a fatal `error` event, the session ending, or a
non-fatal error during the conversation (printed, the conversation goes on), 2 on a timeout, 3 when
the gateway cannot be reached or refuses the session.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import httpx
import orjson

from avatar_stack.client import SILENCE_FRAME, Conversation, SessionRefused, create_session, end_session
from common.pcm import FRAME_MS, SAMPLE_RATE, frames, read_wav_16k_mono

SETTLE_S = 3.0  # longer than TURN_MAX_WAIT_S: an unfinished turn may still be answered


class Progress:
    """What the events say about the conversation: is anything still owed?"""

    def __init__(self, quiet_audio: bool) -> None:
        self.quiet_audio = quiet_audio
        self.talking: set[str] = set()
        self.unanswered = 0  # finals since the last reply (or ignore)
        self.replies = 0
        self.errors = 0
        self.fatal = False
        self.ended = False
        self.last_event = time.monotonic()

    def on_event(self, event: dict[str, Any]) -> None:
        self.last_event = time.monotonic()
        kind = event.get("type")
        shown = {k: v for k, v in event.items() if k != "_rx" and not (self.quiet_audio and k == "mouth")}
        print(orjson.dumps(shown).decode(), flush=True)
        if kind == "transcript.final" and event.get("text", "").strip():
            self.unanswered += 1
        elif kind in ("avatar.reply", "transcript.ignored"):
            self.unanswered = 0
            if kind == "avatar.reply":
                self.replies += 1
        elif kind == "avatar.started_talking":
            self.talking.add(event.get("reply_id", ""))
        elif kind == "avatar.stopped_talking":
            self.talking.discard(event.get("reply_id", ""))
        elif kind == "error":
            self.errors += 1
            self.fatal = self.fatal or bool(event.get("fatal"))
        elif kind == "session.ended":
            self.ended = True

    def settled(self, settle_s: float) -> bool:
        return not self.talking and not self.unanswered and time.monotonic() - self.last_event >= settle_s


async def say(
    path: str,
    url: str,
    *,
    timeout_s: float,
    api_key: str | None,
    quiet_audio: bool = True,
    settle_s: float = SETTLE_S,
) -> int:
    pcm = read_wav_16k_mono(path)
    try:
        session = await create_session(url, api_key=api_key)
    except httpx.HTTPError as exc:
        print(f"cannot reach the gateway at {url}: {exc}", file=sys.stderr)
        return 3
    except SessionRefused as exc:
        print(str(exc), file=sys.stderr)
        return 3
    progress = Progress(quiet_audio)
    conv = Conversation(session, on_event=progress.on_event)
    try:
        await conv.connect()
        file_sent = asyncio.Event()
        sender = asyncio.create_task(_stream(conv, pcm, file_sent))
        try:
            # `timeout_s` counts from the end of the file: a long file is streamed in real time first.
            limit = timeout_s + len(pcm) / (2 * SAMPLE_RATE)
            return await asyncio.wait_for(_until_settled(conv, progress, file_sent, settle_s), limit)
        except TimeoutError:
            print(f"timed out {timeout_s:.0f} s after the file before the conversation settled", file=sys.stderr)
            return 2
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    finally:
        await conv.close()
        await end_session(url, session)


async def _until_settled(conv: Conversation, progress: Progress, file_sent: asyncio.Event, settle_s: float) -> int:
    counted_end = False
    while True:
        if progress.fatal or progress.ended or conv.closed:
            return 1
        if file_sent.is_set() and not counted_end:
            counted_end = True  # the file's last words may not have been heard yet: settle from here
            progress.last_event = max(progress.last_event, time.monotonic())
        if counted_end and progress.settled(settle_s):
            if not progress.replies:
                print("the avatar did not reply", file=sys.stderr)
                return 1
            return 1 if progress.errors else 0
        await conv.changed(0.2)


async def _stream(conv: Conversation, pcm: bytes, file_sent: asyncio.Event) -> None:
    """Send the file as 20 ms frames at real-time pace, then silence, like an open microphone."""
    assert conv.ws is not None
    start = time.monotonic()
    sent = 0
    for frame in frames(pcm):
        await conv.ws.send(frame)
        sent += 1
        await _pace(start, sent)
    file_sent.set()
    while True:
        await conv.ws.send(SILENCE_FRAME)
        sent += 1
        await _pace(start, sent)


async def _pace(start: float, sent: int) -> None:
    delay = start + sent * FRAME_MS / 1000 - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
