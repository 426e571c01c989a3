"""alerts/: the rules load and pass their promtool unit tests, every alert carries what the
on-call needs (severity, summary, description, a runbook section, a threshold row), and every
rule is covered by a promtool test."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from config.kubernetes import gen_manifests
from tests.config_checks.artefacts import (
    REPO,
    RULE_TESTS,
    RULES,
    alerts,
    exported_metric_names,
    github_anchor,
    load_rules,
    metric_names,
    recording_rule_names,
    require_binary,
    rule_tests,
    runbook_anchors,
    threshold_table,
)

ALERT_NAMES = [rule["alert"] for rule in alerts()]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)


def test_promtool_accepts_the_rules_file() -> None:
    result = run([require_binary("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool tests in alerts/tests/"
    result = run([require_binary("promtool"), "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


@pytest.mark.slow
def test_promtool_unit_tests_catch_a_changed_threshold(tmp_path) -> None:
    """The unit tests pin behaviour: loosening TTSGpuMemoryHigh to 0.99 must fail them."""
    changed = RULES.read_text().replace("gpu:tts_gpu_memory_used:ratio >= 0.90",
                                        "gpu:tts_gpu_memory_used:ratio >= 0.99")
    assert changed != RULES.read_text()
    (tmp_path / "alerts").mkdir()
    (tmp_path / "alerts" / "tts.rules.yaml").write_text(changed)
    tests_dir = tmp_path / "alerts" / "tests"
    tests_dir.mkdir()
    system_tests = REPO / "alerts" / "tests" / "system.yaml"
    (tests_dir / system_tests.name).write_text(system_tests.read_text())
    result = run([require_binary("promtool"), "test", "rules", str(tests_dir / "system.yaml")])
    assert result.returncode != 0
    assert "TTSGpuMemoryHigh" in result.stdout + result.stderr


def test_rule_names_are_unique() -> None:
    names = [rule.get("alert") or rule["record"] for rule in load_rules()]
    assert len(names) == len(set(names))


def test_recording_rules_follow_level_metric_operations() -> None:
    for name in recording_rule_names():
        assert len(name.split(":")) == 3, f"{name}: expected level:metric:operations"
        assert name.split(":")[1].startswith("tts_"), name


@pytest.mark.parametrize("rule", load_rules(), ids=lambda r: r.get("alert") or r["record"])
def test_rules_read_only_exported_or_recorded_series(rule: dict) -> None:
    known = exported_metric_names() | recording_rule_names() | {"up"}
    unknown = metric_names(rule["expr"]) - known
    assert not unknown, f"{rule.get('alert') or rule['record']} reads unknown series {unknown}"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_has_severity_summary_description_and_runbook(alert: dict) -> None:
    assert alert["labels"]["severity"] in {"critical", "warning", "info"}
    annotations = alert["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    base, _, anchor = annotations["runbook_url"].partition("#")
    # Relative to the repository: the manifest generator puts its runbook base URL in front.
    assert base == "alerts/runbooks.md", annotations["runbook_url"]
    assert anchor == github_anchor(alert["alert"])
    assert anchor in runbook_anchors(), f"no section '## {alert['alert']}' in runbooks.md"


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_threshold_table_agrees_with_the_rule(alert: dict) -> None:
    row = threshold_table().get(alert["alert"])
    assert row is not None, f"{alert['alert']} has no row in the runbooks' threshold table"
    assert row["severity"] == alert["labels"]["severity"]
    assert row["for"] == alert.get("for", "—")


def test_threshold_table_lists_no_alert_that_does_not_exist() -> None:
    assert set(threshold_table()) == set(ALERT_NAMES)


def test_gpu_memory_alert_closes_the_ingress_at_the_gates_threshold() -> None:
    """The name and label are a contract with the sidecar and the end-to-end test; the alert
    fires where the shipped sidecar's own gate closes (``>=``, as the gate compares)."""
    alert = next(a for a in alerts() if a["alert"] == "TTSGpuMemoryHigh")
    assert alert["labels"]["action"] == "close_ingress"
    threshold = re.fullmatch(r"gpu:tts_gpu_memory_used:ratio >= ([\d.]+)", alert["expr"].strip())
    assert threshold is not None, alert["expr"]
    sidecar = yaml.safe_load((REPO / "config" / "exporter.yaml").read_text())
    assert float(threshold.group(1)) == sidecar["gate"]["close_at"]
    assert [a["alert"] for a in alerts() if a["labels"].get("action")] == ["TTSGpuMemoryHigh"]


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_every_alert_has_a_firing_and_a_silent_promtool_case(name: str) -> None:
    cases = [check for case in rule_tests() for check in case.get("alert_rule_test", [])
             if check["alertname"] == name]
    assert any(check.get("exp_alerts") for check in cases), f"{name}: never shown firing"
    assert any(not check.get("exp_alerts") for check in cases), f"{name}: never shown silent"


@pytest.mark.parametrize("name", sorted(recording_rule_names()))
def test_every_recording_rule_has_a_promtool_case(name: str) -> None:
    exprs = [check["expr"] for case in rule_tests() for check in case.get("promql_expr_test", [])]
    assert any(name in metric_names(expr) for expr in exprs), f"{name} is not tested"


def test_the_prometheus_rule_takes_a_runbook_base_url() -> None:
    """Issue 19 #2: the runbook links pointed at a repository that does not exist; the manifest
    generator puts the deployment's runbook URL in front of each alert's section."""
    base = "https://runbooks.example.com/tts/runbooks.md"
    rule = yaml.safe_load(gen_manifests.prometheus_rule(base).split("\n", 2)[2])
    urls = {r["alert"]: r["annotations"]["runbook_url"]
            for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r}
    assert urls == {name: f"{base}#{github_anchor(name)}" for name in ALERT_NAMES}
