"""Type stub of the compiled scanner (exporter/analyze/_scan.c)."""

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

class Scanner:
    def __init__(self, events: dict[bytes, str], fields: dict[bytes, str],
                 length_edges: Sequence[int], pending_cap: int,
                 stamp: Callable[[str, bool], float | None]) -> None: ...
    def scan(self, chunk: bytes, pos: int, pending: OrderedDict[str, Any],
             window: tuple[float, float] | None) -> tuple[int, bytes | None, dict[str, Any]]: ...
