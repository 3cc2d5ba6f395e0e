"""The protocol as data cannot drift: the checked-in JSON Schema and TypeScript types are what
common/models.py generates, real messages validate against the schema, and the widget's types name
every event the widget sends."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import jsonschema
import orjson
import pytest

from common import models, schema
from common.bus import dump

ROOT = Path(__file__).resolve().parent.parent
FRONTEND = ROOT / "frontend"


def test_checked_in_schema_and_types_match_the_models():
    assert schema.main(["--check"]) == 0, "run `python -m common.schema` and commit the result"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    doc = json.loads(schema.SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(doc)
    return jsonschema.Draft202012Validator(doc)


def valid(validator, definition: str, instance) -> bool:
    sub = {"$ref": f"#/$defs/{definition}"}
    return validator.evolve(schema={**validator.schema, **sub}).is_valid(instance)


SAMPLE_EVENTS = [
    models.SessionReady(provider="local", stt_provider="local", audio_sample_rate=22050),
    models.SessionReady(provider="liveavatar", livekit=models.LiveKitInfo(url="wss://x", token="t")),
    models.TranscriptInterim(utterance_id="u1", text="what is"),
    models.TranscriptFinal(utterance_id="u1", text="what is it", start_s=0.1, end_s=1.2),
    models.TranscriptIgnored(utterance_id="u2", reason="echo"),
    models.AvatarReply(reply_id="r1", turn_id="u1", text="It is…"),
    models.AvatarStartedTalking(reply_id="r1"),
    models.AvatarPaused(reply_id="r1"),
    models.AvatarResumed(reply_id="r1"),
    models.AvatarStoppedTalking(reply_id="r1", interrupted=True),
    models.AvatarAudio(reply_id="r1", seq=0, sample_rate=22050, samples=441, mouth=[0.1, 0.5], mouth_hop_ms=10),
    models.ErrorEvent(code="llm_failed", message="the model failed"),
    models.SessionEnded(reason="deleted"),
]


def test_every_event_type_has_a_sample():
    union = typing.get_args(typing.get_args(models.Event)[0])
    assert {type(e) for e in SAMPLE_EVENTS} == set(union)


@pytest.mark.parametrize("event", SAMPLE_EVENTS, ids=lambda e: e.type)
def test_events_as_sent_validate(validator, event):
    wire = orjson.loads(dump(event))  # what the bus carries (exclude_none)
    wire["id"] = "1700000000000-0"  # what the gateway adds
    assert valid(validator, "ServerEvent", wire)
    assert not valid(validator, "ServerEvent", {**wire, "surprise": 1})
    assert not valid(validator, "ServerEvent", {**wire, "ts": "soon"})


def test_browser_messages_validate(validator):
    for good in (
        {"type": "text", "text": "hello"},
        {"type": "interrupt"},
        {"type": "end"},
        {"type": "ping"},
        {"type": "avatar.event", "event": "avatar_start_talking", "task_id": "x"},
    ):
        assert valid(validator, "BrowserMessage", good), good
        models.browser_message_adapter.validate_python(good)  # the gateway agrees
    for bad in ({"type": "text", "text": ""}, {"type": "teleport"}, {"type": "end", "now": True}, {"text": "hi"}):
        assert not valid(validator, "BrowserMessage", bad), bad
    assert valid(validator, "SessionConfig", {"language": "en", "avatar_id": "a1"})
    assert not valid(validator, "SessionConfig", {"language": "english please"})


def test_typescript_types_name_every_event():
    dts = schema.DTS_FILE.read_text()
    for event in SAMPLE_EVENTS:
        assert f'"{event.type}": {type(event).__name__};' in dts


def test_widget_types_name_every_event_the_widget_sends():
    sent = set(re.findall(r'this\.emit\("([a-z-]+)"', (FRONTEND / "widget.js").read_text()))
    declared = set(re.findall(r'"avatar-stack:([a-z-]+)"', (FRONTEND / "widget.d.ts").read_text()))
    assert sent and sent == declared, (sent, declared)
