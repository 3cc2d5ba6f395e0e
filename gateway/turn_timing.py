"""Per-turn latency on the gateway: end of speech (where the server's VAD ended it) → the reply's
first audio sent to the page, as the histogram `gateway_turn_speech_end_to_first_audio_seconds`.

The STT worker reports where speech ended in session audio time (`transcript.final.end_s`: seconds
of the PCM the page sent). The gateway received that PCM itself, so it knows when the frame holding
that instant arrived here; the reply's first `avatar.audio` (local voice) or `avatar.started_talking`
(voice over LiveKit, cloud avatars) leaving this gateway ends the measurement. One clock (this
process's), no producer clocks. Only a socket that carried the session's audio from its start can
map audio time (`last_event` not given); a reconnected one skips it.
"""

from __future__ import annotations

from collections import deque

import orjson
from prometheus_client import Histogram

BYTES_PER_S = 16000 * 2
TURN_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0)

SPEECH_END_TO_FIRST_AUDIO = Histogram(
    "gateway_turn_speech_end_to_first_audio_seconds",
    "End of the user's speech (server VAD, as its audio reached the gateway) -> the reply's first audio sent",
    buckets=TURN_BUCKETS,
)
FIRST_AUDIO_TYPES = (b'"type":"avatar.audio"', b'"type":"avatar.started_talking"')


class TurnTimer:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bytes = 0
        self.arrivals: deque[tuple[int, float]] = deque(maxlen=3000)  # (end byte offset, arrival): 60 s
        self.ends: dict[str, float] = {}  # turn (utterance) id -> arrival of its end of speech

    def audio(self, nbytes: int, now: float) -> None:
        if self.enabled:
            self.bytes += nbytes
            self.arrivals.append((self.bytes, now))

    def arrival_of(self, seconds: float) -> float | None:
        """When the audio at session time `seconds` arrived (None: not seen by this socket)."""
        at = seconds * BYTES_PER_S
        if not self.arrivals or at > self.arrivals[-1][0] or at < self.arrivals[0][0] - BYTES_PER_S * 0.1:
            return None
        for end, arrived in self.arrivals:  # oldest first; a turn's end is recent, but 3000 is small
            if end >= at:
                return arrived
        return None

    def event(self, raw: bytes, now: float) -> None:
        """Look at one live event on its way to the page."""
        if not self.enabled:
            return
        if b'"type":"transcript.final"' in raw:
            event = orjson.loads(raw)
            end = event.get("end_s")
            arrived = self.arrival_of(end) if isinstance(end, int | float) else None
            if arrived is not None and event.get("text", "").strip():
                self.ends[str(event.get("utterance_id"))] = arrived
                while len(self.ends) > 16:
                    self.ends.pop(next(iter(self.ends)))
        elif self.ends and any(t in raw for t in FIRST_AUDIO_TYPES):
            reply_id = str(orjson.loads(raw).get("reply_id", ""))
            # The avatar worker names a reply "r-<turn id>"; a voice turn's id is its utterance id.
            arrived = self.ends.pop(reply_id[2:], None) if reply_id.startswith("r-") else None
            if arrived is not None:
                SPEECH_END_TO_FIRST_AUDIO.observe(max(0.0, now - arrived))
