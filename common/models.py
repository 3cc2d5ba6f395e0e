"""Typed messages: browser ↔ gateway, and the bus between services.

Every message is a pydantic model discriminated by `type`, so the gateway, the workers and the
tests all parse and build the same shapes. Events carry a server timestamp `ts` (unix ms) so the
page can show where time went.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

AVATAR_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


def now_ms() -> int:
    return int(time.time() * 1000)


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Event(BaseModel):
    """Base of events sent down to the browser."""

    model_config = ConfigDict(extra="forbid")
    ts: int = Field(default_factory=now_ms)


# ---------------------------------------------------------------- REST


class SessionConfig(_Msg):
    """Per-session choices a client may make; the server fills in defaults."""

    avatar_id: str | None = Field(default=None, pattern=AVATAR_ID_PATTERN)
    voice_id: str | None = Field(default=None, pattern=AVATAR_ID_PATTERN)
    language: str = Field(default="en", pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})?$")


class SessionCreated(BaseModel):
    session_id: str
    token: str
    ws_url: str


class SessionInfo(BaseModel):
    session_id: str
    state: str
    created_at: float
    connected: bool
    stt_owner: str | None = None
    avatar_owner: str | None = None
    ended_reason: str | None = None


# ---------------------------------------------------------------- browser → gateway


class TextIn(_Msg):
    type: Literal["text"]
    text: str = Field(min_length=1)


class InterruptIn(_Msg):
    type: Literal["interrupt"]


class AvatarEventIn(_Msg):
    """An event the page saw on the vendor's LiveKit data channel, relayed to the server."""

    model_config = ConfigDict(extra="allow")
    type: Literal["avatar.event"]
    event: str = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _payload_fits_the_bus(self) -> AvatarEventIn:
        """The extra fields are relayed as JSON on the bus: refuse here what orjson cannot write
        (integers past 64 bits), so the page gets `bad_message` instead of a dropped socket."""
        try:
            orjson.dumps(self.model_extra or {})
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"payload cannot be relayed: {exc}") from None
        return self


class EndIn(_Msg):
    type: Literal["end"]


class PingIn(_Msg):
    type: Literal["ping"]


BrowserMessage = Annotated[
    TextIn | InterruptIn | AvatarEventIn | EndIn | PingIn, Field(discriminator="type")
]
browser_message_adapter: TypeAdapter[BrowserMessage] = TypeAdapter(BrowserMessage)


# ---------------------------------------------------------------- gateway → browser (events)


class LiveKitInfo(BaseModel):
    url: str
    token: str
    avatar_identity: str | None = None  # the avatar's participant: the page takes tracks only from it


class SessionReady(_Event):
    type: Literal["session.ready"] = "session.ready"
    provider: str
    stt_provider: str | None = None
    livekit: LiveKitInfo | None = None
    audio_sample_rate: int | None = None  # set by the local avatar: rate of its binary audio


class TranscriptInterim(_Event):
    type: Literal["transcript.interim"] = "transcript.interim"
    utterance_id: str
    text: str


class TranscriptFinal(_Event):
    type: Literal["transcript.final"] = "transcript.final"
    utterance_id: str
    text: str
    start_s: float
    end_s: float


class AvatarReply(_Event):
    type: Literal["avatar.reply"] = "avatar.reply"
    reply_id: str
    turn_id: str
    text: str
    # The user went on right after their last turn (it was not finished after all): that turn's
    # reply, this id, was dropped, and this reply answers both turns as one.
    replaces: str | None = None


class AvatarStartedTalking(_Event):
    type: Literal["avatar.started_talking"] = "avatar.started_talking"
    reply_id: str


class AvatarStoppedTalking(_Event):
    type: Literal["avatar.stopped_talking"] = "avatar.stopped_talking"
    reply_id: str
    interrupted: bool = False


class AvatarPaused(_Event):
    """The avatar went quiet because the user started talking over it; `avatar.resumed` follows
    if no words come (a cough, a door, a backchannel), else `avatar.stopped_talking`."""

    type: Literal["avatar.paused"] = "avatar.paused"
    reply_id: str


