"""What the app's ``/status`` says about the GPUs it holds (``gpu_devices``), which the
sidecar follows under ``gpu.devices: auto`` and exports as ``tts_app_gpu_*``."""

from __future__ import annotations

import types
from typing import Any

import pytest

from tests.app.conftest import StartApp
from tts_app.backends.base import GpuDevice, gpu_status
from tts_app.backends.chattts import ChatTTSBackend

GIB = 1 << 30


class FakeCuda:
    """The slice of ``torch.cuda`` the report reads."""

    def __init__(self, uuid: object = "8f3a1b2c-0000-1111-2222-333344445555") -> None:
        self.uuid = uuid
        self.fail = False

    def current_device(self) -> int:
        return 1

    def get_device_properties(self, index: int) -> Any:
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return types.SimpleNamespace(name="Fake H100", uuid=self.uuid) if self.uuid \
            else types.SimpleNamespace(name="Fake H100")

    def memory_allocated(self, index: int) -> int:
        return 2 * GIB

    def memory_reserved(self, index: int) -> int:
        return 3 * GIB


def loaded_on(device_type: str, index: int | None, cuda: FakeCuda) -> ChatTTSBackend:
    """A ChatTTS backend as ``load()`` leaves it, with a fake torch (no GPU here)."""
    backend = ChatTTSBackend(model_dir="unused")
    backend._torch = types.SimpleNamespace(cuda=cuda)
    backend._device = types.SimpleNamespace(type=device_type, index=index)
    return backend


async def test_espeak_status_says_it_holds_no_gpu(start_app: StartApp) -> None:
    app = await start_app()
    status = await (await app.client.get("/status")).json()
    assert status["gpu_devices"] == []
    assert status["ready"] is True


def test_chattts_on_cuda_reports_the_nvml_uuid_and_torch_memory() -> None:
    backend = loaded_on("cuda", None, FakeCuda())  # "cuda": the current device, 1 here
    backend.gpu_oom_total[1] += 2
    assert gpu_status(backend) == {"gpu_devices": [{
        "index": 1, "uuid": "GPU-8f3a1b2c-0000-1111-2222-333344445555",
        "memory_allocated_bytes": 2 * GIB, "memory_reserved_bytes": 3 * GIB,
        "gpu_oom_total": 2}]}


def test_a_mig_instance_gets_nvmls_mig_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-4d1e9c2a-aaaa-bbbb-cccc-ddddeeeeffff")
    (device,) = loaded_on("cuda", 0, FakeCuda("4d1e9c2a-aaaa-bbbb-cccc-ddddeeeeffff")) \
        .gpu_devices() or []
    assert device == GpuDevice(0, "MIG-4d1e9c2a-aaaa-bbbb-cccc-ddddeeeeffff", 2 * GIB, 3 * GIB)


def test_chattts_on_cpu_holds_no_gpu_and_before_load_says_nothing() -> None:
    assert gpu_status(loaded_on("cpu", None, FakeCuda())) == {"gpu_devices": []}
    assert gpu_status(ChatTTSBackend(model_dir="unused")) == {}


@pytest.mark.parametrize("problem", ["cuda fault", "no uuid"])
def test_when_cuda_cannot_tell_the_field_is_left_out_not_emptied(problem: str) -> None:
    """An empty list would tell the sidecar "no GPU here" and stop the gate watching VRAM."""
    cuda = FakeCuda(uuid=None if problem == "no uuid" else "8f3a")
    cuda.fail = problem == "cuda fault"
    backend = loaded_on("cuda", 0, cuda)
    assert gpu_status(backend) == {}
    assert gpu_status(backend) == {}


def test_a_cuda_fault_on_status_is_logged_once_per_episode(
        caplog: pytest.LogCaptureFixture) -> None:
    cuda = FakeCuda()
    backend = loaded_on("cuda", 0, cuda)
    cuda.fail = True
    for _ in range(3):
        gpu_status(backend)
    cuda.fail = False
    assert gpu_status(backend)["gpu_devices"][0]["uuid"].startswith("GPU-")
    cuda.fail = True
    gpu_status(backend)
    faults = [r for r in caplog.records if "cannot read the CUDA device" in r.getMessage()]
    assert len(faults) == 2


def test_a_cuda_oom_counts_on_its_device_for_status() -> None:
    pytest.importorskip("ChatTTS")
    import torch

    from tts_app.backends.base import SynthesisParams, SynthesisRequest
    from tts_app.backends.chattts import _Instance
    from tts_app.errors import SynthesisError

    class OomChat:
        def infer(self, *args: Any, **kwargs: Any) -> Any:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    backend = ChatTTSBackend(model_dir="unused")
    backend._torch = torch
    backend._device = types.SimpleNamespace(type="cuda", index=0)
    instance = _Instance(OomChat())
    instance.speakers[7] = "speaker"
    backend._pool.put(instance)
    request = SynthesisRequest("r", "hello.", "default", "en", SynthesisParams(seed=7))
    with pytest.raises(SynthesisError, match="CUDA out of memory"):
        list(backend.synthesize(request, lambda stage, ms: None))
    assert backend.gpu_oom_total == {0: 1}
