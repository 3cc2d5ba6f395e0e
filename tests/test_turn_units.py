"""Turn detection and the barge-in policy as units: words, the Smart Turn model, echo, backchannels."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from avatar_service.floor import Floor
from avatar_service.turn_policy import (
    ECHO_OVERLAP_S,
    SPOKEN_WORDS_PER_S,
    Backchannels,
    BargeInCues,
    EchoGuard,
    TurnPolicy,
    started_at_of,
)
from common.pcm import SAMPLE_RATE
from common.settings import Settings
from stt_service.turn import AudioTail, TurnDetector, combine, model_path, text_verdict
from stt_service.worker import RECENT_LEVEL_S
from tests.speech import speech_available, speech_pcm


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("How many people can talk to one worker at the same time?", "complete"),
        ("So I was wondering", "incomplete"),
        ("So I was wondering...", "incomplete"),
        ("Can you tell me?", "incomplete"),  # Whisper's question mark; the question is still to come
        ("What happens when", "incomplete"),
        ("What happens when?", "incomplete"),  # a pause after "when", however Whisper punctuates it
        ("Where is it from?", "complete"),  # a stranded preposition does end a question
        ("How does the?", "incomplete"),
        ("Is it possible to?", "incomplete"),
        ("I would like to know", "incomplete"),
        ("Tell me about the", "incomplete"),
        ("I need the pricing and,", "incomplete"),
        ("Um", "incomplete"),
        ("That's all, thanks.", "weak_complete"),
        # The rest of a question said after a pause, which the recognizer wrote on its own
        ("Is it possible to? Run it without any keys.", "complete"),
        ("How does it scale.", "complete"),
        ("It scales on its own.", "weak_complete"),  # a statement: the audio may still say more
        ("What I mean is.", "incomplete"),
        ("Is it.", "weak_complete"),  # too short to tell
        ("Redis streams", "unknown"),
        ("", "unknown"),
    ],
)
def test_words_say_whether_a_turn_is_finished(text: str, verdict: str):
    assert text_verdict(text) == verdict


def test_words_decide_where_sure_and_the_audio_where_not():
    assert combine("incomplete", 0.99, 0.5) is False  # a dangling "and" is never the end
    assert combine("complete", 0.01, 0.5) is True
    assert combine("unknown", 0.7, 0.5) is True and combine("unknown", 0.3, 0.5) is False
    assert combine("weak_complete", 0.2, 0.5) is True and combine("weak_complete", 0.05, 0.5) is False
    assert combine("unknown", None, 0.5) is True  # no model answer: never held by the detector itself


def test_the_turn_model_ships_inside_an_installed_package():
    path = model_path(settings())
    assert path is not None and path.is_file() and path.suffix == ".onnx", "pip install --no-deps pipecat-ai"
    assert path.stat().st_size > 1_000_000


@pytest.mark.skipif(not speech_available(), reason="needs espeak-ng and sox")
async def test_the_turn_model_scores_real_speech():
    detector = TurnDetector(settings())
    detector.model_timeout_s = 60.0  # a loaded test machine must not turn this into a words-only verdict
    try:
        await detector.load()
        audio = np.frombuffer(speech_pcm("Can I have a cup of coffee please", pad_s=0.2), dtype="<i2")
        audio = audio.astype(np.float32) / 32768
        verdict = await detector.decide("Can I have a cup of coffee please", audio)
        assert verdict.text == "unknown" and verdict.p_audio is not None and 0.0 <= verdict.p_audio <= 1.0
        assert verdict.complete == (verdict.p_audio >= 0.5)
        sure = await detector.decide("What is Redis?", audio)
        assert sure.complete and sure.p_audio is None  # the words were enough: no model call
    finally:
        detector.close()


async def test_silence_mode_ends_every_turn_at_the_pause():
    detector = TurnDetector(settings(turn_detection="silence"))
    await detector.load()
    assert (await detector.decide("So I was wondering", None)).complete
    detector.close()


def test_audio_tail_is_bounded_and_maps_session_time_to_arrival():
    tail = AudioTail(keep_s=1.0)
    t = 0.0
    for _ in range(200):  # 4 s of 20 ms frames
        t += 0.02
        tail.append(b"\x01\x00" * 320, t)
    assert tail.nbytes <= (1.0 + AudioTail.TRIM_SLACK_S) * SAMPLE_RATE * 2 + 640
    assert len(tail.span(0.0, t)) <= (1.0 + AudioTail.TRIM_SLACK_S) * SAMPLE_RATE + 320
    assert len(tail.span(t - 0.8, t - 0.5)) == round(0.3 * SAMPLE_RATE)
    now_ms = time.time() * 1000
    assert abs(tail.received_at_ms(t) - now_ms) < 1000


def test_backchannels_per_language():
    en = Backchannels(settings(), "en-US")
    assert en.match("Mhm.") and en.match("yeah yeah") and en.match("Oh, okay.") and en.match("I see")
    assert not en.match("Wait, how do I scale it?") and not en.match("")
    de = Backchannels(settings(), "de")
    assert de.match("Ja, genau.") and not de.match("Wie skaliere ich das?")
    custom = Backchannels(settings(backchannels={"en": "roger, copy that"}), "en")
    assert custom.match("Copy that.") and not custom.match("yeah")


def test_an_opening_that_asks_for_the_floor_pauses_at_its_first_word():
    policy = TurnPolicy(settings(), "en")
    policy.echo.reply_started()
    policy.echo.reply_text("The face moves with the voice, drawn in the page.")
    now = int(time.time() * 1000)
    for opening in ("Stop", "Sorry,", "wait", "No", "hold on"):
        assert policy.judge(opening, avatar_talking=True, started_at=now, interim=True) == "words", opening
    # An interim that ends inside a cue: the rest of it is not written yet.
    assert policy.judge("Hold", avatar_talking=True, started_at=now, interim=True) == "words"
    assert policy.judge("Hold it", avatar_talking=True, started_at=now, interim=True) == "words"  # two words
    assert policy.judge("Holding", avatar_talking=True, started_at=now, interim=True) == "nothing"
    assert policy.judge("Yeah", avatar_talking=True, started_at=now, interim=True) == "backchannel"
    policy.echo.reply_text("The face moves with the voice. Wait for the first sentence.")
    assert policy.judge("Wait", avatar_talking=True, started_at=now, interim=True) == "echo"  # its own word
    # A cue after the echo, in one utterance: an interim pauses; as a final, one word is no turn.
    policy.echo.reply_text("Avatar stack is a self-hostable platform for realtime talking avatars.")
    heard = "Avatar Stack is a self-hostable place. Excuse."
    assert policy.judge(heard, avatar_talking=True, started_at=now, interim=True) == "words"
    assert policy.judge(heard, avatar_talking=True, started_at=now) == "echo"
    assert policy.judge("Avatar Stack is a self-hostable place. Right.", avatar_talking=True, started_at=now,
                        interim=True) != "words"
    de = BargeInCues(settings(), "de-DE")
    assert de.opens("Moment, wie geht das?") and not de.opens("Wie geht das?")
    custom = BargeInCues(settings(barge_in_cues={"en": "over to me"}), "en")
    assert custom.opens("over to me now") and custom.opens("over") and not custom.opens("over there")
    assert not custom.opens("stop") and not custom.opens("")


def test_echo_is_the_avatars_own_words_heard_while_it_could_be_heard():
    guard = EchoGuard(settings())
    guard.reply_started()
    guard.reply_text("Scale each service on its own. Run more speech to text workers")
    during = int(time.time() * 1000)
    assert guard.match("run more speech to text workers", during)
    assert guard.match("Scale each service on its", during)
    assert not guard.match("What is the price?", during)
    guard.reply_ended()
    later = int((time.time() + 2.0) * 1000)  # the user repeats its words after it stopped
    assert not guard.match("How do I scale each service?", later)
    assert guard.match("speech to text workers", during)  # began while it talked: still echo
    assert not EchoGuard(settings(echo_guard=False)).match("anything", during)


def test_the_reply_before_is_echo_only_while_it_can_still_be_heard(monkeypatch: pytest.MonkeyPatch):
    clock = [1000.0]
    monkeypatch.setattr("avatar_service.turn_policy.time.time", lambda: clock[0])

    def two_replies(gap_s: float) -> EchoGuard:
        guard = EchoGuard(settings())
        guard.reply_started()
        guard.reply_text("Each worker holds a short lease on the sessions it serves.")
        clock[0] += 4.0
        guard.reply_ended()
        clock[0] += gap_s
        guard.reply_started()
        guard.reply_text("Scale each service on its own.")
        return guard

    guard = two_replies(0.1)  # the next reply began as this one ended: its tail still echoes
    assert guard.match("a short lease on the sessions", round((clock[0] + 0.2) * 1000))
    guard = two_replies(2.0)  # quiet for 2 s first: those words are the user's
    assert not guard.match("a short lease on the sessions", round((clock[0] + 0.2) * 1000))
    assert guard.match("Scale each service", round((clock[0] + 0.2) * 1000))


def test_policy_judges_interims_and_finals():
    policy = TurnPolicy(settings(), "en")
    policy.echo.reply_started()
    policy.echo.reply_text("The local voice is piper and the face is drawn in the page.")
    now = int(time.time() * 1000)
    assert policy.judge("the face is drawn in the page", avatar_talking=True, started_at=now) == "echo"
    assert policy.judge("Mhm.", avatar_talking=True, started_at=now) == "backchannel"
    assert policy.judge("Mhm.", avatar_talking=False) == "words"  # an answer when the avatar is quiet
    assert policy.judge("Tell", avatar_talking=True, started_at=now, interim=True) == "nothing"  # 1 word
    assert policy.judge("Tell", avatar_talking=True, started_at=now) == "words"  # ... but a final counts
    assert policy.judge("wait how do I scale it", avatar_talking=True, started_at=now, interim=True) == "words"


def test_a_question_inside_the_avatars_echo_is_still_heard():
    """With echo all along, the recognizer makes one utterance of the avatar's voice and the
    user's question; the echo clauses go and the question stays."""
    policy = TurnPolicy(settings(), "en")
    policy.echo.reply_started()
    policy.echo.reply_text(
        "avatar-stack is a self-hostable platform for realtime talking avatars. You speak in your browser, "
        "your speech is turned into text, and an avatar answers you out loud with a moving face."
    )
    now = int(time.time() * 1000)
    heard = "Avatar Stack is a self-hostable- Sorry, can it run offline?"
    assert policy.hear(heard, avatar_talking=True, started_at=now, interim=True) == (
        "words", "Sorry, can it run offline?")
    assert policy.judge("Avatar Stack is a self-hostable platform. You speak in your browser.",
                        avatar_talking=True, started_at=now) == "echo"
    assert policy.judge("Avatar Stack is a self-hostable platform, mhm.", avatar_talking=True,
                        started_at=now) == "echo"  # one stray word is not a question


