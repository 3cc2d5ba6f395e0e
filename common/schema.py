"""The browser ↔ gateway protocol as data, generated from `common/models.py`.

    python -m common.schema          # rewrite frontend/protocol.schema.json and frontend/protocol.d.ts
    python -m common.schema --check  # exit 1 if either differs from the models (tests/test_protocol_schema.py)

`protocol.schema.json` is a JSON Schema (2020-12) with one definition per message: what a client
sends (`BrowserMessage`: JSON text frames up), what it receives (`ServerEvent`: JSON text frames
down, each followed by the gateway's `id`), and the REST bodies (`SessionConfig` in,
`SessionCreated` out). Events are described as they are on the wire: fields that are None are left
out (`exclude_none`), every other field is present. `protocol.d.ts` is the same in TypeScript, for
the page, the widget (`widget.d.ts`) and your own code. Both are served by the gateway with the page.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from common import models

FRONTEND = Path(__file__).resolve().parent.parent / "frontend"
SCHEMA_FILE = FRONTEND / "protocol.schema.json"
DTS_FILE = FRONTEND / "protocol.d.ts"
SCHEMA_ID = "urn:avatar-stack:protocol:v1"  # served by the gateway at /protocol.schema.json

# (name, mode, type): `validation` for what the gateway reads, `serialization` for what it writes.
ROOTS: list[tuple[str, str, Any]] = [
    ("BrowserMessage", "validation", models.BrowserMessage),
    ("ServerEvent", "serialization", models.Event),
    ("SessionConfig", "validation", models.SessionConfig),
    ("SessionCreated", "serialization", models.SessionCreated),
]
EVENT_ID = {
    "type": "string",
    "description": "The event's id in the session's event stream: pass the last one back as `last_event` "
    "when reconnecting. Added by the gateway.",
}


def build_schema() -> dict[str, Any]:
    adapters = [(name, mode, TypeAdapter(tp)) for name, mode, tp in ROOTS]
    roots, defs = TypeAdapter.json_schemas(
        [(name, mode, adapter) for name, mode, adapter in adapters], ref_template="#/$defs/{model}"
    )
    all_defs: dict[str, Any] = dict(defs.get("$defs", {}))
    for (name, _mode), schema in roots.items():
        if "$ref" in schema and len(schema) == 1:  # a model: it is in $defs already
            target = schema["$ref"].rsplit("/", 1)[-1]
            if target != name:
                all_defs[name] = schema
            continue
        all_defs[name] = schema
    written = {_def_name(s) for n, m, _ in ROOTS if m == "serialization" for s in _refs(all_defs, n)}
    for name in sorted(written):
        _as_on_the_wire(all_defs[name], event=name in _event_names(all_defs))
    for name in _event_names(all_defs):
        all_defs[name]["properties"]["id"] = copy.deepcopy(EVENT_ID)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "avatar-stack browser <-> gateway protocol",
        "description": (
            "Generated from common/models.py by `python -m common.schema`; do not edit. WebSocket "
            "/v1/sessions/{sid}/ws?token=…: JSON text frames up are BrowserMessage, binary frames up are "
            "PCM16 LE mono 16 kHz (20-100 ms). JSON text frames down are ServerEvent; each avatar.audio is "
            "followed by one binary frame of PCM16 at its sample_rate. POST /v1/sessions takes SessionConfig "
            "and returns SessionCreated."
        ),
        "$defs": dict(sorted(all_defs.items())),
    }


def _def_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _refs(defs: dict[str, Any], name: str, seen: set[str] | None = None) -> set[str]:
    """`name` and every definition it refers to."""
    seen = seen if seen is not None else set()
    if name in seen:
        return seen
    seen.add(name)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                _refs(defs, _def_name(ref), seen)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(defs[name])
    return seen


def _event_names(defs: dict[str, Any]) -> list[str]:
    return sorted(_def_name(r["$ref"]) for r in defs["ServerEvent"]["oneOf"])


def _as_on_the_wire(schema: dict[str, Any], *, event: bool) -> None:
    """Written with exclude_none: a field whose default is None is absent (never null) when unset;
    every other field is always present."""
    props = schema.get("properties")
    if not props:
        return
    required = []
    for key, prop in props.items():
        branches = prop.get("anyOf")
        if branches and {"type": "null"} in branches:
            rest = [b for b in branches if b != {"type": "null"}]
            prop.pop("anyOf")
            prop.pop("default", None)
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest
            continue
        required.append(key)
    schema["required"] = required


# ------------------------------------------------------------------------------ TypeScript


def build_dts(schema: dict[str, Any]) -> str:
    defs = schema["$defs"]
    out = [
        "// Generated from common/models.py by `python -m common.schema`; do not edit.",
        "// The browser <-> gateway protocol (protocol.schema.json) as TypeScript types.",
        "",
    ]
    for name, node in defs.items():
        doc = node.get("description")
        if doc:
            out.append("/** " + " ".join(doc.split()) + " */")
        if "oneOf" in node:
            members = " | ".join(_def_name(r["$ref"]) for r in node["oneOf"])
            out.append(f"export type {name} = {members};")
        else:
            out.append(f"export interface {name} {{")
            required = set(node.get("required", []))
            for key, prop in node.get("properties", {}).items():
                pdoc = prop.get("description")
                if pdoc:
                    out.append("  /** " + " ".join(pdoc.split()) + " */")
                optional = "" if key in required else "?"
                out.append(f"  {_ts_key(key)}{optional}: {_ts_type(prop)};")
            if node.get("additionalProperties") is True:
                out.append("  [extra: string]: unknown;")
            out.append("}")
        out.append("")
    events = _event_names(defs)
    out.append("/** Every server event by its `type`. */")
    out.append("export interface ServerEventMap {")
    for name in events:
        out.append(f"  {json.dumps(defs[name]['properties']['type']['const'])}: {name};")
    out.append("}")
    out.append("")
    return "\n".join(out)


def _ts_key(key: str) -> str:
    return key if key.isidentifier() else json.dumps(key)


def _ts_type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return _def_name(prop["$ref"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "anyOf" in prop:
        return " | ".join(_ts_type(p) for p in prop["anyOf"])
    kind = prop.get("type")
    if kind == "string":
        return "string"
    if kind in ("integer", "number"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "null":
        return "null"
    if kind == "array":
        return f"{_ts_type(prop.get('items', {}))}[]"
    if kind == "object":
        extra = prop.get("additionalProperties")
        if isinstance(extra, dict):
            return f"Record<string, {_ts_type(extra)}>"
        return "Record<string, unknown>"
    return "unknown"


def render() -> dict[Path, str]:
    schema = build_schema()
    return {SCHEMA_FILE: json.dumps(schema, indent=2, ensure_ascii=False) + "\n", DTS_FILE: build_dts(schema)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.schema", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the checked-in files are out of date")
    args = parser.parse_args(argv)
    if not FRONTEND.is_dir():
        print(f"{FRONTEND} not found: run from a checkout of the repository", file=sys.stderr)
        return 2
    stale = []
    for path, text in render().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path)
        else:
            path.write_text(text)
    if stale:
        names = ", ".join(str(p.name) for p in stale)
        print(f"{names} out of date: run `python -m common.schema`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
