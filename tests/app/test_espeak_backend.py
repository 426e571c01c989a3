"""The espeak backend against the protocol: real speech, stages, chunks, parallel instances."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from tts_app.audio import rms, spectral_centroid
from tts_app.backends import make_backend
from tts_app.backends.base import SynthesisParams, SynthesisRequest
from tts_app.backends.espeak import EspeakBackend


@pytest.fixture(scope="module")
def backend() -> Iterator[EspeakBackend]:
    engine = EspeakBackend(instances=2)
    engine.load()
    yield engine
    engine.close()


def speak(backend: EspeakBackend, text: str, lang: str = "en", voice: str = "default",
          speed: float = 1.0) -> tuple[list[np.ndarray], list[tuple[str, float]]]:
    stages: list[tuple[str, float]] = []
    request = SynthesisRequest("t", text, voice, lang, SynthesisParams(speed=speed))
    chunks = list(backend.synthesize(request, lambda s, d: stages.append((s, d))))
    return chunks, stages


def test_reports_its_rate_voices_and_version(backend: EspeakBackend) -> None:
    assert backend.sample_rate == 22050
    assert {"default", "en-us", "cmn"} <= backend.voices
    assert backend.model_version.startswith("espeak-ng-1.")


def test_make_backend_builds_the_named_backend_with_its_options() -> None:
    assert make_backend("espeak", {"instances": 3}).instances == 3
    with pytest.raises(ValueError, match="unknown backend 'nope'; expected one of espeak"):
        make_backend("nope", {})


@pytest.mark.parametrize(("text", "lang", "voice"), [
    ("The quick brown fox jumps over the lazy dog.", "en", "en-us"),
    ("The quick brown fox jumps over the lazy dog.", "en", "en-gb"),
    ("我们今天去公园散步。", "zh", "cmn"),
])
def test_speech_has_voice_like_energy_and_spectrum(backend: EspeakBackend, text: str,
                                                   lang: str, voice: str) -> None:
    chunks, stages = speak(backend, text, lang, voice)
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32
    assert np.abs(audio).max() <= 1.0
    assert 1.0 < audio.size / 22050 < 6.0
    assert rms(audio) > 0.02
    assert 300 < spectral_centroid(audio, 22050) < 6000
    assert [s for s, _ in stages][:2] == ["text_normalize", "synthesis"]


def test_one_chunk_per_sentence(backend: EspeakBackend) -> None:
    chunks, stages = speak(backend, "One. Two! Three? 四。")
    assert len(chunks) == 4
    assert [s for s, _ in stages].count("synthesis") == 4


def test_speed_changes_duration(backend: EspeakBackend) -> None:
    slow = np.concatenate(speak(backend, "Speed test sentence here.", speed=0.5)[0]).size
    fast = np.concatenate(speak(backend, "Speed test sentence here.", speed=2.0)[0]).size
    assert slow > 2 * fast


def test_instances_run_concurrently_without_corruption(backend: EspeakBackend) -> None:
    reference = {lang: np.concatenate(speak(backend, text, lang)[0]).size
                 for lang, text in (("en", "Parallel english words."), ("zh", "并行中文。"))}
    sizes: dict[str, list[int]] = {"en": [], "zh": []}

    def run(lang: str, text: str) -> None:
        for _ in range(5):
            sizes[lang].append(np.concatenate(speak(backend, text, lang)[0]).size)

    threads = [threading.Thread(target=run, args=("en", "Parallel english words.")),
               threading.Thread(target=run, args=("zh", "并行中文。"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for lang, values in sizes.items():
        assert len(values) == 5
        assert all(abs(v - reference[lang]) < 0.05 * reference[lang] for v in values)
