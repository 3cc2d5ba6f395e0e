"""The local "brain": answers from a small Q&A file when no LLM is configured.

The demo has to say something sensible with no API keys and no model download, so replies come
from a Markdown knowledge file (format documented at the top of the bundled `knowledge.md`).
Matching is plain word overlap: both sides are cut into words, common words count for little,
endings are trimmed so "scaling" meets "scale", and rare words weigh more than frequent ones.
Anything that matches nothing well is echoed back, so the user can see what was heard.

Replies are spoken by TTS, so they are plain sentences: no Markdown survives into them.
`split_sentences` lives here too: speech and vendor APIs (HeyGen's length limit, streaming LLM
output) need text cut at sentence boundaries.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from common.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_KNOWLEDGE_FILE = Path(__file__).with_name("knowledge.md")

HINT = "Ask me what avatar-stack is, or how to scale it."
EMPTY_REPLY = f"I'm listening. {HINT}"
GREETING_REPLY = f"Hello! I'm the avatar-stack demo avatar. {HINT}"
HOW_ARE_YOU_REPLY = f"I'm doing well, thanks for asking! {HINT}"
THANKS_REPLY = "You're welcome! Is there anything else you'd like to know about avatar-stack?"
GOODBYE_REPLY = "Goodbye! It was nice talking to you."
MAX_ECHO_CHARS = 150

# A match must score at least this (0..1, weighted Dice overlap) to be answered from the file.
MATCH_THRESHOLD = 0.45
# Queries made only of common words ("what can you do") need a closer phrasing match.
STOPWORD_ONLY_THRESHOLD = 0.5
# Common words still count a little, so "who are you" and "what can you do" can be told apart.
STOP_WEIGHT = 0.15
# Overlap with an answer only tips the balance: alone, a shared word ("what *time* is it" vs
# "interrupt me at any time") is too weak a reason to answer.
ANSWER_BONUS = 0.15

STOPWORDS = frozenset(
    """
    a about above after again all also am an and any are as at be been before being below between
    both but by ca can could did do does doing don done down during each either else ever few for
    from further get gets got had has have having he her here hers him his how i if in into is it
    its just know let like many may me might more most much must my myself need no nor not now of
    off on once one only or other our ours out over own please really same say shall she should so
    some something stuff such tell than that the their theirs them then there these they this those through to too
    thing things under until up us very want was way we well were what when where which while who
    whom whose why will with wo would you your yours yourself yeah yes ok okay um uh hmm actually
    maybe kind sort bit
    """.split()
)
_IRREGULAR = {
    "made": "make",
    "built": "build",
    "ran": "run",
    "began": "begin",
    "spoke": "speak",
    "spoken": "speak",
    "said": "say",
    "knew": "know",
    "known": "know",
    "went": "go",
    "gone": "go",
    "dies": "die",
    "died": "die",
    "dying": "die",
}
_GREETINGS = frozenset("hi hello hey heya hiya howdy greetings yo hallo hola".split())
_GREETING_PHRASE = re.compile(r"^good (morning|afternoon|evening|day)\b")
_GREETING_TAIL = frozenset("good morning afternoon evening day".split())
_HOW_ARE_YOU = re.compile(r"\bhow (are|r) (you|u)\b|\bhow is it going\b|\bhow do you do\b")
_THANKS = frozenset("thank thanks thx cheers appreciate appreciated".split())
_GOODBYE = frozenset("bye goodbye farewell cya later night".split())
_SMALL_TALK_FILLER = frozenset("so much lot very good great again there see avatar buddy friend ok okay".split())


# ---------------------------------------------------------------- words


def _words(text: str) -> list[str]:
    """Lower-case words, contractions folded ("what's" -> "what", "can't" -> "ca not")."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"n't\b", " not", text)
    text = re.sub(r"'(s|re|ve|ll|d|m)\b", "", text)
    return re.findall(r"[a-z0-9]+", text)


def _stem(word: str) -> str:
    """A few suffix rules, enough for "scaling", "scales" and "scaled" to meet "scale"."""
    word = _IRREGULAR.get(word, word)
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix, min_stem in (("ing", 3), ("ed", 2)):
        if word.endswith(suffix) and len(word) - len(suffix) >= min_stem:
            word = word[: -len(suffix)]
            if len(word) > 2 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # running -> run
            break
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


def _tokens(text: str) -> set[str]:
    """Every word of `text` as a matching token: common words as they are, others stemmed."""
    return {w if w in STOPWORDS else _stem(w) for w in _words(text)}


def _content(tokens: set[str]) -> set[str]:
    return {t for t in tokens if t not in STOPWORDS}


