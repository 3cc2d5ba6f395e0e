"""What an STT engine must offer the worker: a per-session stream, audio in, results out.

The worker owns the session (claiming, cursors, publishing); an engine only turns 16 kHz mono
PCM16 into `SttResult`s. Times are *session audio* seconds: the engine adds `start_offset_s`
(the audio time at the resume cursor) so timestamps stay monotonic across a takeover.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

ResultKind = Literal["speech_started", "interim", "final", "checkpoint"]


@dataclass(frozen=True)
class SttResult:
    """One thing the engine learned.

    - `speech_started`: the user began speaking (barge-in signal).
    - `interim`: provisional text of the current utterance (replaces the previous interim).
    - `final`: the finished utterance, exactly once per utterance.
    - `checkpoint`: all audio before `end_s` is fully handled (silence, or covered by finals);
      the worker may move its resume cursor there.
    `utterance_id` is derived from the utterance's start in session audio time, so replaying the
    same audio after a takeover yields the same id (idempotent turns).
    """

    kind: ResultKind
    text: str = ""
    utterance_id: str = ""
    start_s: float = 0.0
    end_s: float = 0.0


class SttError(Exception):
    """An engine failure. `fatal` ones end the session with a clear message (e.g. bad API key)."""

    def __init__(self, code: str, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


class SttStream(Protocol):
    async def send(self, pcm: bytes) -> None:
        """Feed 16 kHz mono PCM16 audio (any length, even number of bytes)."""

    async def finalize(self) -> None:
        """The browser paused or stopped sending: flush what is pending into a final."""

    async def close(self) -> None:
        """End of session: flush, release the engine's resources (sockets, threads)."""

    def results(self) -> AsyncIterator[SttResult]:
        """Results in order; ends after `close()` has flushed everything."""


class SttEngine(Protocol):
    name: str

    async def load(self) -> None:
        """Get ready before the first session (load and warm a model); cheap engines do nothing."""

    async def open(self, session_id: str, *, language: str, start_offset_s: float) -> SttStream: ...

    async def aclose(self) -> None:
        """Release engine-wide resources at worker shutdown."""


def utterance_id(start_s: float) -> str:
    return f"u{round(start_s * 1000):09d}"
