"""What the user's words mean while the avatar talks: a barge-in, a backchannel, or echo.

The avatar worker knows what the avatar is saying and when, so it is where speech heard over the
avatar is judged:

- **Echo**: speech that began while the avatar could be heard (until `ECHO_DELAY_S` after its
  reply ended) and repeats its words is its own voice coming back through the user's speakers,
  never a barge-in and never a turn. Timing comes from the STT worker (`started_at`: when the
  audio reached it), so a user who repeats the avatar's words after it stopped is still heard.
- **Backchannel**: "mhm", "yeah", "right" said over the avatar mean "go on", not "stop".
- Anything else with at least `barge_in_min_words` words is the user taking the floor, and so is
  a single word that opens a listed barge-in cue ("wait", "sorry").
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from difflib import SequenceMatcher
from typing import Literal

from common.settings import Settings

_WORD = re.compile(r"[\w']+")
# Where a recognizer ends a clause: punctuation, or a cut-off word ("self-hostable- Sorry").
_CLAUSE_END = re.compile(r"(?:[.?!,;:\u2026]+|-)(?:\s+|$)")
HUM = re.compile(r"m+h*m*|h+m+|u+h+|h+u+h+|a+h+|o+h+|e+h+")  # "mmm", "hmm", "uhh": how a recognizer spells a hum
MAX_SPOKEN_WORDS = 400  # echo reference: the avatar's latest words, bounded
FUNCTION_WORDS = frozenset(
    """a an the and or but so to of in on at for with by from as is are was were be been am it its
    this that these those i you he she we they me my your our their can could would should will do
    does did have has had not no yes what how which who when where why if then than there here
    just also very may might must i'm you're we're they're it's that's there's what's who's how's
    don't doesn't didn't can't isn't aren't won't i'll you'll we'll i've you've i'd you'd let's""".split()
)
ECHO_DELAY_S = 0.5  # loudspeaker → room → microphone → network, at most
ECHO_TAIL_WORDS = 25  # the previous reply's last words can still be echoing as the next one starts
ECHO_OVERLAP_S = 1.0  # echo a recognizer writes in front of the user's words may overlap them by this
SPOKEN_WORDS_PER_S = 2.6  # how fast the avatar speaks, to guess which words were playing when
ECHO_WINDOW_BEFORE, ECHO_WINDOW_AFTER = 20, 12  # words around that guess (it is only a guess)
USER_CLAUSE_MAX_OVERLAP = 0.25  # in a text of echo, a clause sharing more than this is echo too

Heard = Literal["echo", "backchannel", "words", "nothing"]


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("-", " "))


def clauses(text: str) -> list[str]:
    """`text` cut where the recognizer ended a clause, empty pieces dropped."""
    pieces, start = [], 0
    for end in _CLAUSE_END.finditer(text):
        pieces.append(text[start:end.end()].strip())
        start = end.end()
    pieces.append(text[start:].strip())
    return [p for p in pieces if words_of(p)]


def phrases_for(lists: dict[str, str], language: str) -> set[str]:
    """The comma-separated phrases listed for `language` ("en-US" → "en"; English when unlisted),
    each as its normalized words."""
    primary = (language or "en").split("-")[0].lower()
    listed = lists.get(primary) or lists.get("en", "")
    return {" ".join(words_of(p)) for p in listed.split(",") if words_of(p)}


class Backchannels:
    """Per-language phrases that say "go on" (`BACKCHANNELS`, comma-separated per language)."""

    def __init__(self, settings: Settings, language: str) -> None:
        self.phrases = phrases_for(settings.backchannels, language)
        self.words = {w for p in self.phrases for w in p.split()}

    def match(self, text: str) -> bool:
        """Only backchannel: a listed phrase, or listed words and hums ("yeah yeah yeah", "mmm, okay")."""
        heard = words_of(text)
        if not heard:
            return False
        if " ".join(heard) in self.phrases:
            return True
        if len(heard) <= 4 and all(len(w) == 1 for w in heard):
            return True  # a hum spelled out by the recognizer: "M. H. N."
        return len(heard) <= 8 and all(w in self.words or HUM.fullmatch(w) for w in heard)


