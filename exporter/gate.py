"""The ingress gate: shuts the TTS service's front door while VRAM is too high, while an alert
asks for it, or while an operator says so; opens it when no reason is left.

Two layers:

- :class:`Gate`, a pure state machine with injected clocks. Its state is a set of *reasons*
  (``vram``, ``alert:<alertname>``, ``manual``); the gate is open exactly when the set is empty.
  VRAM uses hysteresis: the ``vram`` reason is added as soon as any GPU's used/total reaches
  ``close_at`` and removed only after every GPU has stayed at or below ``reopen_below`` for
  ``reopen_after_s`` without a break, so a load hovering around the threshold cannot make the
  gate flap.
- :class:`GateComponent`, the sidecar part around it: ``GET /ingress`` (for a readiness probe
  or nginx ``auth_request``), ``POST /alertmanager`` (webhook), ``POST /ingress`` (manual
  override), the gate file the app watches, and the ``tts_ingress_*`` metrics.

Failed or stale GPU readings (policy ``gate.on_gpu_failure``). A failed poll breaks the
"continuously below" streak under every policy except ``ignore``. Once the last good reading is
older than ``gpu.stale_after_s`` (a short grace, so one hiccup changes nothing):

- ``close``: add ``vram``: VRAM is unknown, so assume the worst (fail safe). It lifts like any
  ``vram`` reason: after good readings at or below ``reopen_below`` for the hold time.
- ``hold``: keep the last decision (the default: a flaky NVML neither opens a door that VRAM
  closed nor closes a healthy service).
- ``ignore``: treat the failure as a healthy reading (the gate then follows alerts and the
  manual override only).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from exporter.config import AuthConfig, GateConfig
from exporter.files import write_atomically
from exporter.metrics import SidecarMetrics
from exporter.schema import ForeignSchema, InvalidInput, rules, validate
from exporter.server import json_body

log = logging.getLogger("exporter.gate")

VRAM = "vram"
MANUAL = "manual"
ALERT_PREFIX = "alert:"
CLOSE_ACTION = "close_ingress"


@dataclass(frozen=True)
class GateState:
    """What the gate decided: ``since`` is the wall-clock time of the last open/closed change
    (a reason added to an already closed gate does not move it)."""

    open: bool
    reasons: frozenset[str]
    since: float

    def as_dict(self) -> dict[str, Any]:
        return {"open": self.open, "reasons": sorted(self.reasons), "since": self.since}


Listener = Callable[[GateState, GateState], None]


class Gate:
    """The decision, without I/O. Call it from one thread (the sidecar's event loop)."""

    def __init__(
        self,
        close_at: float = 0.90,
        reopen_below: float = 0.85,
        reopen_after_s: float = 30.0,
        on_gpu_failure: str = "hold",
        stale_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if on_gpu_failure not in ("close", "hold", "ignore"):
            raise ValueError(f"on_gpu_failure: expected close, hold or ignore, got "
                             f"{on_gpu_failure!r}")
        self.close_at, self.reopen_below = close_at, reopen_below
        self.reopen_after_s = reopen_after_s
        self.on_gpu_failure = on_gpu_failure
        self.stale_after_s = stale_after_s
        self.clock, self.wall_clock = clock, wall_clock
        self.state = GateState(open=True, reasons=frozenset(), since=wall_clock())
        self._listeners: list[Listener] = []
        self._last_good = clock()  # start-up counts as fresh: the grace applies from boot too
        self._below_since: float | None = None
        self._firing: dict[str, set[str]] = {}

    @classmethod
    def from_config(cls, gate: GateConfig, stale_after_s: float, **clocks: Any) -> Gate:
        return cls(gate.close_at, gate.reopen_below, gate.reopen_after_s, gate.on_gpu_failure,
                   stale_after_s, **clocks)

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after every change of the reason set."""
        self._listeners.append(listener)

    @property
    def reasons(self) -> frozenset[str]:
        return self.state.reasons

    # --- Inputs -----------------------------------------------------------------------------

    def observe_gpus(self, used_ratios: Sequence[float]) -> None:
        """A successful poll: used/total of every GPU (an empty list: no GPUs)."""
        now = self.clock()
        self._last_good = now
        self._apply_vram(used_ratios, now)

    def gpu_failed(self) -> None:
        """A failed or timed-out poll; applies ``on_gpu_failure`` once readings are stale."""
        now = self.clock()
        if self.on_gpu_failure == "ignore":
            self._apply_vram((), now)
            return
        self._below_since = None
        if self.on_gpu_failure == "close" and now - self._last_good >= self.stale_after_s:
            self._set(self.reasons | {VRAM})

    def apply_alerts(self, updates: Iterable[tuple[str, str, bool]]) -> None:
        """``(alertname, alert identity, firing)`` from one webhook call, applied as one change.

        One alert name may fire for several label sets (one per GPU, say); its reason stays
        until every one of them has resolved.
        """
        for name, identity, firing in updates:
            identities = self._firing.setdefault(name, set())
            if firing:
                identities.add(identity)
            else:
                identities.discard(identity)
                if not identities:
                    del self._firing[name]
        others = {r for r in self.reasons if not r.startswith(ALERT_PREFIX)}
        self._set(others | {ALERT_PREFIX + name for name in self._firing})

    def set_manual(self, closed: bool) -> None:
        """The operator's override: add or lift the ``manual`` reason (only that one)."""
        self._set(self.reasons | {MANUAL} if closed else self.reasons - {MANUAL})

    # --- Internals --------------------------------------------------------------------------

    def _apply_vram(self, used_ratios: Sequence[float], now: float) -> None:
        if any(ratio >= self.close_at for ratio in used_ratios):
            self._below_since = None
            self._set(self.reasons | {VRAM})
            return
        if VRAM not in self.reasons:
            return
        if not all(ratio <= self.reopen_below for ratio in used_ratios):
            self._below_since = None
            return
        if self._below_since is None:
            self._below_since = now
        if now - self._below_since >= self.reopen_after_s:
            self._below_since = None
            self._set(self.reasons - {VRAM})

    def _set(self, reasons: Iterable[str]) -> None:
        new_reasons = frozenset(reasons)
        old = self.state
        if new_reasons == old.reasons:
            return
        is_open = not new_reasons
        since = self.wall_clock() if is_open != old.open else old.since
        self.state = GateState(is_open, new_reasons, since)
        for listener in self._listeners:
            listener(old, self.state)


class WebhookError(InvalidInput):
    """An Alertmanager payload that is not version 4 or is malformed; the message says where."""


class _Alert(ForeignSchema, frozen=True):
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    fingerprint: str = ""

    def __post_init__(self) -> None:
        rules(labels=None if self.labels.get("alertname") else "expected an alertname label")


class _Webhook(ForeignSchema, frozen=True):
    """The part of Alertmanager's webhook body (version 4) the gate reads."""

    version: Literal["4"]
    alerts: list[_Alert]


def parse_webhook(payload: Any) -> list[tuple[str, str, bool]]:
    """The gate-relevant alerts of an Alertmanager webhook payload (version 4).

    Validates the whole payload before anything is applied, so a malformed call changes
    nothing. Only alerts labelled ``action="close_ingress"`` are returned; identity is the
    alert's fingerprint (its label set when the fingerprint is missing).
    """
    try:
        webhook = validate(_Webhook, payload)
    except InvalidInput as exc:
        raise WebhookError(exc.problems) from None
    return [(alert.labels["alertname"],
             alert.fingerprint or json.dumps(sorted(alert.labels.items())),
             alert.status == "firing")
            for alert in webhook.alerts if alert.labels.get("action") == CLOSE_ACTION]


class GateComponent:
    """The gate's outputs and HTTP inputs around a :class:`Gate`.

    Every change is published synchronously from the gate's listener: the gate file (JSON
    ``{"open", "reasons", "since", "retry_after_s"}``, written atomically), the metrics and one
    log line, so ``/ingress``, the file and ``/metrics`` agree as soon as the poll that caused it
    returns.
    """

    routes: list[web.RouteDef]

    def __init__(self, gate: Gate, config: GateConfig, auth: AuthConfig,
                 metrics: SidecarMetrics) -> None:
        self.gate = gate
        self.config = config
        self.auth = auth
        self.metrics = metrics
        self.gate_file = Path(config.gate_file)
        self.routes = [
            web.get("/ingress", self.get_ingress),
            web.post("/ingress", self.post_ingress),
            web.post("/alertmanager", self.post_alertmanager),
        ]
        gate.subscribe(self._on_change)

    async def start(self) -> None:
        self.gate_file.parent.mkdir(parents=True, exist_ok=True)
        m = self.metrics
        with m.updating():
            for to in ("open", "closed"):  # both series exist from the start, so rate() works
                m.ingress_transitions.inc((to,), 0.0)
            m.ingress_last_transition.set((), self.gate.state.since)
        self._publish(self.gate.state)

    async def stop(self) -> None:
        """Nothing to release; the gate file keeps the last decision for the app."""

    def _on_change(self, old: GateState, new: GateState) -> None:
        if new.open != old.open:
            log.log(logging.INFO if new.open else logging.WARNING, "ingress %s (reasons: %s)",
                    "opened" if new.open else "closed", ", ".join(sorted(new.reasons)) or "none")
            with self.metrics.updating():
                self.metrics.ingress_transitions.inc(("open" if new.open else "closed",))
                self.metrics.ingress_last_transition.set((), new.since)
        else:
            log.info("ingress still %s; reasons now: %s", "open" if new.open else "closed",
                     ", ".join(sorted(new.reasons)) or "none")
        self._publish(new)

    def _publish(self, state: GateState) -> None:
        m = self.metrics
        with m.updating():
            m.ingress_open.set((), 1.0 if state.open else 0.0)
            m.ingress_closed_reason.clear()
            for reason in state.reasons:
                m.ingress_closed_reason.set((reason,), 1.0)
        body = {**state.as_dict(), "retry_after_s": self.config.retry_after_s}
        try:
            # Not durable: after a crash the sidecar rewrites the file at start.
            write_atomically(self.gate_file, json.dumps(body).encode())
        except OSError as exc:
            # The HTTP answer and the metrics are still right; the app misses this update.
            log.error("cannot write the gate file %s: %s", self.gate_file, exc)
            m.count_error("gate")

    # --- HTTP -------------------------------------------------------------------------------

    async def get_ingress(self, request: web.Request) -> web.Response:
        state = self.gate.state
        if state.open:
            return web.json_response(state.as_dict())
        # nginx's auth_request takes only 2xx, 401 and 403 (anything else becomes its 500): a
        # proxy that says so is answered 403 whatever the configured mode.
        if self.config.mode == "auth_request" or request.query.get("for") == "auth_request":
            return web.json_response(state.as_dict(), status=403)
        return web.json_response(state.as_dict(), status=503,
                                 headers={"Retry-After": str(self.config.retry_after_s)})

    async def post_ingress(self, request: web.Request) -> web.Response:
        refused = self._refuse_unauthorised(request)
        if refused is not None:
            return refused
        body = await json_body(request)
        action = body.get("action") if isinstance(body, dict) else None
        reason = body.get("reason", "") if isinstance(body, dict) else None
        if action not in ("close", "open") or not isinstance(reason, str) or (
                action == "close" and not reason.strip()):
            return _error(400, 'expected {"action": "close"|"open", "reason": "why"} '
                               "(a reason is required to close)")
        log.warning("manual override from %s: %s ingress (%s)", request.remote, action,
                    reason or "no reason given")
        self.gate.set_manual(closed=action == "close")
        return web.json_response(self.gate.state.as_dict())

    async def post_alertmanager(self, request: web.Request) -> web.Response:
        refused = self._refuse_unauthorised(request)
        if refused is not None:
            return refused
        try:
            updates = parse_webhook(await json_body(request))
        except WebhookError as exc:
            return _error(400, f"malformed Alertmanager payload: {exc}")
        self.gate.apply_alerts(updates)
        return web.json_response(self.gate.state.as_dict())

    def _refuse_unauthorised(self, request: web.Request) -> web.Response | None:
        try:
            token = self.auth.token()
        except OSError as exc:
            log.error("cannot read auth.bearer_token_file: %s", exc)
            token = ""
        if not token:
            return _error(403, "no bearer token configured (auth.bearer_token or "
                               "auth.bearer_token_file); this route is disabled")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # Bytes on both sides: compare_digest refuses non-ASCII str, and a header may carry any
        # byte (aiohttp hands undecodable ones over as surrogates).
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogatepass"), token.encode()):
            return _error(401, "missing or wrong bearer token",
                          {"WWW-Authenticate": 'Bearer realm="tts-exporter"'})
        return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