def test_echo_misheard_clause_by_clause_stays_echo():
    policy = TurnPolicy(settings(), "en")
    policy.echo.reply_started()
    policy.echo.reply_text("You can ask me which providers it supports, or how to run it without the cloud. "
                           "You can also interrupt me at any time.")
    now = int(time.time() * 1000)
    heard = "Which providers it supports or how to run it without the cloud. You can also enter up me at any time."
    assert policy.judge(heard, avatar_talking=True, started_at=now) == "echo"
    assert policy.judge("M. H. N.", avatar_talking=True, started_at=now) == "backchannel"  # a hum, spelled


def test_echo_written_with_a_contraction_is_still_echo():
    policy = TurnPolicy(settings(), "en")
    policy.echo.reply_started()
    policy.echo.reply_text("You speak in your browser, your speech is turned into text.")
    now = int(time.time() * 1000)
    assert policy.judge("You're", avatar_talking=True, started_at=now) == "echo"  # "your", misheard
    assert policy.judge("You're speech is turned into text.", avatar_talking=True, started_at=now) == "echo"


def test_loudness_tells_the_user_from_the_echo_once_both_are_known():
    policy = TurnPolicy(settings(), "en")
    assert policy.judge("What is avatar stack?", avatar_talking=False, level_db=-18.0) == "words"  # learns the user
    policy.echo.reply_started()
    policy.echo.reply_text("Each worker holds a short lease on the sessions it serves, so the conversation "
                           "carries on after a short pause.")
    now = int(time.time() * 1000)
    assert policy.judge("Each worker holds a short lease", avatar_talking=True, started_at=now,
                        level_db=-28.0) == "echo"  # by its words: learns the echo's level
    # echo misheard into words the avatar never said is still echo: it is as quiet as the echo
    assert policy.judge("Tour plus.", avatar_talking=True, started_at=now, level_db=-28.5) == "echo"
    # the user talking over it is loud, even where the recognizer heard the avatar's words
    over = {"avatar_talking": True, "started_at": now, "interim": True, "level_db": -18.5}
    assert policy.judge("a short lease on the sessions", **over) == "words"
    assert policy.judge("a short lease on the sessions", **{**over, "interim": False}) == "echo"  # not answered
    # ... and a loud final keeps what follows the avatar's words, even written as one clause
    final = {**over, "interim": False}
    assert policy.hear("Each worker holds a short lease fight for how do I scale it", **final) == (
        "words", "fight for how do I scale it")
    assert policy.judge("Wait, how do I scale it?", **over) == "words"  # the user's own words: at once
    # ... but a backchannel after the avatar's words, said over it, is still a backchannel
    assert policy.judge("Each worker holds a short lease. Yeah.", **over) == "backchannel"
    # a final's remainder after the echo needs two content words or a cue and more ("Sorry, who are you?"):
    # not the words a recognizer makes of a noise once the avatar paused, however loud
    assert policy.judge("Each worker holds a short lease to be confirmed.", **final) == "echo"
    assert policy.judge("Each worker holds a short lease, and may chant.", **final) == "echo"
    assert policy.judge("Each worker holds a short lease, and may chant.", avatar_talking=True,
                        started_at=now) == "echo"  # (by its words alone too)
    assert policy.hear("Each worker holds a short lease, sorry, who are you?", **final) == (
        "words", "sorry, who are you?")
    assert policy.hear("Each worker holds a short lease. Excuse me, who are you?", **final) == (
        "words", "Excuse me, who are you?")  # ("who are you?" goes with the clause before it)
    assert policy.hear("Each worker holds a short lease, why do I scale it?", **final) == (
        "words", "why do I scale it?")  # ("Wait," misheard): a question
    assert policy.judge("Each worker holds a short lease. You know.", **final) == "echo"
    # levels too close together say nothing: the words decide
    close = TurnPolicy(settings(), "en")
    close.judge("Hello there", avatar_talking=False, level_db=-20.0)
    close.echo.reply_started()
    close.echo.reply_text("Each worker holds a short lease on the sessions it serves.")
    close.judge("Each worker holds a short lease", avatar_talking=True, started_at=now, level_db=-23.0)
    assert close.judge("Tour plus.", avatar_talking=True, started_at=now, level_db=-23.0) == "words"


