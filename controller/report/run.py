"""Reading a run directory: telemetry.jsonl, decisions.jsonl, summary.json and, while the run is
live, the controller's /metrics (for the cap and the budgets). A log's torn last line is skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.controller.channel_security import channel_opener
from trainwarden.controller.protocol import NONFINITE_TEXT
from trainwarden.controller.runlog import DECISIONS_FILE, TELEMETRY_FILE, read_jsonl

INSTALL_HINT = "pip install 'trainwarden[report]'"


class ReportError(Exception):
    """The report cannot be made; the message says why and what to do."""


# ---- reading the run directory -------------------------------------------------------------------
@dataclass
class Budget:
    """One budget's spend, as last known: `fraction` spent at `elapsed_s` and `tokens`."""

    name: str
    fraction: float
    elapsed_s: float
    tokens: float


@dataclass
class Run:
    run_dir: Path
    run_id: str
    steps: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    summary: dict[str, Any] | None
    shape: dict[str, Any] | None
    cap_bytes: int | None
    budgets: list[Budget] = field(default_factory=list)
    live: bool = False
    """Cap and budgets came from the running controller's /metrics."""

    @property
    def finished(self) -> bool:
        return bool(self.summary and self.summary.get("finished"))

    @property
    def start_time(self) -> float:
        first = self.steps[0]
        return float(first["time"]) - float(first.get("step_time_s") or 0.0)

    def elapsed(self, rec: dict[str, Any]) -> float:
        return float(rec["time"]) - self.start_time

    def knobs(self) -> list[str]:
        """Knobs with a numeric value in the telemetry, in the order the job reported them."""
        out: list[str] = []
        for rec in self.steps:
            for k, v in (rec.get("config") or {}).items():
                if k not in out and _number(v) is not None:
                    out.append(k)
        return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or being written
    return data if isinstance(data, dict) else None


def _live_metrics(run_dir: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """One scrape of the running controller's /metrics, or None when it does not answer."""
    ready = _read_json(run_dir / "controller.json")
    if not ready or not isinstance(ready.get("metrics"), str):
        return None
    try:
        # Not through an http_proxy from the environment (as the channel): loopback stays local.
        with channel_opener(ready["metrics"]).open(ready["metrics"], timeout=1.0) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    except ValueError:
        return None
    return out


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    telemetry = run_dir / TELEMETRY_FILE
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory (give the run directory `trainwarden run` printed)")
    if not telemetry.exists():
        raise ReportError(
            f"{run_dir} has no {TELEMETRY_FILE}: it is not a trainwarden run directory, "
            "or its job has not connected yet"
        )
    steps: dict[int, dict[str, Any]] = {}
    shape = None
    for rec in read_jsonl(telemetry):
        if rec.get("event") == "hello" and isinstance(rec.get("shape"), dict):
            shape = shape or rec["shape"]
        elif rec.get("event") == "step" and isinstance(rec.get("step"), int) and "time" in rec:
            steps.setdefault(rec["step"], _finite_text_to_float(rec))
    if not steps:
        raise ReportError(f"{telemetry} has no step yet: nothing to plot (run the report again later)")
    ordered = [steps[s] for s in sorted(steps)]
    decisions_path = run_dir / DECISIONS_FILE
    decisions = list(read_jsonl(decisions_path)) if decisions_path.exists() else []
    decisions = [d for d in decisions if isinstance(d.get("step"), int) and isinstance(d.get("kind"), str)]
    decisions.sort(key=lambda d: (d["step"], d.get("time", 0.0)))
    summary = _read_json(run_dir / "summary.json")
    run_id = str((summary or {}).get("run_id") or (shape or {}).get("run_id") or run_dir.name)
    run = Run(run_dir, run_id, ordered, decisions, summary, shape, cap_bytes=None)
    last = ordered[-1]
    if summary is not None:
        run.cap_bytes = summary.get("memory_cap_bytes")
        b = summary.get("budget")
        if isinstance(b, dict) and b.get("fraction"):
            run.budgets = [
                Budget(b["name"], float(b["fraction"]), run.elapsed(last), float(last.get("tokens") or 0))
            ]
    else:
        live = _live_metrics(run_dir)
        if live is not None:
            run.live = True
            cap = [v for (n, _), v in live.items() if n == "trainwarden_device_memory_cap_bytes"]
            run.cap_bytes = int(cap[0]) if cap else None
            elapsed = next((v for (n, _), v in live.items() if n == "trainwarden_elapsed_seconds"), None)
            tokens = next((v for (n, _), v in live.items() if n == "trainwarden_tokens_total"), None)
            for (n, labels), v in sorted(live.items()):
                if n == "trainwarden_budget_spent_ratio" and v > 0:
                    run.budgets.append(
                        Budget(
                            dict(labels)["budget"],
                            v,
                            elapsed if elapsed is not None else run.elapsed(last),
                            tokens if tokens is not None else float(last.get("tokens") or 0),
                        )
                    )
    return run


def _finite_text_to_float(rec: dict[str, Any]) -> dict[str, Any]:
    """A step line as the plots take it: a non-finite loss (written "NaN"/"Infinity" in the logs,
    strict JSON; or a bare NaN by an older controller) is no point on a curve, like a missing one."""
    for key in ("loss", "eval_loss"):
        v = rec.get(key)
        if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)):
            rec[key] = None
    for key in ("lr", "time", "step_time_s"):
        v = rec.get(key)
        if isinstance(v, str) and v in NONFINITE_TEXT:
            rec[key] = NONFINITE_TEXT[v]
    losses = rec.get("domain_loss")
    if isinstance(losses, dict):
        rec["domain_loss"] = {
            k: v for k, v in losses.items() if isinstance(v, (int, float)) and math.isfinite(v)
        }
    return rec
