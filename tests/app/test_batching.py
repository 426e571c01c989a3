"""Dynamic batching (tts_app.batching): grouping, per-request audio/logs, error isolation.

Most tests drive a real app over real HTTP with a small numpy batch backend whose audio is a
pure function of the text, so "each request got its own audio" is an exact comparison. The
``chattts`` tests run the real ChatTTS code path on the tiny model (tests/app/chattts_tiny.py).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import zlib
from collections.abc import Generator, Iterator
from typing import Any

import numpy as np
import pytest

from tests.app.conftest import Running, StartApp
from tests.app.test_http_tts import decode_wav
from tts_app.backends.base import StageCallback, SynthesisParams, SynthesisRequest
from tts_app.backends.espeak import EspeakBackend
from tts_app.batching import BatchingBackend, with_batching
from tts_app.config import BatchConfig, ConfigError, config_from_mapping
from tts_app.errors import SynthesisError

RATE = 16000


def tone(text: str) -> np.ndarray:
    """The audio of ``text``: its length and pitch depend on the text only."""
    pitch = 200 + zlib.crc32(text.encode()) % 400
    t = np.arange(RATE // 10 + 200 * len(text)) / RATE
    return (0.5 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


class ToneBatchBackend:
    """A batch backend: "bad …" fails any call it is in; "huge …" fails in a batch > 1 (OOM)."""

    name = "tone"
    model_version = "tone-1"
    sample_rate = RATE
    voices = frozenset({"default"})

    def __init__(self, instances: int = 1) -> None:
        self.instances = instances
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def load(self) -> None:
        pass

    def close(self) -> None:
        pass

    def retire(self, request: SynthesisRequest) -> bool:
        return False        # one lock, no instances to take out of service

    def rebuild(self) -> None:
        pass

    def batch_key(self, request: SynthesisRequest) -> Any:
        params = request.params
        return None if params.seed is not None else (request.lang, params.temperature)

    def synthesize(self, request: SynthesisRequest, on_stage: StageCallback
                   ) -> Iterator[np.ndarray]:
        for _, chunk in self.synthesize_batch([request], on_stage):
            yield chunk

    def synthesize_batch(self, requests: list[SynthesisRequest], on_stage: StageCallback
                         ) -> Iterator[tuple[int, np.ndarray]]:
        texts = [r.text for r in requests]
        with self.lock:
            self.calls.append(texts)
        on_stage("llm_inference", 5.0)
        if any(t.startswith("bad") for t in texts):
            raise SynthesisError("MODEL_ERROR", "token out of range", stage="llm_inference")
        if len(texts) > 1 and any(t.startswith("huge") for t in texts):
            raise SynthesisError("GPU_OOM", "CUDA out of memory (simulated)",
                                 stage="llm_inference")
        for index, text in enumerate(texts):   # two chunks each: a stream has a middle
            audio = tone(text)
            yield index, audio[: audio.size // 2]
            yield index, audio[audio.size // 2:]


def batcher(max_size: int = 4, max_wait_s: float = 1.0) -> tuple[BatchingBackend,
                                                                   ToneBatchBackend]:
    inner = ToneBatchBackend()
    return BatchingBackend(inner, max_size, max_wait_s), inner


def req(text: str, seed: int | None = None, temperature: float = 0.3) -> SynthesisRequest:
    return SynthesisRequest(f"r-{text}", text, "default", "en",
                            SynthesisParams(seed=seed, temperature=temperature))


async def post_all(app: Running, bodies: list[dict[str, Any]]) -> list[tuple[int, bytes]]:
    async def one(body: dict[str, Any]) -> tuple[int, bytes]:
        response = await app.client.post("/v1/tts", json={"lang": "en", **body})
        return response.status, await response.read()

    return list(await asyncio.gather(*(one(b) for b in bodies)))


def completes(app: Running) -> dict[int, dict[str, Any]]:
    """synthesis_complete of each model run, by text length (the texts here differ in it)."""
    return {r["text_len"]: r for r in app.records("synthesis_complete") if not r["cache_hit"]}


def pcm_of(text: str) -> np.ndarray:
    return np.clip(tone(text), -1, 1)


async def test_concurrent_misses_share_one_model_call_and_each_gets_its_own_audio(
        start_app: StartApp) -> None:
    backend, inner = batcher(max_size=4)
    app = await start_app(backend=backend)
    texts = ["one.", "number two.", "the third one.", "and this is four."]
    results = await post_all(app, [{"text": t} for t in texts])
    assert [status for status, _ in results] == [200] * 4
    assert [sorted(call) for call in inner.calls[1:]] == [sorted(texts)]   # 0: the warm-up
    for text, (_, body) in zip(texts, results, strict=True):
        _, samples = decode_wav(body)
        assert samples.size == pcm_of(text).size
        assert np.allclose(samples, pcm_of(text), atol=1 / 16384)
    records = completes(app)
    assert {records[len(t)]["batch_size"] for t in texts} == {4}
    assert len({records[len(t)]["request_id"] for t in texts}) == 4
    waits = [r for r in app.records("stage_time") if r["stage"] == "batch_wait"]
    inference = [r for r in app.records("stage_time") if r["stage"] == "llm_inference"]
    assert len({r["request_id"] for r in waits}) == 4
    assert len(inference) == 4


async def test_requests_with_other_params_or_an_explicit_seed_never_share_a_call(
        start_app: StartApp) -> None:
    backend, inner = batcher(max_size=8, max_wait_s=0.3)
    app = await start_app(backend=backend)
    bodies: list[dict[str, Any]] = [
        {"text": "plain one."}, {"text": "plain two, longer."},
        {"text": "warmer sampling.", "params": {"temperature": 0.9}},
        {"text": "seeded text here, alone.", "params": {"seed": 42}}]
    results = await post_all(app, bodies)
    assert [status for status, _ in results] == [200] * 4
    calls = sorted(map(sorted, inner.calls[1:]))
    assert calls == sorted([["plain one.", "plain two, longer."], ["warmer sampling."],
                            ["seeded text here, alone."]])
    sizes = {length: r["batch_size"] for length, r in completes(app).items()}
    assert sizes == {len("plain one."): 2, len("plain two, longer."): 2,
                     len("warmer sampling."): 1, len("seeded text here, alone."): 1}


async def test_one_bad_text_in_a_batch_fails_only_its_own_request(start_app: StartApp) -> None:
    backend, inner = batcher(max_size=3)
    app = await start_app(backend=backend)
    texts = ["good one.", "bad text that breaks the model", "good two, longer."]
    results = await post_all(app, [{"text": t} for t in texts])
    assert [status for status, _ in results] == [200, 503, 200]
    for text, (_, body) in zip(texts[::2], results[::2], strict=True):
        assert np.allclose(decode_wav(body)[1], pcm_of(text), atol=1 / 16384)
    assert b"MODEL_ERROR" in results[1][1]
    # the failed batch of three, then each member alone
    assert sorted(map(len, inner.calls[1:])) == [1, 1, 1, 3]
    records = completes(app)
    bad = records[len(texts[1])]
    assert (bad["status"], bad["error_code"], bad["batch_size"]) == ("failed", "MODEL_ERROR", 1)
    assert [records[len(t)]["status"] for t in texts[::2]] == ["success"] * 2
    # the failed attempt's stages are not reported on top of each request's own run
    inference = [r["request_id"] for r in app.records("stage_time")
                 if r["stage"] == "llm_inference" and r["request_id"] != "warmup"]
    assert sorted(inference) == sorted(records[len(t)]["request_id"] for t in texts)


async def test_a_batch_out_of_gpu_memory_runs_its_requests_alone(start_app: StartApp) -> None:
    backend, inner = batcher(max_size=2)
    app = await start_app(backend=backend)
    results = await post_all(app, [{"text": "huge text."}, {"text": "small text here."}])
    assert [status for status, _ in results] == [200, 200]
    assert sorted(map(len, inner.calls[1:])) == [1, 1, 2]
    assert {r["batch_size"] for r in completes(app).values()} == {1}


async def test_a_lone_request_waits_at_most_max_wait(start_app: StartApp) -> None:
    backend, inner = batcher(max_size=8, max_wait_s=0.3)
    app = await start_app(backend=backend)
    (status, _), = await post_all(app, [{"text": "all alone."}])
    assert status == 200
    assert inner.calls[1:] == [["all alone."]]
    wait, = [r for r in app.records("stage_time") if r["stage"] == "batch_wait"]
    assert 250 <= wait["duration_ms"] < 5000
    assert completes(app)[len("all alone.")]["batch_size"] == 1


def test_followers_get_their_audio_when_the_leader_stops_reading() -> None:
    backend, _ = batcher(max_size=2)
    leader = backend.synthesize(req("leader."), lambda s, d: None)
    assert isinstance(leader, Generator)    # closable, as the engine closes it
    first: list[np.ndarray] = []
    started = threading.Thread(target=lambda: first.append(next(leader)))
    started.start()                         # the leader opens the batch and waits
    follower: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: follower.extend(
        backend.synthesize(req("the follower."), lambda s, d: None)))
    thread.start()
    started.join(10)
    leader.close()                          # the leader's client went away mid-audio
    thread.join(10)
    assert first
    assert np.array_equal(first[0], tone("leader.")[: tone("leader.").size // 2])
    assert np.array_equal(np.concatenate(follower), tone("the follower."))


def test_a_group_keeps_filling_while_the_model_is_busy() -> None:
    backend, inner = batcher(max_size=8, max_wait_s=0.01)
    entered, release = threading.Event(), threading.Event()
    original = inner.synthesize_batch

    def held(requests: list[SynthesisRequest], on_stage: StageCallback) -> Any:
        if requests[0].text == "first.":
            entered.set()
            release.wait(10)
        return original(requests, on_stage)

    inner.synthesize_batch = held        # type: ignore[method-assign]
    threads = [threading.Thread(target=lambda t=text: list(backend.synthesize(
        req(t), lambda s, d: None))) for text in ("first.", "a.", "bb.", "ccc.")]
    threads[0].start()
    assert entered.wait(10)            # "first." holds the only model instance
    for thread in threads[1:]:         # arrive well apart, each past the last one's max_wait
        thread.start()
        threading.Event().wait(0.05)
    release.set()
    for thread in threads:
        thread.join(10)
    assert [sorted(call) for call in inner.calls] == [["first."], ["a.", "bb.", "ccc."]]


def test_batching_wraps_only_backends_that_batch_and_only_when_enabled() -> None:
    espeak = EspeakBackend()
    assert with_batching(espeak, BatchConfig(max_size=8)) is espeak
    tones = ToneBatchBackend(instances=2)
    assert with_batching(tones, BatchConfig(max_size=1)) is tones
    # wrapped: 8 requests share each of the 2 instances, so 16 may run at once
    assert with_batching(tones, BatchConfig(max_size=8)).instances == 16


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("max_size", 0, "expected a value >= 1"), ("max_size", 1000, "expected a value <= 64"),
    ("max_size", "big", "expected an integer"), ("max_wait_ms", -1, "expected a value >= 0")])
def test_bad_batch_config_names_the_key(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"batch": {key: value}}, "app.yaml")
    assert caught.value.key == f"batch.{key}"
    assert expected in caught.value.problem


# --- the real ChatTTS code path on the tiny model
chattts = pytest.mark.chattts
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_chattts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    if os.environ.get("TTS_REQUIRE_CHATTTS") != "1":
        pytest.importorskip("ChatTTS")
    from tests.app.chattts_tiny import build_tiny_assets, configure
    from tts_app.backends.chattts import ChatTTSBackend

    model_dir = build_tiny_assets(tmp_path_factory.mktemp("chattts"))
    backend = ChatTTSBackend(model_dir=str(model_dir), device="cpu", max_new_token=MAX_TOKENS,
                             config_hook=functools.partial(configure, directory=model_dir))
    backend.load()
    return backend


def run_concurrently(backend: BatchingBackend, requests: list[SynthesisRequest]
                     ) -> list[np.ndarray | SynthesisError]:
    results: list[np.ndarray | SynthesisError] = [np.zeros(0)] * len(requests)

    def one(index: int) -> None:
        try:
            chunks = list(backend.synthesize(requests[index], lambda s, d: None))
            results[index] = np.concatenate(chunks)
        except SynthesisError as exc:
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


@chattts
def test_chattts_batch_runs_one_infer_and_gives_each_text_its_own_audio(
        tiny_chattts: Any) -> None:
    backend = BatchingBackend(tiny_chattts, max_size=3, max_wait_s=5.0)
    calls: list[int] = []
    original = tiny_chattts.synthesize_batch

    def counting(requests: list[SynthesisRequest], on_stage: StageCallback) -> Any:
        calls.append(len(requests))
        return original(requests, on_stage)

    tiny_chattts.synthesize_batch = counting
    try:
        requests = [req("hello world."), req("a second, longer text."), req("third.")]
        results = run_concurrently(backend, requests)
    finally:
        del tiny_chattts.synthesize_batch
    assert calls == [3]
    arrays = [r for r in results if isinstance(r, np.ndarray)]
    assert len(arrays) == 3
    assert all(a.size > 0.05 * 24000 for a in arrays)
    assert all(backend.batch_size_of(r) == 3 for r in requests)
    assert not np.array_equal(arrays[0][:2000], arrays[1][:2000])


@chattts
def test_chattts_seeded_request_is_identical_alone_and_under_batching(
        tiny_chattts: Any) -> None:
    backend = BatchingBackend(tiny_chattts, max_size=4, max_wait_s=0.5)
    seeded = req("seeded text.", seed=7)
    alone = np.concatenate(list(tiny_chattts.synthesize(seeded, lambda s, d: None)))
    # Same-seed and unseeded neighbours: either could share its call if seeds were batched.
    results = run_concurrently(backend, [req("first.", seed=7), seeded,
                                         req("second one.", seed=7), req("third one here.")])
    assert isinstance(results[1], np.ndarray)
    assert np.array_equal(results[1], alone)
    assert backend.batch_size_of(seeded) == 1


@chattts
def test_chattts_batch_rows_do_not_reproduce_their_solo_audio(tiny_chattts: Any) -> None:
    """Why seeded requests run alone: ChatTTS 0.2.5 samples a batch from one generator
    reseeded per step, so a text's tokens depend on its row and neighbours. If this starts
    failing, ChatTTS made batches reproducible and seeded requests could be batched too."""
    def audio(requests: list[SynthesisRequest]) -> list[np.ndarray]:
        chunks: dict[int, list[np.ndarray]] = {}
        for index, chunk in tiny_chattts.synthesize_batch(requests, lambda s, d: None):
            chunks.setdefault(index, []).append(chunk)
        return [np.concatenate(chunks[i]) for i in range(len(requests))]

    texts = [req("first text.", seed=7), req("the second text.", seed=7)]
    alone = [audio([r])[0] for r in texts]
    batched = audio(texts)
    assert not np.array_equal(alone[1], batched[1])


@chattts
def test_chattts_batch_out_of_gpu_memory_runs_each_text_alone(
        tiny_chattts: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    chat = tiny_chattts._pool._idle.queue[0].chat
    original = chat.infer
    sizes: list[int] = []

    def infer(texts: Any, **kwargs: Any) -> Any:
        sizes.append(len(texts))
        if len(texts) > 1:      # what CUDA raises when a batch's activations do not fit
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return original(texts, **kwargs)

    monkeypatch.setattr(chat, "infer", infer)
    backend = BatchingBackend(tiny_chattts, max_size=3, max_wait_s=5.0)
    requests = [req("short."), req("a longer text, here."), req("another short one.")]
    results = run_concurrently(backend, requests)
    assert sorted(sizes) == [1, 1, 1, 3]
    assert all(isinstance(r, np.ndarray) and r.size for r in results)
    assert [backend.batch_size_of(r) for r in requests] == [1, 1, 1]