def test_a_final_whose_interims_were_the_users_keeps_its_words_after_the_echo():
    """"Which providers … does it support for the avatar?": the rest, said over the reply's first
    words, comes back as one clause with the echo in front of it. The words alone call it a fragment
    of the avatar's voice; its interims were heard as the user's (they paused the avatar), so the
    final keeps what follows the avatar's words, as a loud final does."""
    reply = ("For speech to text you can use Deepgram in the cloud, or a local Whisper model that runs on "
             "your own machine. For the avatar you can use HeyGen or LiveAvatar.")
    policy = TurnPolicy(settings(), "en")
    policy.echo.reply_started()
    policy.echo.reply_text(reply)
    now = int(time.time() * 1000)
    final = {"avatar_talking": True, "started_at": now}
    heard = "For speeds and supports for the avatar."
    assert policy.judge(heard, **final) == "echo"
    assert policy.hear(heard, **final, user_heard=True) == ("words", "and supports for the avatar.")
    # Only the avatar's words, or one stray word after them, stay echo whatever the interims were.
    assert policy.hear("For speech to text you can use Deepgram.", **final, user_heard=True)[0] == "echo"
    assert policy.hear("For speech to text, yes.", **final, user_heard=True)[0] == "echo"
    # And where the loudness is known and says echo, it is echo.
    loud = TurnPolicy(settings(), "en")
    loud.judge("What is avatar stack?", avatar_talking=False, level_db=-11.0)
    loud.echo.reply_started()
    loud.echo.reply_text(reply)
    loud.judge("For speech to text you can use Deepgram", **final, level_db=-22.0)
    assert loud.hear(heard, **final, level_db=-23.0, user_heard=True)[0] == "echo"
    assert loud.hear(heard, **final, level_db=-16.5, user_heard=True) == ("words", "and supports for the avatar.")