def _query_tokens(text: str) -> set[str]:
    """Tokens of what the user said, minus greetings ("hi, how do I scale it")."""
    return _tokens(text) - _GREETINGS


def _greeted(words: list[str]) -> bool:
    return bool(words) and (words[0] in _GREETINGS or bool(_GREETING_PHRASE.match(" ".join(words))))


def _speakable(text: str) -> str:
    """Strip Markdown so TTS never reads out asterisks, backticks or link targets."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [label](url) -> label
    text = re.sub(r"^\s*(?:[-*+]|\d+[.)])\s+", "", text, flags=re.MULTILINE)  # list markers
    text = re.sub(r"^\s*#+\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"[*_`~]{1,3}(\S(?:.*?\S)?)[*_`~]{1,3}", r"\1", text)  # **bold**, `code`
    text = text.replace("`", "")
    return " ".join(text.split())


# ---------------------------------------------------------------- knowledge file


@dataclass(frozen=True)
class Entry:
    """One Q&A entry: the heading question, other phrasings, and the answer to speak."""

    question: str
    phrasings: tuple[str, ...]
    answer: str


def parse_knowledge(text: str, source: str = "knowledge") -> list[Entry]:
    """Parse the `## Question?` / `Also: a | b` / answer format. Raises on a malformed file."""
    entries: list[Entry] = []
    current: tuple[int, str, list[str], list[str]] | None = None  # line, question, alts, answer

    def close() -> None:
        if current is None:
            return
        line_no, question, alts, answer = current
        spoken = _speakable("\n".join(answer))
        if not spoken:
            raise ValueError(f"{source}:{line_no}: question {question!r} has no answer")
        entries.append(Entry(question=question, phrasings=(question, *alts), answer=spoken))

    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("## "):
            close()
            current = (line_no, stripped[3:].strip(), [], [])
        elif current is None:
            continue  # documentation above the first entry
        elif stripped.lower().startswith("also:"):
            current[2].extend(p.strip() for p in stripped[5:].split("|") if p.strip())
        else:
            current[3].append(line)
    close()
    if not entries:
        raise ValueError(f"{source}: no entries (each starts with a '## Question?' line)")
    return entries


# ---------------------------------------------------------------- responder


@dataclass(frozen=True)
class _Indexed:
    entry: Entry
    phrasings: tuple[frozenset[str], ...]
    answer: frozenset[str]


class LocalResponder:
    """Answers user turns from a knowledge file; cheap and synchronous (well under 1 ms a reply)."""

    def __init__(self, knowledge_file: str | Path | None = None) -> None:
        path = Path(knowledge_file) if knowledge_file else DEFAULT_KNOWLEDGE_FILE
        self.knowledge_file = path
        self.entries = parse_knowledge(path.read_text(encoding="utf-8"), source=str(path))
        self._index = [
            _Indexed(e, tuple(frozenset(_tokens(p)) for p in e.phrasings), frozenset(_content(_tokens(e.answer))))
            for e in self.entries
        ]
        df: dict[str, int] = {}
        for item in self._index:
            for token in set().union(*item.phrasings, item.answer):
                df[token] = df.get(token, 0) + 1
        n = len(self._index)
        self._df = df
        self._n = n
        log.info("local responder: %d entries from %s", n, path)

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalResponder:
        """The file named by `KNOWLEDGE_FILE`, else the bundled one."""
        return cls(settings.knowledge_file or None)

    def _weight(self, token: str) -> float:
        # Smoothed IDF: a word that is in every entry still counts a little; unknown words most.
        idf = math.log((self._n + 1) / (self._df.get(token, 0) + 0.5)) + 0.1
        return idf * (STOP_WEIGHT if token in STOPWORDS else 1.0)

    def _mass(self, tokens: set[str] | frozenset[str]) -> float:
        return sum(self._weight(t) for t in tokens)

    def score(self, text: str) -> list[tuple[float, Entry]]:
        """Every entry's score for `text` (0..1), best first; for tests and tuning."""
        query = _query_tokens(text)
        content = _content(query)
        q_mass = self._mass(query)
        c_mass = self._mass(content)
        scored: list[tuple[float, Entry]] = []
        for item in self._index:
            best = 0.0
            for phrasing in item.phrasings:
                shared = query & phrasing
                if not shared or (content and not (content & phrasing)):
                    continue  # a phrasing must share a real word when the user said one
                dice = 2 * self._mass(shared) / (q_mass + self._mass(phrasing))
                best = max(best, dice)
            if best > 0 and c_mass > 0:
                best = min(1.0, best + ANSWER_BONUS * self._mass(content & item.answer) / c_mass)
            scored.append((best, item.entry))
        scored.sort(key=lambda pair: -pair[0])  # stable: earlier entries win ties
        return scored

    def match(self, text: str) -> Entry | None:
        """The entry that answers `text`, or None when nothing matches well enough."""
        scored = self.score(text)
        if not scored:
            return None
        best, entry = scored[0]
        threshold = MATCH_THRESHOLD if _content(_query_tokens(text)) else STOPWORD_ONLY_THRESHOLD
        return entry if best >= threshold else None

    def reply(self, text: str) -> str:
        """What the avatar says back to `text`: an answer, small talk, or an echo with a hint."""
        words = _words(text)
        if not words:
            return EMPTY_REPLY
        small_talk = _small_talk(words)  # only when that is all the user said
        if small_talk is not None:
            return small_talk
        hello = "Hello! " if _greeted(words) else ""
        entry = self.match(text)
        if entry is not None:
            return hello + entry.answer
        return f'{hello}You said: "{_echo(text)}". {HINT}'


