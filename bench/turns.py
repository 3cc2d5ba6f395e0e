"""Turn-taking in a real room: pauses, backchannels, noise and the avatar's own voice in the mic.

Starts its own Redis, gateway, STT worker and avatar worker (local providers, real processes) and
talks to them through the real WebSocket like a page next to a loudspeaker: one microphone stream
of 20 ms frames at real-time pace, into which it mixes the user's speech (`--user-voice`: a
natural piper voice pitched up from the avatar's, by default, or espeak-ng), noise bursts, and
the avatar's voice as it is "played" (the audio the page receives, played back to back, frozen
while the avatar is paused, cut on barge-in) at `--echo-db` after `--echo-ms`.

Scenarios (36 by default) and what each counts:

- `plain` (10): a complete question → end of speech → first avatar audio; >1 turn = premature.
- `paused` (8): a question with a 0.5-1.2 s pause mid-sentence → premature if it becomes 2 turns;
  answered as one if it was one turn, or every reply but the last was dropped for it (`replaces`)
  when the user went on.
- `backchannel` (5) / `noise` (5): said or heard over the avatar → false barge-in if it stops the
  reply (a pause that resumes is counted apart).
- `barge_in` (5): a real question over the avatar → missed if it is not quiet within 2 s; time
  from the user's voice onset to quiet.
- `echo` (3 levels, one delay each, + the echo in every other scenario): the avatar answers, the
  user says nothing more → self-interruptions (its reply stopped) and self-answers (a turn made of
  its own words answered).

    .venv/bin/python -m bench.turns [--echo-db -10 --echo-ms 120] [--user-voice piper|espeak] [--json out.json]

`BENCH_SERVICE_PYTHONPATH` runs the services from another checkout (the "before" numbers).
`--llm-ttft-ms N` answers with an LLM (the fake of `tests/fakes/llm.py` on loopback) whose first
token comes N ms after the request, tokens 30 ms apart, instead of the instant local responder:
a cloud model's reply starts later, so the user's pause is more often over before it is heard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

from avatar_stack.client import create_session
from bench.local_stack import local_stack
from bench.measure import pct
from common.pcm import SAMPLE_RATE
from tests.fakes.llm import FakeLlm
from tests.room import Room, noise, said, since, speech, trim_trailing_silence

TRIGGER = "Tell me about the avatar providers."  # a long answer (~10 s) to talk over
LLM_REPLY = ("Avatar stack answers by voice and face within a second. It runs on your own machines, "
             "with local speech or a cloud vendor. Ask me about scaling, providers or the setup.")

PLAIN = [
    "What is avatar stack?", "How do I scale it?", "Which speech engines does it use?",
    "Can it run without any keys?", "Does it work offline?", "Who are you?", "What can you do?",
    "How does avatar stack work?", "Which avatar providers are supported?", "How many people can use it at once?",
]
PAUSED = [
    ("So I was wondering", 0.9, "how many people can talk to one speech worker at the same time?"),
    ("Can you tell me", 0.6, "what avatar stack is?"),
    ("What happens when", 1.2, "a worker crashes?"),
    ("I would like to know", 0.8, "how I can scale it?"),
    ("How does the", 0.5, "avatar know what to say?"),
    ("Is it possible to", 1.0, "run it without any keys?"),
    ("Tell me about the", 0.7, "speech engines."),
    ("Which providers", 1.1, "does it support for the avatar?"),
]
BACKCHANNELS = ["Mhm.", "Yeah.", "Right.", "Okay.", "Uh huh."]
NOISES = ["white", "thump", "keys", "cough", "white"]
BARGE_INS = [
    "Wait, how do I scale it?", "Stop, what is avatar stack?", "Sorry, can it run offline?",
    "Hold on, who are you?", "Excuse me, which speech engines does it use?",
]
ECHO_LEVELS = [(-6.0, 250), (-10.0, 120), (-15.0, 60)]
USER_PITCH_SEMITONES = 3  # the piper user is the avatar's voice model, made another person's


class UserVoice:
    """How the user sounds. `espeak`: flat synthetic prosody, which Whisper tiny.en mishears
    next to the avatar's echo and the turn model cannot read. `piper`: a natural voice (the
    bundled piper model raised by a few semitones, so it is not the avatar's), whose pauses
    mid-sentence are piper's own comma pauses (continuing intonation) stretched to the gap."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tts = None
        if name == "piper":
            from avatar_service.tts import PiperTts

            self._tts = PiperTts()

    def say(self, text: str) -> np.ndarray:
        if self._tts is None:
            return speech(text)
        return self._trimmed(self._piper(text))

    def say_with_pause(self, head: str, gap_s: float, rest: str) -> np.ndarray:
        pause = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
        if self._tts is None:
            return np.concatenate([speech(head), pause, speech(rest)])
        audio = self._piper(f"{head}, {rest}")
        start, end = _longest_inner_gap(audio)
        return self._trimmed(np.concatenate([audio[:start], pause, audio[end:]]))

    def _piper(self, text: str) -> np.ndarray:
        import soxr

        voice = self._tts._voice  # type: ignore[attr-defined]
        audio = np.concatenate([c.audio_float_array for c in voice.synthesize(text)]).astype(np.float32)
        # Resampling as if recorded faster raises the pitch (and the pace, a little).
        rate = voice.config.sample_rate * 2 ** (USER_PITCH_SEMITONES / 12)
        return soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)

    @staticmethod
    def _trimmed(audio: np.ndarray) -> np.ndarray:
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        return np.frombuffer(trim_trailing_silence(pcm), dtype="<i2").astype(np.float32) / 32768


