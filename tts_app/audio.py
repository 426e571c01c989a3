"""Audio helpers: float32 chunks to 16-bit PCM and WAV, and the quality figures we log.

RMS and spectral centroid are cheap numpy figures that catch the silent-output and
"sounds like noise" failures that a 200 status hides.
"""

from __future__ import annotations

import struct

import numpy as np

STREAM_SIZE = 0xFFFFFFFF   # RIFF/data size for a stream whose length is not known yet


def to_pcm16(chunk: np.ndarray) -> bytes:
    """Float samples in [-1, 1] to little-endian int16 bytes (clipped, not wrapped)."""
    clipped = np.clip(np.asarray(chunk, dtype=np.float32), -1.0, 1.0)
    return (clipped * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM16 mono RIFF header; ``None`` length writes the streaming sentinel."""
    data_size = STREAM_SIZE if data_bytes is None else data_bytes
    riff_size = STREAM_SIZE if data_bytes is None else 36 + data_bytes
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff_size, b"WAVE", b"fmt ", 16, 1, 1,
                       sample_rate, sample_rate * 2, 2, 16, b"data", data_size)


def encode(pcm: bytes, sample_rate: int, fmt: str) -> bytes:
    """The response body for ``fmt`` ("wav" or "pcm") from PCM16 bytes."""
    return wav_header(sample_rate, len(pcm)) + pcm if fmt == "wav" else pcm


def pcm_duration_ms(pcm_bytes: int, sample_rate: int) -> float:
    return pcm_bytes / 2 / sample_rate * 1000.0


def rms(samples: np.ndarray) -> float:
    if samples.size == 0:
        return 0.0
    as_float = samples.astype(np.float64)
    return float(np.sqrt(np.mean(as_float * as_float)))


def spectral_centroid(samples: np.ndarray, sample_rate: int) -> float:
    """Magnitude-weighted mean frequency in Hz (0 for silence)."""
    if samples.size < 2:
        return 0.0
    magnitude = np.abs(np.fft.rfft(samples.astype(np.float64)))
    total = float(magnitude.sum())
    if total <= 0.0:
        return 0.0
    freqs = np.fft.rfftfreq(samples.size, d=1.0 / sample_rate)
    return float((freqs * magnitude).sum() / total)
