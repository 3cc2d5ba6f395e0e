"""The brain: what the avatar answers, as a stream of sentences, with a per-session memory.

Two backends behind one interface (`Brain.reply` / `Brain.remember`):
- `LlmBrain`: any OpenAI-compatible chat-completions server (`LLM_BASE_URL`), streamed; the reply
  is cut into sentences as tokens arrive, so the avatar starts speaking after the first sentence,
  not after the whole answer.
- `LocalBrain`: the offline Q&A responder (`LocalResponder`), used when `LLM_BASE_URL` is empty.

History lives in Redis (`history:{sid}`, a list of JSON messages, the last `llm_history_messages`
kept, expiring with the session). What is saved as the assistant's turn is what the avatar
actually said: after a barge-in, only the sentences that had started playing (the driver reports
them), so the model never believes the user heard an answer they cut off.

An LLM failure never crashes a session: a reply that fails before its first sentence is replaced
by a short spoken apology, and `Reply.error` carries a clear (non-fatal) error event for the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from avatar_service.llm import ChatClient, LlmError
from avatar_service.responder import LocalResponder, _speakable, split_sentences
from common import keys
from common.models import ErrorEvent
from common.settings import Settings

log = logging.getLogger(__name__)

APOLOGY = "Sorry, I can't think of an answer right now. Please try again in a moment."
FIRST_MAX_CHARS = 120  # the first piece is cut early (at a comma) so speech starts sooner
MAX_CHARS = 250
DEFAULT_SYSTEM_PROMPT = (
    "You are the avatar-stack demo avatar, a friendly assistant in a live voice conversation. "
    "Answer briefly, in one to three short spoken sentences. Use plain text only: no Markdown, "
    "no lists, no emoji, no URLs."
)


# ---------------------------------------------------------------- sentence cutting


class SentenceCutter:
    """Turns a stream of text deltas into whole sentences, each as soon as it is complete.

    A sentence is complete when the text after it has started (a boundary needs whitespace after
    the full stop, so "3." in "3.5" is never cut); a sentence longer than the limit is cut at a
    comma or space. `flush()` returns what is left at the end of the stream.
    """

    def __init__(self, first_max_chars: int = FIRST_MAX_CHARS, max_chars: int = MAX_CHARS) -> None:
        self.first_max_chars = first_max_chars
        self.max_chars = max_chars
        self.emitted = 0
        self._buf = ""

    def feed(self, delta: str) -> list[str]:
        self._buf += delta
        if not self._buf.strip():
            return []
        out: list[str] = []
        while True:
            limit = self.first_max_chars if self.emitted == 0 else self.max_chars
            parts = split_sentences(self._buf, limit)
            if len(parts) <= 1:
                return out
            head = parts[0]
            out.extend(self._clean([head]))
            self.emitted += 1
            # The rest of the buffer: drop the emitted head (whitespace-insensitively).
            self._buf = _after(self._buf, head)

    def flush(self) -> list[str]:
        rest, self._buf = self._buf, ""
        if not rest.strip():
            return []
        pieces = self._clean(split_sentences(rest, self.first_max_chars if self.emitted == 0 else self.max_chars))
        self.emitted += len(pieces)
        return pieces

    @staticmethod
    def _clean(pieces: list[str]) -> list[str]:
        return [s for s in (_speakable(p) for p in pieces) if s]


def _after(text: str, head: str) -> str:
    """`text` without its leading `head`, where `head` is `text`'s start with whitespace collapsed."""
    i = 0
    for word in head.split():
        i = text.index(word, i) + len(word)
    return text[i:]


# ---------------------------------------------------------------- replies


class Reply:
    """One answer being produced: sentences as they become ready, the full text once done."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.sentences_so_far: list[str] = []
        self.done = asyncio.Event()
        self.changed = asyncio.Event()  # set on each new sentence and at the end
        self.error: ErrorEvent | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def of_text(cls, text: str) -> Reply:
        reply = cls()
        for sentence in split_sentences(text, MAX_CHARS):
            reply._put(sentence)
        reply._finish()
        return reply

    @property
    def text(self) -> str:
        """The reply so far (the whole reply once `done` is set)."""
        return " ".join(self.sentences_so_far)

    async def sentences(self) -> AsyncIterator[str]:
        """Each sentence once, in order, as soon as it is ready. Iterate at most once."""
        while True:
            sentence = await self._queue.get()
            if sentence is None:
                return
            yield sentence

    async def aclose(self) -> None:
        """Stop producing (the reply was interrupted or the session went away)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._finish()

    def _put(self, sentence: str) -> None:
        self.sentences_so_far.append(sentence)
        self._queue.put_nowait(sentence)
        self.changed.set()

    def _finish(self) -> None:
        if not self.done.is_set():
            self.done.set()
            self._queue.put_nowait(None)
            self.changed.set()


