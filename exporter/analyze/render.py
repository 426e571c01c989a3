"""Human-readable tables for the analyze report and timelines (``--json`` prints the dicts)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from exporter.analyze.reader import Damage


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value).astimezone().isoformat(timespec="milliseconds")


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[_num(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def render_report(data: dict[str, Any], stats: dict[str, Any]) -> str:
    """The summary, one section per question an on-call engineer asks first."""
    lines: list[str] = []
    tr = data["time_range"]
    lines.append(f"Time range: {_ts(tr['first'])} .. {_ts(tr['last'])}")
    lines.append(f"Files: {len(stats['files'])}  lines: {stats['lines']}  records: "
                 f"{stats['records']}  malformed lines: {stats['malformed']}  "
                 f"continuation lines: {stats['continuation']}")
    lines += [f"NOT READ WHOLE: {Damage(**damage)}" for damage in stats["damaged"]]
    lines.append("Records by level: " + ", ".join(f"{k}={v}" for k, v in data["levels"].items()))
    syn = data["syntheses"]
    ratio = syn["failure_ratio"]
    lines.append(f"Syntheses: {syn['total']} ("
                 + ", ".join(f"{k}={v}" for k, v in syn["by_status"].items())
                 + f"), failure ratio {'-' if ratio is None else f'{ratio:.2%}'}")
    d = data["duration_ms"]
    lines.append(f"Synthesis duration ms: P50={_num(d['p50'])} P95={_num(d['p95'])} "
                 f"P99={_num(d['p99'])} mean={_num(d['mean'])} ({d['method']})")
    lines += ["", "Top error codes"]
    lines += table(["code", "count", "share", "first seen", "last seen", "example request"],
                   [[e["code"], e["count"], f"{e['share']:.1%}", _ts(e["first_seen"]),
                     _ts(e["last_seen"]), e["example_request_id"] or "-"]
                    for e in data["error_codes"]])
    lines += ["", "Failures by text length (chars)"]
    lines += table(["length", "syntheses", "failed", "failure", "top error (share)"],
                   [[b["bucket"], b["total"], b["failed"], f"{b['failure_ratio']:.1%}",
                     f"{b['top_error']} ({b['top_error_share']:.0%})" if b["top_error"] else "-"]
                    for b in data["failures_by_text_length"]])
    lines += ["", "Failures by model stage"]
    lines += table(["stage", "failed"], [[k, v] for k, v in data["failures_by_stage"].items()])
    lines += ["", "Stage times (ms)"]
    lines += table(["stage", "count", "mean", "p50", "p99"],
                   [[k, s["count"], s["mean"], s["p50"], s["p99"]]
                    for k, s in data["stages"].items()])
    lines += ["", "Slowest syntheses"]
    lines += table(["request", "duration ms"],
                   [[s["request_id"], s["duration_ms"]] for s in data["slowest"]])
    lines += ["", "Warnings and errors by code (rejections, cache warnings, failures)"]
    lines += table(["level", "code", "count", "first seen", "last seen", "example request"],
                   [[r["level"], r["code"], r["count"], _ts(r["first_seen"]),
                     _ts(r["last_seen"]), r["example_request_id"] or "-"]
                    for r in data["records_by_code"]])
    lines += ["", "Failures and rejections per minute"]
    lines += table(["minute", "failed", "rejected", "gateway 5xx"],
                   [[_ts(m["minute"]), m["failed"], m["rejected"], m["gateway_5xx"]]
                    for m in data["per_minute"]])
    gateway = data["gateway"]
    if gateway is not None:
        lines += ["", f"Gateway status codes ({gateway['requests']} requests)"]
        lines += table(["code", "upstream code", "count"],
                       [[g["code"], g["upstream_code"], g["count"]] for g in gateway["by_code"]])
    return "\n".join(lines) + "\n"


def render_timeline(t: dict[str, Any]) -> str:
    """One request, record by record, offsets from its first timestamp."""
    lines = [f"Request {t['request_id']}: {t['status']}, start {_ts(t['start'])}, "
             f"span {_num(t['span_ms'])} ms, synthesis {_num(t['duration_ms'])} ms"]
    for e in t["records"]:
        fields = ", ".join(f"{k}={v}" for k, v in e["fields"].items())
        off = "-" if e["offset_ms"] is None else f"+{e['offset_ms']:.0f}ms"
        lines.append(f"  {off:>10}  {e['level']:<8} {e['event'] or e['message']}  {fields}")
        for tb in e.get("traceback", []):
            lines.append(f"{'':14}| {tb}")
    if t["stages"]:
        lines += ["", "Stages"]
        lines += table(["stage", "duration ms", "at"],
                       [[s["stage"], s["duration_ms"], s["offset_ms"]] for s in t["stages"]])
    return "\n".join(lines) + "\n"


def dump_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
