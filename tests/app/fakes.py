"""Test doubles of the backend protocol (tts_app/backends/base.py) for failure and timing cases.

``GatedBackend`` is the real espeak backend that waits for a test-controlled event before
synthesizing, so "in flight" and "queue full" are states a test holds instead of races.
``FailingBackend`` raises what a GPU model raises (GPU_OOM, MODEL_ERROR, a bare bug).
``HangingBackend`` never returns from some syntheses (a wedged model) until the test says;
``SilentBackend`` "succeeds" with silence; ``BreakingBackend`` fails mid-stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from tts_app.backends.base import StageCallback, SynthesisRequest
from tts_app.backends.espeak import EspeakBackend
from tts_app.errors import SynthesisError


class GatedBackend(EspeakBackend):
    def __init__(self, instances: int = 1) -> None:
        super().__init__(instances=instances)
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Semaphore(0)   # one release per synthesis that started
        self.calls = 0
        self.load_gate = threading.Event()
        self.load_gate.set()

    def load(self) -> None:
        self.load_gate.wait(10)
        super().load()

    def wait_gate(self, request: SynthesisRequest) -> None:
        if request.request_id != "warmup":
            self.calls += 1
            self.entered.release()
            self.release.wait(10)

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        self.wait_gate(request)
        yield from EspeakBackend.synthesize(self, request, on_stage)


class FailingBackend(GatedBackend):
    """Raises for texts that name a failure: "oom …", "model …" or "bug …"."""

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        self.wait_gate(request)
        word = request.text.split()[0].lower()
        if word == "oom":
            on_stage("text_normalize", 0.1)
            raise SynthesisError("GPU_OOM", "CUDA out of memory (simulated)",
                                 stage="llm_inference")
        if word == "model":
            raise SynthesisError("MODEL_ERROR", "decoder produced NaN", stage="audio_render")
        if word == "bug":
            raise ZeroDivisionError("backend bug")
        yield from EspeakBackend.synthesize(self, request, on_stage)


class PausingBackend(EspeakBackend):
    """Real espeak chunks (one per sentence) that stop after the first until ``resume``."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        for index, chunk in enumerate(super().synthesize(request, on_stage)):
            if index == 1 and request.request_id != "warmup":
                self.resume.wait(10)
            yield chunk


class HangingBackend(EspeakBackend):
    """Texts starting with "hang" block inside the model, holding their instance, until
    ``unhang`` is set; ``rebuild`` (a replacement instance) waits for ``rebuild_gate``."""

    def __init__(self, instances: int = 1) -> None:
        super().__init__(instances=instances)
        self.unhang = threading.Event()
        self.rebuild_gate = threading.Event()
        self.rebuild_gate.set()
        self.rebuilds = 0

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        hang = request.text.lower().startswith("hang")
        for chunk in super().synthesize(request, on_stage):
            if hang:
                self.unhang.wait(30)
            yield chunk

    def rebuild(self) -> None:
        self.rebuild_gate.wait(30)
        super().rebuild()
        self.rebuilds += 1

    def release_all(self) -> None:
        self.unhang.set()
        self.rebuild_gate.set()


class SilentBackend(EspeakBackend):
    """A model that "succeeds" with digital silence (a broken decoder)."""

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        for chunk in super().synthesize(request, on_stage):
            yield np.zeros_like(chunk) if request.request_id != "warmup" else chunk


class BreakingBackend(EspeakBackend):
    """Speaks the first sentence, then fails as a model does mid-stream."""

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        for index, chunk in enumerate(super().synthesize(request, on_stage)):
            if index == 1 and request.request_id != "warmup":
                raise SynthesisError("MODEL_ERROR", "decoder produced NaN",
                                     stage="audio_render")
            yield chunk
