"""The brain: sentence cutting on streamed tokens, history in Redis, trimming, fallback, errors.

The LLM is `tests/fakes/llm.py` (an OpenAI-compatible streaming server on loopback); Redis is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterator

import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from avatar_service.brain import APOLOGY, LlmBrain, LocalBrain, Reply, SentenceCutter, make_brain
from avatar_service.responder import LocalResponder
from avatar_service.worker import AvatarWorker, _Conversation
from common import keys
from common.bus import Bus
from common.models import SessionConfig, SpeechStarted, TurnSegment, UserSpeech, UserTurn
from common.sessions import SessionStore
from common.settings import Settings
from tests.fakes.llm import FakeLlm

KEY = "sk-test-llm-key-9c2b7e"


@pytest.fixture
def llm() -> Iterator[FakeLlm]:
    with FakeLlm(api_key=KEY, token_delay_s=0.005) as fake:
        yield fake


@pytest.fixture
async def r(clean_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(clean_redis)
    yield client
    await client.aclose()


def settings_for(llm: FakeLlm | None, redis_url: str = "redis://127.0.0.1:1/0", **extra) -> Settings:
    fields = {"llm_base_url": llm.url if llm else "", "llm_api_key": SecretStr(KEY), "llm_model": "fake-model"}
    return Settings(_env_file=None, redis_url=redis_url, **{**fields, **extra})


async def collect(reply: Reply) -> list[str]:
    return [s async for s in reply.sentences()]


# ---------------------------------------------------------------- sentence cutting


def test_sentences_are_cut_as_soon_as_the_next_one_starts() -> None:
    cutter = SentenceCutter()
    text = "Hello there. Dr. Smith says 3.5 is fine!  How are you?\nI am **fine**. Bye"
    out: list[tuple[int, str]] = []
    for i, ch in enumerate(text):  # one character per token: the worst case
        out += [(i, s) for s in cutter.feed(ch)]
    out += [(len(text), s) for s in cutter.flush()]
    assert [s for _, s in out] == [
        "Hello there.", "Dr. Smith says 3.5 is fine!", "How are you?", "I am fine.", "Bye",
    ]
    assert out[0][0] == text.index("Dr.")  # emitted as soon as the next sentence starts


def test_a_long_first_sentence_is_cut_early_at_a_comma() -> None:
    cutter = SentenceCutter(first_max_chars=60, max_chars=200)
    text = ("Well, this is a rather long opening sentence, which keeps going and going, "
            "and it has no full stop for a long while, but we still want speech to start soon.")
    pieces = [p for word in text.split(" ") for p in cutter.feed(word + " ")] + cutter.flush()
    assert len(pieces[0]) <= 60 and " ".join(pieces) == text


# ---------------------------------------------------------------- LLM brain


async def test_reply_streams_sentences_before_the_reply_is_complete(llm: FakeLlm, r: aioredis.Redis) -> None:
    llm.token_delay_s = 0.03
    llm.script(["First sentence here. Then " + " ".join(["more"] * 30) + " words. Last one."])
    brain = LlmBrain(r, settings_for(llm))
    start = time.monotonic()
    reply = await brain.reply("s1", "hi")
    seen: list[tuple[float, str]] = []
    async for sentence in reply.sentences():
        seen.append((time.monotonic() - start, sentence))
    await brain.aclose()
    assert next(s for _, s in seen) == "First sentence here." and seen[-1][1] == "Last one."
    assert seen[0][0] < seen[-1][0] - 0.5  # the first sentence came long before the end
    assert reply.error is None and reply.done.is_set()
    request = llm.requests[-1]
    assert request.auth_ok and request.body["stream"] is True and request.body["model"] == "fake-model"
    assert request.messages[0]["role"] == "system" and request.messages[-1] == {"role": "user", "content": "hi"}


async def test_history_is_bounded_sent_with_each_request_and_expires(llm: FakeLlm, r: aioredis.Redis) -> None:
    brain = LlmBrain(r, settings_for(llm, llm_history_messages=6))
    for i in range(10):
        await brain.remember("s1", f"question {i}", f"answer {i}")
    history = await brain.history("s1")
    assert len(history) == 6 and history[-1] == {"role": "assistant", "content": "answer 9"}
    assert history[0] == {"role": "user", "content": "question 7"}
    assert 0 < await r.ttl(keys.history("s1")) and "{s1}" in keys.history("s1")
    await collect(await brain.reply("s1", "next"))
    messages = llm.requests[-1].messages
    assert messages[1:-1] == history and messages[-1]["content"] == "next"
    await brain.aclose()


async def test_system_prompt_and_knowledge_file(llm: FakeLlm, r: aioredis.Redis, tmp_path) -> None:
    knowledge = tmp_path / "k.md"
    knowledge.write_text("The office opens at nine.")
    brain = LlmBrain(r, settings_for(llm, llm_system_prompt="You are Ada.", llm_knowledge_file=str(knowledge)))
    await collect(await brain.reply("s1", "when?"))
    system = llm.requests[-1].messages[0]["content"]
    assert system.startswith("You are Ada.") and "opens at nine" in system
    await brain.aclose()


async def test_llm_errors_become_a_spoken_apology_and_a_clear_error(
    llm: FakeLlm, r: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    brain = LlmBrain(r, settings_for(llm))
    llm.fail_next(503)
    reply = await brain.reply("s1", "hi")
    assert await collect(reply) == [APOLOGY]
    assert reply.error is not None and reply.error.code == "llm_failed" and not reply.error.fatal
    # cut mid-stream: what came is kept, no apology glued on, still an error
    llm.cut_after = 6
    llm.script(["One two three. Four five six seven eight."])
    reply = await brain.reply("s1", "hi")
    assert await collect(reply) == ["One two three."]
    assert reply.error is not None
    llm.cut_after = None
    await brain.aclose()
    # nobody listening at all, and a wrong key
    for bad in (LlmBrain(r, settings_for(None, llm_base_url="http://127.0.0.1:9/v1")),
                LlmBrain(r, settings_for(llm, llm_api_key=SecretStr("sk-wrong-key-123")))):
        reply = await bad.reply("s1", "hi")
        assert await collect(reply) == [APOLOGY] and reply.error is not None
        await bad.aclose()
    assert KEY not in caplog.text and "sk-wrong-key-123" not in caplog.text


async def test_without_an_llm_the_local_responder_serves(r: aioredis.Redis) -> None:
    settings = settings_for(None)
    brain = make_brain(r, settings, LocalResponder())
    assert isinstance(brain, LocalBrain)
    reply = await brain.reply("s1", "hello")
    sentences = await collect(reply)
    assert sentences and reply.text == " ".join(sentences) and reply.error is None
    assert isinstance(make_brain(r, settings_for(FakeLlm()), LocalResponder()), LlmBrain)


# ---------------------------------------------------------------- the worker with the brain


class StubAvatar:
    """Takes sentences as they come; 'interrupted' after `cut_after` sentences."""

    answers_itself = False

    def __init__(self, cut_after: int | None = None) -> None:
        self.cut_after = cut_after
        self.heard: list[str] = []

    async def speak(self, reply_id: str, text, *, user_text: str | None = None) -> str:
        async for sentence in text:
            self.heard.append(sentence)
            if self.cut_after is not None and len(self.heard) >= self.cut_after:
                return " ".join(self.heard)
        return " ".join(self.heard)


async def test_worker_saves_only_what_was_spoken_after_a_barge_in(
    llm: FakeLlm, r: aioredis.Redis, clean_redis: str
) -> None:
    settings = settings_for(llm, redis_url=clean_redis)
    brain = LlmBrain(r, settings)
    worker = AvatarWorker(r, settings, driver=None, brain=brain)  # type: ignore[arg-type]
    sid, _ = await SessionStore(r, Bus(r, settings)).create(SessionConfig())
    llm.script(["Sentence one is here. Sentence two is here. Sentence three is here."] * 2)
    avatar = StubAvatar(cut_after=1)
    conversation = _Conversation(worker, sid, avatar, SessionConfig())  # type: ignore[arg-type]
    await conversation._answer("r-t1", UserTurn(turn_id="t1", text="tell me", source="text"))
    assert await brain.history(sid) == [
        {"role": "user", "content": "tell me"}, {"role": "assistant", "content": "Sentence one is here."},
    ]
    avatar.cut_after = None
    avatar.heard = []
    await conversation._answer("r-t2", UserTurn(turn_id="t2", text="again", source="text"))
    history = await brain.history(sid)
    assert history[-1]["content"] == "Sentence one is here. Sentence two is here. Sentence three is here."
    assert llm.requests[-1].messages[1:3] == history[:2]  # the trimmed turn was the context
    events = [orjson.loads(f[b"e"]) for _, f in await r.xrange(keys.events(sid))]
    replies = [e for e in events if e["type"] == "avatar.reply" and e["reply_id"] == "r-t2"]
    assert replies and replies[-1]["text"] == history[-1]["content"] and replies[-1]["turn_id"] == "t2"
    await brain.aclose()


async def test_worker_publishes_the_llm_error_and_speaks_the_apology(
    llm: FakeLlm, r: aioredis.Redis, clean_redis: str
) -> None:
    settings = settings_for(llm, redis_url=clean_redis)
    brain = LlmBrain(r, settings)
    worker = AvatarWorker(r, settings, driver=None, brain=brain)  # type: ignore[arg-type]
    sid, _ = await SessionStore(r, Bus(r, settings)).create(SessionConfig())
    llm.fail_next(500)
    avatar = StubAvatar()
    conversation = _Conversation(worker, sid, avatar, SessionConfig())  # type: ignore[arg-type]
    await conversation._answer("r-t1", UserTurn(turn_id="t1", text="hi", source="text"))
    assert avatar.heard == [APOLOGY]
    events = [orjson.loads(f[b"e"]) for _, f in await r.xrange(keys.events(sid))]
    assert any(e["type"] == "error" and e["code"] == "llm_failed" and not e["fatal"] for e in events)
    await brain.aclose()
    await asyncio.sleep(0)


class PausingAvatar(StubAvatar):
    async def pause(self) -> bool:
        return True

    async def resume(self) -> None:
        pass


async def test_a_barge_in_heard_after_the_avatars_echo_is_a_new_turn_not_the_rest_of_the_last(
    llm: FakeLlm, r: aioredis.Redis, clean_redis: str
) -> None:
    """One utterance holds the avatar's echo from the start of its answer, then the user's
    "Sorry, can it run offline?" 2 s in; the final may keep only the user's words with the
    utterance's start. Its interims showed where the user's words began: not a continuation.
    The same final with no such interim (the user went on within the window) is one."""
    settings = settings_for(llm, redis_url=clean_redis)
    worker = AvatarWorker(r, settings, driver=None, brain=LocalBrain(r, settings, LocalResponder()))  # type: ignore[arg-type]
    sid, _ = await SessionStore(r, Bus(r, settings)).create(SessionConfig())
    now_ms = int(time.time() * 1000)
    asked = UserTurn(turn_id="u1", text="Tell me about the avatar providers.", source="voice",
                     segments=[TurnSegment(text="Tell me about the avatar providers.", started_at=now_ms - 3000)])
    rest = UserTurn(turn_id="u2", text="Sorry, can it run offline?", source="voice",
                    segments=[TurnSegment(text="Sorry, can it run offline?", started_at=now_ms + 300)])

    def answering() -> _Conversation:
        conversation = _Conversation(worker, sid, PausingAvatar(), SessionConfig())  # type: ignore[arg-type]
        conversation.policy.echo.reply_started()
        conversation.policy.echo.audible_from = now_ms / 1000
        conversation.policy.echo.reply_text("avatar-stack is a self-hostable platform for realtime talking avatars.")
        conversation.answering = asked
        conversation.speaking = asyncio.get_running_loop().create_future()  # the answer is playing
        conversation.floor.on_air = True
        return conversation

    heard_over = answering()
    await heard_over._heard_over_avatar(UserSpeech(
        utterance_id="u2", text="Avatar stack is the self-host of the internet. Sorry, can it run off?",
        started_at=now_ms + 300))
    assert heard_over.paused
    assert heard_over._continued_by(rest) is None
    assert answering()._continued_by(rest) is asked
    # Words with no echo in front, whose interim came 2.5 s into the answer: begun well after it.
    late = answering()
    await late._heard_over_avatar(UserSpeech(utterance_id="u2", text="Sorry, can it run offline?",
                                             started_at=now_ms + 300, ts=now_ms + 2500))
    assert late._continued_by(rest) is None
    soon = answering()  # ... and 0.9 s in: the user only paused
    await soon._heard_over_avatar(UserSpeech(utterance_id="u2", text="Sorry, can it run offline?",
                                             started_at=now_ms + 300, ts=now_ms + 900))
    assert soon._continued_by(rest) is asked


class FailingAvatar(StubAvatar):
    """Speaks one sentence, then its speech fails with `error` (once)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error: Exception | None = error

    async def speak(self, reply_id: str, text, *, user_text: str | None = None) -> str:
        async for sentence in text:
            self.heard.append(sentence)
            if self.error is not None:
                error, self.error = self.error, None
                raise error
        return " ".join(self.heard)

    async def on_user_speaking(self, speaking: bool) -> None:
        return None


