"""The README's metric reference cannot drift from what the sidecar exports."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.metrics import CounterFamily, SidecarMetrics

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_metric_reference_lists_exactly_the_exported_families() -> None:
    text = README.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| \w+ \| `(tts_\w+)` \|", text, flags=re.MULTILINE))
    exported = {family.name + ("_total" if isinstance(family, CounterFamily) else "")
                for family in SidecarMetrics().registry.families()}
    assert documented == exported, {"undocumented": exported - documented,
                                    "not exported": documented - exported}