def _longest_inner_gap(audio: np.ndarray, hop: int = 320, quiet_db: float = -40.0) -> tuple[int, int]:
    """Sample range of the longest quiet run between two voiced stretches (the comma's pause)."""
    n = len(audio) // hop
    rms = np.sqrt(np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1))
    voiced = np.nonzero(20 * np.log10(rms + 1e-9) > quiet_db)[0]
    if len(voiced) < 2:
        return len(audio), len(audio)
    gaps = np.diff(voiced)
    i = int(np.argmax(gaps))
    return int(voiced[i] + 1) * hop, int(voiced[i + 1]) * hop


async def run_scenarios(base_url: str, echo_db: float | None, echo_ms: int, only: set[str] | None,
                        voice: UserVoice) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    results: dict[str, list[dict[str, Any]]] = {}
    rooms: list[Room] = []

    async def session(gain_db: float | None, delay_ms: int) -> tuple[Room, asyncio.Event, asyncio.Task]:
        room = Room(await create_session(base_url), 0.0 if gain_db is None else 10 ** (gain_db / 20), delay_ms)
        stop = asyncio.Event()
        task = asyncio.create_task(room.run(stop))
        if await room.wait(lambda e: e["type"] == "session.ready", 120) is None:
            raise SystemExit("session did not start")
        await asyncio.sleep(0.5)
        return room, stop, task

    async def close(stop: asyncio.Event, task: asyncio.Task) -> None:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    def want(kind: str) -> bool:
        return only is None or kind in only

    async def ask(room: Room, text: str) -> tuple[int, float]:
        mark = len(room.events)
        end = await said(room, voice.say(text))
        return mark, end

    async def answered_turn(room: Room, mark: int, timeout_s: float = 20) -> dict[str, Any] | None:
        return await room.wait(lambda e: e in room.events[mark:] and e["type"] == "avatar.audio", timeout_s)

    room, stop, task = await session(echo_db, echo_ms)
    rooms.append(room)
    try:
        if want("plain"):
            for text in PLAIN:
                mark, end = await ask(room, text)
                audio = await answered_turn(room, mark)
                await room.quiet()
                turns = {e["turn_id"] for e in since(room, mark, "avatar.reply")}
                results.setdefault("plain", []).append({
                    "text": text, "first_audio_s": None if audio is None else audio["_rx"] - end,
                    "turns": len(turns), "interrupted": sum(e.get("interrupted", False)
                                                             for e in since(room, mark, "avatar.stopped_talking")),
                })
                print(f"  plain {text!r}: {results['plain'][-1]}", file=sys.stderr)
        if want("paused"):
            for head, gap, rest in PAUSED:
                mark = len(room.events)
                end = await said(room, voice.say_with_pause(head, gap, rest))
                audio = await answered_turn(room, mark)
                await room.quiet()
                replies = since(room, mark, "avatar.reply")
                turns = {e["turn_id"] for e in replies}
                early = [e for e in replies if e["_rx"] < end]
                # A premature turn the user went on with is dropped and answered with its rest.
                replaced = {e["replaces"] for e in replies if e.get("replaces")}
                reply_ids = list(dict.fromkeys(e["reply_id"] for e in replies))
                results.setdefault("paused", []).append({
                    "text": f"{head} … {rest}", "pause_s": gap, "turns": len(turns),
                    "premature": bool(early) or len(turns) > 1,
                    "answered_as_one": (not early and len(turns) == 1) or (
                        len(reply_ids) > 1 and all(r in replaced for r in reply_ids[:-1])),
                    "first_audio_s": None if audio is None else audio["_rx"] - end,
                })
                print(f"  paused {head!r}+{gap}s: {results['paused'][-1]}", file=sys.stderr)
        for kind, items in (("backchannel", BACKCHANNELS), ("noise", NOISES), ("barge_in", BARGE_INS)):
            if not want(kind):
                continue
            for item in items:
                mark, _ = await ask(room, TRIGGER)
                started = await room.wait(
                    lambda e, m=mark: e in room.events[m:] and e["type"] == "avatar.started_talking", 20)
                if started is None:
                    results.setdefault(kind, []).append({"item": item, "error": "no reply"})
                    continue
                await asyncio.sleep(2.0)  # well into the reply
                over = len(room.events)
                onset = time.monotonic()
                audio = voice.say(item) if kind != "noise" else noise(item, rng)
                await said(room, audio)
                quiet = await room.wait(
                    lambda e, m=over: e in room.events[m:] and (
                        e["type"] == "avatar.paused"
                        or (e["type"] == "avatar.stopped_talking" and e.get("interrupted"))), 3.0)
                await room.quiet()
                stopped = any(e.get("interrupted") for e in since(room, over, "avatar.stopped_talking"))
                pauses = since(room, over, "avatar.paused")
                resumed = [e for e in since(room, over, "avatar.resumed") if pauses and e["_rx"] >= pauses[0]["_rx"]]
                row = {"item": item, "stopped": stopped, "paused": bool(pauses),
                       "paused_for_s": resumed[0]["_rx"] - pauses[0]["_rx"] if resumed else None,
                       "quiet_after_s": None if quiet is None else quiet["_rx"] - onset,
                       "turns_after": len({e["turn_id"] for e in since(room, over, "avatar.reply")})}
                results.setdefault(kind, []).append(row)
                print(f"  {kind} {item!r}: {row}", file=sys.stderr)
    finally:
        await close(stop, task)
    if want("echo"):
        for gain_db, delay_ms in ECHO_LEVELS:
            room, stop, task = await session(gain_db, delay_ms)
            rooms.append(room)
            try:
                mark, _ = await ask(room, TRIGGER)
                await answered_turn(room, mark)
                await room.quiet(40)
                await asyncio.sleep(2.0)
                replies = {e["turn_id"] for e in since(room, mark, "avatar.reply")}
                row = {"echo_db": gain_db, "echo_ms": delay_ms,
                       "self_interruptions": sum(e.get("interrupted", False)
                                                 for e in since(room, mark, "avatar.stopped_talking")),
                       "self_answers": max(0, len(replies) - 1),
                       "ignored_as_echo": sum(
                           e.get("reason") == "echo" for e in since(room, mark, "transcript.ignored"))}
                results.setdefault("echo", []).append(row)
                print(f"  echo {gain_db} dB {delay_ms} ms: {row}", file=sys.stderr)
            finally:
                await close(stop, task)
    out = summarize(results)
    out["events"] = [[_brief(e) for e in r.events if e["type"] != "avatar.audio"] for r in rooms]
    return out


