"""DiskCache: keys, LRU eviction by size, restart rescan, atomic writes, bodies not saved."""

from __future__ import annotations

from pathlib import Path

from tts_app.backends.base import SynthesisParams
from tts_app.cache import DiskCache, cache_key


def key(text: str, **changes: object) -> str:
    fields = {"backend": "espeak", "model_version": "v1", "voice": "default", "lang": "en",
              "params": SynthesisParams(), "fmt": "wav", **changes}
    return cache_key(fields["backend"], fields["model_version"], fields["voice"],  # type: ignore[arg-type]
                     fields["lang"], text, fields["params"], fields["fmt"])  # type: ignore[arg-type]


def test_key_changes_with_everything_that_changes_audio() -> None:
    base = key("hello")
    assert key("hello") == base
    variants = [key("hello!"), key("hello", backend="chattts"), key("hello", model_version="v2"),
                key("hello", voice="cmn"), key("hello", lang="zh"), key("hello", fmt="pcm"),
                key("hello", params=SynthesisParams(seed=3)),
                key("hello", params=SynthesisParams(speed=1.5))]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_put_get_roundtrip_without_leftover_temp_files(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000, memory_max_bytes=0)
    assert cache.get(key("a")) is None
    assert cache.put(key("a"), b"A" * 100) is None
    assert cache.get(key("a")) == b"A" * 100
    files = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [key("a") + ".audio"]


def test_lru_eviction_keeps_total_under_cap(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=300, memory_max_bytes=0)
    for name in "abc":
        cache.put(key(name), name.encode() * 100)
    assert cache.get(key("a")) is not None          # a is now most recently used
    cache.put(key("d"), b"d" * 100)
    assert cache.get(key("b")) is None              # b was least recently used
    assert all(cache.get(key(n)) for n in "acd")
    assert cache.total_bytes == 300
    assert cache.evictions == 1
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.audio"))
    assert on_disk == 300


def test_restart_rescans_and_enforces_a_smaller_cap(tmp_path: Path) -> None:
    first = DiskCache(tmp_path, max_bytes=1000, memory_max_bytes=0)
    for name in "abcd":
        first.put(key(name), b"x" * 100)
    second = DiskCache(tmp_path, max_bytes=250, memory_max_bytes=0)
    assert len(second) == 2
    assert second.total_bytes == 200
    assert sum(1 for _ in tmp_path.rglob("*.audio")) == 2


def test_memory_layer_serves_without_disk(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=10_000, memory_max_bytes=4_000)
    cache.put(key("hot"), b"h" * 500)
    for path in tmp_path.rglob("*.audio"):
        path.unlink()
    assert cache.get(key("hot")) == b"h" * 500


def test_write_failure_is_returned_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the cache directory should be")
    cache = DiskCache(blocker / "cache", max_bytes=10_000, memory_max_bytes=0)
    problem = cache.put(key("a"), b"data")
    assert problem is not None
    assert problem.reason == "write_failed"
    assert isinstance(problem.error, OSError)
    assert cache.get(key("a")) is None
    assert cache.total_bytes == 0


def test_body_larger_than_the_cache_is_reported_not_saved(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=100, memory_max_bytes=0)
    problem = cache.put(key("big"), b"b" * 101)
    assert problem is not None
    assert (problem.reason, problem.error) == ("too_large", None)
    assert list(tmp_path.rglob("*.audio")) == []
    assert cache.total_bytes == 0
