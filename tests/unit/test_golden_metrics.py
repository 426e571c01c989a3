"""The whole ``/metrics`` exposition of a real sidecar fed fixed inputs, compared with checked-in
files, so that renaming a family, a label or a help text, or changing a bucket, is a reviewed
diff of tests/golden/metrics/*.txt.

Inputs (tests/golden/metrics/): the app's log in JSON and IndexTTS text form and the gateway's
access log (a few of every event, a traceback, a malformed and an invalid line), a ``file:`` GPU
reading and the app's ``/status`` answer (served by a tiny aiohttp app). What varies from run
to run is taken out, not frozen into the files: the sidecar's own ``process_*`` and
``python_info``, the temp directory in label values, the gate's transition time (wall clock at
start) and exemplar timestamps (OpenMetrics).

After an intended change: ``UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden_metrics.py``,
then review ``git diff tests/golden/metrics``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from exporter import sidecar as sidecar_module
from exporter.config import config_from_mapping
from exporter.sidecar import Sidecar

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "metrics"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
VOLATILE_FAMILIES = re.compile(r"^(# (HELP|TYPE) )?(process_|python_info)")
TRANSITION_TIME = re.compile(r"^(tts_ingress_last_transition_timestamp_seconds) \S+$")
EXEMPLAR_TIME = re.compile(r"( # \{[^}]*\} \S+) \S+$")


def normalise(exposition: str, tmp_path: Path) -> str:
    lines = []
    for line in exposition.replace(str(tmp_path), "<tmp>").splitlines():
        if VOLATILE_FAMILIES.match(line):
            continue
        line = TRANSITION_TIME.sub(r"\1 <wall clock at start>", line)
        lines.append(EXEMPLAR_TIME.sub(r"\1 <time>", line))
    return "\n".join(lines) + "\n"


async def wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the sidecar did not read the fixed inputs in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def expositions(tmp_path: Path, aiohttp_server: Any, unused_tcp_port: int,
                      monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """``/metrics`` in the text format and in OpenMetrics, once everything fixed was read."""
    status = (GOLDEN / "status.json").read_bytes()

    async def answer(_: web.Request) -> web.Response:
        return web.Response(body=status, content_type="application/json")

    app = web.Application()
    app.router.add_get("/status", answer)
    app_server = await aiohttp_server(app)
    shutil.copytree(GOLDEN / "logs", tmp_path / "logs")
    log_bytes = sum(p.stat().st_size for p in (tmp_path / "logs").iterdir())
    monkeypatch.setattr(sidecar_module, "__version__", "0.0.0-golden")  # a release is no diff
    sidecar = Sidecar(config_from_mapping({
        "server": {"listen": f"127.0.0.1:{unused_tcp_port}"},
        "logs": {"paths": [str(tmp_path / "logs" / "*.log")],
                 "checkpoint_path": str(tmp_path / "state" / "offsets.json")},
        "gpu": {"source": f"file:{GOLDEN / 'gpu.json'}", "poll_interval_s": 3600},
        "gate": {"gate_file": str(tmp_path / "state" / "ingress.json")},
        "probe": {"url": str(app_server.make_url("/status")), "interval_s": 3600},
    }))
    await sidecar.start()
    try:
        await wait_for(lambda: sidecar.metrics.log_bytes.get() == log_bytes)
        url = f"http://127.0.0.1:{unused_tcp_port}/metrics"
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                text = await response.text()
            async with session.get(url, headers={"Accept": OPENMETRICS}) as response:
                assert response.content_type == "application/openmetrics-text"
                openmetrics = await response.text()
    finally:
        await sidecar.stop()
    return {"metrics.txt": normalise(text, tmp_path),
            "metrics.openmetrics.txt": normalise(openmetrics, tmp_path)}


def test_metrics_exposition_matches_the_checked_in_files(expositions: dict[str, str]) -> None:
    for name, exposition in expositions.items():
        golden = GOLDEN / name
        if os.environ.get("UPDATE_GOLDEN"):
            golden.write_text(exposition)
        assert exposition == golden.read_text(), (
            f"/metrics differs from {golden}; if intended, regenerate it with UPDATE_GOLDEN=1 "
            "(see this file's docstring) and review the diff")
