"""The avatar worker: claims sessions, starts their avatar, answers user turns, handles barge-in.

Per session: read `turns:{sid}` from the resume cursor; user turns go, in order, to one speaker
task. Barge-in needs words: a bare voice onset only turns the avatar towards the user (listening
pose); words heard over the avatar that are neither its own echo nor a backchannel pause it, a
real turn then stops it, and if no turn follows within `barge_in_resume_s` it resumes where it
was (avatars that cannot pause are interrupted). A reply that is ready while the user has begun to
speak again waits unheard (`Floor`), so a turn cut at its pause is answered once, as a whole. A
typed interrupt stops it at once. The worker also ends sessions whose browser left (after the
grace period) or that went idle, and always stops the avatar when a session ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from avatar_service.brain import Brain, Reply
from avatar_service.driver import AvatarDriver, AvatarError, AvatarSession
from avatar_service.floor import Floor
from avatar_service.turn_policy import TurnPolicy, started_at_of
from common import keys
from common.bus import Bus, is_redis_failure
from common.jobs import Job
from common.metrics import HOP_BUCKETS, entry_age_s
from common.models import (
    AvatarReply,
    AvatarStoppedTalking,
    AvatarVendorEvent,
    SessionConfig,
    SessionEnd,
    SpeechStarted,
    TranscriptIgnored,
    TurnSegment,
    UserInterrupt,
    UserSpeech,
    UserTurn,
)
from common.sessions import SessionStore
from common.settings import Settings
from common.worker import ClaimLoop

log = logging.getLogger(__name__)

TURN_TO_ANSWER = Histogram(
    "avatar_turn_to_answer_seconds", "User turn added to Redis -> this worker starts answering it", buckets=HOP_BUCKETS
)
TURNS = Counter("avatar_turns_answered_total", "User turns answered", ["source"])  # voice | text
HEARD = Counter("avatar_heard_total", "Speech heard while the avatar could be heard, by verdict", ["verdict", "stage"])
# paused | resumed | stopped | continued (the user went on with the turn the avatar had begun to answer)
BARGE_INS = Counter("avatar_barge_ins_total", "Barge-ins, by outcome", ["outcome"])

READ_BLOCK_MS = 1000
# A voice's first words come from the recognizer about this long after it began, or later: a
# continued turn's first words came within TURN_CONTINUATION_S + this of the answer's start.
WORDS_LAG_S = 1.0
UNSEEN_GAP_S = 5 * READ_BLOCK_MS / 1000  # idle sessions are checked each READ_BLOCK_MS: longer is an outage
MAX_PENDING_TURNS = 8
INTERRUPT_TIMEOUT_S = 3.0


class AvatarWorker:
    def __init__(self, r: aioredis.Redis, settings: Settings, driver: AvatarDriver, brain: Brain) -> None:
        self.r = r
        self.settings = settings
        self.driver = driver
        self.brain = brain
        self.bus = Bus(r, settings)
        self.store = SessionStore(r, self.bus)
        self.claims = ClaimLoop(
            r, self.store, stream=keys.JOBS_AVATAR, group=keys.GROUP_AVATAR, kind="avatar",
            owner_field=keys.F_AVATAR_OWNER, capacity=settings.avatar_capacity,
            lease_ms=settings.job_lease_ms, heartbeat_ms=settings.heartbeat_ms, serve=self.serve,
        )

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.claims.run(stop)
        finally:
            await self.driver.aclose()
            await self.brain.aclose()

    async def serve(self, job: Job) -> None:
        sid = job.session_id
        config = await self.store.config(sid)
        avatar = await self.driver.open(sid, config, resumed=job.taken_over)
        ended = False
        try:
            try:
                await avatar.start()
            except AvatarError as exc:  # the driver already told the browser why
                log.warning("avatar did not start: %s", exc.code, extra={"sid": sid})
                await self.store.end(sid, exc.code)
                ended = True
                return
            await self.store.mark_live(sid)
            ended = await _Conversation(self, sid, avatar, config).run()
        finally:
            if ended or await self.store.is_ended(sid):
                await avatar.stop("session_ended")


class _Conversation:
    """One session's turn loop on the owning worker."""

    def __init__(self, worker: AvatarWorker, sid: str, avatar: AvatarSession, config: SessionConfig) -> None:
        self.w = worker
        self.sid = sid
        self.avatar = avatar
        self.policy = TurnPolicy(worker.settings, config.language)
        self.floor = Floor(worker.settings.reply_hold_s)  # a ready reply waits while the user goes on
        self.paused = False
        self._resume_timer: asyncio.Task[None] | None = None
        # (entry id, turn, the reply it replaces: a continued turn's dropped reply, else None)
        self.pending: asyncio.Queue[tuple[str, UserTurn, str | None]] = asyncio.Queue(MAX_PENDING_TURNS)
        self.pending_ids: deque[str] = deque()
        self.speaking: asyncio.Task[None] | None = None
        self.answering: UserTurn | None = None  # the turn being answered, while `speaking`
        self.dropped: str | None = None  # the reply being dropped for a continued turn: not remembered
        # (utterance id, unix ms) where the user's own words began in the utterance heard over the
        # avatar: its interims show it when the final has lost the echo in front of them.
        self.words_began: tuple[str, int] | None = None
        self.last_activity = time.time()
        # When this worker last saw a browser socket live (or took the session). Presence written
        # just before a Redis failover can be missing on the promoted replica; the grace period
        # then counts from here, so a page has the whole grace to reconnect.
        self.seen_present_at = time.time()
        self.checked_at = time.time()  # the last time `_should_end` could read the session

    async def run(self) -> bool:
        """Returns True when the session ended (as opposed to being handed to another worker)."""
        record = await self.w.store.get(self.sid) or {}
        after = record.get(keys.F_AVATAR_CURSOR, "0")
        if record.get(keys.F_AVATAR_REPLY):
            await self._close_cut_reply(record[keys.F_AVATAR_REPLY])
        speaker = asyncio.create_task(self._speaker())
        try:
            while True:
                if speaker.done():  # it failed: hand the session back (or end it) rather than go deaf
                    speaker.result()
                turns = await self.w.bus.read_turns(self.sid, after, READ_BLOCK_MS)
                if not turns and await self._should_end():
                    return True
                for entry_id, turn in turns:
                    after = entry_id.decode()
                    if isinstance(turn, SessionEnd):
                        await self._interrupt()
                        return True
                    await self._handle(after, turn)
                if turns:
                    await self._save_cursor(after)
        finally:
            speaker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await speaker

    async def _handle(self, entry_id: str, turn: object) -> None:
        if isinstance(turn, UserTurn):
            self.last_activity = time.time()
            if turn.source == "voice" and not await self._is_a_turn(turn):
                return
            await self.avatar.on_user_speaking(False)
            replaces = None
            if self._talking():
                continued = self._continued_by(turn)
                BARGE_INS.labels("continued" if continued else "stopped").inc()
                if continued is not None:
                    replaces = self._join(continued, turn)
                await self._interrupt()  # the user took the floor: the rest of the reply goes
            self.floor.settled()
            if self.pending.full():
                log.warning("dropping turn %s: too many pending", turn.turn_id, extra={"sid": self.sid})
                return
            self.pending_ids.append(entry_id)
            self.pending.put_nowait((entry_id, turn, replaces))
        elif isinstance(turn, SpeechStarted):
            self.last_activity = time.time()
            self.floor.voice()
            await self.avatar.on_user_speaking(True)
        elif isinstance(turn, UserSpeech):
            self.floor.voice()
            if self._talking() and self.floor.on_air:  # (a reply not yet heard waits for the final)
                await self._heard_over_avatar(turn)
        elif isinstance(turn, UserInterrupt):
            self.last_activity = time.time()
            await self._interrupt()
        elif isinstance(turn, AvatarVendorEvent):
            await self.avatar.on_vendor_event(turn.event, turn.data)

    async def _is_a_turn(self, turn: UserTurn) -> bool:
        """A final is answered unless it is the avatar's own echo or a backchannel said over it.

        Each segment, and each clause of it, is judged at the time it was said (a turn may join
        the avatar's echo with the user's question): what is echo is dropped from what is answered."""
        talking = self._talking()
        pieces = turn.segments or [TurnSegment(text=turn.text, started_at=0)]
        user_heard = self._user_heard_in(turn)
        kept = [s.model_copy(update={"text": rest, "started_at": started_at_of(rest, s.text, s.started_at)})
                for s in pieces
                if (rest := self.policy.hear(s.text, avatar_talking=talking, started_at=s.started_at,
                                             level_db=self._level_of(s, user_heard), user_heard=user_heard)[1])]
        if not kept:
            verdict = "echo"
        else:
            text = " ".join(s.text for s in kept)
            if text != turn.text:
                log.info("echo dropped from turn %s", turn.turn_id, extra={"sid": self.sid})
                turn.text = text
                if turn.segments:
                    turn.segments = kept  # (where the user's own speech began counts, not the echo's)
            verdict = self.policy.judge(text, avatar_talking=talking, echo_checked=True)
        HEARD.labels(verdict, "final").inc()
        if verdict == "words":
            return True
        if verdict in ("echo", "backchannel"):
            loud = self.policy.loudness
            log.info("not a turn (%s): %s (levels %s; user %s, echo %s dBFS)", verdict, turn.turn_id,
                     [s.level_db for s in pieces], loud.user and round(loud.user, 1),
                     loud.echo and round(loud.echo, 1), extra={"sid": self.sid})
            await self.w.bus.publish_event(self.sid, TranscriptIgnored(utterance_id=turn.turn_id, reason=verdict))
        await self._resume()
        return False

    def _user_heard_in(self, turn: UserTurn) -> bool:
        """Whether this turn's interims were heard as the user's words over the avatar (they
        paused it): its final is judged as they were, not as echo for the echo in front of them."""
        return self.words_began is not None and self.words_began[0] == turn.turn_id

    @staticmethod
    def _level_of(piece: TurnSegment, user_heard: bool) -> float | None:
        """How loud a piece of a final was. Interims are judged by the level of their latest audio;
        a final whose interims were heard as the user's is judged the same way (the louder of that
        and the whole): the whole piece also holds the echo in front of the user's words, and a user
        who trails off ("Which providers … does it support for the avatar?") falls to its level."""
        if not user_heard or piece.recent_level_db is None:
            return piece.level_db
        return max(piece.recent_level_db, piece.level_db if piece.level_db is not None else -math.inf)

    def _continued_by(self, turn: UserTurn) -> UserTurn | None:
        """The turn being answered, if `turn` is its rest: voice that began at most
        `turn_continuation_s` after the avatar began to answer (the user only paused)."""
        window = self.w.settings.turn_continuation_s
        last = self.answering
        if not window or last is None or last.source != "voice" or turn.source != "voice" or not turn.segments:
            return None
        if not self.floor.on_air:  # not a word of its answer was heard: the user went on at once
            return last
        began_answering = self.policy.echo.audible_from  # set as the reply began
        began = turn.segments[0].started_at
        if self.words_began is not None and self.words_began[0] == turn.turn_id:
            began = max(began, self.words_began[1])
        return last if began / 1000 - began_answering <= window else None

    def _join(self, earlier: UserTurn, turn: UserTurn) -> str:
        """Make `turn` the whole of `earlier` and itself; the reply begun for `earlier` is dropped
        unremembered. Returns that reply's id."""
        self.dropped = reply_id_of(earlier)
        log.info("turn %s continues %s: its reply is dropped", turn.turn_id, earlier.turn_id, extra={"sid": self.sid})
        turn.text = f"{earlier.text} {turn.text}"
        return self.dropped

    async def _heard_over_avatar(self, speech: UserSpeech) -> None:
        """Words while the avatar talks: pause it for real words (stop, where it cannot pause)."""
        # A held segment is finished speech (the user paused after it): like a final, one word
        # ("Wait.") is enough; a running interim needs BARGE_IN_MIN_WORDS.
        verdict, rest = self.policy.hear(speech.text, avatar_talking=True, started_at=speech.started_at,
                                         interim=not speech.held, level_db=speech.level_db)
        HEARD.labels(verdict, "interim").inc()
        if log.isEnabledFor(logging.DEBUG):  # (several times a second per session: no work unless asked)
            loud = self.policy.loudness
            log.debug("heard over the avatar (%s): %r level %s (user %s, echo %s)", verdict, speech.text,
                      speech.level_db, loud.user and round(loud.user, 1), loud.echo and round(loud.echo, 1),
                      extra={"sid": self.sid})
        if verdict != "words":
            return
        # The user began after the echo in front of their words, and about WORDS_LAG_S before the
        # first interim that had them came (a final that lost the echo says neither). A later interim
        # only moves it by a better view of the echo in front: it came later, not the words.
        began = started_at_of(rest, speech.text, speech.started_at)
        if self.words_began is None or self.words_began[0] != speech.utterance_id:
            self.words_began = (speech.utterance_id, max(began, speech.ts - round(WORDS_LAG_S * 1000)))
        elif began > self.words_began[1]:
            self.words_began = (speech.utterance_id, began)
        if not self.paused:
            if not await self.avatar.pause():
                BARGE_INS.labels("stopped").inc()
                await self._interrupt()
                return
            BARGE_INS.labels("paused").inc()
            self.paused = True
        wait_s = self.w.settings.barge_in_resume_s
        if speech.held:  # the STT worker waits for the rest of this turn: so does the pause
            wait_s = max(wait_s, self.w.settings.turn_max_wait_s + 0.5)
        self._arm_resume(wait_s)  # more words: the window starts again

    def _talking(self) -> bool:
        return self.speaking is not None and not self.speaking.done()

    def _arm_resume(self, wait_s: float) -> None:
        if self._resume_timer is not None:
            self._resume_timer.cancel()
        self._resume_timer = asyncio.create_task(self._resume_later(wait_s))

    async def _resume_later(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        self._resume_timer = None  # so _resume does not cancel the task it runs in
        await self._resume()

    async def _resume(self) -> None:
        """False interruption (no turn came): carry on from where the avatar paused."""
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        self.floor.settled()
        if self.paused:
            self.paused = False
            if self._talking():
                BARGE_INS.labels("resumed").inc()
                await self.avatar.resume()

    async def _interrupt(self) -> None:
        """Barge-in: drop the rest of the current reply at once."""
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        self.paused = False
        task = self.speaking
        if task is None or task.done():
            return
        self.floor.drop()  # not heard yet: it never will be
        await self.avatar.interrupt()
        try:
            await asyncio.wait_for(asyncio.shield(task), INTERRUPT_TIMEOUT_S)
        except TimeoutError:
            log.warning("avatar did not stop within %.1f s; cancelling", INTERRUPT_TIMEOUT_S, extra={"sid": self.sid})
            task.cancel()
        except Exception:
            log.exception("avatar speech failed", extra={"sid": self.sid})

    async def _speaker(self) -> None:
        answered = keys.answered(self.sid)
        r = self.w.r
        while True:
            entry_id, turn, replaces = await self.pending.get()
            try:
                if not turn.text.strip() or await r.sismember(answered, turn.turn_id):
                    continue
                async with r.pipeline(transaction=False) as pipe:
                    pipe.sadd(answered, turn.turn_id)
                    pipe.expire(answered, int(self.w.settings.session_max_s) + 60)
                    await pipe.execute()
                reply_id = reply_id_of(turn)
                TURN_TO_ANSWER.observe(entry_age_s(entry_id))
                TURNS.labels(turn.source).inc()
                await self.w.store.set_fields(self.sid, **{keys.F_AVATAR_REPLY: reply_id})
                if self.avatar.answers_itself:  # the vendor writes the answer from what was said
                    speech = self._speak_own(reply_id, turn)
                else:  # our brain writes the answer; speech starts with its first sentence
                    speech = self._answer(reply_id, turn, replaces)
                self.answering = turn
                self.floor.reply_begun()
                self.speaking = asyncio.create_task(speech)
                try:
                    await asyncio.wait({self.speaking})  # an interrupt ends the reply, not us
                except asyncio.CancelledError:
                    self.speaking.cancel()
                    raise  # handed over mid-reply: the field stays, for the next owner to close it
                finally:
                    self.policy.echo.reply_ended()
                    self.paused = False
                    self.answering = self.dropped = None
                failed = None if self.speaking.cancelled() else self.speaking.exception()
                if failed is not None and is_redis_failure(failed):
                    raise failed  # the field stays: whoever serves the session next closes the reply
                if failed is not None:
                    log.error("speaking failed: %r", failed, extra={"sid": self.sid})
                    await self._close_cut_reply(reply_id)  # the page must not show it speaking on
                else:
                    await r.hdel(keys.session(self.sid), keys.F_AVATAR_REPLY)
            finally:
                if self.pending_ids and self.pending_ids[0] == entry_id:
                    self.pending_ids.popleft()

    async def _take_the_floor(self) -> bool:
        """Wait while the user has begun to speak again (`Floor`): True once the reply may be
        heard (from here it is audible), False if it was dropped unheard."""
        if not await self.floor.wait():
            return False
        self.policy.echo.reply_started()
        return True

    async def _speak_own(self, reply_id: str, turn: UserTurn) -> None:
        if await self._take_the_floor():
            await self.avatar.speak(reply_id, turn.text, user_text=turn.text)

    async def _answer(self, reply_id: str, turn: UserTurn, replaces: str | None = None) -> None:
        """Ask the brain, speak its sentences as they come, remember what was actually said. The
        brain starts at once; its first sentence is shown and heard once the user leaves the floor."""
        reply = await self.w.brain.reply(self.sid, turn.text)
        shown: asyncio.Task[None] | None = None

        async def heard_when_free() -> AsyncIterator[str]:
            nonlocal shown
            async for sentence in reply.sentences():
                if shown is None:
                    if not await self._take_the_floor():
                        return  # dropped unheard: nothing is shown or said
                    shown = asyncio.create_task(self._show_reply(reply_id, turn.turn_id, reply, replaces))
                yield sentence

        spoken: str | None = None
        try:
            spoken = await self.avatar.speak(reply_id, heard_when_free(), user_text=turn.text)
        finally:
            await reply.aclose()
            if shown is not None:
                await asyncio.gather(shown, return_exceptions=True)
        if reply.error is not None:
            await self.w.bus.publish_event(self.sid, reply.error)
        said = reply.text if spoken is None else spoken
        if reply_id == self.dropped:  # the user went on: the next reply answers this turn too
            return
        try:
            await self.w.brain.remember(self.sid, turn.text, said)
        except Exception:
            log.exception("could not save the conversation history", extra={"sid": self.sid})

    async def _show_reply(self, reply_id: str, turn_id: str, reply: Reply, replaces: str | None) -> None:
        """`avatar.reply` for the page: the text so far, growing sentence by sentence, then whole."""
        shown = ""
        while True:
            reply.changed.clear()  # before reading: a change during the publish wakes the wait
            done = reply.done.is_set()
            if reply.text != shown:
                shown = reply.text
                self.policy.echo.reply_text(shown)
                await self.w.bus.publish_event(self.sid, AvatarReply(
                    reply_id=reply_id, turn_id=turn_id, text=shown, replaces=replaces))
            if done:
                return
            await reply.changed.wait()

    async def _close_cut_reply(self, reply_id: str) -> None:
        """A reply was cut without its `avatar.stopped_talking` (its owner died or was handed over
        mid-reply, or its speech failed) and the turn counts as answered: say it here, once, or the
        page shows the avatar speaking on."""
        if await self.w.r.hdel(keys.session(self.sid), keys.F_AVATAR_REPLY):
            log.info("closing reply %s, cut before its end", reply_id, extra={"sid": self.sid})
            await self.w.bus.publish_event(self.sid, AvatarStoppedTalking(reply_id=reply_id, interrupted=True))

    async def _save_cursor(self, last_read: str) -> None:
        """Resume point for a takeover: just before the oldest turn not yet answered."""
        cursor = _before(self.pending_ids[0]) if self.pending_ids else last_read
        await self.w.store.set_fields(self.sid, **{keys.F_AVATAR_CURSOR: cursor})

    async def _should_end(self) -> bool:
        """End sessions whose browser left past the grace period, or that went idle."""
        record = await self.w.store.get(self.sid)
        if record is None or record.get(keys.F_STATE) == "ended":
            return True
        left_at = await self.w.store.disconnected_since(self.sid)
        now = time.time()
        # A page cannot come back while its Redis is failing over either: a long gap since the last
        # check (this worker could not read the session meanwhile) gives it the grace period anew.
        if left_at is None or now - self.checked_at > UNSEEN_GAP_S:
            self.seen_present_at = now
        self.checked_at = now
        reason = None
        if left_at is not None and now - max(left_at, self.seen_present_at) > self.w.settings.session_grace_s:
            reason = "browser_left"
        elif now - self.last_activity > self.w.settings.session_idle_timeout_s:
            reason = "idle_timeout"
        elif now - float(record.get(keys.F_CREATED, now)) > self.w.settings.session_max_s:
            reason = "max_duration"
        if reason is None:
            return False
        await self.w.store.end(self.sid, reason)
        return True


def reply_id_of(turn: UserTurn) -> str:
    """The reply's id follows from the turn's, so a worker that takes over answers under the same id."""
    return f"r-{turn.turn_id}"


def _before(entry_id: str) -> str:
    """The stream id just before `entry_id`, so XREAD from it returns `entry_id` again."""
    ms, seq = (int(x) for x in entry_id.split("-"))
    return f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}-18446744073709551615"
