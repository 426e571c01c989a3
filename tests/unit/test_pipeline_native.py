"""The live pipeline's compiled classifier (``Classifier`` in exporter/analyze/_scan.c) changes
nothing but speed: every test feeds the same bytes to a pipeline that uses it and to one that
reads every line with :class:`RecordParser` (``native=False``, what a source tree without the
extension does) and compares all they make: every family's values (counters, gauges,
histogram buckets, sums and exemplars), the outcomes, the overflow counts and the lines
handed to ``on_records``, on random and hostile lines of both formats.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.analyze._scan import SynthesisRun
from exporter.config import AliasConfig, LogsConfig, MetricsConfig
from exporter.logs.parsers import RecordParser
from exporter.logs.pipeline import (
    NUMBER_FIELDS,
    READ_FIELDS,
    Classifier,
    InvalidField,
    KeptLine,
    LogPipeline,
)
from exporter.metrics import CounterFamily, GaugeFamily, HistogramFamily, SidecarMetrics
from tests.bench.make_logs import generate


@pytest.fixture(autouse=True)
def _classifier_built() -> None:
    """Without the extension both pipelines would be the parser: make builds _scan.c, so its
    absence fails these tests rather than skipping them."""
    assert Classifier is not None, "exporter/analyze/_scan.c is not built (make builds it)"


class _Run:
    """One pipeline and everything it hands out."""

    def __init__(self, native: bool, cap: int, logs: LogsConfig) -> None:
        self.metrics = SidecarMetrics()
        self.kept: list[tuple[str, list[KeptLine]]] = []
        self.pipeline = LogPipeline(
            self.metrics, logs, MetricsConfig(label_value_cap=cap, max_series_per_family=40),
            on_records=lambda source, lines: self.kept.append((source, list(lines))),
            native=native)

    def state(self) -> dict[str, Any]:
        """Every family's samples (exemplars without their wall-clock time) and the kept
        lines."""
        state: dict[str, Any] = {"kept": self.kept}
        for family in self.metrics.metric_set.families():
            if isinstance(family, CounterFamily | GaugeFamily):
                state[family.name] = dict(family.values)
            elif isinstance(family, HistogramFamily):
                state[family.name] = {
                    labels: (series.counts, series.sum,
                             [e and e[:2] for e in series.exemplars])
                    for labels, series in family.series.items()}
        return state


def _run_lines(items: list[Any]) -> int:
    """Lines the classifier read whole into runs."""
    return sum(len(item) for item in items if isinstance(item, SynthesisRun))


def _compiled_lines(items: list[Any]) -> int:
    """Lines the classifier read (whole, or as fields for a handler)."""
    return _run_lines(items) + sum(type(item) is tuple for item in items)


def _classify(data: bytes, keep: bool = True) -> list[Any]:
    classifier = LogPipeline(SidecarMetrics(), LogsConfig(), MetricsConfig())._classifier
    assert classifier is not None
    return classifier.classify(data, keep)[0]


def _compare(chunks: list[bytes], cap: int = 50, logs: LogsConfig | None = None
             ) -> dict[str, Any]:
    """Both pipelines' state after the same chunks (must be equal); the native one's."""
    logs = logs or LogsConfig()
    native, parser = _Run(True, cap, logs), _Run(False, cap, logs)
    assert native.pipeline._classifier is not None
    assert parser.pipeline._classifier is None
    for chunk in chunks:
        native.pipeline.process("app.log", chunk)
        parser.pipeline.process("app.log", chunk)
    state = native.state()
    assert state == parser.state()
    return state


STAMP = "2026-11-22 10:00:01,250"
# Values at the edges of what the classifier converts itself or leaves to the handlers
HOSTILE_VALUES = [
    "0", "7", "523", "1.5", "0.0001", "007", "86 chars", "1.5 ms", "12 x y", "-5", "-0", "+5",
    "1e3", "1E400", "5_000", "1.", ".5", "nan", "inf", "-inf", "Infinity", "1" * 30,
    "9" * 400, "9" * 16 + ".5", "1000000000000001", "1e15", "999999999999999.9",
    "", "success", "failed", "true", "True", "false", "1", "yes", "none", "GPU_OOM", "/v1/tts",
    "200", '"quoted, value"', "'single'", '"a\\"b"', "x=y", "a b", "\u0663", "caf\u00e9",
    "x\u00a0", "tab\there", "L" * 300, "\u4eca\u5929",
]
TEXT_KEYS = ["id", "request_id", "task_id", "status", "result", "duration_ms", "elapsed_ms",
             "latency_ms", "error_code", "code", "err_code", "warning_code", "text_len",
             "chars", "text", "audio_duration_ms", "queue_ms", "audio_size_kb", "rms",
             "spectral_centroid", "model_version", "cache_hit", "cache_saved",
             "fallback_used", "method", "route", "endpoint", "stage", "path", "used_percent",
             "model_stage", "lang", "msg_event", "x.y", "_"]
SYNTHESIS_KEYS = ["status", "duration_ms", "error_code", "text_len", "text", "audio_duration_ms",
                  "queue_ms", "batch_size", "audio_size_kb", "rms", "spectral_centroid",
                  "model_version", "cache_hit", "cache_saved", "fallback_used"]
EVENTS = ["synthesis_complete", "synthesis_start", "stage_time", "http_request", "first_audio",
          "audio_metrics", "service_start", "cache_health", "cache_dir_usage", "infer_done",
          "request", "something_new", "Synthesis_complete", "a.b"]
LEVELS = ["INFO", "ERROR", "WARNING", "WARN", "ERR", "FATAL", "CRITICAL", "DEBUG", "NOTICE",
          "Info", "warn", "L" * 40]


PLAIN_VALUES = ["0", "12", "523", "86 chars", "0.25", "1.5", "success", "failed", "true",
                "false", "GPU_OOM", "/v1/tts", "llm_infer", "POST", "200", "v2", "ts_0001"]


def _value(rnd: random.Random) -> str:
    return rnd.choice(HOSTILE_VALUES if rnd.random() < 0.15 else PLAIN_VALUES)


def _text_line(rnd: random.Random) -> str:
    keys = rnd.sample(TEXT_KEYS, rnd.randrange(0, 9))
    if rnd.random() < 0.05 and keys:
        keys.append(rnd.choice(keys))                  # a key given twice
    pairs = ", ".join(f"{k}={_value(rnd)}" for k in keys)
    body = (f"{rnd.choice(EVENTS)}: {pairs}" if rnd.random() < 0.85
            else rnd.choice([f"free text {pairs}", f"ERROR: scipy.fft failed, {pairs}",
                             f"{rnd.choice(EVENTS)}:", f"{rnd.choice(EVENTS)}:  {pairs}"]))
    stamp = rnd.choice([STAMP] * 6 + ["2026-11-22T10:00:01.5", "2026-11-22 10:00:01",
                                      "2026-13-40 25:00:00", "2026-11-22 10:00:01,"])
    sep = rnd.choice([" - "] * 40 + ["  -  ", " -", "- "])
    return f"{stamp}{sep}app.tts{sep}{rnd.choice(LEVELS)}{sep}{body}"


def _synthesis_line(rnd: random.Random) -> str:
    """A text synthesis_complete, most of whose values the classifier reads itself."""
    keys = rnd.sample(SYNTHESIS_KEYS, rnd.randrange(0, len(SYNTHESIS_KEYS)))
    numbers = ["0", "12", "523", "86 chars", "0.25", "1.5", "2001", "999999999999999.9"]
    pairs = "".join(f", {k}={rnd.choice(numbers)}" if k in NUMBER_FIELDS and rnd.random() < 0.9
                    else f", {k}={_value(rnd)}" for k in keys)
    level = rnd.choice(["INFO"] * 8 + LEVELS)
    return f"{STAMP} - app.tts - {level} - synthesis_complete: id=ts_{rnd.randrange(99)}{pairs}"


def _json_line(rnd: random.Random) -> str:
    keys = rnd.sample(TEXT_KEYS, rnd.randrange(0, 7))
    pairs = "".join(f', "{k}": {rnd.choice(["1", "-2", "1.5", "null", "true", "[1]", "{}"])}'
                    if rnd.random() < 0.4 else f', "{k}": "{_value(rnd)}"'
                    for k in keys if k.isidentifier())
    return (f'{{"time": "2026-11-22T10:00:01Z", "level": "{rnd.choice(LEVELS)}", '
            f'"event": "{rnd.choice(EVENTS)}"{pairs}}}')


def _corrupt(rnd: random.Random, line: str) -> str:
    cut = rnd.randrange(0, max(1, len(line)))
    return rnd.choice([
        line[:cut],                                             # a write cut short
        line[:cut] + rnd.choice('"\',=: \t\r\x00\x7f') + line[cut + 1:],
        line + "\r",                                            # a CRLF file
        line + " ",
        line.replace(", ", ",", 1),
        "  " + line,
    ])


def _hostile_lines(seed: int, count: int) -> list[str]:
    rnd = random.Random(seed)
    lines = []
    for _ in range(count):
        kind = rnd.random()
        if kind < 0.05:
            lines.append(rnd.choice(["Traceback (most recent call last):", "", "   ", "\r",
                                     "  File x", "{", "[1]", "0", "\u00e9"]))
            continue
        line = _text_line(rnd) if kind < 0.75 else _json_line(rnd)
        lines.append(_corrupt(rnd, line) if rnd.random() < 0.1 else line)
    return lines


def _chunks(data: bytes, rnd: random.Random) -> list[bytes]:
    """``data`` cut at random line ends, as the tailer reads it."""
    ends = [i + 1 for i, byte in enumerate(data) if byte == 10]
    cuts = sorted(rnd.sample(ends, min(len(ends), 8)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]


@pytest.mark.parametrize("seed", range(6))
def test_hostile_lines_of_both_formats_make_identical_metrics(seed: int) -> None:
    rnd = random.Random(seed)
    lines = _hostile_lines(seed, 2500) + list(generate(300, seed=seed))
    rnd.shuffle(lines)
    for _ in range(120):  # stretches of syntheses, which the classifier reads whole
        at = rnd.randrange(len(lines))
        lines[at:at] = [_synthesis_line(rnd) for _ in range(rnd.randrange(2, 8))]
    data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
    state = _compare(_chunks(data, rnd), cap=rnd.choice([3, 50]))
    items, _ = _Run(True, 50, LogsConfig()).pipeline._classifier.classify(data)  # type: ignore[union-attr]
    assert _compiled_lines(items) > 600   # a good share took the C path
    assert _run_lines(items) > 60         # syntheses read whole among them
    outcomes = {labels[0]: v for labels, v in state["tts_exporter_log_lines"].items()}
    # the lines reached every outcome the parser gives, so the comparison covered them all
    assert {"parsed", "invalid_field", "unknown_event", "free_form", "continuation",
            "malformed"} <= set(outcomes)
    assert sum(outcomes.values()) == len(lines)
    assert "error" not in outcomes


def test_label_caps_and_series_budget_overflow_identically() -> None:
    lines = [f"{STAMP} - app - INFO - http_request: id=r{i}, method=M{i % 7}, route=/r{i}, "
             f"status={200 + i % 9}, duration_ms={i}" for i in range(400)]
    lines += [f"{STAMP} - app - ERROR - synthesis_complete: id=s{i}, status=failed, "
              f"error_code=E{i}, model_version=v{i % 5}, duration_ms=3" for i in range(200)]
    lines += [f"{STAMP} - app - INFO - stage_time: id=s{i}, stage={'x' * (i % 300)}, "
              f"duration_ms=2.5" for i in range(300)]
    state = _compare([("\n".join(lines) + "\n").encode()], cap=4)
    assert state["tts_exporter_label_overflow"]          # the caps were reached


def test_the_apps_text_lines_take_the_compiled_path() -> None:
    """What IndexTTS and make_logs write is read by the classifier, not left to the parser
    (else the speed-up would be lost without any test failing)."""
    text = [line for line in generate(3000, seed=3) if line[:1].isdigit()]
    pipeline = LogPipeline(SidecarMetrics(), LogsConfig(), MetricsConfig())
    assert pipeline._classifier is not None
    items, continuation = pipeline._classifier.classify(("\n".join(text) + "\n").encode())
    left = [item for item in items if type(item) is str]
    # only the quoted free-text ERROR lines ("ERROR: scipy.fft failed ...") are the parser's
    assert len(left) + continuation <= len(text) // 20, left[:3]
    _compare([("\n".join(text) + "\n").encode()])


def test_crlf_blank_and_unterminated_lines_split_as_the_parser_splits_them() -> None:
    line = f"{STAMP} - app - INFO - stage_time: id=a, stage=llm, duration_ms=5"
    state = _compare([f"{line}\r\n\r\n{line}\r\r\n\n{line}\r".encode(),
                      f"{line}\n{line}".encode()])
    assert state["tts_stage_duration_seconds"][("llm",)][0] != [0] * 9


def test_indextts_lines_make_identical_metrics(indextts_lines: bytes) -> None:
    _compare([indextts_lines])


def test_aliases_the_classifier_cannot_mirror_leave_every_line_to_the_parser() -> None:
    odd = AliasConfig(fields={"result": ["result", "status"]}, events={})
    pipeline = LogPipeline(SidecarMetrics(), LogsConfig(aliases=odd), MetricsConfig())
    assert pipeline._classifier is None
    custom = AliasConfig(fields={"id": ["id", "rid"], "duration_ms": ["took"]},
                         events={"done": "synthesis_complete"})
    lines = [f"{STAMP} - app - INFO - done: rid=r{i}, status=success, took={i} ms, "
             f"audio_size_kb=3" for i in range(50)]
    state = _compare([("\n".join(lines) + "\n").encode()], logs=LogsConfig(aliases=custom))
    assert state["tts_syntheses"] == {("success", "none", "unknown"): 50.0}


text_values = st.text(alphabet=st.sampled_from(list('0123456789.-e ,="\'\\ab_\u00e9\t')),
                      max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(EVENTS), st.sampled_from(LEVELS),
                          st.lists(st.tuples(st.sampled_from(TEXT_KEYS), text_values),
                                   max_size=6)),
                min_size=1, max_size=10))
def test_any_text_values_make_identical_metrics(
        records: list[tuple[str, str, list[tuple[str, str]]]]) -> None:
    lines = [f"{STAMP} - app - {level} - {event}: " + ", ".join(f"{k}={v}" for k, v in pairs)
             for event, level, pairs in records]
    _compare([("\n".join(lines) + "\n").encode()], cap=3)


class _Recording(dict[str, Any]):
    """Fields that note every name a handler looks up."""

    read: ClassVar[set[str]] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_handlers_read_only_the_fields_the_classifier_extracts() -> None:
    """A handler that reads a field missing from READ_FIELDS would see it on the parser's
    lines and never on the classifier's: this catches it for every handler."""
    pipeline = LogPipeline(SidecarMetrics(), LogsConfig(), MetricsConfig())
    parser = RecordParser()
    seen: set[str] = set()
    for line in _hostile_lines(5, 4000):
        try:
            parsed = parser.fields(line)
        except ValueError:
            continue
        if parsed is None:
            continue
        _, event, fields = parsed
        recording = _Recording(fields)
        handler = pipeline._handlers.get(event)
        seen.add(event)
        try:
            pipeline._level_code(recording)
            if handler is not None:
                handler(recording, fields.get("id"))
        except InvalidField:
            pass
    assert set(pipeline._handlers) <= seen
    assert _Recording.read <= set(READ_FIELDS), _Recording.read - set(READ_FIELDS)


