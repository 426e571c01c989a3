"""How long a newcomer waits for `make run`: from the command to its first printed URL, on a
fresh clone with no venv and no pip cache; then how long the demo takes to stop on a signal, and
whether anything it started is left running.

    .venv/bin/python tests/bench/time_make_run.py            # fresh clone of HEAD, fresh .venv
    .venv/bin/python tests/bench/time_make_run.py --quick    # this checkout, its .venv as it is
    .venv/bin/python tests/bench/time_make_run.py -- PYTHON=/usr/bin/python3   # make variables

Not part of `make bench` (it installs a venv). Debian packages are installed only when missing,
so on a machine that has them the figure leaves out apt-get.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def clean_env() -> dict[str, str]:
    """The environment of a new shell: no activated venv, no pip cache, no PYTHONPATH."""
    env = dict(os.environ, PIP_NO_CACHE_DIR="1")
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    env["PATH"] = os.pathsep.join(part for part in env["PATH"].split(os.pathsep)
                                  if "/.venv/" not in part + "/")
    return env


def leftovers(checkout: Path) -> list[str]:
    """Processes still running whose command line names the checkout (the demo's children)."""
    found = subprocess.run(["pgrep", "-af", str(checkout.resolve())], capture_output=True,
                           text=True, check=False).stdout.splitlines()
    return [line for line in found if str(os.getpid()) != line.split()[0]
              and Path(__file__).name not in line]


def time_make_run(checkout: Path, make_args: list[str], stop: signal.Signals) -> int:
    started = time.monotonic()
    make = subprocess.Popen(
        ["make", "run", *make_args], cwd=checkout, env=clean_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # a terminal's Ctrl-C reaches a foreground job even where this script's SIGINT is ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert make.stdout is not None
    first_url = None
    for line in make.stdout:
        print(f"[{time.monotonic() - started:6.1f} s] {line.rstrip()}", flush=True)
        if "http://" in line:
            first_url = time.monotonic() - started
            break
    if first_url is None:
        print(f"make run exited with {make.wait()} before printing a URL")
        return 1
    time.sleep(3)
    stopping = time.monotonic()
    os.killpg(make.pid, stop)  # as a terminal's Ctrl-C, or `timeout`, reaches the whole job
    try:
        make.wait(60)
    except subprocess.TimeoutExpired:
        print("make run did not exit within 60 s")
    stop_s = time.monotonic() - stopping
    for line in make.stdout:
        print(f"    {line.rstrip()}")
    time.sleep(1)
    left = leftovers(checkout)
    print(f"\nfirst URL after {first_url:.1f} s; {stop.name} to exit {stop_s:.1f} s; "
          f"left running: {len(left)}")
    for line in left:
        print(f"  {line}")
    return 1 if left else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="this checkout and its venv as they are (measures the start only)")
    parser.add_argument("--signal", default="SIGINT", choices=["SIGINT", "SIGTERM", "SIGHUP"])
    parser.add_argument("make_args", nargs="*", help="after --: variables for make")
    args = parser.parse_args()
    stop = signal.Signals[args.signal]
    if args.quick:
        return time_make_run(REPO, args.make_args, stop)
    with tempfile.TemporaryDirectory(prefix="tts-first-run-") as scratch:
        checkout = Path(scratch) / "tts-sentinel"
        subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
        return time_make_run(checkout, args.make_args, stop)


if __name__ == "__main__":
    sys.exit(main())
