"""ChatTTS (``ChatTTS==0.2.5``) behind the backend protocol; torch is an optional extra.

torch and ChatTTS are imported inside ``load()`` only, so the app starts without them when
the espeak backend is configured. Assets come from a local directory that holds ``asset/``
(``Chat.load(source="custom")``) or from a Hugging Face cache dir holding
``models--2Noise--ChatTTS/snapshots/<rev>``: never ChatTTS's downloading modes, and never
``source="local"`` (it rewrites files and fetches tools at start-up).

ChatTTS mutates the parameter objects it is given and its ``infer`` defaults are shared
objects, so every request builds fresh ``RefineTextParams``/``InferCodeParams``. One Chat
object is not safe for concurrent use: ``instances`` copies are loaded into an
:class:`InstancePool` that lends each to one request at a time; the app's worker pool is
sized from ``instances``. Every CUDA out-of-memory form (torch's OutOfMemoryError types and
the RuntimeErrors of cuBLAS/cuDNN) is GPU_OOM: the cache is freed and ``gpu_oom_total``
counts it per device.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tts_app.backends.base import GpuDevice, StageCallback, SynthesisRequest
from tts_app.backends.pool import InstancePool
from tts_app.errors import SynthesisError

log = logging.getLogger("tts_app.chattts")

SAMPLE_RATE = 24000
DEFAULT_VOICES = {"default": 2222}     # voice name -> speaker seed
HF_SNAPSHOTS = "models--2Noise--ChatTTS/snapshots"
# How cuBLAS, cuDNN and the CUDA runtime word an allocation failure when it does not surface
# as torch's OutOfMemoryError type (they raise a plain RuntimeError).
_OOM_MESSAGE = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED"
                          r"|CUDNN_STATUS_NOT_ALLOCATED|CUDA_ERROR_OUT_OF_MEMORY"
                          r"|cudaErrorMemoryAllocation", re.IGNORECASE)


def is_cuda_oom(exc: BaseException, torch: Any) -> bool:
    """Every form in which torch reports that the accelerator ran out of memory."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    return isinstance(exc, oom_types) or (isinstance(exc, RuntimeError)
                                          and _OOM_MESSAGE.search(str(exc)) is not None)


def free_cuda_cache(torch: Any) -> None:
    """Return cached blocks to the driver after an OOM; a no-op without CUDA. A CUDA error
    can leave the context unusable, so this must not raise on top of the original fault."""
    if torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()


def resolve_model_dir(model_dir: str | Path) -> Path:
    """The directory that holds ``asset/``: ``model_dir`` itself or its newest HF snapshot."""
    root = Path(model_dir)
    if (root / "asset").is_dir():
        return root
    snapshots = sorted((root / HF_SNAPSHOTS).glob("*/asset"), key=lambda p: p.stat().st_mtime)
    if snapshots:
        return snapshots[-1].parent
    raise FileNotFoundError(f"{root}: no asset/ directory and no {HF_SNAPSHOTS}/*/asset")


