"""The deployment files, validated offline (no Docker engine here): compose schema, references, commands."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from avatar_stack.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.mark.skipif(shutil.which("check-jsonschema") is None and not (ROOT / ".venv/bin/check-jsonschema").exists(),
                    reason="check-jsonschema not installed")
def test_compose_file_matches_the_compose_spec():
    tool = shutil.which("check-jsonschema") or str(ROOT / ".venv/bin/check-jsonschema")
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_depends_on_names_real_services():
    services = compose()["services"]
    for name, service in services.items():
        for target in service.get("depends_on", {}):
            assert target in services, f"{name} depends on unknown service {target}"


def test_every_command_is_a_real_subcommand():
    for name, service in compose()["services"].items():
        command = service.get("command")
        if name in ("redis", "livekit", "prometheus", "grafana"):  # third-party images
            continue
        assert command[0] == "avatar-stack", name
        args = build_parser().parse_args(command[1:])  # exits (fails the test) on an unknown subcommand
        assert args.command == command[1]


def test_workers_scale_freely():
    services = compose()["services"]
    for name in ("stt", "avatar"):
        assert "container_name" not in services[name]
        assert "ports" not in services[name]
    assert "healthcheck" in services["redis"]
    assert "--appendonly" in services["redis"]["command"]


def test_livekit_is_optional_and_configured():
    """`docker compose up` stays as it was; `--profile livekit` adds the official server with our config."""
    livekit = compose()["services"]["livekit"]
    assert livekit["profiles"] == ["livekit"]
    assert livekit["image"].startswith("livekit/livekit-server:")
    config_path = livekit["volumes"][0].split(":")[0]
    config = yaml.safe_load((ROOT / config_path).read_text())
    assert config["port"] == 7880 and config["rtc"]["udp_port"] == 7882
    assert all(len(secret) >= 32 for secret in config["keys"].values())  # LiveKit's minimum outside dev mode
    for name, service in compose()["services"].items():
        assert "livekit" not in service.get("depends_on", {}), f"{name} must run without LiveKit"


def test_dockerfile_runs_as_non_root_and_bakes_assets():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER app" in text
    assert "livekit-client.umd.js" in text
    assert text.count("FROM ") >= 2
