"""Helpers shared by the unit and integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


class FakeClock:
    """A clock for code that takes one injected (monotonic or wall, ``() -> float``); tests
    move it by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something listens on until the block ends."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


_DROPPED = "cap_dac_override,cap_dac_read_search"
# Ways to run a program without the capabilities that let root ignore file permissions.
_DROPPERS = (
    ("capsh", ["--drop=" + _DROPPED, "--", "-c", 'exec "$@"', "unprivileged"]),
    ("setpriv", ["--inh-caps=-dac_override,-dac_read_search",
                 "--bounding-set=-dac_override,-dac_read_search"]),
)


def _can_list(prefix: list[str], directory: Path) -> bool:
    probe = [*prefix, sys.executable, "-c", f"import os; os.listdir({str(directory)!r})"]
    return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0


@pytest.fixture(scope="session")
def permissions_apply() -> list[str]:
    """A command prefix under which file permissions bind, as in a non-root container: empty
    when the tests do not run as root, else capsh or setpriv dropping CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH. Skips when neither tool can (checked on a real unreadable
    directory)."""
    if os.geteuid() != 0:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        closed = Path(scratch) / "closed"
        closed.mkdir(mode=0)
        try:
            for tool, args in _DROPPERS:
                path = shutil.which(tool)
                if path is not None and _can_list([path, *args], Path(scratch)) \
                        and not _can_list([path, *args], closed):
                    return [path, *args]
        finally:
            closed.chmod(0o700)
    pytest.skip("running as root and neither capsh nor setpriv can drop CAP_DAC_OVERRIDE "
                "here, so a permission change cannot be made to bind")


# The log-monitoring notes' IndexTTS lines (issue 18), the last two built from the fields the
# notes name.
_INDEXTTS_LINES = (
    "2024-06-12 14:22:37,892 - app.tts_engine - INFO - synthesis_start: id=ts_7f3a2b1c, "
    'text="今天天气真好", lang=zh, voice=alloy, duration_ms=0, cache_hit=false\n'
    "2024-06-12 14:22:38,415 - app.tts_engine - INFO - synthesis_complete: id=ts_7f3a2b1c, "
    "status=success, duration_ms=523, audio_size_kb=124, cache_saved=true, "
    "model_stage=llm_postproc\n"
    "2024-06-12 10:05:11,203 - app.cache - WARNING - cache_dir_usage: path=/app/cache, "
    "used_percent=92.7, threshold=90.0, action=warn\n"
    "2024-06-12 14:25:02,110 - app.tts_engine - INFO - synthesis_complete: id=ts_9c0d1e2f, "
    "status=success, rms=0.024, spectral_centroid=2150\n"
    "2024-06-12 14:26:40,001 - app.tts_engine - WARNING - synthesis_complete: id=ts_5a6b7c8d, "
    "status=success, duration_ms=880, warning_code=VOICE_FALLBACK, fallback_used=true\n"
).encode()


@pytest.fixture
def indextts_lines() -> bytes:
    return _INDEXTTS_LINES
