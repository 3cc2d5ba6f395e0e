"""A protocol-faithful fake of Deepgram's live `/v1/listen` WebSocket, on loopback, for tests.

Wire protocol as in `../shared/reference/vendor-protocols.md` §1:
- Handshake: `Authorization: Token <api_key>` or HTTP 401; the query is validated (bad or missing
  `encoding`/`sample_rate`, non-boolean flags, `utterance_end_ms` < 1000 or without
  `interim_results=true`, `keyterm` on a non-Nova-3 model, ...) or HTTP 400 with a `dg-error`
  header. Every response carries `dg-request-id`. `reject_next()` scripts transient 5xx/429s.
- Audio: binary frames of linear16 PCM. A zero-length binary frame closes the socket (1011), as the
  docs warn. Any frame, binary or text, resets the idle timer; after `idle_timeout_s` without one
  the socket is closed with 1011 `NET-0001`.
- Control: `KeepAlive` (no reply), `Finalize` (one `is_final`, `from_finalize` Results, maybe
  empty), `CloseStream` (remaining finals, then `Metadata`, then close 1000). Unknown types are
  ignored.
- Results carry `start`/`duration` and word timings relative to the audio received on *this*
  socket, like the real service.

How it "recognizes" speech: audio carries its own transcript. `Speech` turns words into PCM where
each word is a burst of non-zero samples spelling the word (one code point per sample, then a -1
marker, repeated for the word's length) and silence is zeros. The recognizer reads the bursts in
the audio it receives, so it is fully driven by audio time: when a word's burst ends it sends an
interim for the open segment (with `interim_every_s`, on a clock instead: Deepgram's own example
shows one a second); every `words_per_final` words it sends an `is_final` segment; after
`endpointing` ms of silence it sends the `speech_final` result (or, with `speech_final=False`, a
noisy room where VAD never endpoints, a plain final); after `utterance_end_ms` of silence after the
last word, `UtteranceEnd`; a word burst after silence first gets `SpeechStarted`; long silence gets
an empty final every `silence_final_s`. Because words come from the audio, resending the same audio
on a new socket yields the same words at the same audio times, as a real recognizer would, which
is what reconnect tests need.

Real sound (anything with samples below -2, which word bursts never have: noise, the avatar's own
voice leaking into the microphone) is "foreign": like Deepgram's VAD, the fake answers its onset
with `SpeechStarted` whatever it is, and transcribes it only as far as a test scripted it with
`hear_foreign("words it says")`: one scripted word per `foreign_word_s` of loud audio, as interims
and finals like any other words. Unscripted foreign sound (a cough, a door) gives `SpeechStarted`
and no words, as the real service does for non-speech. `Speech().noise(s)` makes such a burst.

Records for assertions: `handshakes` (every upgrade attempt, accepted or not) and `connections`
(query, every frame in order: `int` byte counts for audio, `str` types for text messages, what was
sent back, how it closed). `drop_next()` makes the next connection fail mid-stream, after N bytes
of audio or on a given control message, abruptly (no close frame) or with 1011; `disconnect()`
fails a live one now.

    async with FakeDeepgram(api_key="k", idle_timeout_s=1.5) as fake:
        speech = Speech().say("hello there").pause(1.2)
        ...  # point the client at fake.url, send speech.pcm
        assert fake.connections[0].controls == ["CloseStream"]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

SAMPLE_RATE = 16_000
BYTES_PER_S = SAMPLE_RATE * 2
WORD_END = -1  # sample value that ends a word's spelling inside its burst
FOREIGN_BELOW = -2  # a sample below this is real sound, never a spelled word
FOREIGN_LOUD = 300  # RMS (PCM16) of a 20 ms frame of foreign sound that counts as voiced
ENCODINGS = {"linear16", "linear32", "flac", "alaw", "mulaw", "amr-nb", "amr-wb", "opus", "ogg-opus", "speex", "g729"}
BOOLEAN_PARAMS = {
    "interim_results", "vad_events", "smart_format", "punctuate", "multichannel", "diarize", "dictation",
    "detect_entities", "numerals", "profanity_filter", "filler_words", "no_delay", "mip_opt_out",
}
MODEL_PREFIXES = ("nova-3", "nova-2", "nova", "enhanced", "base", "whisper")


# --- test audio -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpokenWord:
    text: str
    start_s: float
    end_s: float


class Speech:
    """Builds PCM the fake recognizes, and remembers where each word is.

    `Speech().say("hello there").pause(1.0).say("bye")`: each word lasts `word_s`, words within
    (and between) `say()` calls are separated by `gap_s` of silence, `pause()` adds silence.
    """

    def __init__(self, *, word_s: float = 0.3, gap_s: float = 0.1) -> None:
        self.word_s = word_s
        self.gap_s = gap_s
        self.words: list[SpokenWord] = []
        self._samples: list[np.ndarray] = []
        self._n = 0
        self._after_word = False

    def say(self, text: str) -> Speech:
        for word in text.split():
            if self._after_word:
                self.pause(self.gap_s)
            codes = [ord(c) for c in word] + [WORD_END]
            if max(codes) > 32767:
                raise ValueError(f"cannot spell {word!r} in PCM16")
            n = round(self.word_s * SAMPLE_RATE)
            if n < len(codes):
                raise ValueError(f"{word!r} needs a longer word_s")
            start = self._n
            self._append(np.resize(np.array(codes, dtype="<i2"), n))
            self.words.append(SpokenWord(word, start / SAMPLE_RATE, self._n / SAMPLE_RATE))
            self._after_word = True
        return self

    def pause(self, seconds: float) -> Speech:
        self._append(np.zeros(round(seconds * SAMPLE_RATE), dtype="<i2"))
        self._after_word = False
        return self

    def noise(self, seconds: float, *, seed: int = 0) -> Speech:
        """A burst of non-speech sound (a cough, a door): `SpeechStarted` and no words."""
        rng = np.random.default_rng(seed)
        self._append(np.clip(rng.normal(0, 4000, round(seconds * SAMPLE_RATE)), -32768, 32767).astype("<i2"))
        self._after_word = False
        return self

    def _append(self, samples: np.ndarray) -> None:
        self._samples.append(samples)
        self._n += len(samples)

    @property
    def pcm(self) -> bytes:
        return b"".join(s.tobytes() for s in self._samples)

    @property
    def duration_s(self) -> float:
        return self._n / SAMPLE_RATE

    @property
    def text(self) -> str:
        return " ".join(w.text for w in self.words)

    def byte_at(self, t: float) -> int:
        """Byte offset of audio time `t` (sample aligned)."""
        return round(t * SAMPLE_RATE) * 2


# --- records ----------------------------------------------------------------------------------


@dataclass
class Handshake:
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    status: int


@dataclass
class FakeConnection:
    """One accepted socket, as the server saw it."""

    index: int
    request_id: str
    query: dict[str, list[str]]
    frames: list[int | str] = field(default_factory=list)  # audio byte counts and text types, in order
    sent: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None  # what the server closed with; None if the client closed first
    close_reason: str = ""
    dropped: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    reading: asyncio.Event = field(default_factory=asyncio.Event)  # cleared: a stalled engine reads nothing
    ws: ServerConnection | None = field(default=None, repr=False)

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    @property
    def chunk_sizes(self) -> list[int]:
        return [f for f in self.frames if isinstance(f, int)]

    @property
    def audio_bytes(self) -> int:
        return sum(self.chunk_sizes)

    @property
    def controls(self) -> list[str]:
        return [f for f in self.frames if isinstance(f, str)]

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m.get("type") == kind]


@dataclass(frozen=True)
class _Drop:
    after_bytes: int | None
    at_control: str | None
    how: Literal["abort", "1011"]


# --- the recognizer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Word:
    text: str
    start: float
    end: float


def _r(t: float) -> float:
    return round(t, 3)


class _Recognizer:
    """Turns one socket's audio into Deepgram messages, in audio time (see module docstring)."""

    def __init__(
        self, query: dict[str, list[str]], request_id: str, *,
        words_per_final: int, speech_final: bool, silence_final_s: float | None,
        foreign: deque[str] | None = None, foreign_word_s: float = 0.3, interim_every_s: float = 0.0,
    ) -> None:
        self.foreign = foreign if foreign is not None else deque()
        self.foreign_word_s = foreign_word_s
        self.interim_every_s = interim_every_s
        self.unreported_since: float | None = None  # end of the first word no interim has carried yet
        self.request_id = request_id
        self.words_per_final = words_per_final
        self.speech_final = speech_final
        self.silence_final_s = silence_final_s
        self.interim = _first(query, "interim_results") == "true"
        self.vad_events = _first(query, "vad_events") == "true"
        endpointing = _first(query, "endpointing") or "10"  # Deepgram's default
        self.endpointing_s = None if endpointing == "false" else int(endpointing) / 1000
        utterance_end = _first(query, "utterance_end_ms")
        self.utterance_end_s = int(utterance_end) / 1000 if utterance_end and self.interim else None
        self.samples = 0
        self.carry = b""
        self.window_start = 0.0
        self.pending: list[_Word] = []
        self.in_word = False
        self.word_start = 0.0
        self.code: list[int] = []
        self.utterance_open = False
        self.last_word_end = 0.0
        self.utterance_end_due = False

    @property
    def now(self) -> float:
        return self.samples / SAMPLE_RATE

    def feed(self, pcm: bytes) -> list[dict[str, Any]]:
        data = self.carry + pcm
        usable = len(data) // 2 * 2
        self.carry = data[usable:]
        samples = np.frombuffer(data[:usable], dtype="<i2")
        out: list[dict[str, Any]] = []
        if not len(samples):
            return out
        if (samples < FOREIGN_BELOW).any():
            self._feed_foreign(samples, out)
            self.samples += len(samples)
            return out
        voiced = samples != 0
        edges = (np.flatnonzero(voiced[1:] != voiced[:-1]) + 1).tolist()
        for lo, hi in zip([0, *edges], [*edges, len(samples)], strict=True):
            t0, t1 = (self.samples + lo) / SAMPLE_RATE, (self.samples + hi) / SAMPLE_RATE
            if voiced[lo]:
                if not self.in_word:
                    self._advance(t0, out)
                    self._start_word(t0, out)
                if len(self.code) < 256:
                    self.code.extend(samples[lo:hi][: 256 - len(self.code)].tolist())
            else:
                if self.in_word:
                    self._end_word(t0, out)
                self._advance(t1, out)
        self.samples += len(samples)
        return out

    def _feed_foreign(self, samples: np.ndarray, out: list[dict[str, Any]]) -> None:
        """Real sound, 20 ms at a time: loud frames are voice (scripted words) or noise (none)."""
        frame = SAMPLE_RATE // 50
        for lo in range(0, len(samples), frame):
            chunk = samples[lo:lo + frame].astype(np.float32)
            t0 = (self.samples + lo) / SAMPLE_RATE
            t1 = t0 + len(chunk) / SAMPLE_RATE
            loud = float(np.sqrt(np.mean(chunk**2))) > FOREIGN_LOUD
            if loud:
                if not self.in_word:
                    self._advance(t0, out)
                    self._start_word(t0, out)
                    word = self.foreign.popleft() if self.foreign else None
                    self.code = [ord(c) for c in word] + [WORD_END] if word else [0]
                elif self.code != [0] and t1 - self.word_start >= self.foreign_word_s:
                    self._end_word(t1, out)  # a scripted word per foreign_word_s of voice
            elif self.in_word:
                if self.code == [0]:  # noise ends: no word was heard
                    self.in_word, self.last_word_end = False, t0
                else:
                    self._end_word(t0, out)
            self._advance(t1, out)

    def finalize(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.in_word:
            self._end_word(self.now, out)
        out.append(self._results(self.pending, self.window_start, self.now, is_final=True, from_finalize=True))
        self.window_start, self.pending, self.utterance_open = self.now, [], False
        return out

    def close(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.in_word:
            self._end_word(self.now, out)
        if self.pending:
            out.append(self._results(self.pending, self.window_start, self.now, is_final=True))
            self.window_start, self.pending = self.now, []
        out.append({
            "type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
            "sha256": "0" * 64, "created": datetime.now(UTC).isoformat(), "duration": _r(self.now), "channels": 1,
        })
        return out

    def _start_word(self, t: float, out: list[dict[str, Any]]) -> None:
        self.in_word, self.word_start, self.code = True, t, []
        self.utterance_end_due = False
        if not self.utterance_open:
            self.utterance_open = True
            if self.vad_events:
                out.append({"type": "SpeechStarted", "channel": [0, 1], "timestamp": _r(t)})

    def _end_word(self, t: float, out: list[dict[str, Any]]) -> None:
        if self.interim_every_s:
            self._advance(t, out)  # interims due during the word carry only the words before it
        spelled = self.code[: self.code.index(WORD_END)] if WORD_END in self.code else self.code
        self.pending.append(_Word("".join(chr(c) for c in spelled if c > 0) or "?", self.word_start, t))
        self.in_word, self.last_word_end = False, t
        self.utterance_end_due = self.utterance_end_s is not None
        if self.interim and not self.interim_every_s:
            out.append(self._results(self.pending, self.window_start, t, is_final=False))
        elif self.interim and self.unreported_since is None:
            self.unreported_since = t
        if len(self.pending) >= self.words_per_final:
            out.append(self._results(self.pending, self.window_start, t, is_final=True))
            self.window_start, self.pending = t, []

    def _advance(self, t: float, out: list[dict[str, Any]]) -> None:
        """Fire the silence timers (endpointing, utterance end, silent finals) due by audio time t."""
        while True:
            due: list[tuple[float, str]] = []
            if self.unreported_since is not None and not self.pending:
                self.unreported_since = None  # a final carried them
            if self.unreported_since is not None:  # the next tick of the interim clock
                every = self.interim_every_s
                due.append((math.ceil(self.unreported_since / every - 1e-9) * every, "interim"))
            if self.utterance_open and not self.in_word and self.endpointing_s is not None:
                due.append((self.last_word_end + self.endpointing_s, "endpoint"))
            if self.utterance_end_due and self.utterance_end_s is not None:
                due.append((self.last_word_end + self.utterance_end_s, "utterance_end"))
            if self.silence_final_s and not self.utterance_open and not self.pending:
                due.append((self.window_start + self.silence_final_s, "silence"))
            if not due:
                return
            when, what = min(due)
            if when > t + 1e-9:
                return
            if what == "endpoint":
                if self.speech_final or self.pending:
                    out.append(self._results(
                        self.pending, self.window_start, when, is_final=True, speech_final=self.speech_final,
                    ))
                    self.window_start = when
                self.pending, self.utterance_open = [], False
            elif what == "interim":
                out.append(self._results(self.pending, self.window_start, when, is_final=False))
                self.unreported_since = None
            elif what == "utterance_end":
                if self.pending:
                    out.append(self._results(self.pending, self.window_start, when, is_final=True))
                    self.window_start, self.pending = when, []
                out.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": _r(self.last_word_end)})
                self.utterance_end_due, self.utterance_open = False, False
            else:
                out.append(self._results([], self.window_start, when, is_final=True))
                self.window_start = when

    def _results(
        self, words: list[_Word], start: float, end: float, *,
        is_final: bool, speech_final: bool = False, from_finalize: bool = False,
    ) -> dict[str, Any]:
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": _r(_r(end) - _r(start)),
            "start": _r(start),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [{
                "transcript": " ".join(w.text for w in words),
                "confidence": 0.99 if words else 0.0,
                "words": [
                    {
                        "word": w.text.lower().strip(".,?!"), "start": _r(w.start), "end": _r(w.end),
                        "confidence": 0.99, "punctuated_word": w.text,
                    }
                    for w in words
                ],
            }]},
            "metadata": {
                "request_id": self.request_id,
                "model_uuid": "00000000-0000-0000-0000-000000000000",
                "model_info": {"name": "general-nova-3", "version": "fake", "arch": "nova-3"},
            },
        }