class BargeInCues:
    """Per-language openings that mean "let me speak" ("wait", "sorry", "hold on"; `BARGE_IN_CUES`):
    an interim that begins with one pauses the avatar at its first word instead of the
    `barge_in_min_words`-th, a word sooner (the pause is undone if no turn follows). An interim
    that ends inside a cue ("Hold", "Excuse") counts too: recognizers write a word as it ends, so
    waiting for the cue's last word would cost what the cue saves."""

    def __init__(self, settings: Settings, language: str) -> None:
        self.phrases = [p.split() for p in phrases_for(settings.barge_in_cues, language)]

    def opens(self, text: str) -> bool:
        heard = words_of(text)
        return bool(heard) and any(heard[:len(cue)] == cue[:len(heard)] for cue in self.phrases)

    def leads(self, text: str) -> bool:
        """A whole cue and more after it ("Hold on, who are you?"): the user's own sentence."""
        heard = words_of(text)
        return any(heard[:len(cue)] == cue and len(heard) > len(cue) for cue in self.phrases)


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
        self.before_until = 0.0  # unix time that reply ended
        self.audible_from = 0.0  # unix time the current/last reply started
        self.audible_until = 0.0  # unix time it ended; inf while it is being spoken

    @property
    def spoken(self) -> list[str]:
        return self.before + self.words

    def reply_started(self) -> None:
        self.before = self.words[-ECHO_TAIL_WORDS:]
        self.before_until = min(self.audible_until, time.time())  # (cut off unended: it stopped now)
        self.words = []
        self.audible_from = time.time()
        self.audible_until = float("inf")

    def reply_text(self, text: str) -> None:
        """The current reply's text so far (it grows sentence by sentence)."""
        self.words = words_of(text)[-MAX_SPOKEN_WORDS:]

    def reply_ended(self) -> None:
        if self.audible_until == float("inf"):  # (a reply dropped before it was heard never began)
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
        # The reply before this one may still be echoing as this one starts, but not once it has
        # been quiet for longer than the echo takes to come back.
        echoing = lo == 0 and started_at_ms / 1000 <= self.before_until + ECHO_DELAY_S
        return (self.before if echoing else []) + self.words[lo:at + ECHO_WINDOW_AFTER + heard_words]

    def match(self, text: str, started_at_ms: int = 0, ratio: float | None = None) -> bool:
        """Whether `text` is echo: more than `ratio` (default `ECHO_MATCH`) of its content words
        are (loosely) in the stretch of the avatar's speech being played when it began."""
        if not self.enabled or not self.spoken or not self.could_be_echo(started_at_ms):
            return False
        words = words_of(text)
        heard = content_words(words)
        if not heard:
            return False
        found = best_window_overlap(self.reference(started_at_ms, len(words)), heard)
        if found > (self.ratio if ratio is None else ratio) * len(heard):
            return True
        # A short fragment heard while the avatar is audible that shares a content word with what it
        # is saying is its voice, misheard ("First speech to tap" for "For speech to text"). The
        # price: a short barge-in that repeats the avatar's own words waits for its final turn.
        return self.audible_until == float("inf") and len(heard) <= 3 and found >= 1


    def residual(self, text: str, started_at_ms: int = 0, enough: Callable[[str], bool] | None = None) -> str:
        """What of `text` is not the avatar's own voice.

        With echo all the time the avatar talks, a recognizer hears no pause between its voice and
        the user's: one utterance holds both ("Avatar stack is a self-hostable- Sorry, can it run
        offline?"). So each clause is judged at about the time it was said (the utterance's start
        plus its words so far at a speaking pace) and only the clauses that are not echo remain.
        A text that is echo as a whole keeps a remainder only if `enough` says it counts (by
        default: two content words)."""
        whole = self.match(text, started_at_ms)
        parts = clauses(text)
        if len(parts) <= 1:
            return "" if whole else text
        kept, at, previous_kept = [], started_at_ms, False
        for i, part in enumerate(parts):
            if i and not set(words_of(part)) - FUNCTION_WORDS:
                # Words everyone says ("who are you?") tell nothing by themselves: the clause goes
                # with the one before it ("Hold on, who are you?"; "... in your browser, you know").
                keep = previous_kept
            else:
                # Inside a text that is echo as a whole, a clause is the user's only when it shares
                # (almost) nothing with what the avatar was saying: echo is misheard clause by clause.
                keep = not self.match(part, at, USER_CLAUSE_MAX_OVERLAP if whole else None)
            if keep:
                kept.append(part)
            previous_kept = keep
            if at > 0:
                at += round(len(words_of(part)) / SPOKEN_WORDS_PER_S * 1000)
        rest = " ".join(kept)
        if whole and not (enough or _two_content_words)(rest):
            return ""
        return rest


    def after_echo(self, text: str, started_at_ms: int = 0) -> str:
        """The words after the last one that the avatar was saying: the user who talks over its
        echo comes last in the utterance, and a recognizer often writes it all as one clause
        ("Avatar stack is a self-hostable fight for how do I scale it")."""
        tokens = text.split()
        reference = self.reference(started_at_ms, len(words_of(text)))
        last = -1
        for i, token in enumerate(tokens):
            words = [w for w in words_of(token) if w not in FUNCTION_WORDS]
            if any(similar(w, said) for w in words for said in reference):
                last = i
        return " ".join(tokens[last + 1:])


