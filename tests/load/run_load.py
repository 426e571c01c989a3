"""``make load``: start the local stack (app + sidecar, shipped configs) and run the locustfile.

    python tests/load/run_load.py [--users 20] [--spawn-rate 10] [--run-time 30s]

Prints Locust's headless stats and the classified summary (tests/load/locustfile.py); exits
with Locust's code (1 when any response failed).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.local_stack import Stack, StackOptions

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "tests" / "load" / "locustfile.py"


def locust_command(host: str, users: int, spawn_rate: float, run_time: str,
                   summary_json: Path | None = None) -> list[str]:
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
               "--host", host, "-u", str(users), "-r", str(spawn_rate), "-t", run_time,
               "--stop-timeout", "10", "--only-summary"]
    return command + (["--summary-json", str(summary_json)] if summary_json else [])


def locust_environment() -> dict[str, str]:
    """The locustfile imports tests.load.classify: the repository must be importable."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), path) if p)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--run-time", default="30s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tts-load-") as workdir:
        options = StackOptions(prometheus=False, alertmanager=False)
        with Stack(Path(workdir), options) as stack:
            command = locust_command(stack.url("app"), args.users, args.spawn_rate,
                                     args.run_time)
            print("$ " + " ".join(command), flush=True)
            return subprocess.run(command, env=locust_environment(), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
