"""The `avatar-stack` command as a new user meets it.

(a) `--version`; `doctor` shows every setting with secrets masked, warns about misspelt ones, and
    checks Redis and each configured vendor; every setting is documented in .env.example
(b) `up` prints the URL only once a session started from the page would be served, showing what it
    waits for meanwhile; `say` streams a whole file of two questions and exits after the last reply
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import httpx
import orjson
import pytest

from avatar_stack import __version__
from avatar_stack.config import all_settings, unknown_settings
from avatar_stack.up import free_port
from tests.browser_util import static_server
from tests.conftest import stack_env
from tests.speech import silence_pcm, speech_available, speech_pcm

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "avatar_stack.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    # From a temporary cwd, the checkout must still be the package that runs.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("LIVEKIT_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def test_version():
    out = subprocess.run([*CLI, "--version"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == f"avatar-stack {__version__}"


def test_every_setting_is_in_env_example():
    text = (ROOT / ".env.example").read_text()
    names = {line.lstrip("# ").split("=", 1)[0] for line in text.splitlines() if "=" in line}
    missing = sorted(s.env for s in all_settings() if s.env not in names)
    assert not missing, f"not in .env.example (as NAME=… or # NAME=…): {missing}"


def test_unknown_settings_are_found_with_a_hint(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("STT_CAPACTIY=3\nREDIS_URL=redis://x\nMY_OWN_THING=1\n")
    found = dict(
        unknown_settings(
            {"AVATAR_PROVDER": "local", "AVATAR_PROVIDER": "local", "SESSION_MANAGER": "x", "HOME": "/"}, dotenv
        )
    )
    assert found["AVATAR_PROVDER"] == "did you mean AVATAR_PROVIDER?"
    assert found["STT_CAPACTIY"] == "did you mean STT_CAPACITY?"
    assert found["MY_OWN_THING"] == "no service reads it"  # .env is ours: every unknown name counts
    assert "SESSION_MANAGER" not in found and "HOME" not in found  # the environment is shared


def test_doctor_masks_secrets_warns_and_checks_vendors(redis_url: str, tmp_path):
    (tmp_path / ".env").write_text("STT_CAPACTIY=3\n")
    secret = "sk-do-not-print-me-0123456789"
    with static_server(tmp_path) as llm:  # any HTTP server answers for "reachable"
        env = cli_env(
            REDIS_URL=redis_url, LLM_BASE_URL=f"{llm}/v1", LLM_API_KEY=secret, AVATAR_PROVDER="local",
            STT_PROVIDER="local", AVATAR_PROVIDER="local",
        )  # fmt: skip
        ok = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert secret not in ok.stdout + ok.stderr
    assert "LLM_API_KEY" in ok.stdout and "********" in ok.stdout
    assert "AVATAR_PROVDER is not a setting (did you mean AVATAR_PROVIDER?)" in ok.stderr
    assert "STT_CAPACTIY: did you mean STT_CAPACITY?" in ok.stdout
    assert "[ok  ] redis" in ok.stdout and "[ok  ] brain: llm" in ok.stdout
    for s in all_settings():
        assert s.env in ok.stdout

    closed = free_port()
    env = cli_env(REDIS_URL=redis_url, LLM_BASE_URL=f"http://127.0.0.1:{closed}/v1", STT_PROVIDER="local")
    bad = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert bad.returncode == 1 and "[FAIL] brain: llm" in bad.stdout, bad.stdout


def write_wav(path: Path, pcm: bytes) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return path


@pytest.mark.slow
def test_up_then_say_a_file_of_two_questions(redis_url: str, tmp_path):
    if not speech_available():
        pytest.skip("needs espeak-ng and sox for the spoken questions")
    port = free_port()
    env = {**stack_env(redis_url, port), "AVATAR_STACK_LIVEKIT": "off", "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen(
        [*CLI, "up"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(up.stderr), daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            line = up.stdout.readline()
            assert line or up.poll() is None, "".join(stderr)
            if "running: open" in line:
                break
            assert time.monotonic() < deadline, "".join(stderr)
        assert f"open {base}" in line
        # The moment the URL is printed, the page's first click gets a session, not "all busy".
        first = httpx.post(f"{base}/v1/sessions", json={})
        assert first.status_code == 201, first.text
        httpx.delete(f"{base}/v1/sessions/{first.json()['session_id']}",
                     headers={"Authorization": f"Bearer {first.json()['token']}"})  # fmt: skip
        assert any("[up] starting… waiting for" in s for s in stderr), stderr

        # Two questions, the second long after the first was answered: say hears both answers.
        pcm = speech_pcm("What is avatar stack?", pad_s=0.5) + silence_pcm(12) + speech_pcm("How does it scale?")
        wav = write_wav(tmp_path / "two.wav", pcm)
        said = subprocess.run(
            [*CLI, "say", str(wav), "--url", base, "--timeout", "90"], capture_output=True, text=True,
            env=cli_env(), cwd=ROOT, timeout=240,
        )  # fmt: skip
        events = [orjson.loads(line) for line in said.stdout.splitlines() if line.startswith("{")]
        kinds = [e["type"] for e in events]
        assert said.returncode == 0, (said.stderr, kinds)
        finals = [e for e in events if e["type"] == "transcript.final" and e["text"].strip()]
        replies = list(dict.fromkeys(e["reply_id"] for e in events if e["type"] == "avatar.reply"))
        assert len(finals) >= 2 and len(replies) >= 2, kinds
        stopped = [e["reply_id"] for e in events if e["type"] == "avatar.stopped_talking"]
        assert replies[-1] in stopped  # it left after the last reply, not after the first

        # examples/client.py, the script client of the README, against the same stack.
        asked = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "client.py"), "What can you do?", "--url", base],
            capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert asked.returncode == 0, asked.stderr
        assert "you:    What can you do?" in asked.stdout and "avatar: " in asked.stdout, asked.stdout
    finally:
        up.send_signal(signal.SIGTERM)  # up stops the services it started
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
