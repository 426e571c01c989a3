"""The backend protocol every synthesis engine implements.

The HTTP app only ever talks to this protocol: admission sizes its worker pool from
``instances``, the cache keys on ``name``/``model_version``, validation uses ``voices``.

Conventions beyond the protocol (see ``tts_app.backends.make_backend``): a backend is built
as ``BackendClass(**options)`` with the mapping under ``backend.<name>`` in the app config
(an unknown option is a TypeError, reported as a config error), and ``load()`` is called
later. A backend may declare ``languages: frozenset[str]``; without it the app accepts
``limits.languages``. ``model_version`` may change during ``load()``; it is read afterwards.
A backend that runs on CUDA implements :class:`GpuReporting`; one that does not holds no GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class SynthesisParams:
    """Sampling parameters; fresh per request and part of the cache key."""

    seed: int | None = None
    temperature: float = 0.3
    top_p: float = 0.7
    top_k: int = 20
    speed: float = 1.0


@dataclass(frozen=True)
class SynthesisRequest:
    request_id: str
    text: str                   # validated already
    voice: str
    lang: str                   # "en" | "zh" | ...
    params: SynthesisParams


StageCallback = Callable[[str, float], None]    # (stage name, duration_ms)


@runtime_checkable
class Backend(Protocol):
    name: str                   # "espeak" | "chattts"
    model_version: str          # part of the cache key; shown on /status
    sample_rate: int            # Hz of produced audio
    voices: frozenset[str]      # accepted voice names (unknown voice -> 422 VOICE_UNKNOWN)
    instances: int              # model instances = concurrent syntheses (worker pool size)

    def load(self) -> None:
        """Blocking; run in a thread before warm-up."""
        ...

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        """Blocking generator run in a worker thread; yields float32 mono chunks in [-1, 1].

        Reports each stage it runs via ``on_stage`` (text_normalize, llm_prompt_gen,
        llm_inference, llm_postproc, audio_render, ...). Raises
        ``tts_app.errors.SynthesisError(code, message, stage=...)`` on failure; on CUDA OOM
        the chattts backend calls ``torch.cuda.empty_cache()`` and raises GPU_OOM (HTTP 503).
        """
        ...

    def retire(self, request: SynthesisRequest) -> bool:
        """Take the instance serving ``request`` out of service (its synthesis timed out
        and its thread cannot be stopped); it is unloaded when that call returns. Quick."""
        ...

    def rebuild(self) -> None:
        """Blocking: load one more instance into service (replaces a retired one)."""
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True)
class GpuDevice:
    """One CUDA device a backend holds, as ``/status`` reports it under ``gpu_devices``.

    ``uuid`` is NVML's form (``GPU-…``, ``MIG-…``) so the sidecar can follow exactly this GPU
    (``gpu.devices: auto``); the memory fields are PyTorch's view (what its tensors occupy and
    what its caching allocator holds), so a leak can be told from the cache.
    """

    index: int
    uuid: str
    memory_allocated_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    gpu_oom_total: int = 0


@runtime_checkable
class GpuReporting(Protocol):
    def gpu_devices(self) -> list[GpuDevice] | None:
        """The CUDA devices in use (empty: none, e.g. loaded on CPU), or None when they
        cannot be told right now (the sidecar then keeps what it followed)."""
        ...


def gpu_status(backend: Backend) -> dict[str, Any]:
    """The ``gpu_devices`` part of ``/status``: what the backend reports, an empty list for a
    backend that never holds a GPU, nothing when it cannot tell."""
    devices = backend.gpu_devices() if isinstance(backend, GpuReporting) else []
    return {} if devices is None else {"gpu_devices": [asdict(d) for d in devices]}


@runtime_checkable
class BatchBackend(Backend, Protocol):
    """A backend that can synthesize several compatible requests in one model call."""

    def batch_key(self, request: SynthesisRequest) -> Hashable | None:
        """Requests with equal keys may share a call; None: this one always runs alone."""
        ...

    def synthesize_batch(self, requests: list[SynthesisRequest], on_stage: StageCallback
                         ) -> Iterator[tuple[int, np.ndarray]]:
        """Like ``synthesize`` for all of ``requests`` (equal ``batch_key``): yields
        (index into ``requests``, chunk); ``on_stage`` reports the call's stages once."""
        ...
