"""The real sidecar process killed with SIGKILL at random moments while an app log grows (and
rotates, by rename or by copytruncate under a glob that matches the copies), or losing the
permission to read its log directory: /metrics counts every written line and synthesis exactly
once."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.local_stack import REPO, Process, free_port, http_get, wait_until

pytestmark = pytest.mark.slow


def contract_line(index: int) -> tuple[str, tuple[str, str]]:
    """A synthesis_complete JSON line as the app writes it, and its (status, error_code)."""
    failed = index % 7 == 3
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime()),
              "level": "ERROR" if failed else "INFO", "logger": "tts_app.engine",
              "event": "synthesis_complete", "request_id": f"req-{index:06d}",
              "status": "failed" if failed else "success", "duration_ms": 100 + index % 900,
              "cache_hit": False, "cache_saved": not failed, "audio_size_kb": 12,
              "audio_duration_ms": 900, "text_len": 20 + index % 50}
    if failed:
        record.update(error_code="GPU_OOM", model_stage="llm_inference")
    return json.dumps(record), ("failed", "GPU_OOM") if failed else ("success", "none")


def contract_text_line(index: int) -> tuple[str, tuple[str, str]]:
    """The same record in the IndexTTS text format (read by the compiled classifier)."""
    record, labels = contract_line(index)
    fields = json.loads(record)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S,000", time.gmtime())
    head = f"{stamp} - {fields.pop('logger')} - {fields.pop('level')} - {fields.pop('event')}"
    del fields["time"]
    fields = {"id": fields.pop("request_id"), **fields}
    pairs = ", ".join(f"{key}={str(value).lower() if type(value) is bool else value}"
                      for key, value in fields.items())
    return f"{head}: {pairs}", labels


class Sidecar:
    """The sidecar on ``workdir/logs/<pattern>``, started through ``prefix`` (e.g. without the
    capabilities that let root ignore permissions)."""

    def __init__(self, workdir: Path, pattern: str = "*.log", prefix: list[str] | None = None
                 ) -> None:
        self.port = free_port()
        self.output = workdir / "exporter.out"
        config = {
            "server": {"listen": f"127.0.0.1:{self.port}"},
            "logs": {"paths": [str(workdir / "logs" / pattern)],
                     "checkpoint_path": str(workdir / "state" / "offsets.json"),
                     "checkpoint_interval_s": 0.1, "poll_interval_s": 0.2,
                     "read_chunk_bytes": 4096},
            "gpu": {"source": "none"},
            "gate": {"enabled": False},
        }
        config_path = workdir / "exporter.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.process = Process(
            "exporter",
            [*(prefix or []), sys.executable, "-m", "exporter", "--config", str(config_path)],
            f"http://127.0.0.1:{self.port}/healthz", self.output, REPO)

    def start(self) -> None:
        self.process.start()
        self.process.wait_ready(timeout=20)

    def kill(self) -> None:
        assert self.process.popen is not None
        self.process.popen.send_signal(signal.SIGKILL)
        self.process.popen.wait(5)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        _, body = http_get(f"http://127.0.0.1:{self.port}/metrics")
        return [(sample.name, sample.labels, sample.value)
                for family in text_string_to_metric_families(body.decode())
                for sample in family.samples]

    def totals(self) -> tuple[float, Counter[tuple[str, str]]]:
        lines, syntheses = 0.0, Counter[tuple[str, str]]()
        for name, labels, value in self.samples():
            if name == "tts_exporter_log_lines_total":
                lines += value
            elif name == "tts_syntheses_total":
                syntheses[(labels["status"], labels["error_code"])] += int(value)
        return lines, syntheses

    def counter(self, name: str, **labels: str) -> dict[str, float]:
        """The samples of a counter by their ``labels`` values (``kind`` -> value, ...)."""
        return {",".join(sample_labels[k] for k in labels): value
                for sample_name, sample_labels, value in self.samples()
                if sample_name == name
                and all(sample_labels.get(k) == v for k, v in labels.items() if v)}

    def log_lines(self, text: str) -> list[str]:
        return [line for line in self.output.read_text(errors="replace").splitlines()
                if text in line]


class AppLog:
    """The app's log with what was written to it, and logrotate's steps."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "app.log"
        directory.mkdir(exist_ok=True)
        self.written = 0
        self.expected: Counter[tuple[str, str]] = Counter()

    def write(self, count: int) -> None:
        batch = [contract_line(self.written + i) for i in range(count)]
        with self.path.open("a") as out:
            out.writelines(line + "\n" for line, _ in batch)
        self.written += count
        self.expected.update(labels for _, labels in batch)

    def copy(self) -> None:
        shutil.copyfile(self.path, self.path.with_name("app.log.1"))

    def truncate(self) -> None:
        with self.path.open("r+") as out:
            out.truncate(0)

    def compress_previous(self) -> None:
        """delaycompress: the previous plain copy becomes app.log.2.gz."""
        backup = self.path.with_name("app.log.1")
        if backup.exists():
            middle = backup.rename(self.path.with_name("app.log.2"))
            with gzip.open(self.path.with_name("app.log.2.gz"), "wb") as out:
                out.write(middle.read_bytes())
            middle.unlink()


