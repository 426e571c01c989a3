"""The ChatTTS backend on the real ChatTTS 0.2.5 code path, with a tiny random model.

Skipped only when ChatTTS is not installed; ``make test`` installs it and sets
``TTS_REQUIRE_CHATTTS=1``, so there a missing ChatTTS fails instead. Everything runs on
CPU in seconds: a tiny asset directory is built once per module (tests/app/chattts_tiny.py).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import threading
import types
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if os.environ.get("TTS_REQUIRE_CHATTTS") == "1":
    import ChatTTS  # noqa: F401
else:
    pytest.importorskip("ChatTTS")

from tests.app.chattts_tiny import build_tiny_assets, configure
from tts_app.backends.base import SynthesisParams, SynthesisRequest
from tts_app.backends.chattts import ChatTTSBackend, asset_digest
from tts_app.errors import SynthesisError

pytestmark = pytest.mark.chattts
MAX_TOKENS = 24        # audio tokens per request: keeps a synthesis well under a second


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_assets(tmp_path_factory.mktemp("chattts"))


def tiny_backend(model_dir: Path) -> ChatTTSBackend:
    return ChatTTSBackend(model_dir=str(model_dir), device="cpu", max_new_token=MAX_TOKENS,
                          config_hook=functools.partial(configure, directory=model_dir))


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> ChatTTSBackend:
    loaded = tiny_backend(model_dir)
    loaded.load()
    return loaded


def request(seed: int | None = None, text: str = "hello world.") -> SynthesisRequest:
    return SynthesisRequest("req-1", text, "default", "en", SynthesisParams(seed=seed))


def synthesize(backend: ChatTTSBackend, req: SynthesisRequest
               ) -> tuple[np.ndarray, list[str]]:
    stages: list[str] = []
    chunks = list(backend.synthesize(req, lambda stage, ms: stages.append(stage)))
    return np.concatenate(chunks), stages


def test_synthesizes_float32_audio_at_24khz_and_reports_stages(
        backend: ChatTTSBackend, model_dir: Path) -> None:
    audio, stages = synthesize(backend, request(seed=1))
    assert backend.sample_rate == 24000
    assert audio.dtype == np.float32
    assert audio.ndim == 1
    # Each audio token is 2 mel frames of 256 samples: at most MAX_TOKENS * 512 samples.
    assert 0.05 * 24000 < audio.size <= MAX_TOKENS * 512
    assert np.all(np.abs(audio) <= 1.0)
    assert np.any(audio != 0)
    assert stages == ["text_normalize", "llm_prompt_gen", "llm_inference", "audio_render"]
    assert backend.model_version == asset_digest(model_dir)
    assert backend.model_version.startswith("chattts-0.2.5/")


def test_seeds_are_deterministic_and_do_not_leak_between_requests(
        backend: ChatTTSBackend) -> None:
    import ChatTTS

    defaults = inspect.signature(ChatTTS.Chat.infer).parameters
    before = {name: dataclasses.asdict(defaults[name].default)
              for name in ("params_refine_text", "params_infer_code")}
    first, _ = synthesize(backend, request(seed=7))
    other, _ = synthesize(backend, request(seed=8))
    again, _ = synthesize(backend, request(seed=7))
    assert np.array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)
    after = {name: dataclasses.asdict(defaults[name].default) for name in before}
    assert after == before


def test_second_request_waits_while_one_runs(backend: ChatTTSBackend) -> None:
    running = backend.synthesize(request(seed=1), lambda stage, ms: None)
    assert isinstance(running, Generator)    # closable, as the engine closes it
    next(running)          # suspended inside the model lock, holding the only instance
    second_done = threading.Event()

    def second() -> None:
        synthesize(backend, request(seed=2))
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    try:
        assert not second_done.wait(0.5)
    finally:
        running.close()    # ends the first request: releases the instance
    thread.join(30)
    assert second_done.is_set()


def test_retired_instance_is_unloaded_and_a_rebuilt_one_serves(
        model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ChatTTS

    backend = tiny_backend(model_dir)
    backend.load()
    unloaded: list[object] = []
    monkeypatch.setattr(ChatTTS.Chat, "unload", lambda chat: unloaded.append(chat))
    stuck = request(seed=1)
    running = backend.synthesize(stuck, lambda stage, ms: None)
    assert isinstance(running, Generator)
    next(running)                  # holds the only instance, as a hung call does
    assert backend.retire(stuck)
    backend.rebuild()
    audio, _ = synthesize(backend, request(seed=2))    # the replacement serves meanwhile
    assert audio.size > 0
    assert unloaded == []
    running.close()                # the hung call returns: its instance is unloaded
    assert len(unloaded) == 1
    backend.close()                # only the replacement was left in service
    assert len(unloaded) == 2


# Every way torch reports an exhausted accelerator: its OutOfMemoryError types, and the plain
# RuntimeErrors of the CUDA runtime, cuBLAS (matmuls: Linear) and cuDNN (convolutions: Conv1d).
OOM_FORMS: list[tuple[str, str, Any]] = [
    ("cuda_oom_type", "Linear", lambda torch: torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB")),
    ("torch_oom_type", "Linear", lambda torch: torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 MiB")),
    ("cuda_runtime", "Linear", lambda torch: RuntimeError(
        "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")),
    ("cublas", "Linear", lambda torch: RuntimeError(
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")),
    ("cudnn_not_allocated", "Conv1d", lambda torch: RuntimeError(
        "cuDNN error: CUDNN_STATUS_NOT_ALLOCATED")),
    ("cudnn_alloc_failed", "Conv1d", lambda torch: RuntimeError(
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED")),
]


def fail_layer(monkeypatch: pytest.MonkeyPatch, layer: str, error: BaseException) -> None:
    """Make every ``torch.nn.<layer>`` of the loaded model raise ``error`` when it runs."""
    import torch

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(getattr(torch.nn, layer), "forward", broken)


@pytest.mark.parametrize(("raised", "code"), [("oom", "GPU_OOM"), ("runtime", "MODEL_ERROR")])
def test_model_faults_become_synthesis_errors(backend: ChatTTSBackend, raised: str,
                                              code: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    import torch

    fail_layer(monkeypatch, "Linear",
               torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
               if raised == "oom" else RuntimeError("shape mismatch"))
    with pytest.raises(SynthesisError) as failure:
        synthesize(backend, request(seed=1))
    assert failure.value.code == code
    assert failure.value.stage == "llm_inference"


@pytest.mark.slow
async def test_every_cuda_oom_form_is_503_gpu_oom_frees_the_cache_and_is_counted(
        start_app: Any, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    backend = tiny_backend(model_dir)
    app = await start_app(backend=backend)
    freed: list[int] = []
    # Loaded on this CPU-only host: pretend it is CUDA device 0, to see the cache being freed
    # and the OOM counted on its device (what /status reports per device).
    monkeypatch.setattr(backend, "_device", types.SimpleNamespace(type="cuda", index=0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(1))
    for count, (name, layer, make) in enumerate(OOM_FORMS, start=1):
        with monkeypatch.context() as patch:
            fail_layer(patch, layer, make(torch))
            response = await app.client.post("/v1/tts", json={"text": f"form {name}."})
            body = await response.json()
        assert (response.status, body["error"]["code"]) == (503, "GPU_OOM"), (name, body)
        assert "Retry-After" in response.headers
        assert len(freed) == count, name
        assert backend.gpu_oom_total == {0: count}, name
    other = {"text": "not memory."}
    with monkeypatch.context() as patch:
        fail_layer(patch, "Linear", RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        response = await app.client.post("/v1/tts", json=other)
    assert (await response.json())["error"]["code"] == "MODEL_ERROR"
    assert len(freed) == len(OOM_FORMS)
    assert backend.gpu_oom_total == {0: len(OOM_FORMS)}
    assert (await app.client.post("/v1/tts", json=other)).status == 200   # instance still serves
    codes = [r["error_code"] for r in app.records("synthesis_complete")]
    assert codes == ["GPU_OOM"] * len(OOM_FORMS) + ["MODEL_ERROR", "none"]


@pytest.mark.slow
async def test_app_serves_chattts_wav_over_http(start_app: Any, model_dir: Path) -> None:
    app = await start_app(backend=tiny_backend(model_dir))
    response = await app.client.post("/v1/tts", json={"text": "hello there.",
                                                       "format": "wav"})
    body = await response.read()
    assert response.status == 200, body[:200]
    assert body[:4] == b"RIFF"
    assert body[8:12] == b"WAVE"
    assert int.from_bytes(body[24:28], "little") == 24000
    status = await (await app.client.get("/status")).json()
    assert status["backend"] == "chattts"
    assert status["model_version"] == asset_digest(model_dir)
