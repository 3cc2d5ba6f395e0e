"""What an avatar driver must offer the worker.

The worker owns the session and its turn stream; a driver owns the vendor side (a remote avatar
session, or local TTS) and turns reply text into speech the user sees and hears.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from common.models import ErrorEvent, SessionConfig

Speech = str | AsyncIterator[str]
"""What `speak` says: a whole text, or sentences as a brain produces them (each one complete)."""


class AvatarError(Exception):
    """A failure the user must be told about; `code`/`message` become an `error` event as they are."""

    def __init__(self, code: str, message: str, *, fatal: bool = True) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal

    def event(self) -> ErrorEvent:
        return ErrorEvent(code=self.code, message=self.message, fatal=self.fatal)


class AvatarSession(Protocol):
    answers_itself: bool
    """True when the vendor writes the answer itself (HeyGen `talk` with its knowledge base): the
    worker then passes the user's words and publishes no reply text of its own."""

    async def start(self) -> None:
        """Start the avatar and publish `session.ready` (LiveKit url/token for cloud avatars).

        Raises `AvatarError` (already published to the browser) when it cannot start."""

    async def speak(self, reply_id: str, text: Speech, *, user_text: str | None = None) -> str | None:
        """Speak `text` (a string, or an async iterator of sentences to start on before the reply
        is complete); returns when the avatar has finished saying it, or soon after `interrupt()`.

        Returns what the avatar actually said: all of it, or after an interrupt the sentences that
        had started playing (the brain saves only that as the assistant's turn). None when the
        driver cannot tell (the vendor wrote the answer itself)."""

    async def interrupt(self) -> None:
        """Stop the avatar's current speech at once (barge-in); the running `speak` returns."""

    async def pause(self) -> bool:
        """Go quiet now but keep the place (the user may have only coughed). False when this
        avatar cannot pause (then the worker interrupts once the words are clear)."""

    async def resume(self) -> None:
        """Continue after `pause()` from where it stopped."""

    async def on_user_speaking(self, speaking: bool) -> None:
        """The user started (True) or finished (False) talking: a listening pose, where the vendor has one."""

    async def on_vendor_event(self, event: str, data: dict) -> None:
        """An event the page relayed from the vendor's data channel."""

    async def stop(self, reason: str) -> None:
        """Stop the avatar for good (never leak a paid vendor session). Idempotent."""


class AvatarDriver(Protocol):
    name: str

    async def open(self, session_id: str, config: SessionConfig, *, resumed: bool) -> AvatarSession: ...

    async def aclose(self) -> None: ...


async def sentences_of(text: Speech, max_chars: int = 250) -> AsyncIterator[str]:
    """`text` as sentences, whether it came whole or already as a stream of sentences."""
    from avatar_service.responder import split_sentences

    if isinstance(text, str):
        for sentence in split_sentences(text, max_chars):
            yield sentence
        return
    async for sentence in text:
        if sentence.strip():
            yield sentence
