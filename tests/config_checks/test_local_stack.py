"""The demo (tests/support/local_stack.py, what `make run` starts) as a newcomer meets it: every
URL it prints answers, the curl it prints writes a WAV, its live counter counts the demo's
requests, and a stop signal stops every process it started."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.config_checks.artefacts import REPO
from tests.support import local_stack

# The demo's stop bound plus room for a loaded 2-core CI machine.
STOP_BOUND_S = local_stack.STOP_TIMEOUT_S + 10


def process_identity(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process; None when it is gone or a zombie. The start
    time tells a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), fields[19]


def children_of(pid: int) -> dict[int, str]:
    """The live children of ``pid``: pid -> start time."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            identity = process_identity(int(entry.name))
            if identity is not None and identity[0] == pid:
                found[int(entry.name)] = identity[1]
    return found


def still_running(processes: dict[int, str]) -> list[int]:
    return [pid for pid, started in processes.items()
            if (identity := process_identity(pid)) is not None and identity[1] == started]


def wait_gone(processes: dict[int, str], timeout: float) -> list[int]:
    """Wait up to ``timeout`` for all of ``processes`` to end; those still running."""
    deadline = time.monotonic() + timeout
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@dataclass
class Demo:
    """``python -m tests.support.local_stack`` running as a subprocess, up to its 'stops
    everything' line."""

    popen: subprocess.Popen[str]
    lines: list[str]

    def line(self, label: str) -> str:
        return next(line.split(None, 1)[1] for line in self.lines if line.split()[:1] == [label])

    def stop(self, signum: int = signal.SIGTERM) -> list[int]:
        """Send ``signum`` to the demo alone; the children still running after the bound."""
        children = children_of(self.popen.pid)
        assert children, "the demo started no processes"
        self.popen.send_signal(signum)
        try:
            self.popen.wait(STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
        return wait_gone(children, 5)


def start_demo(workdir: Path, *args: str) -> Demo:
    popen = subprocess.Popen(
        [sys.executable, "-m", "tests.support.local_stack", "--workdir", str(workdir),
         *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    assert popen.stdout is not None
    lines = []
    deadline = time.monotonic() + 120
    for line in popen.stdout:
        lines.append(line.rstrip())
        if "stops everything" in line or time.monotonic() > deadline:
            break
    if not any("stops everything" in line for line in lines):
        popen.kill()
        pytest.fail("the demo did not come up:\n" + "\n".join(lines))
    return Demo(popen, lines)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    for binary in ("prometheus", "prometheus-alertmanager"):
        if not shutil.which(binary):
            pytest.skip(f"{binary} is not installed (make debs)")
    running = start_demo(tmp_path_factory.mktemp("demo"))
    yield running
    assert running.stop() == []


@pytest.mark.slow
@pytest.mark.external
def test_every_url_the_demo_prints_answers_200(demo: Demo) -> None:
    urls = [demo.line(label).split()[0]
            for label in ("sidecar", "gate", "prometheus", "alertmanager")]
    for url in urls:
        status, _ = local_stack.http_get(url, timeout=5)
        assert status == 200, url


@pytest.mark.slow
@pytest.mark.external
def test_the_printed_curl_command_writes_a_wav(demo: Demo, tmp_path: Path) -> None:
    command = demo.line("synthesize")
    assert command.startswith("curl ")
    result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    audio = (tmp_path / "hello.wav").read_bytes()
    assert audio[:4] == b"RIFF"
    assert audio[8:12] == b"WAVE"
    assert len(audio) > 1000


@pytest.mark.slow
@pytest.mark.external
def test_the_printed_amtool_command_reaches_alertmanager(demo: Demo) -> None:
    amtool = shlex.split(demo.line("alertmanager").split("(or: ", 1)[1].rstrip(")"))
    if not shutil.which(amtool[0]):
        pytest.skip("amtool is not installed")
    result = subprocess.run(amtool, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.external
def test_the_running_sidecar_and_app_report_the_package_version(demo: Demo) -> None:
    _, metrics = local_stack.http_get(demo.line("sidecar").split()[0])
    assert f'tts_exporter_build_info{{version="{version("tts-sentinel")}"}} 1' in metrics.decode()
    app_status = demo.line("synthesize").split()[-1].replace("/v1/tts", "/status")
    _, body = local_stack.http_get(app_status)
    assert json.loads(body)["version"] == version("tts-sentinel")


@pytest.mark.slow
@pytest.mark.external
def test_the_printed_gpu_drill_closes_the_gate(demo: Demo) -> None:
    """Last of the tests on the shared demo: the gate stays closed for ``reopen_after_s``."""
    drill = shlex.split(demo.line("GPU").split(None, 1)[1].split("   (")[0])
    gate = demo.line("gate").split()[0]
    assert local_stack.http_get(gate)[0] == 200
    subprocess.run(drill, cwd=REPO, check=True, capture_output=True, timeout=30)
    local_stack.wait_until(lambda: local_stack.http_get(gate)[0] == 503, 15,
                           what="the gate to close")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "args"), [
    pytest.param(signal.SIGTERM, (), id="SIGTERM-with-prometheus",
                 marks=pytest.mark.external),
    pytest.param(signal.SIGINT, ("--no-prom",), id="SIGINT"),
    pytest.param(signal.SIGHUP, ("--no-prom",), id="SIGHUP"),
])
def test_a_stop_signal_to_the_demo_stops_every_process_it_started(
        signum: int, args: tuple[str, ...], tmp_path: Path) -> None:
    running = start_demo(tmp_path, *args)
    started = time.monotonic()
    left = running.stop(signum)
    assert left == [], f"still running after {signal.Signals(signum).name}: {left}"
    assert time.monotonic() - started < STOP_BOUND_S
    output = running.popen.stdout.read() if running.popen.stdout else ""
    assert f"{signal.Signals(signum).name} received" in output
    assert "stopped in" in output


def test_stop_reaches_what_a_child_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    parent = local_stack.Process(
        "shell", ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], "http://unused",
        tmp_path / "shell.out", tmp_path)
    parent.start()
    local_stack.wait_until(lambda: pid_file.read_text().strip(), 10, what="the grandchild")
    grandchild = int(pid_file.read_text())
    identity = process_identity(grandchild)
    assert identity is not None
    parent.stop(timeout=5)
    assert wait_gone({grandchild: identity[1]}, 5) == []


@pytest.mark.slow
def test_a_child_that_ignores_sigterm_is_killed_at_the_bound(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn = local_stack.Process(
        "stubborn", [sys.executable, "-c",
                     "import pathlib, signal, sys, time; "
                     "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                     "pathlib.Path(sys.argv[1]).touch(); time.sleep(300)", str(ready)],
        "http://unused", tmp_path / "stubborn.out", tmp_path)
    stubborn.start()
    local_stack.wait_until(ready.exists, 30, what="the child to ignore SIGTERM")
    started = time.monotonic()
    killed = local_stack.stop_all([stubborn], timeout=1.0)
    elapsed = time.monotonic() - started
    assert killed == ["stubborn"]
    assert stubborn.popen is not None
    assert stubborn.popen.returncode == -signal.SIGKILL
    assert 1.0 <= elapsed < 10


def send_and_read_live_summary(stack: Any, texts: list[str], since: Any = None) -> str:
    """Send ``texts``, then the live summary once the sidecar has read their syntheses and at
    least one of its own probes."""
    for text in texts:
        assert stack.synthesize(text)[0] == 200

    def counted() -> str | None:
        _, body = local_stack.http_get(stack.url("exporter", "/metrics"))
        probes_seen = 'route="/status"' in body.decode()
        summary: str = local_stack.live_summary(stack, since)
        return summary if probes_seen and f"syntheses {len(texts)}," in summary else None

    summary: str = local_stack.wait_until(counted, 30, what="the sidecar to read the logs")
    return summary


@pytest.mark.slow
def test_the_live_counter_counts_the_demo_requests_not_the_probe(tmp_path: Path) -> None:
    options = local_stack.StackOptions(prometheus=False, alertmanager=False,
                                       exporter_overrides={"probe": {"interval_s": 0.2}})
    with local_stack.Stack(tmp_path, options) as stack:
        summary = send_and_read_live_summary(stack, ["one", "two", "three"])
        assert summary.startswith("requests 3,"), summary
    # A second demo on the same workdir: the sidecar restores its totals, the line starts at 0.
    with local_stack.Stack(tmp_path, options) as stack:
        before = local_stack.live_totals(stack)
        summary = send_and_read_live_summary(stack, ["four", "five"], since=before)
        assert summary.startswith("requests 2,"), summary


@pytest.mark.slow
def test_the_sidecar_exits_on_sigterm_within_seconds_while_traffic_flows(tmp_path: Path) -> None:
    """The stack's SIGKILL bound is a backstop: the sidecar itself stops at once, mid-traffic."""
    options = local_stack.StackOptions(prometheus=False, alertmanager=False)
    with local_stack.Stack(tmp_path, options) as stack:
        for index in range(5):
            assert stack.synthesize(f"traffic {index}")[0] == 200
        exporter = stack.processes["exporter"]
        assert exporter.popen is not None
        started = time.monotonic()
        exporter.popen.send_signal(signal.SIGTERM)
        code = exporter.popen.wait(local_stack.STOP_TIMEOUT_S)
        elapsed = time.monotonic() - started
    assert code == 0, exporter.log_tail()
    assert elapsed < 5, f"{elapsed:.1f} s"