def test_without_the_extension_the_parser_reads_every_line(
        monkeypatch: pytest.MonkeyPatch, indextts_lines: bytes) -> None:
    """A source tree whose C part was never built imports no Classifier: the pipeline then
    parses every line, with the same result."""
    monkeypatch.setattr("exporter.logs.pipeline.Classifier", None)
    metrics = SidecarMetrics()
    pipeline = LogPipeline(metrics, LogsConfig(), MetricsConfig())
    assert pipeline._classifier is None
    pipeline.process("app.log", indextts_lines)
    monkeypatch.undo()
    reference = _Run(True, 50, LogsConfig())
    reference.pipeline.process("app.log", indextts_lines)
    assert metrics.log_lines.values == reference.metrics.log_lines.values
    assert metrics.syntheses.values == reference.metrics.syntheses.values


def test_a_classifier_whose_init_failed_refuses_to_classify() -> None:
    """A half-built classifier (its __init__ raised, or was never called) raises instead of
    reading through missing tables."""
    line = f"{STAMP} - app - INFO - stage_time: id=a\n".encode()
    classifier = Classifier.__new__(Classifier)
    with pytest.raises(RuntimeError):
        classifier.classify(line)
    # a spec naming a field the classifier does not read: its index lookup fails
    with pytest.raises(ValueError, match="not in sequence"):
        Classifier.__init__(classifier, {b"x": "x"}, {b"id": "id"}, (), (), {},
                            {"x": ((("nope", 1),), 0, ())}, frozenset(), 1e15, frozenset(), 64)
    with pytest.raises(RuntimeError):
        classifier.classify(line)


