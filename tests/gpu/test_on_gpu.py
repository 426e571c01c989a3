"""The one-shot GPU check itself, in its quick form: runs where there is an NVIDIA GPU and
skips, saying why, where there is none (``make gpu-check`` runs the full one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.gpu import check

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_gpu_check_passes_on_this_gpu(tmp_path: Path) -> None:
    reason = check.no_gpu_reason()
    if reason is not None:
        pytest.skip(f"no GPU: {reason}")
    out = tmp_path / "report.json"
    code = check.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report.get("error") or report["failures"]
    assert report["gate"]["close_p99_s"] <= check.GATE_P99_LIMIT_S


def test_without_a_gpu_the_check_says_why_and_passes(tmp_path: Path) -> None:
    if check.no_gpu_reason() is None:
        pytest.skip("this machine has a GPU: the check runs for real above")
    out = tmp_path / "report.json"
    assert check.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"]