def test_a_question_made_of_the_avatars_words_is_answered_only_at_the_users_own_level():
    """"Stop, what is avatar stack?" over "avatar-stack is a self-hostable platform …" comes back as
    "What is avatar stack?": only the avatar's words. Louder than the echo is not enough for that
    (a loud stretch of echo); as loud as the user speaks, and asked, it is the user's question."""
    policy = TurnPolicy(settings(), "en")
    policy.judge("Who are you?", avatar_talking=False, level_db=-11.0)
    policy.echo.reply_started()
    policy.echo.reply_text("For speech to text you can use Deepgram in the cloud, or a local Whisper model.")
    now = int(time.time() * 1000)
    final = {"avatar_talking": True, "started_at": now}
    policy.judge("For speech to text you can use Deepgram", **final, level_db=-22.0)  # learns the echo
    asked = "What is Deepgram in the cloud?"
    assert policy.hear(asked, **final, level_db=-11.5) == ("words", asked)
    assert policy.judge(asked, **final, level_db=-15.0) == "echo"  # louder than the echo, not the user's level
    assert policy.judge("Deepgram in the cloud.", **final, level_db=-11.5) == "echo"  # not asked
    # With the echo in front of it in the same utterance, the question is what is answered.
    assert policy.hear("For speech to text you can use, what is Deepgram in the cloud?", **final,
                       level_db=-11.5) == ("words", "what is Deepgram in the cloud?")


