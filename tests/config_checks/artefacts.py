"""Readers for the shipped monitoring artefacts (rules, runbooks, dashboards) and the PromQL
facts the config checks compare: which metric names an expression reads, which names exist.

Kept apart from the tests so each test states one expectation and the parsing lives once.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from exporter.metrics import SidecarMetrics

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "alerts" / "tts.rules.yaml"
RULE_TESTS = sorted((REPO / "alerts" / "tests").glob("*.yaml"))
RUNBOOKS = REPO / "alerts" / "runbooks.md"
PROMETHEUS_CONFIG = REPO / "config" / "prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "config" / "alertmanager.yml"
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
GRAFANA_CHECK = REPO / "grafana" / "check"

# Series Prometheus itself writes (not the sidecar) that rules may read.
PROMETHEUS_SERIES = frozenset({"up"})

MATCH_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}

# Grafana's built-in variables, replaced by values of the right PromQL type before parsing.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m",
                    "__interval_ms": "15000", "__range_s": "300", "__range_ms": "300000"}


def require_binary(name: str) -> str:
    """Path of a CLI the checks run; skip (with the reason) where it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make test installs it)")
    return path


def load_rules() -> list[dict[str, Any]]:
    """Every rule of alerts/tts.rules.yaml, in file order."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def recording_rule_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def exported_metric_names() -> set[str]:
    """The series names the sidecar exposes, from its own metric definitions."""
    names: set[str] = set()
    for family in SidecarMetrics().metric_set.families():
        if family.kind == "counter":
            names.add(family.name + "_total")
        elif family.kind == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names every vector selector of ``expr`` reads (``{__name__="x"}`` included)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers if node.matchers else []:
                if matcher.name == "__name__":
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, {label: matcher text}) for each vector selector of ``expr``."""
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = node.matchers.matchers if node.matchers else []
            found.append((node.name or "", {
                m.name: MATCH_OPS[str(m.op).rsplit(".", 1)[-1]] + m.value for m in matchers}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def substitute_variables(expr: str) -> str:
    """Grafana variables replaced by what Grafana sends, so the result is plain PromQL:
    built-ins by a duration or number, user variables (``$instance``, ``${instance}``,
    ``[[instance]]``) by a regex that matches anything (they sit in ``=~`` matchers)."""
    def replace(match: re.Match[str]) -> str:
        name = match.group("name") or match.group("braced") or match.group("old")
        return GRAFANA_BUILTINS.get(name, ".*")

    pattern = r"\$\{(?P<braced>\w+)(?::\w+)?\}|\[\[(?P<old>\w+)\]\]|\$(?P<name>\w+)"
    return re.sub(pattern, replace, expr)


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL expression of a dashboard and where it sits, for messages."""

    dashboard: str
    where: str
    expr: str
    raw: dict[str, Any]


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        yield panel


def dashboard_queries(path: Path) -> list[DashboardQuery]:
    """Panel targets and annotation queries of one dashboard (the variable query aside)."""
    dashboard = json.loads(path.read_text())
    queries = [DashboardQuery(path.name, f"panel {panel.get('title')!r}", target["expr"], target)
               for panel in panels(dashboard) for target in panel.get("targets", [])
               if "expr" in target]
    for annotation in dashboard.get("annotations", {}).get("list", []):
        expr = annotation.get("expr") or annotation.get("target", {}).get("expr")
        if expr:
            queries.append(DashboardQuery(path.name, f"annotation {annotation['name']!r}",
                                          expr, annotation))
    return queries


def all_dashboard_queries() -> list[DashboardQuery]:
    return [query for path in DASHBOARDS for query in dashboard_queries(path)]


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {github_anchor(line.lstrip("#")) for line in RUNBOOKS.read_text().splitlines()
            if line.startswith("## ")}


def threshold_table() -> dict[str, dict[str, str]]:
    """Rows of the thresholds table in runbooks.md, by alert name."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in RUNBOOKS.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == "alert":
            header = cells
        elif header and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return rows


def rule_tests() -> list[dict[str, Any]]:
    """Every test case of alerts/tests/*.yaml."""
    return [case for path in RULE_TESTS for case in yaml.safe_load(path.read_text())["tests"]]