async def _events(r: aioredis.Redis, sid: str, kind: str) -> list[dict]:
    return [e for _, f in await r.xrange(keys.events(sid)) if (e := orjson.loads(f[b"e"]))["type"] == kind]


async def _until(predicate, timeout_s: float = 20.0) -> None:
    """Until `predicate()` (a value or an awaitable of one) is true."""
    async with asyncio.timeout(timeout_s):  # a hang guard only
        while True:
            ok = predicate()
            if await ok if inspect.isawaitable(ok) else ok:
                return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("failure", ["redis", "bug"])
async def test_a_reply_whose_speech_fails_is_closed_for_the_page_and_the_next_turn_is_answered(
    failure: str, r: aioredis.Redis, clean_redis: str
) -> None:
    """A Redis outage longer than the client's retries mid-reply (or a bug in the avatar's speech)
    once left the page showing the avatar speaking for good, and a failure just before speaking
    killed the session's speaker unseen: the session read on but never answered again. Now a Redis
    failure hands the session back (the conversation raises it, the next owner closes the reply),
    and a bug closes the reply here; either way the next turn is answered."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    settings = settings_for(None, redis_url=clean_redis)
    worker = AvatarWorker(r, settings, driver=None, brain=LocalBrain(r, settings, LocalResponder()))  # type: ignore[arg-type]
    bus = Bus(r, settings)
    sid, _ = await SessionStore(r, bus).create(SessionConfig())
    error = RedisConnectionError("Redis went away") if failure == "redis" else RuntimeError("speech bug")
    avatar = FailingAvatar(error)
    await bus.publish_turn(sid, UserTurn(turn_id="t1", text="What is avatar stack?", source="text"))
    conversation = asyncio.create_task(_Conversation(worker, sid, avatar, SessionConfig()).run())  # type: ignore[arg-type]
    if failure == "redis":
        with pytest.raises(RedisConnectionError):
            async with asyncio.timeout(20):  # a hang guard: before, the conversation never noticed
                await conversation
        assert await r.hget(keys.session(sid), keys.F_AVATAR_REPLY) == b"r-t1"  # for the next owner
        conversation = asyncio.create_task(_Conversation(worker, sid, avatar, SessionConfig()).run())  # type: ignore[arg-type]

    async def closed() -> bool:
        stops = await _events(r, sid, "avatar.stopped_talking")
        return any(e["reply_id"] == "r-t1" and e["interrupted"] for e in stops)

    await _until(closed)
    await bus.publish_turn(sid, UserTurn(turn_id="t2", text="hello", source="text"))

    async def answered() -> bool:
        return any(e["reply_id"] == "r-t2" for e in await _events(r, sid, "avatar.reply"))

    await _until(answered)
    assert [e["reply_id"] for e in await _events(r, sid, "avatar.stopped_talking")] == ["r-t1"]  # said once
    assert not conversation.done()
    conversation.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await conversation


# ---------------------------------------------------------------- a reply does not start over the user


class ListeningAvatar(StubAvatar):
    async def on_user_speaking(self, speaking: bool) -> None:
        pass

    async def interrupt(self) -> None:
        pass

    async def pause(self) -> bool:
        return False


def _voice_turn(turn_id: str, text: str, ago_ms: int) -> UserTurn:
    started_at = int(time.time() * 1000) - ago_ms
    segments = [TurnSegment(text=text, started_at=started_at)]
    return UserTurn(turn_id=turn_id, text=text, source="voice", segments=segments)


@contextlib.asynccontextmanager
async def _conversation_running(llm: FakeLlm, r: aioredis.Redis, redis_url: str, **settings: object):
    """A session's conversation loop on the worker, with the LLM brain and a listening avatar,
    reading its real `turns:{sid}` stream. Yields (worker, sid, avatar, conversation, brain)."""
    config = settings_for(llm, redis_url=redis_url, **settings)
    brain = LlmBrain(r, config)
    worker = AvatarWorker(r, config, driver=None, brain=brain)  # type: ignore[arg-type]
    sid, _ = await SessionStore(r, Bus(r, config)).create(SessionConfig())
    avatar = ListeningAvatar()
    conversation = _Conversation(worker, sid, avatar, SessionConfig())  # type: ignore[arg-type]
    running = asyncio.create_task(conversation.run())
    try:
        yield worker, sid, avatar, conversation, brain
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await brain.aclose()


async def test_a_reply_ready_while_the_user_goes_on_is_dropped_unheard_and_answered_with_the_rest(
    llm: FakeLlm, r: aioredis.Redis, clean_redis: str
) -> None:
    """The recognizer ended "How does that?" at the user's pause and the brain began (an LLM's
    first sentence takes a while); the user's voice came back before a word of it was heard. The
    reply waits unheard, the rest drops it, and the whole question is answered once."""
    llm.token_delay_s = 0.15  # the first sentence is ready about a second after the request
    llm.script(["The first answer, to half a question only. It goes on.", "The whole answer is here. Done."])
    async with _conversation_running(llm, r, clean_redis) as (worker, sid, avatar, conversation, brain):
        now_ms = int(time.time() * 1000)
        await worker.bus.publish_turn(sid, _voice_turn("t1", "How does that?", 1500))
        await _until(lambda: len(llm.requests) == 1)  # the brain began on it
        await worker.bus.publish_turn(sid, SpeechStarted())  # ... and the user goes on
        await worker.bus.publish_turn(sid, UserSpeech(utterance_id="t2", text="work with", started_at=now_ms))
        await worker.bus.publish_turn(sid, _voice_turn("t2", "work with redis cluster?", 0))
        await _until(lambda: len(llm.requests) == 2 and avatar.heard == ["The whole answer is here.", "Done."])
        assert llm.requests[-1].messages[-1]["content"] == "How does that? work with redis cluster?"
        replies = await _events(r, sid, "avatar.reply")
        assert replies and {e["reply_id"] for e in replies} == {"r-t2"}, "the dropped reply was shown"
        assert replies[-1]["replaces"] == "r-t1"
        await _until(lambda: not conversation._talking())
        history = await brain.history(sid)
        assert [m["content"] for m in history if m["role"] == "user"] == ["How does that? work with redis cluster?"]


async def test_a_ready_reply_waits_for_a_voice_that_came_back_and_goes_on_when_it_was_nothing(
    llm: FakeLlm, r: aioredis.Redis, clean_redis: str
) -> None:
    """A voice onset after the turn (a cough, a "mhm") holds the ready reply; once what it was is
    known not to be a turn, the reply is heard (and shown) after all. With no hold it is heard at once."""
    for hold_s, held in ((5.0, True), (0.0, False)):
        llm.token_delay_s = 0.15
        llm.script(["Here is the answer you asked for. It is short."])
        async with _conversation_running(llm, r, clean_redis, reply_hold_s=hold_s) as (
            worker, sid, avatar, conversation, _,
        ):
            requests = len(llm.requests)
            await worker.bus.publish_turn(sid, _voice_turn("t1", "What is avatar stack?", 1500))
            await _until(lambda r0=requests: len(llm.requests) == r0 + 1)
            await worker.bus.publish_turn(sid, SpeechStarted())
            await asyncio.sleep(2.5)  # the reply was ready long since
            assert bool(avatar.heard) is not held, avatar.heard
            if held:
                assert conversation.floor.holding
                await worker.bus.publish_turn(sid, _voice_turn("t2", "Mhm.", 400))
                await _until(lambda a=avatar: a.heard == ["Here is the answer you asked for.", "It is short."])
                ignored = await _events(r, sid, "transcript.ignored")
                assert any(e["reason"] == "backchannel" for e in ignored)
            assert [e["reply_id"] for e in await _events(r, sid, "avatar.reply")][-1] == "r-t1"


async def test_the_rest_of_a_question_said_over_the_first_words_of_its_answer_continues_it(
    llm: FakeLlm, r: aioredis.Redis, clean_redis: str
) -> None:
    """"Which providers … does it support for the avatar?": the answer to "Which providers?" has
    begun when the user goes on. The interims are the user's words (they pause the avatar); the
    final writes the echo in front of them in the same clause. The final is not dropped as echo,
    and it continues the question, counted from where the user's words began: the first interim
    that had them, not each later one."""
    settings = settings_for(llm, redis_url=clean_redis)
    worker = AvatarWorker(r, settings, driver=None, brain=LocalBrain(r, settings, LocalResponder()))  # type: ignore[arg-type]
    sid, _ = await SessionStore(r, Bus(r, settings)).create(SessionConfig())
    now_ms = int(time.time() * 1000)
    asked = UserTurn(turn_id="u1", text="Which providers?", source="voice",
                     segments=[TurnSegment(text="Which providers?", started_at=now_ms - 1500)])
    conversation = _Conversation(worker, sid, PausingAvatar(), SessionConfig())  # type: ignore[arg-type]
    conversation.policy.echo.reply_started()
    conversation.policy.echo.audible_from = now_ms / 1000
    conversation.policy.echo.reply_text(
        "For speech to text you can use Deepgram in the cloud, or a local Whisper model that runs on your own "
        "machine. For the avatar you can use HeyGen or LiveAvatar.")
    conversation.answering = asked
    conversation.speaking = asyncio.get_running_loop().create_future()  # the answer is playing
    for text, ts in (("Does it support?", now_ms + 1500), ("Does it support for the", now_ms + 2300)):
        await conversation._heard_over_avatar(UserSpeech(utterance_id="u2", text=text, started_at=now_ms + 300,
                                                         ts=ts))
    assert conversation.paused
    rest = UserTurn(turn_id="u2", text="For speeds and supports for the avatar.", source="voice",
                    segments=[TurnSegment(text="For speeds and supports for the avatar.", started_at=now_ms + 300)])
    assert await conversation._is_a_turn(rest)
    assert rest.text == "and supports for the avatar."
    assert conversation._continued_by(rest) is asked