def test_audio_tail_level_is_the_loud_part_of_a_range():
    tail = AudioTail()
    quiet = (np.sin(np.arange(16000) / 5) * 0.03 * 32767).astype("<i2").tobytes()  # ~ -33 dBFS
    loud = (np.sin(np.arange(8000) / 5) * 0.3 * 32767).astype("<i2").tobytes()  # ~ -13 dBFS
    tail.append(quiet, 1.0)
    tail.append(loud, 1.5)
    assert abs(tail.level_db(0.0, 1.0) - -33.5) < 1.0
    assert abs(tail.level_db(0.0, 1.5) - -13.5) < 1.0  # a third of it loud: the loud part counts
    assert tail.level_db(2.0, 3.0) is None  # not heard yet


def test_an_interims_level_window_hears_a_one_word_cue_over_the_echo():
    tail = AudioTail()
    echo = (np.sin(np.arange(32000) / 5) * 0.05 * 32767).astype("<i2").tobytes()  # ~ -29 dBFS, 2 s
    cue = (np.sin(np.arange(1920) / 5) * 0.3 * 32767).astype("<i2").tobytes()  # "Wait,": 0.12 s, ~ -13
    tail.append(echo, 2.0)
    tail.append(cue, 2.12)
    tail.append(echo[:2080], 2.25)  # the comma's pause, with the echo going on under it
    assert tail.level_db(2.25 - RECENT_LEVEL_S, 2.25) > -16  # the user's level: a barge-in, by loudness
    assert tail.level_db(2.25 - 1.5, 2.25) < -25  # a 1.5 s window still heard only the echo


def test_audio_tail_range_joins_only_the_chunks_it_spans():
    tail, t, whole = AudioTail(keep_s=2.0), 0.0, b""
    rng = np.random.default_rng(7)
    for _ in range(60):  # uneven chunks, as the feed's batches are; older ones fall out of the tail
        chunk = rng.integers(-3000, 3000, int(rng.integers(1, 12)) * 320, dtype="<i2").tobytes()
        t += len(chunk) / 2 / SAMPLE_RATE
        tail.append(chunk, t)
        whole += chunk
    held = whole[-tail.nbytes:]
    held_from = tail.end_s - tail.nbytes / 2 / SAMPLE_RATE
    for start, end in [(held_from, tail.end_s), (tail.end_s - 1.5, tail.end_s), (held_from + 0.13, held_from + 0.5)]:
        lo, hi = round((start - held_from) * SAMPLE_RATE) * 2, round((end - held_from) * SAMPLE_RATE) * 2
        assert tail._between(start, end) == held[lo:hi]


