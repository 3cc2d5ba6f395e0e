"""The local responder: knowledge-file answers, small talk, the echo fallback, sentence splitting."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from avatar_service.responder import (
    DEFAULT_KNOWLEDGE_FILE,
    EMPTY_REPLY,
    GREETING_REPLY,
    HINT,
    LocalResponder,
    parse_knowledge,
    split_sentences,
)
from common.settings import Settings


@pytest.fixture(scope="module")
def responder() -> LocalResponder:
    return LocalResponder()


@pytest.mark.parametrize(
    ("said", "question"),
    [
        ("What is avatar-stack?", "What is avatar-stack?"),
        ("what's avatar stack", "What is avatar-stack?"),
        ("tell me about this project", "What is avatar-stack?"),
        ("who are you", "Who are you?"),
        ("what's your name", "Who are you?"),
        ("what can you do", "What can you do?"),
        ("what can you do for me", "What can you do?"),
        ("help", "What can you do?"),
        ("how does it work", "How does avatar-stack work?"),
        ("explain the architecture", "How does avatar-stack work?"),
        ("how do I scale it", "How do I scale avatar-stack?"),
        ("How does avatar stack scale?", "How do I scale avatar-stack?"),
        ("scaling", "How do I scale avatar-stack?"),
        ("can it handle a thousand users", "How do I scale avatar-stack?"),
        ("which providers do you support", "Which providers does avatar-stack support?"),
        ("does it support deepgram", "Which providers does avatar-stack support?"),
        ("can I use it offline", "Can I run avatar-stack without the cloud?"),
        ("do I need an API key", "Can I run avatar-stack without the cloud?"),
        ("who made you", "Who made avatar-stack?"),
        ("who built this thing", "Who made avatar-stack?"),
        ("what happens when a server dies", "What happens if a worker crashes?"),
        ("how do I stop you talking", "Can I interrupt you?"),
        ("what's the latency", "How fast is avatar-stack?"),
        ("how do I install it", "How do I get started?"),
    ],
)
def test_questions_hit_their_entry(responder: LocalResponder, said: str, question: str) -> None:
    entry = responder.match(said)
    assert entry is not None, f"{said!r} matched nothing"
    assert entry.question == question
    assert responder.reply(said) == entry.answer


@pytest.mark.parametrize(
    "said", ["what time is it", "tell me a joke", "I like pizza", "how many languages", "is it good"]
)
def test_unrelated_words_fall_back_to_an_echo(responder: LocalResponder, said: str) -> None:
    assert responder.match(said) is None
    assert responder.reply(said) == f'You said: "{said}". {HINT}'


def test_echo_is_quotable_and_bounded(responder: LocalResponder) -> None:
    reply = responder.reply('The parrot said "pieces of eight"   ' + "and then some more words " * 20)
    heard = re.fullmatch(r'You said: "(.*)"\. ' + re.escape(HINT), reply)
    assert heard is not None
    assert '"' not in heard.group(1)
    assert heard.group(1).startswith("The parrot said 'pieces of eight' and then")
    assert len(heard.group(1)) <= 160


@pytest.mark.parametrize("said", ["hi", "Hello there!", "hey", "Good morning", "hello avatar"])
def test_greetings_get_a_greeting(responder: LocalResponder, said: str) -> None:
    assert responder.reply(said) == GREETING_REPLY


def test_greeting_with_a_question_answers_it(responder: LocalResponder) -> None:
    entry = responder.match("what is avatar stack")
    assert entry is not None
    assert responder.reply("Hi, what is avatar stack?") == f"Hello! {entry.answer}"


def test_small_talk(responder: LocalResponder) -> None:
    assert responder.reply("how are you?").startswith("I'm doing well")
    assert responder.reply("thank you so much").startswith("You're welcome")
    assert responder.reply("ok bye").startswith("Goodbye")


@pytest.mark.parametrize("said", ["", "   ", "?!", "..."])
def test_empty_input_gets_a_gentle_prompt(responder: LocalResponder, said: str) -> None:
    assert responder.reply(said) == EMPTY_REPLY


def test_bundled_answers_are_speakable(responder: LocalResponder) -> None:
    assert len(responder.entries) >= 10
    for entry in responder.entries:
        assert not re.search(r"[*`#|\[\]<>]", entry.answer), entry.question
        assert "\n" not in entry.answer
        # A question must find its own entry, or the file has two entries that collide.
        assert responder.match(entry.question) == entry


def test_custom_knowledge_file(tmp_path: Path) -> None:
    path = tmp_path / "kb.md"
    path.write_text(
        "# Shop\nDocs above the first entry are ignored.\n\n"
        "## When are you open?\nAlso: opening hours | What time do you close?\n"
        "We are open **every day**,\nfrom 9 to 5. See [the site](https://example.com).\n\n"
        "## Do you sell bikes?\nAlso: bicycles\n- Yes, we sell `bikes`.\n",
        encoding="utf-8",
    )
    responder = LocalResponder.from_settings(Settings(knowledge_file=str(path)))
    assert [e.question for e in responder.entries] == ["When are you open?", "Do you sell bikes?"]
    assert responder.reply("what are your opening hours") == "We are open every day, from 9 to 5. See the site."
    assert responder.reply("bicycles?") == "Yes, we sell bikes."


def test_default_knowledge_file_when_unset() -> None:
    assert LocalResponder.from_settings(Settings(knowledge_file="")).knowledge_file == DEFAULT_KNOWLEDGE_FILE


@pytest.mark.parametrize(
    "text", ["just docs, no entries", "## A question with no answer?\nAlso: another way\n\n## Next?\nAn answer."]
)
def test_malformed_knowledge_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_knowledge(text)


# ---------------------------------------------------------------- split_sentences


def test_splits_at_sentence_ends() -> None:
    text = "Hello there. How are you? I'm fine!  Dr. Smith said e.g. this works... Really?\n\nA line\nand another"
    assert split_sentences(text, 200) == [
        "Hello there.",
        "How are you?",
        "I'm fine!",
        "Dr. Smith said e.g. this works...",
        "Really?",
        "A line",
        "and another",
    ]
    assert split_sentences('It costs 3.5 dollars. He said "stop." Then left.', 200) == [
        "It costs 3.5 dollars.",
        'He said "stop."',
        "Then left.",
    ]


def test_long_sentences_break_at_commas_then_spaces() -> None:
    text = "This sentence is long, it has a comma in the middle, and it goes on for quite a while after that"
    assert split_sentences(text, 60) == [
        "This sentence is long, it has a comma in the middle,",
        "and it goes on for quite a while after that",
    ]
    assert split_sentences("one two three four five six", 10) == ["one two", "three four", "five six"]
    assert split_sentences("Supercalifragilistic", 8) == ["Supercal", "ifragili", "stic"]


def test_empty_text_and_bad_limit() -> None:
    assert split_sentences("", 10) == []
    assert split_sentences(" \n ", 10) == []
    with pytest.raises(ValueError):
        split_sentences("text", 0)


@pytest.mark.parametrize("max_chars", [12, 25, 40, 80, 400])
def test_split_respects_the_limit_and_keeps_every_word(max_chars: int) -> None:
    rng = random.Random(max_chars)
    vocab = ["avatar", "stack", "scale", "Redis", "workers", "e.g.", "3.5", "Dr.", "it's", "ok", "sessions"]
    for _ in range(200):
        words = []
        for _ in range(rng.randint(1, 60)):
            word = rng.choice(vocab) + rng.choice(["", "", "", ",", ".", "!", "?", ";", "..."])
            words.append(word)
        text = rng.choice([" ", "  ", "\n"]).join(words)
        parts = split_sentences(text, max_chars)
        assert all(0 < len(p) <= max_chars for p in parts)
        assert all(p == p.strip() for p in parts)
        assert " ".join(parts).split() == text.split()