def _synthesis(i: int, status: str = "success", level: str = "INFO", **fields: object) -> str:
    pairs = "".join(f", {key}={value}" for key, value in fields.items())
    return (f"{STAMP} - app.tts_engine - {level} - synthesis_complete: id=ts_{i}, "
            f"status={status}{pairs}")


def test_syntheses_read_whole_overflow_caps_and_budgets_as_line_by_line() -> None:
    """Label values past a cap and label sets past the series budget, on lines the
    classifier reads whole: every such line counts its overflow, as line by line."""
    rnd = random.Random(7)
    lines = [_synthesis(i, rnd.choice(["failed", "timeout", "success"]),
                        error_code=f"E{rnd.randrange(11)}", model_version=f"v{rnd.randrange(9)}",
                        duration_ms=i) for i in range(600)]
    data = ("\n".join(lines) + "\n").encode()
    assert _run_lines(_classify(data)) == len(lines)
    state = _compare([data], cap=4)
    overflows = state["tts_exporter_label_overflow"]
    assert overflows[("tts_syntheses_total", "error_code")] > 100
    assert overflows[("tts_syntheses_total", "model_version")] > 100
    assert overflows[("tts_syntheses_total", "*")] > 0     # the series budget (40) too


def test_more_kinds_than_a_run_holds_continue_in_the_next_run() -> None:
    lines = [_synthesis(i, model_version=f"v{i}", duration_ms=i % 50, cache_hit="true")
             for i in range(300)]
    data = ("\n".join(lines) + "\n").encode()
    items = _classify(data)
    assert len(items) > 1
    assert all(isinstance(item, SynthesisRun) for item in items)
    assert _run_lines(items) == 300
    state = _compare([data], cap=500)
    assert sum(state["tts_syntheses"].values()) == 300


