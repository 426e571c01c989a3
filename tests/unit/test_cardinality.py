"""Issue 14 finding 3: no log content can make /metrics larger than the bound its config sets.

Each test renders the real exposition (text and OpenMetrics, as /metrics serves them) and
measures its bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from exporter.config import LogsConfig, MetricsConfig
from exporter.logs.pipeline import LogPipeline
from exporter.metrics import OVERFLOW_LABEL_VALUE, SERIES_OVERFLOW_LABEL, SidecarMetrics
from exporter.server import build_registry
from tests.unit.test_checkpoint import Rig
from tests.unit.test_tailer import append

# Characters at their most expensive in the exposition: one byte each, escaped to two.
WORST = '"\\\n'
WIDE_ID = "\U0001d11e" * 64                 # the longest exemplar id, 4 bytes a character
MIB = 1 << 20


def pipeline(**limits: Any) -> tuple[LogPipeline, SidecarMetrics]:
    metrics = SidecarMetrics()
    return LogPipeline(metrics, LogsConfig(), MetricsConfig(**limits)), metrics


def line(level: str = "ERROR", **fields: Any) -> bytes:
    return json.dumps({"time": "2026-11-22T10:00:00Z", "level": level, **fields}).encode() \
        + b"\n"


def exposition_sizes(metrics: SidecarMetrics) -> tuple[int, int, int]:
    """(whole text exposition, whole OpenMetrics exposition, the log-labelled families' part
    of the larger of the two), in bytes."""
    registry = build_registry(metrics)
    text, om = generate_latest(registry), openmetrics(registry)
    names = tuple(f.name for f in metrics.log_labelled())
    part = max(sum(len(x) + 1 for x in body.split(b"\n") if x.lstrip(b"# HELPTYE").decode()
                   .startswith(names)) for body in (text, om))
    return len(text), len(om), part


def hostile_logs(p: LogPipeline, width: int = 50) -> None:
    """Every log-labelled family pushed past its bounds (width**3 method x route x status
    combinations) with values longer than the byte bound, made of the costliest characters,
    and observations in every bucket so that each bucket carries the longest exemplar."""
    costly = WORST * 70                          # 210 bytes
    levels = ("WARNING", "ERROR", "CRITICAL")
    for i in range(width):
        batch = [line(event="http_request", method=f"{i}{costly}", route=f"{j}{costly}",
                      status=f"{k}{costly}", duration_ms=2.0 ** (k % 18), request_id=WIDE_ID)
                 for j in range(width) for k in range(width)]
        batch.extend(line(levels[k % 3], event="synthesis_complete", status=f"{i}{costly}",
                          error_code=f"{k}{costly}", duration_ms=5, warning_code=f"{i}{costly}")
                     for k in range(width))
        batch.extend(line(event="stage_time", stage=f"{i}{costly}", duration_ms=2.0 ** k,
                          request_id=WIDE_ID) for k in range(16))
        p.process("a", b"".join(batch))


@pytest.mark.slow
def test_the_default_bound_is_within_two_mib_and_hostile_logs_stay_inside_it() -> None:
    p, m = pipeline()
    bound = m.log_derived_bound_bytes()
    assert bound <= 1.9 * MIB                    # leaves room for the fixed families
    hostile_logs(p)
    text, om, part = exposition_sizes(m)
    assert part <= bound
    assert max(text, om) <= 2 * MIB
    assert len(m.http_requests.values) == MetricsConfig().max_series_per_family + 1
    assert m.label_overflow.get(("tts_http_requests_total", SERIES_OVERFLOW_LABEL)) > 0
    # The bound is near what hostile input reaches: it limits, it is not a guess.
    assert part > 0.6 * bound


def test_a_tighter_config_gives_a_tighter_bound_that_holds_too() -> None:
    p, m = pipeline(label_value_cap=10, label_value_max_bytes=32, max_series_per_family=40)
    hostile_logs(p, width=15)
    assert exposition_sizes(m)[2] <= m.log_derived_bound_bytes() <= 0.2 * MIB


def test_long_label_values_are_cut_to_the_configured_bytes() -> None:
    """50 lines with 60 KB routes once made a 51 MB /metrics."""
    p, m = pipeline(label_value_max_bytes=40)
    p.process("a", b"".join(line(event="http_request", method="GET", status=200,
                                 route=f"/v1/{i:02d}" + "é" * 30_000) for i in range(50)))
    routes = {labels[1] for labels in m.http_requests.values}
    assert len(routes) == 50
    assert all(len(r.encode()) <= 40 and r.startswith("/v1/") for r in routes)
    assert max(exposition_sizes(m)[:2]) < 100_000


def test_each_family_and_label_has_its_own_cap() -> None:
    """Junk synthesis statuses once filled a shared `status` cap, folding HTTP codes into
    `other`."""
    p, m = pipeline(label_value_cap=5)
    p.process("a", b"".join(line(event="synthesis_complete", status=f"junk{i}")
                            for i in range(20)))
    p.process("a", line(event="http_request", method="GET", route="/v1/tts", status=200))
    assert m.http_requests.values == {("GET", "/v1/tts", "200", "none"): 1.0}
    assert m.syntheses.get((OVERFLOW_LABEL_VALUE, "unknown", "unknown")) == 15
    assert m.label_overflow.get(("tts_syntheses_total", "status")) == 15


def count_after_restarts(rig: Rig, restarts: int,
                         new_values: Callable[[int], bytes]) -> list[int]:
    """Stage series after each of ``restarts`` restarts, each bringing new stage names."""
    seen = []
    for run in range(restarts):
        component, metrics = rig.pipeline_component(MetricsConfig(label_value_cap=10))
        append(rig.log, [new_values(run).decode()])
        component.step()
        component.checkpoint()
        seen.append(len(metrics.stage_duration.series))
    return seen


def test_caps_are_restored_with_the_checkpoint(tmp_path: Path) -> None:
    """The caps once started empty at each restart while the checkpoint restored the old
    series: 51 → 101 → 251 stage series over 4 restarts."""
    rig = Rig(tmp_path)
    counts = count_after_restarts(rig, 4, lambda run: b"".join(
        line(event="stage_time", stage=f"s{run}-{i}", duration_ms=1) for i in range(10)))
    assert counts == [10, 11, 11, 11]


def test_a_checkpoint_beyond_todays_bounds_is_folded_into_them() -> None:
    before = SidecarMetrics()
    for i in range(40):
        before.stage_duration.observe((f"stage-{i}" + "x" * 500,), 0.5)
    state = json.loads(json.dumps(before.log_state()))
    _, after = pipeline(label_value_cap=10, label_value_max_bytes=16)
    after.metric_set.check_state(state)
    assert after.metric_set.load_state(state) == []
    assert len(after.stage_duration.series) == 11
    assert after.stage_duration.count((OVERFLOW_LABEL_VALUE,)) == 30
    assert sum(after.stage_duration.count(k) for k in after.stage_duration.series) == 40
    assert all(len(k[0]) <= 16 for k in after.stage_duration.series)
    assert after.label_overflow.values == {}     # restored, not observed again