def _first(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def validate_query(query: dict[str, list[str]]) -> str | None:
    """What Deepgram would answer with HTTP 400 for, or None when the query is acceptable."""
    model = _first(query, "model")
    if model is not None and not model.startswith(MODEL_PREFIXES):
        return f"unknown model {model!r}"
    encoding = _first(query, "encoding")
    if encoding is not None:
        if encoding not in ENCODINGS:
            return f"unsupported encoding {encoding!r}"
        rate = _first(query, "sample_rate")
        if rate is None or not rate.isdigit() or int(rate) <= 0:
            return "sample_rate is required with encoding"
    channels = _first(query, "channels")
    if channels is not None and (not channels.isdigit() or int(channels) < 1):
        return "channels must be a positive integer"
    for name in BOOLEAN_PARAMS & query.keys():
        if _first(query, name) not in ("true", "false"):
            return f"{name} must be true or false"
    endpointing = _first(query, "endpointing")
    if endpointing is not None and endpointing != "false" and not endpointing.isdigit():
        return "endpointing must be milliseconds or false"
    utterance_end = _first(query, "utterance_end_ms")
    if utterance_end is not None:
        if not utterance_end.isdigit() or int(utterance_end) < 1000:
            return "utterance_end_ms must be an integer of at least 1000"
        if _first(query, "interim_results") != "true":
            return "utterance_end_ms requires interim_results=true"
    if "keyterm" in query and not (model or "").startswith("nova-3"):
        return "keyterm is only supported on Nova-3"
    if "keywords" in query and (model or "").startswith("nova-3"):
        return "keywords is not supported on Nova-3; use keyterm"
    if "language" in query and not _first(query, "language"):
        return "language must not be empty"
    return None


# --- the server -------------------------------------------------------------------------------


class FakeDeepgram:
    """A local `/v1/listen` on 127.0.0.1 and a free port; use as `async with`."""

    def __init__(
        self,
        api_key: str = "test-key",
        *,
        idle_timeout_s: float = 10.0,
        words_per_final: int = 2,
        speech_final: bool = True,
        silence_final_s: float | None = 2.0,
        recv_buffer_bytes: int | None = None,
        interim_every_s: float = 0.0,
    ) -> None:
        """`recv_buffer_bytes`: the sockets' kernel receive buffer (SO_RCVBUF), small so that a
        stalled connection pushes back on its client at once instead of after megabytes.
        `interim_every_s`: 0, an interim as each word ends; else interims on a clock of that period
        in audio time, carrying the words ended by then (Deepgram's own example shows one a second)."""
        self.interim_every_s = interim_every_s
        self.api_key = api_key
        self.recv_buffer_bytes = recv_buffer_bytes
        self.idle_timeout_s = idle_timeout_s
        self.words_per_final = words_per_final
        self.speech_final = speech_final
        self.silence_final_s = silence_final_s
        self.handshakes: list[Handshake] = []
        self.connections: list[FakeConnection] = []
        self.foreign: deque[str] = deque(maxlen=10_000)  # words real sound will be heard as (scripted)
        self.answer_finalize = True  # False: `Finalize` gets no `from_finalize` result
        self._drops: deque[_Drop] = deque()
        self._rejections: deque[int] = deque()
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self.url = ""

    async def __aenter__(self) -> FakeDeepgram:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.recv_buffer_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.recv_buffer_bytes)  # accepted sockets inherit it
        sock.bind(("127.0.0.1", 0))
        self._server = await serve(
            self._handle, sock=sock, max_queue=2 if self.recv_buffer_bytes else 16, ping_interval=None,
            process_request=self._process_request, process_response=self._process_response,
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/listen"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # scripting

    def hear_foreign(self, text: str) -> None:
        """Real sound from now on says these words (e.g. the avatar's voice coming back)."""
        self.foreign.extend(text.split())

    def drop_next(
        self, *, after_bytes: int | None = None, at_control: str | None = None,
        how: Literal["abort", "1011"] = "abort",
    ) -> None:
        """The next accepted connection fails once it has received `after_bytes` of audio, or when
        the control message `at_control` (e.g. "Finalize") arrives.

        "abort" drops TCP without a close frame (the client sees 1006); "1011" sends a close frame.
        The frame that triggers the drop is recorded but not processed.
        """
        assert (after_bytes is None) != (at_control is None), "give after_bytes or at_control"
        self._drops.append(_Drop(after_bytes, at_control, how))

    def reject_next(self, status: int = 503, times: int = 1) -> None:
        """The next `times` handshakes (with valid credentials) are answered with `status`."""
        self._rejections.extend([status] * times)

    async def disconnect(self, index: int = -1, how: Literal["abort", "1011"] = "abort") -> None:
        """Fail a live connection now (see `drop_next` for `how`)."""
        conn = self.connections[index]
        assert conn.ws is not None
        conn.dropped = True
        if how == "abort":
            conn.ws.transport.abort()
        else:
            await self._close(conn.ws, conn, 1011, "simulated server error")
        await conn.closed.wait()

    def stall(self, index: int = -1) -> None:
        """Stop reading a connection (an engine that cannot keep up); `resume` reads again."""
        self.connections[index].reading.clear()

    def resume(self, index: int = -1) -> None:
        self.connections[index].reading.set()

    async def wait_connections(self, count: int) -> FakeConnection:
        """Wait until `count` connections were accepted; returns the last one."""
        while len(self.connections) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.connections[count - 1]

    # protocol

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        authorization = request.headers.get("Authorization")
        status, error = 101, None
        if parts.path != "/v1/listen":
            status, error = 404, "Not found"
        elif authorization != f"Token {self.api_key}":
            status, error = 401, "Invalid credentials."
        elif (problem := validate_query(query)) is not None:
            status, error = 400, problem
        elif self._rejections:
            status, error = self._rejections.popleft(), "Service temporarily unavailable"
        self.handshakes.append(Handshake(parts.path, query, authorization, status))
        self._changed.set()
        if error is None:
            return None
        body = json.dumps({"err_code": "INVALID_AUTH" if status == 401 else "Bad Request", "err_msg": error})
        response = connection.respond(status, body)
        response.headers["Content-Type"] = "application/json"
        response.headers["dg-error"] = error
        return response

    def _process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        response.headers["dg-request-id"] = str(uuid.uuid4())

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None and ws.response is not None
        conn = FakeConnection(
            index=len(self.connections),
            request_id=ws.response.headers.get("dg-request-id", ""),
            query=parse_qs(urlsplit(ws.request.path).query, keep_blank_values=True),
            ws=ws,
        )
        conn.reading.set()
        self.connections.append(conn)
        self._changed.set()
        drop = self._drops.popleft() if self._drops else None
        recognizer = _Recognizer(
            conn.query, conn.request_id, words_per_final=self.words_per_final,
            speech_final=self.speech_final, silence_final_s=self.silence_final_s, foreign=self.foreign,
            interim_every_s=self.interim_every_s,
        )
        try:
            await self._serve(ws, conn, recognizer, drop)
        except ConnectionClosed:
            pass
        finally:
            conn.closed.set()
            self._changed.set()

    async def _serve(
        self, ws: ServerConnection, conn: FakeConnection, recognizer: _Recognizer, drop: _Drop | None,
    ) -> None:
        while True:
            await conn.reading.wait()
            try:
                message = await asyncio.wait_for(ws.recv(), self.idle_timeout_s)
            except TimeoutError:
                await self._close(ws, conn, 1011, "NET-0001")
                return
            if isinstance(message, bytes):
                conn.frames.append(len(message))
                self._audio_received(conn, len(message))
                if not message:
                    await self._close(ws, conn, 1011, "DATA-0000: zero-length audio frame")
                    return
                if drop is not None and drop.after_bytes is not None and conn.audio_bytes >= drop.after_bytes:
                    await self._drop(ws, conn, drop)
                    return
                await self._send(ws, conn, recognizer.feed(message))
                continue
            try:
                kind = json.loads(message).get("type")
            except (ValueError, AttributeError):
                kind = None
            conn.frames.append(str(kind))
            if drop is not None and drop.at_control == kind:
                await self._drop(ws, conn, drop)
                return
            if kind == "Finalize":
                if self.answer_finalize:  # the real service has been seen to leave one unanswered
                    await self._send(ws, conn, recognizer.finalize())
            elif kind == "CloseStream":
                await self._send(ws, conn, recognizer.close())
                await self._close(ws, conn, 1000, "")
                return
            # KeepAlive only resets the idle timer; unknown types are ignored.

    def _audio_received(self, conn: FakeConnection, nbytes: int) -> None:
        """Hook for a benchmark's stamps; the fake itself needs nothing here."""

    async def _drop(self, ws: ServerConnection, conn: FakeConnection, drop: _Drop) -> None:
        conn.dropped = True
        if drop.how == "abort":
            ws.transport.abort()
        else:
            await self._close(ws, conn, 1011, "simulated server error")

    async def _send(self, ws: ServerConnection, conn: FakeConnection, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            conn.sent.append(message)
            await ws.send(json.dumps(message))

    async def _close(self, ws: ServerConnection, conn: FakeConnection, code: int, reason: str) -> None:
        """Close like a server that keeps reading: frames already in flight must not stall the handshake."""
        conn.close_code, conn.close_reason = code, reason

        async def discard_incoming() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()

        drain = asyncio.create_task(discard_incoming())
        try:
            with contextlib.suppress(ConnectionClosed):
                await ws.close(code, reason)
        finally:
            drain.cancel()
            await asyncio.gather(drain, return_exceptions=True)