def started_at_of(rest: str, text: str, started_at_ms: int) -> int:
    """When `rest`, what is left of `text` once its echo is out, began: the echo in front of it
    was the avatar's words, said at its pace, less `ECHO_OVERLAP_S` of them that may have been
    said over the user's first words (a recognizer writes both talkers one after the other).
    (0 stays 0: unknown.)"""
    heard, kept = words_of(text), words_of(rest)
    if started_at_ms <= 0 or not kept or heard[:len(kept)] == kept:
        return started_at_ms
    probe = kept[:3]
    before = next((i for i in range(len(heard)) if heard[i:i + len(probe)] == probe), 0)
    return started_at_ms + round(max(0.0, before / SPOKEN_WORDS_PER_S - ECHO_OVERLAP_S) * 1000)


def _asked(text: str) -> bool:
    """A question of three words or more ("why do I scale it?"), as the recognizer wrote it."""
    return text.rstrip().endswith("?") and len(words_of(text)) >= 3


def _two_content_words(text: str) -> bool:
    return len(content_words(words_of(text))) >= 2


def similar(a: str, b: str) -> bool:
    """The same word, misheard a little: equal but for an apostrophe ("you're" for "your"),
    sharing a 4-letter start, or (long words) mostly the same letters."""
    a, b = a.replace("'", ""), b.replace("'", "")
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


class Loudness:
    """How loud the user and the avatar's echo are at this microphone, learnt as the talk goes:
    the user from speech while the avatar is quiet, the echo from speech that repeats its words.

    Words alone fail both ways in a real room: a recognizer mishears echo into words the avatar
    never said ("Tour plus" for "a short pause"), and hears the echo instead of a user talking
    over it. A user next to the microphone is well above the echo of a loudspeaker an arm away,
    so once the two are `gap_db` apart, the level says who is speaking."""

    SMOOTHING = 0.3  # weight of the newest level in the running estimates
    MARGIN_DB = 1.0  # levels this close to the midpoint say nothing

    def __init__(self, gap_db: float) -> None:
        self.gap_db = gap_db
        self.user: float | None = None
        self.echo: float | None = None

    def learn_user(self, level_db: float) -> None:
        self.user = self._blend(self.user, level_db)

    def learn_echo(self, level_db: float) -> None:
        self.echo = self._blend(self.echo, level_db)

    def says(self, level_db: float | None) -> Literal["user", "echo"] | None:
        if level_db is None or self.gap_db <= 0 or self.user is None or self.echo is None:
            return None
        if self.user - self.echo < self.gap_db:
            return None  # a loud loudspeaker, or a quiet user: only the words can tell
        middle = (self.user + self.echo) / 2
        if level_db >= middle + self.MARGIN_DB:
            return "user"
        if level_db <= middle - self.MARGIN_DB:
            return "echo"
        return None

    def at_user_level(self, level_db: float | None) -> bool:
        """As loud as the user's own speech (once the two levels are apart): far louder than the
        echo comes back."""
        if level_db is None or self.gap_db <= 0 or self.user is None or self.echo is None:
            return False
        return self.user - self.echo >= self.gap_db and level_db >= self.user - self.MARGIN_DB

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * new