def settle(sidecar: Sidecar, log: AppLog) -> None:
    """Everything written is counted, and in a checkpoint (written every 0.1 s)."""
    wait_until(lambda: sidecar.totals()[0] >= log.written, timeout=10,
               what=f"{log.written} lines counted")
    time.sleep(0.4)


@pytest.mark.parametrize("line_of", [contract_line, contract_text_line],
                         ids=["json", "text"])
def test_sigkill_at_random_points_loses_and_duplicates_nothing(
        tmp_path: Path, line_of: Callable[[int], tuple[str, tuple[str, str]]]) -> None:
    rng = random.Random(20261122)
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    sidecar = Sidecar(tmp_path)
    expected: Counter[tuple[str, str]] = Counter()
    written = 0
    sidecar.start()
    try:
        for round_ in range(6):
            for _ in range(rng.randint(2, 5)):
                batch = [line_of(written + i) for i in range(rng.randint(50, 400))]
                text = "".join(line + "\n" for line, _ in batch)
                cut = rng.randint(0, len(text))  # a partial line may sit there at the kill
                with log.open("a") as out:
                    out.write(text[:cut])
                    out.flush()
                    time.sleep(rng.uniform(0.0, 0.15))
                    out.write(text[cut:])
                written += len(batch)
                expected.update(labels for _, labels in batch)
                time.sleep(rng.uniform(0.0, 0.3))
            if round_ == 2:  # rotate: the renamed file still matches the glob
                os.rename(log, log.with_name("app.1.log"))
            sidecar.kill()
            if round_ % 2:  # lines written while the sidecar is down
                batch = [line_of(written + i) for i in range(100)]
                with log.open("a") as out:
                    out.writelines(line + "\n" for line, _ in batch)
                written += len(batch)
                expected.update(labels for _, labels in batch)
            sidecar.start()
        wait_until(lambda: sidecar.totals()[0] >= written, timeout=10,
                   what=f"{written} lines counted")
        time.sleep(0.5)  # anything counted twice would show up by now
        lines, syntheses = sidecar.totals()
    finally:
        sidecar.process.stop()
    assert lines == written
    assert syntheses == expected


def test_copytruncate_under_a_glob_matching_the_copies_is_exact_across_kill_9(
        tmp_path: Path) -> None:
    """``logs.paths: [logs/app.log*]`` with logrotate's copytruncate + delaycompress, and the
    sidecar killed between the steps: each line once, the copy never counted again."""
    log = AppLog(tmp_path / "logs")
    sidecar = Sidecar(tmp_path, pattern="app.log*")
    sidecar.start()

    def restart() -> None:
        sidecar.kill()
        sidecar.start()

    try:
        for cycle in range(3):
            log.write(150)
            settle(sidecar, log)
            log.write(40)  # maybe not read yet when the copy is made
            log.compress_previous()
            if cycle == 0:
                restart()
            log.copy()
            if cycle == 1:
                restart()
            log.write(25)  # after the copy, before the truncate: only in app.log
            settle(sidecar, log)
            if cycle == 2:
                restart()
                settle(sidecar, log)
            log.truncate()
            if cycle != 1:
                restart()
            log.write(10)
        settle(sidecar, log)
        time.sleep(0.6)  # anything counted twice would show up by now
        lines, syntheses = sidecar.totals()
        rotations = sidecar.counter("tts_exporter_log_rotations_total", kind="")
    finally:
        sidecar.process.stop()
    assert lines == log.written
    assert syntheses == log.expected
    assert set(rotations) <= {"truncate"}  # no copy was taken for a new file or a rename


def test_a_permission_glitch_on_the_log_dir_is_a_logged_error_not_a_rotation(
        tmp_path: Path, permissions_apply: list[str]) -> None:
    """``chmod 000`` on the log directory for 2 s and back, with the sidecar unable to
    override permissions (as in a non-root container): nothing re-read, nothing counted as a
    rotation, the error counted and logged once; the same at start-up."""
    log = AppLog(tmp_path / "logs")
    log.write(100)
    sidecar = Sidecar(tmp_path, prefix=permissions_apply)
    sidecar.start()
    try:
        settle(sidecar, log)
        log.path.parent.chmod(0)
        try:
            log.write(20)  # still read through the open descriptor
            time.sleep(2.0)
        finally:
            log.path.parent.chmod(0o755)
        settle(sidecar, log)
        time.sleep(1.0)  # a re-read from 0 would show up by now
        lines, syntheses = sidecar.totals()
        assert (lines, syntheses) == (log.written, log.expected)
        assert sidecar.counter("tts_exporter_log_rotations_total", kind="") == {}
        assert sidecar.counter("tts_exporter_collector_errors_total",
                               collector="tail")["tail"] >= 1
        assert len(sidecar.log_lines("cannot list the log directory")) == 1

        sidecar.process.stop()  # start-up with the directory unreadable
        log.path.parent.chmod(0)
        try:
            sidecar.start()
            wait_until(lambda: len(sidecar.log_lines("cannot list the log directory"))
                       == 2, timeout=10, what="the start-up error logged")
            errors = sidecar.counter("tts_exporter_collector_errors_total", collector="tail")
            assert errors["tail"] >= 1
        finally:
            log.path.parent.chmod(0o755)
        log.write(10)
        settle(sidecar, log)
        time.sleep(1.0)
        assert sidecar.totals() == (log.written, log.expected)
    finally:
        sidecar.process.stop()
