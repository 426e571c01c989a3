"""Type stub of the compiled scanner (exporter/analyze/_scan.c)."""

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, TypedDict

class Segment(TypedDict):
    """What scan() aggregated from one stretch of lines (built by segment_result in C)."""

    lines: int
    records: int
    continuation: int
    levels: dict[bytes, int]                       # raw level -> records
    statuses: dict[str, int]                       # synthesis_complete status -> count
    lengths: dict[tuple[int, str], int]            # (length bucket, error code or "") -> count
    stages: dict[str, list[float]]                 # stage -> durations in file order
    classes: list[tuple[bool, bytes, bytes]]       # (text format, lowest, highest stamp)
    durations: list[float]                         # completions' durations in file order
    rids: list[str]                                # their request ids
    failed: list[tuple[str, str, float, str]]      # (error code, model stage, time, id)
    counted: list[tuple[bytes, str, float, str | None]]  # WARNING+: (level, code, time, id)
    orphans: list[tuple[str, str]]                 # (id, error code or "") without a length

class Scanner:
    def __init__(self, events: dict[bytes, str], fields: dict[bytes, str],
                 length_edges: Sequence[int], pending_cap: int,
                 stamp: Callable[[str, bool], float | None]) -> None: ...
    def scan(self, chunk: bytes, pos: int, pending: OrderedDict[str, Any],
             window: tuple[float, float] | None) -> tuple[int, bytes | None, Segment]: ...

ClassifiedLine = tuple[str, str, dict[str, Any], str]
"""(level, event, fields, line): a text record as RecordParser.fields reads it."""

class SynthesisRun:
    """Consecutive lines of the spec's event that the classifier read whole (see
    exporter/logs/pipeline.py, LogPipeline._count_run)."""

    kinds: list[tuple[Any, ...]]     # each distinct kind of line, in order of first appearance
    kept: list[tuple[str, str, str, str | None]]  # (id, event, line, status) with an id
    def __len__(self) -> int: ...
    def apply(self, plans: Sequence[Sequence[tuple[int, int, int]] | None],
              sums: Sequence[float], bounds: Sequence[Sequence[float] | None],
              ) -> tuple[list[float], list[list[tuple[int, int]]],
                         list[list[tuple[int, str, float]]], int]: ...

class Classifier:
    def __init__(self, events: dict[bytes, str], fields: dict[bytes, str],
                 numbers: Sequence[str], labels: Sequence[str],
                 levels: dict[bytes, str],
                 specs: dict[str, tuple[tuple[tuple[str, int], ...], int, tuple[float, ...]]],
                 true_values: frozenset[object], max_number: float,
                 counted_levels: frozenset[str], max_exemplar_chars: int) -> None: ...
    def classify(self, data: bytes, keep: bool = True,
                 ) -> tuple[list[str | ClassifiedLine | SynthesisRun], int]: ...
