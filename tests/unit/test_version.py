"""One version, pyproject.toml's: the sidecar and the app both report it from the package
metadata (neither imports the other)."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import exporter
import tts_app

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_installed_metadata_carries_the_version_pyproject_declares() -> None:
    # a regex, not tomllib: the package supports Python 3.10, which lacks it
    declared = re.search(r'^version = "([^"]+)"$', PYPROJECT.read_text(), re.MULTILINE)
    assert declared is not None
    assert version("tts-sentinel") == declared.group(1)


def test_the_sidecar_and_the_app_report_the_package_version() -> None:
    assert exporter.__version__ == tts_app.__version__ == version("tts-sentinel")
