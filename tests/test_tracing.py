"""OpenTelemetry: one trace per user turn across the three services, its context carried in the
bus entries; exported here to a file (TRACES_FILE) by each real service process."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from avatar_stack.client import Conversation, create_session
from tests.conftest import Stack, start_stack
from tests.speech import speech_available, speech_pcm

VOICE_ORDER = ["stt.end_of_speech_to_final", "avatar.brain_first_text", "avatar.first_audio", "avatar.speaking"]


@pytest.fixture(scope="module")
def traced_stack(redis_url: str, tmp_path_factory) -> Iterator[tuple[Stack, Path]]:
    path = tmp_path_factory.mktemp("traces") / "spans.jsonl"
    stack = start_stack(redis_url, TRACES_FILE=str(path))
    yield stack, path
    stack.stop_all()


def spans_of(path: Path, trace_id: str | None = None) -> list[dict]:
    spans = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [s for s in spans if trace_id is None or s["trace_id"] == trace_id]


def wait_spans(path: Path, predicate, timeout_s: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        spans = spans_of(path) if path.exists() else []
        if predicate(spans):
            return spans
        assert time.monotonic() < deadline, [(s["name"], s["service"]) for s in spans]
        time.sleep(0.1)


async def test_a_spoken_turn_is_one_trace_across_the_services(traced_stack):
    if not speech_available():
        pytest.skip("needs espeak-ng and sox for the spoken question")
    stack, path = traced_stack
    conv = Conversation(await create_session(stack.base_url))
    await conv.connect()
    await conv.wait_type("session.ready", 60)
    await conv.stream(speech_pcm("What is avatar stack?"), trailing_silence_s=1.0)
    final = await conv.wait_type("transcript.final", 60)
    await conv.wait_type("avatar.stopped_talking", 90)
    assert all("tp" not in e for e in conv.events)  # the page never sees the trace context
    await conv.close()

    turn_id = final["utterance_id"]
    spans = wait_spans(
        path, lambda ss: any(s["name"] == "gateway.deliver" and s["attributes"].get("event.type") ==
                             "avatar.started_talking" for s in ss),
    )  # fmt: skip
    [root] = [s for s in spans if s["name"] == VOICE_ORDER[0] and s["attributes"]["turn.id"] == turn_id]
    trace = {s["name"]: s for s in spans_of(path, root["trace_id"]) if s["name"] != "gateway.deliver"}
    delivered = [s for s in spans_of(path, root["trace_id"]) if s["name"] == "gateway.deliver"]
    for s in sorted(spans_of(path, root["trace_id"]), key=lambda s: s["start_ns"]):
        print(f"  {(s['start_ns'] - root['start_ns']) / 1e6:8.1f} ms  {(s['end_ns'] - s['start_ns']) / 1e6:7.1f} ms"
              f"  {s['service']:<22} {s['name']} {s['attributes'].get('event.type', '')}")  # fmt: skip

    # Every service took part, each span in its own process.
    assert root["service"] == "avatar-stack-stt" and root["parent_id"] is None
    assert {trace[n]["service"] for n in VOICE_ORDER[1:]} == {"avatar-stack-avatar"}
    assert {s["service"] for s in delivered} == {"avatar-stack-gateway"}
    assert {s["attributes"]["event.type"] for s in delivered} >= {"avatar.reply", "avatar.audio"}
    # One tree: the avatar's turn under the STT span, its moments under the avatar's turn.
    assert trace["avatar.turn"]["parent_id"] == root["span_id"]
    for name in VOICE_ORDER[1:]:
        assert trace[name]["parent_id"] == trace["avatar.turn"]["span_id"], name
    # In order: end of speech -> final -> brain's first text -> first audio -> speaking, back to back.
    starts = [trace[n]["start_ns"] for n in VOICE_ORDER]
    ends = [trace[n]["end_ns"] for n in VOICE_ORDER]
    assert starts == sorted(starts) and ends == sorted(ends), list(zip(VOICE_ORDER, starts, ends, strict=True))
    assert root["end_ns"] - root["start_ns"] > 0  # end of speech is before the final, not "now"
    assert trace["avatar.turn"]["end_ns"] >= ends[-1]


async def test_a_typed_turn_starts_its_trace_at_the_gateway(traced_stack):
    stack, path = traced_stack
    conv = Conversation(await create_session(stack.base_url))
    await conv.connect()
    await conv.wait_type("session.ready", 60)
    await conv.send_text("How does it scale?")
    await conv.wait_type("avatar.started_talking", 60)
    await conv.close()
    spans = wait_spans(path, lambda ss: any(s["name"] == "gateway.text_turn" for s in ss))
    [root] = [s for s in spans if s["name"] == "gateway.text_turn"]
    wanted = {"gateway.text_turn", "avatar.turn", "avatar.brain_first_text"}
    # avatar.turn ends once the avatar is heard: wait for it rather than for the first span.
    spans = wait_spans(path, lambda ss: wanted <= {s["name"] for s in ss if s["trace_id"] == root["trace_id"]}, 30)
    assert root["service"] == "avatar-stack-gateway" and root["parent_id"] is None
    turn = next(s for s in spans if s["name"] == "avatar.turn" and s["trace_id"] == root["trace_id"])
    assert turn["parent_id"] == root["span_id"]