def _brief(event: dict[str, Any]) -> str:
    keys = ("utterance_id", "turn_id", "reply_id", "reason", "interrupted", "text")
    return f"{event['_rx']:.2f} {event['type']} " + " ".join(f"{k}={event[k]!r}" for k in keys if k in event)


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def rate(rows: list[dict[str, Any]], key: str) -> str:
        return f"{sum(bool(r.get(key)) for r in rows)}/{len(rows)}" if rows else "-"

    plain, paused = results.get("plain", []), results.get("paused", [])
    latency = [r["first_audio_s"] for r in plain if r.get("first_audio_s") is not None and r["turns"] == 1]
    # A paused question's wait after its end: the turn model says "finished" or the silence cap does.
    paused_latency = [r["first_audio_s"] for r in paused if not r["premature"] and r.get("first_audio_s") is not None]
    over = results.get("backchannel", []) + results.get("noise", [])
    barge = results.get("barge_in", [])
    quiet = [r["quiet_after_s"] for r in barge if r.get("quiet_after_s") is not None]
    held = [r["paused_for_s"] for r in over if r.get("paused_for_s") is not None and not r.get("stopped")]
    echo_rooms = results.get("echo", [])
    self_answers = sum(r["self_answers"] for r in echo_rooms) + sum(max(0, r["turns"] - 1) for r in plain)
    self_interrupt = sum(r["self_interruptions"] for r in echo_rooms) + sum(r.get("interrupted", 0) for r in plain)
    summary = {
        "utterances": sum(len(v) for v in results.values()),
        "premature_turns": rate(paused, "premature"),
        "paused_answered_as_one": rate(paused, "answered_as_one"),
        "false_barge_ins": rate(over, "stopped"),
        "false_pauses_resumed": f"{sum(bool(r.get('paused')) and not r.get('stopped') for r in over)}/{len(over)}",
        "false_pause_s": {"median": statistics.median(held) if held else None, "max": max(held, default=None)},
        "missed_barge_ins": f"{sum(r.get('quiet_after_s') is None or r['quiet_after_s'] > 2.0 for r in barge)}"
                            f"/{len(barge)}",
        "barge_in_quiet_s": {"median": statistics.median(quiet) if quiet else None,
                             "p95": pct(quiet, 0.95) if quiet else None},
        "self_interruptions": self_interrupt,
        "self_answers": self_answers,
        "end_of_speech_to_first_audio_s": {
            "median": statistics.median(latency) if latency else None, "p95": pct(latency, 0.95) if latency else None,
            "n": len(latency),
        },
        "paused_end_of_speech_to_first_audio_s": {
            "median": statistics.median(paused_latency) if paused_latency else None,
            "p95": pct(paused_latency, 0.95) if paused_latency else None, "n": len(paused_latency),
        },
    }
    return {"summary": summary, "rows": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--echo-db", type=float, default=-10.0, help="avatar voice back into the mic (dB)")
    parser.add_argument("--echo-ms", type=int, default=120, help="... after this delay")
    parser.add_argument("--no-echo", action="store_true", help="a headset: no avatar voice in the mic")
    parser.add_argument("--only", default="", help="comma-separated scenario kinds")
    parser.add_argument("--user-voice", choices=("piper", "espeak"), default="piper",
                        help="the user's voice: natural (piper, pitched up) or synthetic (espeak)")
    parser.add_argument("--json", default="", help="write the summary and rows here")
    parser.add_argument("--llm-ttft-ms", type=int, default=None,
                        help="answer with a fake LLM whose first token takes this long (default: the local responder)")
    args = parser.parse_args()
    only = {k.strip() for k in args.only.split(",") if k.strip()} or None
    with contextlib.ExitStack() as running:
        llm_env = {}
        if args.llm_ttft_ms is not None:
            llm = running.enter_context(FakeLlm(token_delay_s=0.03, first_token_s=args.llm_ttft_ms / 1000))
            llm.default_reply = LLM_REPLY
            llm_env = {"LLM_BASE_URL": llm.url}
        stack = running.enter_context(local_stack(
            os.environ.get("BENCH_SERVICE_PYTHONPATH") or None, SESSION_IDLE_TIMEOUT_S="3600",
            LOG_LEVEL=os.environ.get("LOG_LEVEL", "WARNING"), **llm_env))
        voice = UserVoice(args.user_voice)
        out = asyncio.run(run_scenarios(stack.base_url, None if args.no_echo else args.echo_db, args.echo_ms, only,
                                        voice))
    print(json.dumps(out["summary"], indent=2))
    if os.environ.get("BENCH_EVENTS"):
        with open(os.environ["BENCH_EVENTS"], "w") as f:
            for i, events in enumerate(out.pop("events")):
                f.write(f"# room {i}\n" + "\n".join(events) + "\n")
    out.pop("events", None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