def asset_digest(model_dir: Path) -> str:
    """A stable version string: sha256 over the asset files' relative names and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (model_dir / "asset").rglob("*") if p.is_file()):
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "chattts-0.2.5/" + digest.hexdigest()[:16]


class _Instance:
    """One loaded ``ChatTTS.Chat``; the pool lends it to one request at a time."""

    def __init__(self, chat: Any) -> None:
        self.chat = chat
        self.speakers: dict[int, str] = {}


class ChatTTSBackend:
    name = "chattts"
    sample_rate = SAMPLE_RATE

    def __init__(self, model_dir: str, device: str = "auto", instances: int = 1,
                 voices: Mapping[str, int] | None = None, refine_text: bool = False,
                 stream: bool = True, max_new_token: int = 2048,
                 config_hook: Any = None) -> None:
        """``config_hook(chat)`` may adjust a Chat before ``load`` (tests: tiny configs)."""
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self.model_dir = model_dir
        self.device = device
        self.instances = instances
        self._voices = dict(voices or DEFAULT_VOICES)
        self.voices = frozenset(self._voices)
        self.refine_text = refine_text
        self.stream = stream
        self.max_new_token = max_new_token
        self.config_hook = config_hook
        self.model_version = "chattts-0.2.5/unloaded"
        self._pool: InstancePool[_Instance] = InstancePool(lambda i: i.chat.unload())
        self._torch: Any = None
        self._directory: Path | None = None
        self._device: Any = None
        # CUDA out-of-memory errors by device index, reported on /status as gpu_oom_total.
        self.gpu_oom_total: Counter[int] = Counter()
        self._gpu_report_failing = False
        self._oom_lock = threading.Lock()    # worker threads count

    def load(self) -> None:
        import torch  # optional extra: only when this backend is configured

        self._torch = torch
        self._directory = resolve_model_dir(self.model_dir)
        self._device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                                    else "cpu" if self.device == "auto" else self.device)
        for _ in range(self.instances):
            self.rebuild()
        self.model_version = asset_digest(self._directory)

    def rebuild(self) -> None:
        """Load one Chat from the assets ``load`` resolved and put it into service."""
        import ChatTTS

        chat = ChatTTS.Chat()
        if self.config_hook is not None:
            self.config_hook(chat)
        if not chat.load(source="custom", custom_path=str(self._directory), device=self._device,
                         compile=False):
            raise RuntimeError(f"ChatTTS could not load the assets in {self._directory}")
        self._pool.put(_Instance(chat))

    def retire(self, request: SynthesisRequest) -> bool:
        return self._pool.retire(request)

    def _speaker(self, instance: _Instance, seed: int) -> str:
        """A deterministic speaker embedding for ``seed`` (global RNG left untouched)."""
        if seed not in instance.speakers:
            torch = self._torch
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                instance.speakers[seed] = instance.chat.sample_random_speaker()
        return instance.speakers[seed]

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        for _, chunk in self.synthesize_batch([request], on_stage):
            yield chunk

    def batch_key(self, request: SynthesisRequest) -> tuple[Any, ...] | None:
        """Requests with equal keys may share one ``infer`` call (tts_app.batching).

        ChatTTS takes one speaker, prompt, sampling setting and seed per call. A request with
        an explicit seed asks for reproducible audio, which a batch cannot give (its rows
        draw from one shared generator), so it is never batched (None).
        """
        params = request.params
        if params.seed is not None:
            return None
        return (self._voices[request.voice], request.lang, params.temperature, params.top_p,
                params.top_k, self._speed(params.speed))

    def synthesize_batch(self, requests: list[SynthesisRequest], on_stage: StageCallback
                         ) -> Iterator[tuple[int, np.ndarray]]:
        """One ``infer`` call for requests of equal ``batch_key``: (index, chunk) pairs.

        A batch of more than one runs unstreamed: ChatTTS streams a batch as one padded
        array per step, with no per-text end.
        """
        # A timed-out batch retires the instance its first request checked out.
        with self._pool.checkout(requests[0]) as instance:
            yield from self._run(instance, requests, on_stage)

    @staticmethod
    def _speed(speed: float) -> int:
        return min(9, max(0, round(5 * speed)))

    def _run(self, instance: _Instance, requests: list[SynthesisRequest],
             on_stage: StageCallback) -> Iterator[tuple[int, np.ndarray]]:
        import ChatTTS

        torch = self._torch
        request = requests[0]
        chat, params = instance.chat, request.params
        seed = params.seed if params.seed is not None else self._voices[request.voice]
        stream = self.stream and len(requests) == 1
        stage = "text_normalize"
        try:
            started = time.perf_counter()
            texts = [r.text for r in requests]
            if self.refine_text:
                texts = list(chat.infer(texts, refine_text_only=True, split_text=False,
                                        params_refine_text=ChatTTS.Chat.RefineTextParams(
                                            show_tqdm=False, manual_seed=seed)))
            on_stage("text_normalize", (time.perf_counter() - started) * 1000)
            stage = "llm_prompt_gen"
            started = time.perf_counter()
            code_params = ChatTTS.Chat.InferCodeParams(
                prompt=f"[speed_{self._speed(params.speed)}]",
                spk_emb=self._speaker(instance, seed),
                temperature=params.temperature, top_P=params.top_p, top_K=params.top_k,
                max_new_token=self.max_new_token, show_tqdm=False, manual_seed=seed)
            on_stage("llm_prompt_gen", (time.perf_counter() - started) * 1000)
            stage = "llm_inference"
            model_ms = render_ms = 0.0
            started = time.perf_counter()
            result = chat.infer(texts, stream=stream, lang=request.lang,
                                skip_refine_text=True, split_text=False,
                                do_text_normalization=False,
                                params_refine_text=ChatTTS.Chat.RefineTextParams(
                                    show_tqdm=False),
                                params_infer_code=code_params)
            for wavs in (result if stream else [result]):
                model_ms += (time.perf_counter() - started) * 1000
                render_started = time.perf_counter()
                chunks = [_to_chunk(wavs, index) for index in range(len(requests))]
                render_ms += (time.perf_counter() - render_started) * 1000
                for index, chunk in enumerate(chunks):
                    if chunk.size:
                        yield index, chunk
                started = time.perf_counter()
            model_ms += (time.perf_counter() - started) * 1000
            on_stage("llm_inference", model_ms)
            stage = "audio_render"
            on_stage("audio_render", render_ms)
        except SynthesisError:
            raise
        except Exception as exc:   # any model fault -> 503 (GPU_OOM or MODEL_ERROR), never 500
            if is_cuda_oom(exc, torch):
                free_cuda_cache(torch)
                self._count_oom()
                raise SynthesisError("GPU_OOM", f"CUDA out of memory: {exc}",
                                     stage=stage) from exc
            raise SynthesisError("MODEL_ERROR", f"{type(exc).__name__}: {exc}",
                                 stage=stage) from exc

    def _count_oom(self) -> None:
        if self._device.type == "cuda":  # an OOM raised on a CPU load has no device
            with self._oom_lock:
                self.gpu_oom_total[self._cuda_index()] += 1

    def close(self) -> None:
        self._pool.close()

    def _cuda_index(self) -> int:
        index = self._device.index
        return int(self._torch.cuda.current_device() if index is None else index)

    def gpu_devices(self) -> list[GpuDevice] | None:
        """The CUDA device the instances were loaded on, with PyTorch's memory figures; empty
        on CPU; None before ``load()`` or when CUDA cannot be asked (the sidecar then keeps
        following what it followed)."""
        if self._device is None:
            return None
        if self._device.type != "cuda":
            return []
        cuda = self._torch.cuda
        try:
            index = self._cuda_index()
            uuid = getattr(cuda.get_device_properties(index), "uuid", None)
            if uuid is None:  # a torch too old to report it
                return None
            devices = [GpuDevice(index, _nvml_uuid(index, str(uuid)),
                                 int(cuda.memory_allocated(index)),
                                 int(cuda.memory_reserved(index)), self.gpu_oom_total[index])]
        except Exception as exc:  # a CUDA fault must not turn /status into a 500
            if not self._gpu_report_failing:  # once per episode: /status is polled every second
                log.warning("cannot read the CUDA device for /status: %s: %s",
                            type(exc).__name__, exc)
            self._gpu_report_failing = True
            return None
        self._gpu_report_failing = False
        return devices


def _nvml_uuid(index: int, cuda_uuid: str) -> str:
    """torch gives the bare UUID; NVML and nvidia-smi prefix it with ``GPU-``, or ``MIG-`` for a
    MIG instance, which the process sees when CUDA_VISIBLE_DEVICES names one."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    mig = index < len(visible) and visible[index].startswith("MIG-")
    return ("MIG-" if mig else "GPU-") + cuda_uuid.removeprefix("GPU-").removeprefix("MIG-")


def _to_chunk(wavs: Any, index: int = 0) -> np.ndarray:
    """ChatTTS returns one array per text: text ``index``'s, float32 mono in [-1, 1]."""
    wav = wavs[index] if isinstance(wavs, (list, tuple)) or getattr(wavs, "ndim", 1) > 1 \
        else wavs
    if wav is None:
        return np.zeros(0, dtype=np.float32)
    return np.clip(np.asarray(wav, dtype=np.float32).reshape(-1), -1.0, 1.0)
