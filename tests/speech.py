"""Synthetic speech for tests and benchmarks: `espeak-ng` says a sentence, `sox` makes it 16 kHz mono PCM16.

Real speech (not tones or noise) is what exercises the VAD and Whisper end to end, and espeak-ng is
small, offline and deterministic. Files are cached by a hash of everything that shapes them, so a
test run synthesizes each sentence once; writes are atomic because test processes may race.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

VOICE = "en-us"
WORDS_PER_MINUTE = 140  # slower than the default 175: tiny.en mishears fast espeak
SAMPLE_RATE = 16_000
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """`$AVATAR_SPEECH_CACHE`, else a folder in the system temp dir (shared by test runs)."""
    path = Path(os.environ.get("AVATAR_SPEECH_CACHE") or Path(tempfile.gettempdir()) / "avatar-stack-speech")
    path.mkdir(parents=True, exist_ok=True)
    return path


def speech_available() -> bool:
    """Whether both tools are installed (tests skip, rather than fail, without them)."""
    return shutil.which("espeak-ng") is not None and shutil.which("sox") is not None


def speech_wav(text: str, *, pad_s: float = 0.5) -> Path:
    """A 16 kHz mono 16-bit WAV of `text` spoken by espeak-ng, with `pad_s` of silence at both ends."""
    if not text.strip():
        raise ValueError("speech_wav needs some text")
    if pad_s < 0:
        raise ValueError("pad_s must be >= 0")
    key = hashlib.sha256(f"{_CACHE_VERSION}|{VOICE}|{WORDS_PER_MINUTE}|{pad_s:.3f}|{text}".encode()).hexdigest()[:24]
    out = cache_dir() / f"{key}.wav"
    if out.exists():
        return out
    if not speech_available():
        raise RuntimeError("speech_wav needs `espeak-ng` and `sox` on PATH (apt-get install espeak-ng sox)")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw, converted = Path(tmp) / "raw.wav", Path(tmp) / "16k.wav"
        subprocess.run(
            ["espeak-ng", "-v", VOICE, "-s", str(WORDS_PER_MINUTE), "-w", str(raw), "--", text],
            check=True, capture_output=True, timeout=60,
        )
        subprocess.run(
            ["sox", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer",
             str(converted), "pad", f"{pad_s:.3f}", f"{pad_s:.3f}"],
            check=True, capture_output=True, timeout=60,
        )
        os.replace(converted, out)  # atomic: a concurrent reader sees the whole file or none
    return out


def speech_pcm(text: str, *, pad_s: float = 0.5) -> bytes:
    """The PCM16 samples of `speech_wav(text, pad_s=pad_s)`, without the WAV header."""
    with wave.open(str(speech_wav(text, pad_s=pad_s)), "rb") as wav:
        assert wav.getframerate() == SAMPLE_RATE and wav.getnchannels() == 1 and wav.getsampwidth() == 2
        return wav.readframes(wav.getnframes())


def silence_pcm(seconds: float) -> bytes:
    """Digital silence of the given length, for gaps between synthetic utterances."""
    return b"\x00\x00" * round(seconds * SAMPLE_RATE)
