"""PCM16 helpers shared by the gateway, the workers and the command-line client."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import soxr

SAMPLE_RATE = 16_000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2  # 640


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def resample_pcm16(pcm: bytes, src_rate: int, dst_rate: int) -> bytes:
    if src_rate == dst_rate or not pcm:
        return pcm
    samples = np.frombuffer(pcm, dtype="<i2")
    return soxr.resample(samples, src_rate, dst_rate).astype("<i2").tobytes()


class StreamResampler:
    """Resamples one continuous PCM16 stream chunk by chunk, keeping the filter state between chunks.

    Resampling each chunk on its own restarts the filter at every edge: a click each time. One
    instance per utterance; `flush()` at its end returns the samples the filter still holds.
    """

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self.passthrough = src_rate == dst_rate
        self._stream = None if self.passthrough else soxr.ResampleStream(src_rate, dst_rate, 1, dtype="int16")

    def push(self, pcm: bytes) -> bytes:
        if self.passthrough or not pcm:
            return pcm
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
        return self._stream.resample_chunk(samples).astype("<i2").tobytes()

    def flush(self) -> bytes:
        if self.passthrough:
            return b""
        return self._stream.resample_chunk(np.zeros(0, dtype="<i2"), last=True).astype("<i2").tobytes()


def duration_s(pcm: bytes, rate: int = SAMPLE_RATE) -> float:
    return len(pcm) / 2 / rate


def read_wav_16k_mono(path: str | Path) -> bytes:
    """Read a PCM WAV file and return 16 kHz mono PCM16 bytes (downmixed and resampled)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        channels, rate = wav.getnchannels(), wav.getframerate()
        data = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1).astype("<i2")
    return resample_pcm16(data.tobytes(), rate, SAMPLE_RATE)


def frames(pcm: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """Split PCM into fixed frames; the last one is zero-padded to full length."""
    out = [pcm[i : i + frame_bytes] for i in range(0, len(pcm), frame_bytes)]
    if out and len(out[-1]) < frame_bytes:
        out[-1] = out[-1] + b"\x00" * (frame_bytes - len(out[-1]))
    return out


def mouth_envelope(pcm: bytes, rate: int, hop_ms: int = 20) -> list[float]:
    """Mouth openness per hop (0..1) from the speech's loudness, for lip-sync in the page."""
    samples = pcm16_to_float(pcm)
    hop = max(1, rate * hop_ms // 1000)
    n = len(samples) // hop + (1 if len(samples) % hop else 0)
    if n == 0:
        return []
    padded = np.zeros(n * hop, dtype=np.float32)
    padded[: len(samples)] = samples
    rms = np.sqrt(np.mean(padded.reshape(n, hop) ** 2, axis=1))
    # Speech RMS sits around 0.02..0.3; map it onto 0..1 with a soft knee.
    openness = np.clip((20 * np.log10(rms + 1e-6) + 45) / 30, 0.0, 1.0)
    return [round(float(v), 2) for v in openness]