def test_sums_add_up_line_by_line_in_log_order() -> None:
    """Amounts whose float sum depends on the order of addition, spread over kinds that share
    a series: the sums are exactly those of adding each line's amount in log order."""
    rnd = random.Random(4)
    durations = [rnd.choice(["0.1", "0.2", "0.3", "999999999.7", "3.3", "1"]) for _ in range(3000)]
    lines = [_synthesis(i, rnd.choice(["success", "failed"]), duration_ms=duration,
                        audio_size_kb=duration, audio_duration_ms="7.1")
             for i, duration in enumerate(durations)]
    data = ("\n".join(lines) + "\n").encode()
    assert _run_lines(_classify(data)) == len(lines)
    state = _compare(_chunks(data, rnd))
    expected_seconds = expected_bytes = 0.0
    for duration in durations:
        expected_seconds += float(duration) / 1000.0
        expected_bytes += float(duration) * 1024
    counts, seconds, _ = state["tts_synthesis_duration_seconds"][("unknown",)]
    assert sum(counts) == len(lines)
    assert seconds == expected_seconds
    assert state["tts_audio_bytes"][()] == expected_bytes
    assert (seconds, expected_bytes) != (sum(float(d) / 1000.0 for d in sorted(durations)),
                                         sum(float(d) * 1024 for d in sorted(durations)))


