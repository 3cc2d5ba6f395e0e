"""What the user's words mean while the avatar talks: a barge-in, a backchannel, or echo.

The avatar worker knows what the avatar is saying and when, so it is where speech heard over the
avatar is judged:

- **Echo**: speech that began while the avatar could be heard (until `ECHO_DELAY_S` after its
  reply ended) and repeats its words is its own voice coming back through the user's speakers,
  never a barge-in and never a turn. Timing comes from the STT worker (`started_at`: when the
  audio reached it), so a user who repeats the avatar's words after it stopped is still heard.
- **Backchannel**: "mhm", "yeah", "right" said over the avatar mean "go on", not "stop".
- Anything else with at least `barge_in_min_words` words is the user taking the floor.
"""

from __future__ import annotations

import re
import time
from difflib import SequenceMatcher
from typing import Literal

from common.settings import Settings

_WORD = re.compile(r"[\w']+")
HUM = re.compile(r"m+h*m*|h+m+|u+h+|a+h+|o+h+|e+h+")  # "mmm", "hmm", "uhh": how a recognizer spells a hum
MAX_SPOKEN_WORDS = 400  # echo reference: the avatar's latest words, bounded
FUNCTION_WORDS = frozenset(
    """a an the and or but so to of in on at for with by from as is are was were be been am it its
    this that these those i you he she we they me my your our their can could would should will do
    does did have has had not no yes what how which who when where why if then than there here
    just also very""".split()
)
ECHO_DELAY_S = 0.5  # loudspeaker → room → microphone → network, at most
ECHO_TAIL_WORDS = 25  # the previous reply's last words can still be echoing as the next one starts
SPOKEN_WORDS_PER_S = 2.6  # how fast the avatar speaks, to guess which words were playing when
ECHO_WINDOW_BEFORE, ECHO_WINDOW_AFTER = 20, 12  # words around that guess (it is only a guess)

Heard = Literal["echo", "backchannel", "words", "nothing"]


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("-", " "))


class Backchannels:
    """Per-language phrases that say "go on" (`BACKCHANNELS`, comma-separated per language)."""

    def __init__(self, settings: Settings, language: str) -> None:
        primary = (language or "en").split("-")[0].lower()
        listed = settings.backchannels.get(primary) or settings.backchannels.get("en", "")
        self.phrases = {" ".join(words_of(p)) for p in listed.split(",") if words_of(p)}
        self.words = {w for p in self.phrases for w in p.split()}

    def match(self, text: str) -> bool:
        """Only backchannel: a listed phrase, or listed words and hums ("yeah yeah yeah", "mmm, okay")."""
        heard = words_of(text)
        if not heard:
            return False
        if " ".join(heard) in self.phrases:
            return True
        return len(heard) <= 8 and all(w in self.words or HUM.fullmatch(w) for w in heard)


class EchoGuard:
    """The avatar's own recent words, and the span of wall time in which they could be heard.

    Echo comes back misheard ("self-hostable" as "self-host of") and in fragments, so words match
    loosely (`similar`) and only against the stretch of the reply being played about when the
    heard speech began (the position is estimated from the time since the reply started)."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.echo_guard
        self.tail_s = settings.echo_tail_s
        self.ratio = settings.echo_match
        self.words: list[str] = []  # the current (or last) reply's words, bounded
        self.before: list[str] = []  # the tail of the reply before it
        self.audible_from = 0.0  # unix time the current/last reply started
        self.audible_until = 0.0  # unix time it ended; inf while it is being spoken

    @property
    def spoken(self) -> list[str]:
        return self.before + self.words

    def reply_started(self) -> None:
        self.before = self.words[-ECHO_TAIL_WORDS:]
        self.words = []
        self.audible_from = time.time()
        self.audible_until = float("inf")

    def reply_text(self, text: str) -> None:
        """The current reply's text so far (it grows sentence by sentence)."""
        self.words = words_of(text)[-MAX_SPOKEN_WORDS:]

    def reply_ended(self) -> None:
        self.audible_until = time.time()

    def could_be_echo(self, started_at_ms: int) -> bool:
        """Speech that began while the avatar was audible (0: unknown start, judged by the tail)."""
        if started_at_ms <= 0:
            return time.time() <= self.audible_until + self.tail_s
        started = started_at_ms / 1000
        return self.audible_from - ECHO_DELAY_S <= started <= self.audible_until + ECHO_DELAY_S

    def reference(self, started_at_ms: int, heard_words: int) -> list[str]:
        """The words the avatar was saying while speech of `heard_words` words that began at
        `started_at_ms` was heard."""
        if started_at_ms <= 0 or not self.words:
            return self.spoken
        at = int((started_at_ms / 1000 - self.audible_from) * SPOKEN_WORDS_PER_S)
        lo = max(0, at - ECHO_WINDOW_BEFORE)
        return (self.before if lo == 0 else []) + self.words[lo:at + ECHO_WINDOW_AFTER + heard_words]

    def match(self, text: str, started_at_ms: int = 0) -> bool:
        if not self.enabled or not self.spoken or not self.could_be_echo(started_at_ms):
            return False
        words = words_of(text)
        heard = content_words(words)
        if not heard:
            return False
        found = best_window_overlap(self.reference(started_at_ms, len(words)), heard)
        if found > self.ratio * len(heard):
            return True
        # A short fragment heard while the avatar is audible that shares a content word with what it
        # is saying is its voice, misheard ("First speech to tap" for "For speech to text"). The
        # price: a short barge-in that repeats the avatar's own words waits for its final turn.
        return self.audible_until == float("inf") and len(heard) <= 3 and found >= 1


def similar(a: str, b: str) -> bool:
    """The same word, misheard a little: equal, sharing a 4-letter start, or (long words) mostly
    the same letters."""
    if a == b:
        return True
    if min(len(a), len(b)) >= 4 and a[:4] == b[:4]:
        return True
    return min(len(a), len(b)) >= 5 and SequenceMatcher(None, a, b).ratio() >= 0.75


def content_words(words: list[str]) -> list[str]:
    """The words that carry evidence: "it", "can", "the" are in everyone's sentences."""
    content = [w for w in words if w not in FUNCTION_WORDS]
    return content or words


def best_window_overlap(spoken: list[str], heard: list[str], slack: int = 3) -> int:
    """Most heard words found (loosely) in one stretch of the avatar's speech a little longer than
    what was heard. Echo is a contiguous piece of what it said, misheard here and there; words
    that only occur scattered across a long reply are the user's own."""
    width = len(heard) + slack
    best = 0
    for start in range(max(1, len(spoken) - len(heard) + 1)):
        window = spoken[start:start + width]
        best = max(best, sum(1 for word in heard if any(similar(word, said) for said in window)))
        if best == len(heard):
            break
    return best


class TurnPolicy:
    """Judges what was heard; `avatar_talking` says whether the avatar is audible right now."""

    def __init__(self, settings: Settings, language: str) -> None:
        self.min_words = settings.barge_in_min_words
        self.backchannels = Backchannels(settings, language)
        self.echo = EchoGuard(settings)

    def judge(self, text: str, *, avatar_talking: bool, started_at: int = 0, interim: bool = False) -> Heard:
        """`interim`: words of an utterance still going on, which need `min_words` to count."""
        if not words_of(text):
            return "nothing"
        if self.echo.match(text, started_at):
            return "echo"
        if avatar_talking and self.backchannels.match(text):
            return "backchannel"
        if interim and len(words_of(text)) < self.min_words:
            return "nothing"
        return "words"
