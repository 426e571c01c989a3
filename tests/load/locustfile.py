"""Locust load test of the TTS app that cannot be fooled by a 200 (issue 20).

The mix: cache hits (a few hot texts), misses (unique texts), async jobs polled to the end,
and malformed requests. Every answer is judged by tests/load/classify.py: success only for
a valid WAV of plausible length with energy above the silence floor; shed and failed by the
error code in the body (never the status alone). Locust's own failure list carries shed and
failed with their reasons; the summary printed at the end counts them apart:

    locust -f tests/load/locustfile.py --headless -u 20 -r 10 -t 30s --host http://HOST:PORT \
        [--summary-json out.json]

``make load`` starts the local stack (app + sidecar) and runs this. The exit code is 1 when
anything failed (shed is not a failure: it is the service protecting itself).
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

from tests.load.classify import (
    Outcome,
    Verdict,
    classify_audio,
    classify_job_error,
    classify_rejection,
)

HOT_TEXTS = ["Hello, and welcome to the service.", "Your order has been shipped.",
             "Please hold while we connect you.", "The meeting starts in five minutes."]
WORDS = ["amber", "river", "quiet", "signal", "forest", "copper", "morning", "engine", "paper",
         "window", "silver", "harbor", "garden", "thunder", "velvet", "canyon"]
BAD_BODIES: list[tuple[str, bytes]] = [
    ("not json", b"{this is not json"),
    ("empty text", json.dumps({"text": "   "}).encode()),
    ("text a number", json.dumps({"text": 12345}).encode()),
    ("unknown voice", json.dumps({"text": "Hello.", "voice": "no-such-voice"}).encode()),
    ("unknown language", json.dumps({"text": "Hello.", "lang": "xx"}).encode()),
    ("control characters", json.dumps({"text": "bell \u0007 here"}).encode()),
    ("text too long", json.dumps({"text": "long " * 1000}).encode()),
    ("nested params", json.dumps({"text": "Hi.", "params": {"seed": [[[[1]]]]}}).encode()),
    ("non-finite", b'{"text": "Hi.", "params": {"temperature": NaN}}'),
]
JOB_TIMEOUT_S = 60.0
# (kind, outcome) -> count; one process, so a plain Counter is enough.
TALLY: Counter[tuple[str, Outcome]] = Counter()
_unique = itertools.count()


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--summary-json", default="", help="also write the summary here")


def record(kind: str, verdict: Verdict, response: Any, expected: Outcome = "success") -> None:
    TALLY[kind, verdict.outcome] += 1
    if verdict.outcome == expected:
        response.success()
    else:
        response.failure(f"{verdict.outcome}: {verdict.reason}")


class TtsUser(HttpUser):
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        # Each simulated user is its own client for the per-client rate limit.
        self.client.headers["X-Client-ID"] = f"locust-{id(self):x}"

    def speak(self, kind: str, text: str) -> None:
        with self.client.post("/v1/tts", json={"text": text}, name=kind,
                              catch_response=True) as response:
            record(kind, classify_audio(response.status_code, response.content, text), response)

    @task(5)
    def cache_hit(self) -> None:
        self.speak("hit", random.choice(HOT_TEXTS))

    @task(3)
    def miss(self) -> None:
        words = " ".join(random.choices(WORDS, k=6))
        self.speak("miss", f"Request {next(_unique)}: the {words}.")

    @task(2)
    def job(self) -> None:
        text = f"Job {next(_unique)} reads {' '.join(random.choices(WORDS, k=5))}."
        with self.client.post("/v1/tts/jobs", json={"text": text}, name="job submit",
                              catch_response=True) as response:
            if response.status_code != 202:
                record("job", classify_audio(response.status_code, response.content, text),
                       response)
                return
            response.success()
            url = response.json()["status_url"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.client.get(url, headers={"Accept": "application/json"},
                                 name="job poll", catch_response=True) as poll:
                if poll.status_code != 200:
                    record("job", classify_audio(poll.status_code, poll.content, text), poll)
                    return
                try:
                    state = poll.json()
                except ValueError:
                    record("job", Verdict("failed", "job status is not JSON"), poll)
                    return
                if state.get("status") == "failed":
                    record("job", classify_job_error(state.get("error")), poll)
                    return
                poll.success()
            if state.get("status") == "done":
                with self.client.get(url, name="job audio", catch_response=True) as audio:
                    record("job", classify_audio(audio.status_code, audio.content, text), audio)
                return
            time.sleep(0.1)
        TALLY["job", "failed"] += 1
        events.request.fire(request_type="GET", name="job audio", response_time=0,
                            response_length=0, exception=TimeoutError("job never finished"))

    @task(1)
    def bad_request(self) -> None:
        label, body = random.choice(BAD_BODIES)
        with self.client.post("/v1/tts", data=body, name=f"bad: {label}",
                              headers={"Content-Type": "application/json"},
                              catch_response=True) as response:
            record("bad", classify_rejection(response.status_code, response.content),
                   response, expected="rejected")


def summary(environment: Environment) -> dict[str, Any]:
    total = environment.stats.total
    outcomes = Counter(outcome for (_, outcome) in TALLY.elements())
    return {"requests": total.num_requests, "rps": round(total.total_rps, 1),
            "p50_ms": total.get_response_time_percentile(0.5),
            "p99_ms": total.get_response_time_percentile(0.99),
            "success": outcomes["success"], "rejected": outcomes["rejected"],
            "shed": outcomes["shed"], "failed": outcomes["failed"],
            "by_kind": {f"{kind}/{outcome}": n for (kind, outcome), n in sorted(TALLY.items())}}


@events.quitting.add_listener
def _summary(environment: Environment, **_: Any) -> None:
    result = summary(environment)
    print("tts load summary: " + " ".join(f"{k}={v}" for k, v in result.items()
                                          if k != "by_kind"))
    print("tts load by kind: " + json.dumps(result["by_kind"]))
    path = environment.parsed_options.summary_json if environment.parsed_options else ""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    environment.process_exit_code = 1 if result["failed"] else 0
