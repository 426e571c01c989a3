"""Fixtures: a real app (espeak backend, real sockets via aiohttp's test server) per test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.e2e.conftest import load_local_stack
from tts_app.backends.base import Backend
from tts_app.backends.espeak import EspeakBackend
from tts_app.config import AppConfig, config_from_mapping
from tts_app.logging import StructuredLog
from tts_app.server import STATE, AppState, build_app

deep_merge = load_local_stack().deep_merge


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Running:
    client: TestClient
    state: AppState
    config: AppConfig
    gate_file: Path

    @property
    def log_path(self) -> Path:
        """The log file, after the writer thread wrote everything logged so far."""
        assert self.state.log.flush(), "the log writer did not catch up"
        return Path(self.config.log.path)

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in read_log(self.log_path) if event is None or r["event"] == event]


StartApp = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_app(tmp_path: Path, aiohttp_client: Any) -> AsyncIterator[StartApp]:
    logs: list[StructuredLog] = []

    async def start(overrides: dict[str, Any] | None = None, backend: Backend | None = None,
                    wait_ready: bool = True) -> Running:
        base = {"log": {"path": str(tmp_path / "logs" / "app.log")},
                "cache": {"dir": str(tmp_path / "cache")},
                "gate": {"file": str(tmp_path / "state" / "ingress.json"),
                         "check_interval_s": 0},
                "admission": {"rate_limit": {"enabled": False}}}
        config = config_from_mapping(deep_merge(base, overrides or {}))
        log = StructuredLog.from_config(config.log)
        logs.append(log)
        app = build_app(config, backend or EspeakBackend(), log)
        client = await aiohttp_client(app)
        state = app[STATE]
        if wait_ready:
            await state.settled.wait()
            assert state.ready, state.failed
        return Running(client, state, config, Path(config.gate.file))

    yield start
    for log in logs:
        log.close()


def write_gate(path: Path, is_open: bool, retry_after_s: int = 7) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"open": is_open, "reasons": [] if is_open else ["vram_high"],
                               "since": 1.0, "retry_after_s": retry_after_s}))
    tmp.replace(path)