# ---------------------------------------------------------------- brains


class Brain:
    """History handling shared by both backends; `reply` is the backend's."""

    name = "base"

    def __init__(self, r: aioredis.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self.max_messages = max(0, settings.llm_history_messages)

    async def reply(self, sid: str, user_text: str) -> Reply:
        raise NotImplementedError

    async def history(self, sid: str) -> list[dict[str, str]]:
        if self.max_messages == 0:
            return []
        raw = await self.r.lrange(keys.history(sid), -self.max_messages, -1)
        return [orjson.loads(item) for item in raw]

    async def remember(self, sid: str, user_text: str, spoken_text: str) -> None:
        """Append the exchange as it happened: the user's words, and what the avatar actually said."""
        if self.max_messages == 0:
            return
        messages = [{"role": "user", "content": user_text}]
        if spoken_text.strip():
            messages.append({"role": "assistant", "content": spoken_text.strip()})
        key = keys.history(sid)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *[orjson.dumps(m) for m in messages])
            pipe.ltrim(key, -self.max_messages, -1)
            pipe.expire(key, int(self.settings.session_max_s) + 60)
            await pipe.execute()

    async def aclose(self) -> None:
        return None


class LocalBrain(Brain):
    """The offline Q&A responder behind the brain interface (no model, no network)."""

    name = "local"

    def __init__(self, r: aioredis.Redis, settings: Settings, responder: LocalResponder) -> None:
        super().__init__(r, settings)
        self.responder = responder

    async def reply(self, sid: str, user_text: str) -> Reply:
        return Reply.of_text(self.responder.reply(user_text))


class LlmBrain(Brain):
    """An OpenAI-compatible model, streamed and cut into sentences as it answers."""

    name = "llm"

    def __init__(self, r: aioredis.Redis, settings: Settings, client: ChatClient | None = None) -> None:
        super().__init__(r, settings)
        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else ""
        self.client = client or ChatClient(
            settings.llm_base_url, key, settings.llm_model, timeout_s=settings.llm_timeout_s,
            max_tokens=settings.llm_max_tokens, temperature=settings.llm_temperature,
        )
        self.system_prompt = system_prompt(settings)

    async def reply(self, sid: str, user_text: str) -> Reply:
        messages = [{"role": "system", "content": self.system_prompt}]
        messages += await self.history(sid)
        messages.append({"role": "user", "content": user_text})
        reply = Reply()
        reply._task = asyncio.create_task(self._produce(sid, messages, reply), name=f"llm:{sid}")
        return reply

    async def _produce(self, sid: str, messages: list[dict[str, str]], reply: Reply) -> None:
        cutter = SentenceCutter()
        try:
            async for delta in self.client.stream(messages):
                for sentence in cutter.feed(delta):
                    reply._put(sentence)
            for sentence in cutter.flush():
                reply._put(sentence)
            if not reply.sentences_so_far:
                raise LlmError(200, "empty reply")
        except LlmError as exc:
            log.error("LLM reply failed: %s", exc, extra={"sid": sid})
            reply.error = ErrorEvent(code="llm_failed", message="the assistant could not answer; please try again")
            if not reply.sentences_so_far:
                reply._put(APOLOGY)
        except Exception:  # a bug here must not leave the speaker waiting forever
            log.exception("LLM reply failed", extra={"sid": sid})
            reply.error = ErrorEvent(code="llm_failed", message="the assistant could not answer; please try again")
            if not reply.sentences_so_far:
                reply._put(APOLOGY)
        finally:
            reply._finish()

    async def aclose(self) -> None:
        await self.client.aclose()


def system_prompt(settings: Settings) -> str:
    prompt = settings.llm_system_prompt.strip() or DEFAULT_SYSTEM_PROMPT
    if settings.llm_knowledge_file:
        knowledge = Path(settings.llm_knowledge_file).read_text(encoding="utf-8").strip()
        if knowledge:
            prompt += "\n\nAnswer from this knowledge where it applies:\n\n" + knowledge
    return prompt


def make_brain(r: aioredis.Redis, settings: Settings, responder: LocalResponder) -> Brain:
    if settings.llm_base_url.strip():
        log.info("brain: OpenAI-compatible model %r at %s", settings.llm_model, settings.llm_base_url)
        return LlmBrain(r, settings)
    log.info("brain: local Q&A responder (set LLM_BASE_URL for a model)")
    return LocalBrain(r, settings, responder)
