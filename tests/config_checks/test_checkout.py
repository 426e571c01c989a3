"""Running the shipped configs, or the demo, in a checkout leaves `git status` clean: whatever
they write under the checkout is ignored."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.config_checks.artefacts import REPO


def written_paths() -> list[str]:
    """Relative paths the shipped app and sidecar configs write (files, or a file in a dir)."""
    app: Any = yaml.safe_load((REPO / "config" / "app.yaml").read_text())
    exporter: Any = yaml.safe_load((REPO / "config" / "exporter.yaml").read_text())
    paths = [app["log"]["path"], app["cache"]["dir"] + "/0a/entry.wav", app["gate"]["file"],
             exporter["logs"]["checkpoint_path"], exporter["gate"]["gate_file"],
             "run/demo/app.yaml"]
    assert not any(Path(path).is_absolute() for path in paths)
    return paths


@pytest.mark.parametrize("path", written_paths())
def test_what_the_shipped_configs_write_in_the_checkout_is_ignored(path: str) -> None:
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run([git, "check-ignore", "--no-index", "-q", path], cwd=REPO,
                            check=False, timeout=30)
    assert result.returncode == 0, f"{path} would show as untracked"


def test_the_license_file_is_the_license_pyproject_declares() -> None:
    declared = re.search(r'^license = "([^"]+)"$', (REPO / "pyproject.toml").read_text(),
                         re.MULTILINE)
    assert declared is not None
    assert declared.group(1) == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice
