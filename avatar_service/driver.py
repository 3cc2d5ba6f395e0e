"""What an avatar driver must offer the worker.

The worker owns the session and its turn stream; a driver owns the vendor side (a remote avatar
session, or local TTS) and turns reply text into speech the user sees and hears.
"""

from __future__ import annotations

from typing import Protocol

from common.models import SessionConfig


class AvatarSession(Protocol):
    async def start(self) -> None:
        """Start the avatar and publish `session.ready` (LiveKit url/token for cloud avatars)."""

    async def speak(self, reply_id: str, text: str) -> None:
        """Speak `text`; returns when the avatar has finished saying it, or soon after `interrupt()`."""

    async def interrupt(self) -> None:
        """Stop the avatar's current speech at once (barge-in); the running `speak` returns."""

    async def on_vendor_event(self, event: str, data: dict) -> None:
        """An event the page relayed from the vendor's data channel."""

    async def stop(self, reason: str) -> None:
        """Stop the avatar for good (never leak a paid vendor session). Idempotent."""


class AvatarDriver(Protocol):
    name: str

    async def open(self, session_id: str, config: SessionConfig, *, resumed: bool) -> AvatarSession: ...

    async def aclose(self) -> None: ...
