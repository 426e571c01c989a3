"""The contract between the app and the sidecar: what the app served, the sidecar counts exactly.

Real processes on loopback: the app (espeak backend) writes its JSON log, the sidecar tails it,
and the client's own tally of responses must equal the sidecar's counters, request for request.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.local_stack import Stack, StackOptions, http_get, wait_until


def scrape(stack) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = http_get(stack.url("exporter", "/metrics"))
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def total(samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


@pytest.mark.slow
@pytest.mark.external
def test_sidecar_counts_exactly_what_the_app_served(tmp_path: Path) -> None:
    options = StackOptions(prometheus=False, alertmanager=False)
    with Stack(tmp_path, options) as stack:
        codes: collections.Counter[int] = collections.Counter()
        texts = ["Contract test one.", "Contract test two.", "Contract test one.",
                 "", "x" * 5000, "bad\x00char", "Contract test three."]
        for text in texts:
            status, _, _ = stack.synthesize(text)
            codes[status] += 1
        status, _, _ = stack.synthesize("Unknown voice test.", voice="no-such-voice")
        codes[status] += 1
        assert codes[200] == 4, codes
        synthesised = 4  # three distinct texts, one repeat served from the cache

        def counted() -> bool:
            got = scrape(stack)
            return total(got, "tts_http_requests_total", route="/v1/tts") == sum(codes.values())

        wait_until(counted, timeout=10, what="sidecar to count every request")
        got = scrape(stack)
        for code, n in codes.items():
            assert total(got, "tts_http_requests_total", route="/v1/tts", code=str(code)) == n
        assert total(got, "tts_syntheses_total", status="success") == synthesised
        assert total(got, "tts_cache_hits_total") == 1
        assert total(got, "tts_http_request_duration_seconds_count", route="/v1/tts") == \
            sum(codes.values())
        assert total(got, "tts_exporter_log_lines_total", outcome="malformed") == 0

        lines = (tmp_path / "logs" / "tts-app.log").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        served = sum(1 for r in records if r.get("event") == "http_request"
                     and r.get("route") == "/v1/tts")
        assert served == sum(codes.values())
        assert total(got, "tts_exporter_log_lines_total") == len(lines)