def test_the_users_part_of_an_utterance_begins_after_the_echo_in_front_of_it():
    """An utterance that opens with the avatar's echo and ends with the user's question: the user
    began speaking when the echo's words were said, not when the utterance began (else a barge-in
    2 s into a reply looks like the rest of the turn it answers)."""
    text = "Avatar Stack is a self-hostable spot. Wait, how do I scale it?"
    begun = started_at_of("Wait, how do I scale it?", text, 10_000)
    assert begun == 10_000 + round((7 / SPOKEN_WORDS_PER_S - ECHO_OVERLAP_S) * 1000)  # "self-hostable" is two
    # Two echo words in front may have been said over the user's first ones: no later.
    assert started_at_of("run it without any keys.", "You said, run it without any keys.", 10_000) == 10_000
    assert started_at_of(text, text, 10_000) == 10_000  # nothing was taken out
    assert started_at_of("Wait", "wait", 0) == 0  # unknown stays unknown


async def test_the_turn_model_hears_the_turn_alone_not_the_talk_before_it():
    """Smart Turn was trained on one turn's audio (Pipecat gives it the audio since the user began).
    With 8 s of whatever came before (the avatar's echo, the previous question) it scored finished
    questions 0.01-0.1 on the bench, so every one that Whisper ended with a full stop waited out
    `turn_max_wait_s`."""
    from types import SimpleNamespace

    from stt_service.engine import SttResult
    from stt_service.turn import TRAILING_S
    from stt_service.worker import TURN_LEAD_S, _Turn

    heard: list[np.ndarray] = []

    class Listening(TurnDetector):
        def wants_audio(self, text: str) -> bool:
            return True

        async def decide(self, text: str, audio: np.ndarray | None):
            heard.append(audio)
            return await super().decide(text, None)  # no model here: the words decide (complete)

    flushed: list[list[SttResult]] = []

    async def publish_final(held: list[SttResult]) -> None:
        flushed.append(held)

    async def checkpoint(t: float) -> None:
        pass

    tail = AudioTail()
    for i in range(400):  # 8 s of session audio: talk before the turn, then the turn from 6.0 s
        tail.append(b"\x10\x00" * 320, (i + 1) * 0.02)
    session = SimpleNamespace(tail=tail, sid="s1", _publish_final=publish_final, _checkpoint=checkpoint,
                              w=SimpleNamespace(turns=Listening(settings()), settings=settings()))
    turn = _Turn(session)
    await turn.segment(SttResult("final", "It runs on a laptop.", "u1", 6.0, 7.5))
    assert flushed, "a statement the words call finished, with no model opinion, ends the turn"
    assert len(heard[0]) == round((7.5 + TRAILING_S - (6.0 - TURN_LEAD_S)) * SAMPLE_RATE)


async def test_the_floor_holds_a_ready_reply_only_while_the_user_has_spoken_again() -> None:
    floor = Floor(hold_s=5.0)
    floor.reply_begun()
    assert await floor.wait() and floor.on_air  # nobody spoke since the turn: at once

    floor.reply_begun()
    floor.voice()  # the user's voice came back
    floor.settled()  # ... and it was the turn being answered after all
    assert await floor.wait()

    for settle, said in ((Floor.settled, True), (Floor.drop, False)):
        floor.reply_begun()
        floor.voice()
        waiting = asyncio.create_task(floor.wait())
        await asyncio.sleep(0.05)
        assert floor.holding and not waiting.done() and not floor.on_air
        settle(floor)  # what the voice said was not a turn / the user's next turn replaces the reply
        assert await waiting is said and floor.on_air is said and not floor.holding

    floor.reply_begun()
    floor.drop()  # dropped before it even got here (the brain was still writing)
    assert not await floor.wait()
    floor.reply_begun()
    assert await floor.wait()  # the next reply is not


async def test_the_floor_lets_a_reply_go_after_a_quiet_hold_or_at_once_when_off() -> None:
    floor = Floor(hold_s=0.05)
    floor.reply_begun()
    floor.voice()  # a cough, and nothing after it
    assert await asyncio.wait_for(floor.wait(), 10)  # (a hang guard)
    off = Floor(hold_s=0)
    off.reply_begun()
    off.voice()
    assert await off.wait()