def test_each_bucket_keeps_the_last_request_of_the_run_as_its_exemplar() -> None:
    lines = [_synthesis(i, duration_ms=d) for i, d in enumerate([10, 30, 11, 12, 31, 5000])]
    state = _compare([("\n".join(lines) + "\n").encode()])
    _, _, exemplars = state["tts_synthesis_duration_seconds"][("unknown",)]
    assert [e for e in exemplars if e] == [("ts_3", 0.012), ("ts_4", 0.031), ("ts_5", 5.0)]


@pytest.mark.parametrize("native", [True, False])
def test_a_kind_that_cannot_be_counted_costs_only_its_own_lines(
        native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _Run(native, 50, LogsConfig())
    decide = run.pipeline._decide

    def broken(kind: Any) -> Any:
        if kind[0] == "boom":
            raise RuntimeError("a bug")
        return decide(kind)

    monkeypatch.setattr(run.pipeline, "_decide", broken)
    lines = [_synthesis(i, "boom" if i % 3 == 0 else "success", duration_ms=5)
             for i in range(30)]
    run.pipeline.process("app.log", ("\n".join(lines) + "\n").encode())
    assert run.metrics.log_lines.values == {("error",): 10.0, ("parsed",): 20.0}
    assert run.metrics.syntheses.values == {("success", "none", "unknown"): 20.0}
    assert len(run.kept[0][1]) == 30          # its lines still reach the timelines


def test_without_timelines_runs_keep_no_lines_and_count_the_same() -> None:
    data = ("\n".join(_synthesis(i, duration_ms=i) for i in range(50)) + "\n").encode()
    runs = _classify(data, keep=False)
    assert _run_lines(runs) == 50
    assert all(run.kept == [] for run in runs)
    assert len(_classify(data)[0].kept) == 50
    quiet = LogPipeline(SidecarMetrics(), LogsConfig(), MetricsConfig())
    quiet.process("app.log", data)
    reference = _Run(False, 50, LogsConfig())
    reference.pipeline.process("app.log", data)
    assert quiet.metrics.synthesis_duration.series[("unknown",)].counts == \
        reference.metrics.synthesis_duration.series[("unknown",)].counts


def test_a_run_that_cannot_be_applied_costs_only_its_own_lines(
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = _Run(True, 50, LogsConfig())

    def broken(source: str, synthesis_run: Any) -> Any:
        raise MemoryError("a bug")

    monkeypatch.setattr(run.pipeline, "_count_run", broken)
    stage = f"{STAMP} - app - INFO - stage_time: id=a, stage=llm, duration_ms=5"
    lines = [stage, *(_synthesis(i, duration_ms=5) for i in range(4)), stage]
    run.pipeline.process("app.log", ("\n".join(lines) + "\n").encode())
    assert run.metrics.log_lines.values == {("error",): 4.0, ("parsed",): 2.0}
    assert run.metrics.stage_duration.count(("llm",)) == 2
