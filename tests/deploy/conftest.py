"""Shared helpers for the deployment tests: the repo root and the local stack orchestrator."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "config") not in sys.path:
    sys.path.insert(0, str(REPO / "config"))