class TurnPolicy:
    """Judges what was heard; `avatar_talking` says whether the avatar is audible right now."""

    def __init__(self, settings: Settings, language: str) -> None:
        self.min_words = settings.barge_in_min_words
        self.backchannels = Backchannels(settings, language)
        self.cues = BargeInCues(settings, language)
        self.echo = EchoGuard(settings)
        self.loudness = Loudness(settings.echo_level_gap_db if settings.echo_guard else 0.0)

    def judge(self, text: str, *, avatar_talking: bool, started_at: int = 0, interim: bool = False,
              echo_checked: bool = False, level_db: float | None = None) -> Heard:
        return self.hear(text, avatar_talking=avatar_talking, started_at=started_at, interim=interim,
                         echo_checked=echo_checked, level_db=level_db)[0]

    def hear(self, text: str, *, avatar_talking: bool, started_at: int = 0, interim: bool = False,
             echo_checked: bool = False, level_db: float | None = None,
             user_heard: bool = False) -> tuple[Heard, str]:
        """The verdict and the words it rests on (`text` less its echo clauses). `interim`: words
        of an utterance still going on, which need `min_words` to count. `echo_checked`: `text`
        is already what remained after the echo was taken out. `level_db`: how loud it was.
        `user_heard`: the final of an utterance whose interims were heard as the user's words."""
        if not words_of(text):
            return "nothing", ""
        rest = text if echo_checked else self._not_echo(text, avatar_talking, started_at, interim, level_db,
                                                        user_heard)
        if not words_of(rest):
            return "echo", ""
        if avatar_talking and self.backchannels.match(rest):
            return "backchannel", rest
        if interim and len(words_of(rest)) < self.min_words and not self.cues.opens(rest):
            return "nothing", rest
        return "words", rest

    def _not_echo(self, text: str, avatar_talking: bool, started_at: int, interim: bool,
                  level_db: float | None, user_heard: bool = False) -> str:
        """`text` less what is the avatar's echo, by words and, once learnt, by loudness."""
        audible = self.echo.enabled and bool(self.echo.spoken) and self.echo.could_be_echo(started_at)
        by_level = self.loudness.says(level_db) if audible else None
        if level_db is not None:
            if not audible and not avatar_talking:
                self.loudness.learn_user(level_db)
            elif by_level != "user" and not user_heard and self.echo.match(text, started_at):
                self.loudness.learn_echo(level_db)  # (the user's voice over it is no echo level)
        if by_level == "echo":
            return ""
        if by_level is None and user_heard:
            # Where the level cannot tell, the interims' verdict stands: the user spoke in this
            # utterance. A recognizer writes the echo in front and the user's words as one clause
            # ("For speeds and supports for the avatar"), which the words alone call echo.
            by_level = "user"
        rest = self.echo.residual(text, started_at, self._interim_counts if interim else self._final_counts)
        if by_level != "user" or words_of(rest):
            return rest
        if interim:
            # The user is speaking over it: what was heard is theirs, misheard or not, unless what
            # follows the avatar's words is a backchannel ("... self-hostable platform. Yeah.").
            tail = self.echo.after_echo(text, started_at)
            return tail if self.backchannels.match(tail) else text
        # A loud final the words call echo: the user's part is what follows the avatar's words. A
        # final made only of the avatar's words is not answered however loud, unless it ends in a
        # question said as loud as the user speaks: the user asking about what the avatar says
        # ("Stop, what is avatar stack?" over "avatar-stack is a self-hostable platform ...").
        tail = self.echo.after_echo(text, started_at)
        if self._final_counts(tail):
            return tail
        question = clauses(text)[-1]
        return question if _asked(question) and self.loudness.at_user_level(level_db) else ""

    def _interim_counts(self, rest: str) -> bool:
        """An interim's words after the echo count with two content words or a barge-in cue
        ("Avatar stack is a- Excuse"): a pause is undone if no turn follows."""
        return _two_content_words(rest) or self.cues.opens(rest)

    def _final_counts(self, rest: str) -> bool:
        """A final's words after the echo are answered only with two content words, a question
        ("why do I scale it?") or a barge-in cue and more ("Hold on, who are you?"). Not a lone
        "No.", and not the words a recognizer made of a noise heard once the avatar paused
        ("... self-host to be confirmed.")."""
        return _two_content_words(rest) or _asked(rest) or self.cues.leads(rest)