def _small_talk(words: list[str]) -> str | None:
    """Greetings, thanks and goodbyes, when that is all (or nearly all) the user said."""
    greeted = _greeted(words)
    ignored = STOPWORDS | _SMALL_TALK_FILLER | _GREETINGS | (_GREETING_TAIL if greeted else frozenset())
    rest = [w for w in words if w not in ignored]
    if _HOW_ARE_YOU.search(" ".join(words)) and all(w in {"doing", "today"} for w in rest):
        return HOW_ARE_YOU_REPLY
    if greeted and not rest:
        return GREETING_REPLY
    if rest and all(w in _THANKS for w in rest):
        return THANKS_REPLY
    if rest and all(w in _GOODBYE for w in rest):
        return GOODBYE_REPLY
    return None


def _echo(text: str) -> str:
    """What was heard, safe to quote and speak: one line, no double quotes, not too long."""
    heard = " ".join(text.replace('"', "'").split())
    if len(heard) > MAX_ECHO_CHARS:
        heard = heard[:MAX_ECHO_CHARS].rsplit(" ", 1)[0] + "..."
    return heard


# ---------------------------------------------------------------- sentences

_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs eg ie approx fig".split())
_BOUNDARY = re.compile(r"""(?:[.!?\u2026]+["')\]\u201d\u2019]*)(?=\s)|\n\s*""")
# Each soft break ends with exactly one whitespace character; the cut goes just before it.
_SOFT_BREAK = re.compile(r"[,;:\u2014\u2013]\s|\s[-\u2013\u2014]\s")


def split_sentences(text: str, max_chars: int) -> list[str]:
    """Cut `text` into sentences of at most `max_chars` characters, keeping every word.

    Splits after `.`, `!`, `?` (and `…`, line breaks) unless that looks like an abbreviation
    ("Dr. Smith", "e.g. this"); a sentence still too long is cut at the last comma, semicolon,
    colon or dash that fits, else at the last space, else (one huge word) mid-word.
    Whitespace inside a sentence is collapsed to single spaces.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    out: list[str] = []
    for sentence in _sentences(text):
        out.extend(_fit(sentence, max_chars))
    return out


def _sentences(text: str) -> list[str]:
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end()
        candidate = text[start:end]
        if m.group().strip() and not _is_real_boundary(text, m.start(), end):
            continue
        if candidate.strip():
            sentences.append(" ".join(candidate.split()))
        start = end
    if text[start:].strip():
        sentences.append(" ".join(text[start:].split()))
    return sentences


def _is_real_boundary(text: str, punct_at: int, end: int) -> bool:
    """False for "Dr. Smith" and "e.g. this": a period after an abbreviation or before lower case."""
    if text[punct_at] != ".":
        return True
    word = re.search(r"([A-Za-z.]+)$", text[:punct_at])
    if word and word.group(1).replace(".", "").lower() in _ABBREVIATIONS:
        return False
    after = text[end:].lstrip()
    return not (after and after[0].islower())


def _fit(sentence: str, max_chars: int) -> list[str]:
    parts: list[str] = []
    while len(sentence) > max_chars:
        window = sentence[: max_chars + 1]  # a space right after the limit is a fine place to cut
        soft = [m.end() - 1 for m in _SOFT_BREAK.finditer(window)]
        # A comma near the start would leave a tiny piece; then a plain space is better.
        cut = soft[-1] if soft and soft[-1] >= max_chars // 3 else window.rfind(" ")
        if cut <= 0:
            cut = max_chars  # a single word longer than the limit
        head, sentence = sentence[:cut].rstrip(), sentence[cut:].lstrip()
        if head:
            parts.append(head)
    if sentence:
        parts.append(sentence)
    return parts