class AvatarResumed(_Event):
    type: Literal["avatar.resumed"] = "avatar.resumed"
    reply_id: str


class TranscriptIgnored(_Event):
    """A final the avatar will not answer: its own voice heard back (`echo`) or a backchannel
    ("mhm") said over it. The page shows it struck through, or not at all."""

    type: Literal["transcript.ignored"] = "transcript.ignored"
    utterance_id: str
    reason: Literal["echo", "backchannel"]


class AvatarAudio(_Event):
    """Announces the binary frame that follows it: one chunk of the local avatar's speech.

    `mouth` holds mouth openness (0..1) for each `mouth_hop_ms` of the chunk, so the page can
    animate the face in step with what it plays.
    """

    type: Literal["avatar.audio"] = "avatar.audio"
    reply_id: str
    seq: int
    sample_rate: int
    samples: int
    mouth: list[float]
    mouth_hop_ms: int


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str
    message: str
    fatal: bool = False


class SessionEnded(_Event):
    type: Literal["session.ended"] = "session.ended"
    reason: str


Event = Annotated[
    SessionReady
    | TranscriptInterim
    | TranscriptFinal
    | AvatarReply
    | AvatarStartedTalking
    | AvatarStoppedTalking
    | AvatarPaused
    | AvatarResumed
    | TranscriptIgnored
    | AvatarAudio
    | ErrorEvent
    | SessionEnded,
    Field(discriminator="type"),
]
event_adapter: TypeAdapter[Event] = TypeAdapter(Event)


# ---------------------------------------------------------------- bus: turns:{sid}


class TurnSegment(_Msg):
    """One stretch of speech between pauses; a voice turn is one or more of them."""

    text: str
    started_at: int  # unix ms when its first audio reached the STT worker (≈ when it was spoken)
    level_db: float | None = None  # its loudest speech (dBFS): the user near the mic is louder than echo
    recent_level_db: float | None = None  # ... of its last RECENT_LEVEL_S: who was speaking as it ended


class UserTurn(_Msg):
    """A finished user turn: a final utterance (voice) or a typed message (text)."""

    type: Literal["user.turn"] = "user.turn"
    turn_id: str
    text: str
    source: Literal["voice", "text"]
    segments: list[TurnSegment] = Field(default_factory=list)  # voice: the pieces, for the echo guard
    ts: int = Field(default_factory=now_ms)


class SpeechStarted(_Msg):
    """Voice activity began (maybe speech, maybe a cough): the avatar takes a listening pose; it
    stops talking only for words (`user.speech`)."""

    type: Literal["user.speech_started"] = "user.speech_started"
    ts: int = Field(default_factory=now_ms)


class UserSpeech(_Msg):
    """Words of the utterance in progress (an interim): barge-in needs words, not a bare onset."""

    type: Literal["user.speech"] = "user.speech"
    utterance_id: str
    text: str
    started_at: int = 0  # unix ms when the utterance's first audio reached the STT worker
    held: bool = False  # a finished segment of a turn the STT worker holds open (more may follow)
    level_db: float | None = None  # loudest speech (dBFS) of its latest audio, for the echo guard
    ts: int = Field(default_factory=now_ms)


class UserInterrupt(_Msg):
    type: Literal["user.interrupt"] = "user.interrupt"
    ts: int = Field(default_factory=now_ms)


class AvatarVendorEvent(_Msg):
    """A vendor data-channel event relayed by the page (e.g. avatar_start_talking)."""

    type: Literal["avatar.vendor_event"] = "avatar.vendor_event"
    event: str
    data: dict[str, Any] = Field(default_factory=dict)
    ts: int = Field(default_factory=now_ms)


class SessionEnd(_Msg):
    """In-band end marker: wakes the owning worker so it stops and cleans up."""

    type: Literal["session.end"] = "session.end"
    reason: str


Turn = Annotated[
    UserTurn | SpeechStarted | UserSpeech | UserInterrupt | AvatarVendorEvent | SessionEnd,
    Field(discriminator="type"),
]
turn_adapter: TypeAdapter[Turn] = TypeAdapter(Turn)
