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
from collections import Counter, deque
from typing import Literal

from common.settings import Settings

_WORD = re.compile(r"[\w']+")
MAX_SPOKEN_WORDS = 400  # echo reference: the avatar's latest words, bounded
ECHO_DELAY_S = 0.5  # loudspeaker → room → microphone → network, at most

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
        """Only backchannel: a listed phrase, or a few listed words ("yeah yeah", "oh okay")."""
        heard = words_of(text)
        if not heard:
            return False
        return " ".join(heard) in self.phrases or (len(heard) <= 4 and all(w in self.words for w in heard))


class EchoGuard:
    """The avatar's own recent words, and the span of wall time in which they could be heard."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.echo_guard
        self.tail_s = settings.echo_tail_s
        self.ratio = settings.echo_match
        self.spoken: deque[str] = deque(maxlen=MAX_SPOKEN_WORDS)
        self.audible_from = 0.0  # unix time the current/last reply started
        self.audible_until = 0.0  # unix time it ended; inf while it is being spoken
        self._reply_words = 0  # words of the current reply already in `spoken`

    def reply_started(self) -> None:
        self._reply_words = 0
        self.audible_from = time.time()
        self.audible_until = float("inf")

    def reply_text(self, text: str) -> None:
        """The current reply's text so far (it grows sentence by sentence)."""
        words = words_of(text)
        self.spoken.extend(words[self._reply_words:])
        self._reply_words = len(words)

    def reply_ended(self) -> None:
        self.audible_until = time.time()

    def could_be_echo(self, started_at_ms: int) -> bool:
        """Speech that began while the avatar was audible (0: unknown start, judged by the tail)."""
        if started_at_ms <= 0:
            return time.time() <= self.audible_until + self.tail_s
        started = started_at_ms / 1000
        return self.audible_from - ECHO_DELAY_S <= started <= self.audible_until + ECHO_DELAY_S

    def match(self, text: str, started_at_ms: int = 0) -> bool:
        if not self.enabled or not self.spoken or not self.could_be_echo(started_at_ms):
            return False
        heard = words_of(text)
        if not heard:
            return False
        return best_window_overlap(list(self.spoken), heard) >= self.ratio * len(heard)


def best_window_overlap(spoken: list[str], heard: list[str], slack: int = 3) -> int:
    """Most heard words found in one stretch of the avatar's speech (a little longer than what was
    heard). Echo is a contiguous piece of what it said, misheard here and there; words that only
    occur scattered across a long reply are the user's own."""
    need = Counter(heard)
    width = len(heard) + slack
    best = 0
    for start in range(max(1, len(spoken) - len(heard) + 1)):
        window = Counter(spoken[start:start + width])
        best = max(best, sum(min(n, window[w]) for w, n in need.items()))
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
