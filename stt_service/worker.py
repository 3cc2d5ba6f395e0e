"""The STT worker: claims sessions, relays their audio to an STT engine, publishes the results.

Per session, one task pumps `audio:{sid}` into the engine (from the resume cursor) and one
publishes what the engine says: interim/final transcripts to the browser, finished utterances and
barge-in signals to the avatar worker. The cursor only moves to audio the engine has fully
handled (`checkpoint`), so a worker taking over replays any speech that had no final yet: words
are never lost, and replayed finals keep their utterance ids, so they are never answered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from common import keys, tracing
from common.bus import Bus
from common.jobs import Job
from common.metrics import HOP_BUCKETS, entry_age_s
from common.models import (
    ErrorEvent,
    SpeechStarted,
    TranscriptFinal,
    TranscriptInterim,
    TurnSegment,
    UserSpeech,
    UserTurn,
)
from common.retry import Backoff
from common.sessions import SessionStore
from common.settings import Settings
from common.worker import ClaimLoop
from stt_service.audio_feed import AudioFeed
from stt_service.engine import SttEngine, SttError, SttResult, SttStream
from stt_service.turn import TRAILING_S, AudioTail, Quiet, TurnDetector, text_verdict

log = logging.getLogger(__name__)

FINALIZE_AFTER_IDLE_READS = 2  # empty batches (IDLE_TICK_S each): ~1 s without audio, the page paused or left
CLOSE_TIMEOUT_S = 10.0
MAX_STREAM_RESTARTS = 5
RESTART_BACKOFF = Backoff(base_s=0.5, max_s=8.0)  # an engine stream that failed is reopened after this

AUDIO_FRAMES = Counter("stt_audio_frames_total", "Audio frames relayed to the speech engine")
AUDIO_FRAMES_LOST = Counter(
    "stt_audio_frames_trimmed_total", "Audio frames MAXLEN trimmed from audio:{sid} before the engine read them"
)
AUDIO_TO_ENGINE = Histogram(
    "stt_audio_to_engine_seconds", "Audio frame added to Redis by the gateway -> handed to the speech engine",
    buckets=HOP_BUCKETS,
)
RESULTS = Counter("stt_results_total", "Results published", ["kind"])  # interim | final | speech_started
ENGINE_ERRORS = Counter("stt_engine_errors_total", "Speech engine errors", ["code"])
TURN_DECISIONS = Counter(
    "stt_turn_decisions_total", "Pauses judged by the turn detector", ["verdict", "by"]  # by: words | audio
)
EARLY_FINALIZES = Counter(
    "stt_early_finalize_total",
    "A quiet user's finished question: Finalize sent, or not (the avatar was talking)", ["outcome"],
)


class SttWorker:
    def __init__(self, r: aioredis.Redis, settings: Settings, engine: SttEngine) -> None:
        self.r = r
        self.settings = settings
        self.engine = engine
        self.turns = TurnDetector(settings)
        self.bus = Bus(r, settings)
        self.store = SessionStore(r, self.bus)
        self.audio = AudioFeed(r, min_interval_s=settings.audio_batch_ms * 2.5 / 1000)
        self.claims = ClaimLoop(
            r, self.store, stream=keys.JOBS_STT, group=keys.GROUP_STT, kind="stt",
            owner_field=keys.F_STT_OWNER, capacity=settings.stt_capacity,
            lease_ms=settings.job_lease_ms, heartbeat_ms=settings.heartbeat_ms, serve=self.serve,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.engine.load()  # before claiming, so the first session does not wait for a model
        await self.turns.load()
        try:
            await self.claims.run(stop)
        finally:
            await self.audio.aclose()
            await self.engine.aclose()
            self.turns.close()

    async def serve(self, job: Job) -> None:
        """Serve one session until it ends; reopen the engine stream after a non-fatal failure."""
        sid = job.session_id
        config = await self.store.config(sid)
        for attempt in range(MAX_STREAM_RESTARTS + 1):
            record = await self.store.get(sid) or {}
            cursor = record.get(keys.F_STT_CURSOR, "0")
            cursor_t = float(record.get(keys.F_STT_CURSOR_T, "0") or 0)
            try:
                stream = await self.engine.open(sid, language=config.language, start_offset_s=cursor_t)
                await _SttSession(self, sid, stream, cursor, cursor_t).run()
                return
            except SttError as exc:
                log.warning("stt engine error: %s", exc.code, extra={"sid": sid})
                ENGINE_ERRORS.labels(exc.code).inc()
                fatal = exc.fatal or attempt == MAX_STREAM_RESTARTS
                await self.bus.publish_event(sid, ErrorEvent(code=exc.code, message=exc.message, fatal=fatal))
                if fatal:
                    await self.store.end(sid, "stt_failed")
                    return
                await asyncio.sleep(RESTART_BACKOFF.delay(attempt))


class _SttSession:
    def __init__(self, worker: SttWorker, sid: str, stream: SttStream, cursor: str, cursor_t: float) -> None:
        self.w = worker
        self.sid = sid
        self.stream = stream
        self.cursor = cursor
        self.cursor_t = cursor_t
        # (entry id, session audio time at the end of that entry): maps checkpoints to cursors.
        # Bounded by what the engine holds un-checkpointed, itself bounded by the audio stream.
        self.positions: deque[tuple[str, float]] = deque(maxlen=worker.settings.audio_stream_maxlen * 2)
        self._last_seq: tuple[bytes, int] | None = None  # (socket id, frame number) of the last frame
        self.tail = AudioTail()  # the turn model's input
        self.turn = _Turn(self)
        # Engines that endpoint on their side (Deepgram) may be asked to finalize as soon as the user
        # is quiet after a finished question, instead of waiting for their endpointing.
        early = worker.settings.deepgram_early_finalize and getattr(worker.engine, "finalizes_on_request", False)
        self.quiet = Quiet() if early and worker.turns.enabled else None

    async def run(self) -> None:
        pump = asyncio.create_task(self._pump_guarded())
        try:
            await self._publish_results()
        except BaseException:
            pump.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.stream.close(), CLOSE_TIMEOUT_S)
            raise
        await pump  # re-raises a pump failure

    async def _pump_guarded(self) -> None:
        """If the pump fails, close the engine stream so the results loop ends too."""
        try:
            await self._pump_audio()
        except Exception:
            with contextlib.suppress(Exception):
                await self.stream.close()
            raise

    async def _pump_audio(self) -> None:
        feed = self.w.audio
        queue = feed.subscribe(self.sid, self.cursor)
        try:
            await self._pump_from(queue)
        finally:
            feed.unsubscribe(self.sid)

    async def _pump_from(self, queue: asyncio.Queue) -> None:
        t = self.cursor_t
        idle_reads, sent_since_finalize = 0, False
        while True:
            entries = await queue.get()  # an empty batch every IDLE_TICK_S while the page is quiet
            if isinstance(entries, BaseException):
                raise entries  # the feed's Redis read failed: hand the session back
            if not entries:
                idle_reads += 1
                if sent_since_finalize and idle_reads >= FINALIZE_AFTER_IDLE_READS:
                    sent_since_finalize = False
                    await self.stream.finalize()
                if idle_reads % 20 == 0 and await self.w.store.is_ended(self.sid):
                    await self.stream.close()
                    return
                continue
            idle_reads = 0
            chunks: list[bytes] = []
            ended = False
            for entry_id, field, pcm, seq in entries:
                last_id = entry_id.decode()
                if field != b"pcm":
                    ended = field == b"end"
                    if ended:
                        break
                    continue
                if seq is not None:
                    self._count_trimmed(seq)
                chunks.append(pcm)
                t += len(pcm) / 32000
                self.positions.append((last_id, t))
            if chunks:
                pcm = b"".join(chunks)
                self.tail.append(pcm, t)
                await self.stream.send(pcm)
                if self.quiet is not None and self.quiet.feed(pcm) >= EARLY_FINALIZE_QUIET_S:
                    await self.turn.finalize_if_complete()
                sent_since_finalize = True
                AUDIO_FRAMES.inc(len(chunks))
                AUDIO_TO_ENGINE.observe(entry_age_s(last_id))
            if ended:
                await self.stream.close()
                return

    def _count_trimmed(self, seq: bytes) -> None:
        """A jump in a socket's frame numbers means MAXLEN trimmed frames this worker never read:
        the engine fell more than AUDIO_STREAM_MAXLEN behind. Count them; never lose them silently."""
        socket_id, _, n = seq.rpartition(b":")
        number = int(n)
        last = self._last_seq
        self._last_seq = (socket_id, number)
        if last is None or last[0] != socket_id or number <= last[1] + 1:
            return  # first frame seen, or another socket (a reload): nothing to compare with
        lost = number - last[1] - 1
        AUDIO_FRAMES_LOST.inc(lost)
        log.warning("%d audio frames trimmed before the engine read them (it fell behind)", lost,
                    extra={"sid": self.sid})

    async def _publish_results(self) -> None:
        bus = self.w.bus
        turn = self.turn
        try:
            async for result in self.stream.results():
                RESULTS.labels(result.kind).inc()
                async with turn.lock:
                    if result.kind == "speech_started":
                        turn.heard()
                        await bus.publish_turn(self.sid, SpeechStarted())
                    elif result.kind == "interim":
                        turn.heard()
                        await turn.interim(result)
                    elif result.kind == "final":
                        turn.heard()
                        await turn.segment(result)
                    elif result.kind == "checkpoint":
                        if turn.held:
                            turn.arm()  # noise that gave no words: the held turn's wait goes on
                        else:
                            await self._checkpoint(result.end_s)
        finally:
            turn.cancel_timer()
        async with turn.lock:
            await turn.flush()  # the stream ended (session over): what was said is still a turn

    async def _publish_final(self, segments: list[SttResult]) -> None:
        bus = self.w.bus
        first, text = segments[0], " ".join(r.text for r in segments)
        if tracing.enabled():  # where the VAD ended the speech starts the turn's trace (common/tracing.py)
            tracing.end_of_speech(self.sid, first.utterance_id, self.tail.received_at_ms(segments[-1].end_s))
        await bus.publish_event(
            self.sid,
            TranscriptFinal(
                utterance_id=first.utterance_id, text=text,
                start_s=round(first.start_s, 3), end_s=round(segments[-1].end_s, 3),
            ),
        )
        pieces = [TurnSegment(text=r.text, started_at=self.tail.received_at_ms(r.start_s),
                              level_db=self.tail.level_db(r.start_s, r.end_s),
                              recent_level_db=self.tail.level_db(max(r.start_s, r.end_s - RECENT_LEVEL_S), r.end_s))
                  for r in segments]
        await bus.publish_turn(
            self.sid, UserTurn(turn_id=first.utterance_id, text=text, source="voice", segments=pieces)
        )

    async def _checkpoint(self, t: float) -> None:
        """Move the resume cursor to the last audio entry that ends at or before `t`."""
        moved = None
        while self.positions and self.positions[0][1] <= t + 1e-6:
            moved = self.positions.popleft()
        if moved is None:
            return
        self.cursor, self.cursor_t = moved
        await self.w.store.set_fields(
            self.sid, **{keys.F_STT_CURSOR: self.cursor, keys.F_STT_CURSOR_T: f"{self.cursor_t:.4f}"}
        )


# An interim's level is that of its latest audio: who is speaking now. Short enough that a one-word
# cue ("Wait," ~0.15 s loud) over the echo is in the loudest tenth within 0.2 s (1.5 s took 0.8 s).
RECENT_LEVEL_S = 0.75
TURN_LEAD_S = 0.3  # the voice-activity onset lags the first sound of a word by about this much
EARLY_FINALIZE_QUIET_S = 0.25  # quiet this long after a finished question: Finalize
MAX_HELD_TURN_S = 30.0  # a turn held across pauses ends at this length whatever its words say
MAX_HELD_SEGMENTS = 16


class _Turn:
    """The user turn being assembled from the engine's segments (one segment per pause).

    A segment's `final` is a pause, not yet a turn: the turn detector judges the words so far and
    the audio up to the pause. Complete → one `transcript.final` + `user.turn` now. Incomplete →
    the text so far shows as an interim and the turn waits, up to `turn_max_wait_s` of silence,
    for the rest. The resume cursor stays before a held turn, so a takeover replays its audio and
    the turn keeps its id (the first segment's): nothing is lost or answered twice.
    """

    def __init__(self, session: _SttSession) -> None:
        self.s = session
        self.held: list[SttResult] = []
        self.heard_at = 0.0  # monotonic time of the last onset, interim or segment
        self.lock = asyncio.Lock()  # the results loop and the wait timer both publish
        self._timer: asyncio.Task[None] | None = None
        self.last_interim: SttResult | None = None  # words of the open segment, not yet final
        self._judged: str | None = None  # the interim text last judged for an early Finalize

    def heard(self) -> None:
        self.heard_at = time.monotonic()

    def text(self, extra: str = "") -> str:
        return " ".join(part for part in [*(r.text for r in self.held), extra] if part)

    async def interim(self, result: SttResult) -> None:
        self.last_interim = result
        bus, sid = self.s.w.bus, self.s.sid
        first = self.held[0] if self.held else result
        tail = self.s.tail
        end_s = result.end_s if result.end_s > result.start_s else tail.end_s  # local interims: up to now
        speech = UserSpeech(utterance_id=first.utterance_id, text=result.text,
                            started_at=tail.received_at_ms(result.start_s),
                            level_db=tail.level_db(max(result.start_s, end_s - RECENT_LEVEL_S), end_s))
        await bus.publish_event_and_turn(
            sid, TranscriptInterim(utterance_id=first.utterance_id, text=self.text(result.text)), speech
        )

    async def segment(self, result: SttResult) -> None:
        self.last_interim = None
        self.held.append(result)
        text = self.text()
        if result.end_s - self.held[0].start_s >= MAX_HELD_TURN_S or len(self.held) >= MAX_HELD_SEGMENTS:
            await self.flush()  # someone who talks on and on still gets an answer (and a bound)
            return
        turns = self.s.w.turns
        audio = None
        if turns.wants_audio(text):
            # The model hears this turn alone, as it was trained (Pipecat gives it the audio since the
            # user began): not the avatar's echo or the talk before it, which made finished questions
            # score 0.01-0.1 here and wait the whole `turn_max_wait_s`.
            audio = self.s.tail.span(self.held[0].start_s - TURN_LEAD_S, result.end_s + TRAILING_S)
        verdict = await turns.decide(text, audio)
        TURN_DECISIONS.labels(
            "complete" if verdict.complete else "incomplete", "words" if verdict.p_audio is None else "audio"
        ).inc()
        if verdict.complete:
            await self.flush()
            return
        # The segment's words count for barge-in (an engine may skip interims); `held` tells the
        # avatar worker that the rest of this turn may take up to turn_max_wait_s.
        speech = UserSpeech(utterance_id=self.held[0].utterance_id, text=result.text,
                            started_at=self.s.tail.received_at_ms(result.start_s), held=True,
                            level_db=self.s.tail.level_db(result.start_s, result.end_s))
        await self.s.w.bus.publish_turn(self.s.sid, speech)
        log.info("turn held: words %s, audio %s", verdict.text,
                 "-" if verdict.p_audio is None else f"{verdict.p_audio:.2f}", extra={"sid": self.s.sid})
        await self.s.w.bus.publish_event(
            self.s.sid, TranscriptInterim(utterance_id=self.held[0].utterance_id, text=text)
        )
        self.arm()

    async def flush(self) -> None:
        self.cancel_timer()
        if not self.held:
            return
        held, self.held = self.held, []
        await self.s._publish_final(held)
        await self.s._checkpoint(held[-1].end_s)

    async def finalize_if_complete(self) -> None:
        """The user went quiet after words the engine has not finalized: if they are a finished
        question (judged once per interim text), have the engine finalize now. Only where the
        words alone are sure (a statement's pause is left to the engine's own endpoint), and never
        while the avatar talks: what is heard then may be its echo, which the avatar worker's echo
        guard judges best as the engine cuts it, not cut short here."""
        interim = self.last_interim
        if interim is None or interim.text == self._judged:
            return
        self._judged = interim.text
        if text_verdict(self.text(interim.text)) != "complete":
            return
        if await self.s.w.store.avatar_is_talking(self.s.sid):
            EARLY_FINALIZES.labels("avatar_talking").inc()
            return
        EARLY_FINALIZES.labels("sent").inc()
        await self.s.stream.finalize()

    def arm(self) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._wait())

    def cancel_timer(self) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        self._timer = None

    async def _wait(self) -> None:
        """A held turn waits until `turn_max_wait_s` has passed since the user was last heard (an
        onset, an interim or a pause): while words keep coming it waits on, and an onset that never
        gives words (noise) holds it only that long."""
        wait_s = self.s.w.settings.turn_max_wait_s
        while True:
            await asyncio.sleep(max(0.02, self.heard_at + wait_s - time.monotonic()))
            async with self.lock:
                if time.monotonic() - self.heard_at >= wait_s - 0.01:
                    self._timer = None
                    await self.flush()
                    return
