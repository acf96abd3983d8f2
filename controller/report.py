"""`trainwarden report RUN_DIR`: what happened in a run, as PNG plots and one HTML page.

Reads the run directory the controller writes (telemetry.jsonl, decisions.jsonl and, once the
run is over, summary.json) and draws, against the optimizer step: the loss (and per-domain
loss), memory per rank against the cap, throughput and step time, the configuration the job ran
with (every knob), and the budget burn-down against wall time. Every decision is marked on every
plot by a numbered vertical line, and listed with its reason. The HTML page embeds the images
(base64 data URIs): one file to attach to a ticket or open from a laptop.

A running run works too: the last line of a log may be torn (it is skipped), and where there is
no summary.json yet the cap and the budgets are read from the live controller's /metrics (its
address is in controller.json), when it answers.

Matplotlib is an optional extra (`pip install 'trainwarden[report]'`). Figures are drawn with
matplotlib's object API on the Agg canvas: no pyplot, no global backend switched in the caller.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.controller.channel_security import channel_opener
from trainwarden.controller.protocol import NONFINITE_TEXT
from trainwarden.controller.runlog import DECISIONS_FILE, TELEMETRY_FILE, read_jsonl
from trainwarden.policies.units import format_bytes, format_duration

INSTALL_HINT = "pip install 'trainwarden[report]'"
#: Raw points drawn per series at most; longer series are thinned (smoothed lines use every point).
MAX_POINTS = 4000
DPI = 110
WIDTH_IN = 11.0

KIND_COLORS = {
    "micro_batch_size": "#1f77b4",
    "lr_multiplier": "#9467bd",
    "stop": "#222222",
}
OTHER_COLORS = ["#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
CAP_COLOR = "#d62728"
BAD_OUTCOMES = ("rejected", "rolled_back")


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


# ---- what happened, in words -------------------------------------------------------------------
def _value(d: dict[str, Any]) -> str:
    params = d.get("params") or {}
    if "value" in params:
        v = params["value"]
        return f"{v:g}" if isinstance(v, float) else str(v)
    return "yes" if d.get("kind") == "stop" else json.dumps(params)


@dataclass
class Group:
    """Consecutive decisions of one knob with one outcome: drawn as one label, listed as one line."""

    first: int
    """1-based number of its first decision."""
    decisions: list[dict[str, Any]]

    @property
    def label(self) -> str:
        n = len(self.decisions)
        return str(self.first) if n == 1 else f"{self.first}-{self.first + n - 1}"

    @property
    def kind(self) -> str:
        return str(self.decisions[0]["kind"])

    @property
    def outcome(self) -> str:
        return str(self.decisions[0].get("outcome", "?"))


def group_decisions(decisions: Sequence[dict[str, Any]]) -> list[Group]:
    groups: list[Group] = []
    for i, d in enumerate(decisions, start=1):
        g = groups[-1] if groups else None
        if g and g.kind == d["kind"] and g.outcome == d.get("outcome") and d["kind"] != "stop":
            g.decisions.append(d)
        else:
            groups.append(Group(i, [d]))
    return groups


def describe_group(g: Group) -> str:
    d0, d1 = g.decisions[0], g.decisions[-1]
    where = f"step {d0['step']}" if len(g.decisions) == 1 else f"steps {d0['step']}-{d1['step']}"
    if len(g.decisions) == 1:
        what = f"{g.kind} = {_value(d0)}" if g.kind != "stop" else "stop"
        return f"#{g.label}  {where}: {what} ({g.outcome}): {d0.get('reason', '')}"
    return (
        f"#{g.label}  {where}: {g.kind} {_value(d0)} -> {_value(d1)} in {len(g.decisions)} decisions "
        f"({g.outcome}); first: {d0.get('reason', '')}; last: {d1.get('reason', '')}"
    )


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


def headline(run: Run) -> list[str]:
    """A few sentences: what a person should know about the run in ten seconds."""
    first, last = run.steps[0], run.steps[-1]
    lines = []
    status = "finished" if run.finished else ("running" if run.summary is None else "ended")
    loss0, loss1 = first.get("loss"), last.get("loss")
    lines.append(
        f"Run {run.run_id} ({status}): {last['step']} steps, {_count(last.get('tokens'))} tokens in "
        f"{format_duration(run.elapsed(last))}"
        + (f"; loss {loss0:.3f} -> {loss1:.3f}." if loss0 is not None and loss1 is not None else ".")
    )
    peak = max((m.get("peak_bytes", 0) for r in run.steps for m in r.get("memory") or []), default=0)
    if peak:
        cap = f" against a cap of {format_bytes(run.cap_bytes)}" if run.cap_bytes else ""
        end_peak = _last_peak(run)
        lines.append(
            f"Memory peaked at {format_bytes(peak)} per rank{cap}"
            + (f"; at the end {format_bytes(end_peak)}." if end_peak and end_peak != peak else ".")
        )
    applied = [d for d in run.decisions if d.get("outcome") == "applied"]
    for knob in run.knobs():
        changes = [d for d in applied if d["kind"] == knob]
        if not changes or knob == "stop":
            continue
        start = (first.get("config") or {}).get(knob)
        values = [_value(d) for d in changes]
        shown = values if len(values) <= 6 else [*values[:2], "...", *values[-2:]]
        start_s = f"{start:g}" if isinstance(start, float) else str(start)
        lines.append(
            f"{knob}: {' -> '.join([start_s, *shown])} ({len(changes)} decision{'s' * (len(changes) > 1)}, "
            f"from step {changes[0]['step']})."
        )
    stops = [d for d in applied if d["kind"] == "stop"]
    if stops:
        lines.append(f"Stopped at step {stops[0]['step']}: {stops[0].get('reason', '')}.")
        if stops[0].get("detail"):
            lines.append(f"{stops[0]['detail'][0].upper()}{stops[0]['detail'][1:]}.")
    ignored = [d for d in run.decisions if d.get("kind") == "stop" and d.get("outcome") == "ignored"]
    if ignored:
        lines.append(
            f"THE STOP AT STEP {ignored[0]['step']} WAS IGNORED: the job trained on outside its budget "
            "(it does not read should_stop and the policy file says `controller.stop: cooperative`)."
        )
    bad = [d for d in run.decisions if d.get("outcome") in BAD_OUTCOMES]
    if bad:
        lines.append(f"{len(bad)} decision(s) not carried out (rejected or rolled back): see the table.")
    if not run.decisions:
        lines.append("The controller made no decision.")
    for b in run.budgets:
        lines.append(f"Budget {b.name}: {b.fraction:.0%} spent.")
    return lines


def _last_peak(run: Run) -> int:
    for rec in reversed(run.steps):
        mem = rec.get("memory") or []
        if mem:
            return max(m.get("peak_bytes", 0) for m in mem)
    return 0


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


# ---- drawing ----------------------------------------------------------------------------------
def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(
            f"the report draws its plots with matplotlib, which is not installed: {INSTALL_HINT}"
        ) from exc
    matplotlib.rcParams.update({"font.size": 9, "axes.titlesize": 11, "axes.titleweight": "bold"})
    return Figure


def _thin(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(xs) <= MAX_POINTS:
        return list(xs), list(ys)
    k = math.ceil(len(xs) / MAX_POINTS)
    return list(xs[::k]), list(ys[::k])


def _window(run: Run) -> int:
    """Steps a smoothed line averages over: none on a short run, up to 50 on a long one."""
    return max(1, min(50, len(run.steps) // 40))


def _smooth(values: Sequence[float], w: int) -> list[float]:
    """Centred moving average over `w` points (no lag, unlike an EMA), shrinking at the ends."""
    if w <= 1:
        return list(values)
    h = w // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    n = len(values)
    return [
        (prefix[min(n, i + h + 1)] - prefix[max(0, i - h)]) / (min(n, i + h + 1) - max(0, i - h))
        for i in range(n)
    ]


def _kind_color(kind: str, kinds: Sequence[str]) -> str:
    if kind in KIND_COLORS:
        return KIND_COLORS[kind]
    others = sorted(k for k in kinds if k not in KIND_COLORS)
    return OTHER_COLORS[others.index(kind) % len(OTHER_COLORS)] if kind in others else "#7f7f7f"


def _decision_color(d: dict[str, Any], kinds: Sequence[str]) -> str:
    return CAP_COLOR if d.get("outcome") in BAD_OUTCOMES else _kind_color(d["kind"], kinds)


def _label_clusters(
    run: Run, x_of: Callable[[dict[str, Any]], float], span: float
) -> list[tuple[str, float, str]]:
    """(label, x, colour) per cluster: neighbouring decisions of one knob and outcome closer than
    2% of the axis share a label ("3-7"), so a cooldown of many small steps stays readable."""
    kinds = sorted({d["kind"] for d in run.decisions})
    out: list[tuple[str, float, str]] = []
    first = last = 0
    for i, d in enumerate(run.decisions, start=1):
        prev = run.decisions[i - 2] if i > 1 else None
        if (
            prev is not None
            and prev["kind"] == d["kind"]
            and prev.get("outcome") == d.get("outcome")
            and (x_of(d) - x_of(prev)) <= 0.02 * span
        ):
            last = i
            label = f"{first}-{last}"
            out[-1] = (label, out[-1][1], out[-1][2])
            continue
        first = last = i
        out.append((str(i), x_of(d), _decision_color(d, kinds)))
    return out


def _mark_decisions(axes: Sequence[Any], run: Run, x_of: Callable[[dict[str, Any]], float]) -> None:
    """A vertical line per decision on every axis (dashed: applied; dotted: anything else, red
    when rejected or rolled back); numbered labels along the top of the first axis."""
    kinds = sorted({d["kind"] for d in run.decisions})
    for ax in axes:
        for d in run.decisions:
            ax.axvline(
                x_of(d),
                color=_decision_color(d, kinds),
                linestyle="--" if d.get("outcome") == "applied" else ":",
                linewidth=1.0,
                alpha=0.8,
                zorder=1,
            )
    if not axes or not run.decisions:
        return
    top = axes[0]
    xmin, xmax = top.get_xlim()
    span = (xmax - xmin) or 1.0
    rows: list[float] = []  # right end (axes fraction) of the last label in each row
    for label, x, color in _label_clusters(run, x_of, span):
        pos = (x - xmin) / span
        width = 0.008 + 0.0075 * len(label)
        row = next((r for r, end in enumerate(rows) if pos > end + 0.004), len(rows))
        if row == len(rows):
            rows.append(0.0)
        rows[row] = pos + width
        at_right = pos + width > 1.0  # near the right edge: the label goes left of its line
        top.annotate(
            label,
            xy=(x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-2 if at_right else 2, -3 - 13 * (row % 4)),
            textcoords="offset points",
            ha="right" if at_right else "left",
            va="top",
            fontsize=8,
            fontweight="bold",
            color="white",
            bbox={"boxstyle": "round,pad=0.2", "fc": color, "ec": "none", "alpha": 0.95},
            zorder=5,
        )


def decision_lines(run: Run, width: int = 150, max_lines: int = 16) -> list[str]:
    """The numbered decisions with their reasons: one each, or one per run of a knob when many."""
    lines: list[str] = []
    if len(run.decisions) <= 12:
        entries = [describe_group(Group(i, [d])) for i, d in enumerate(run.decisions, start=1)]
    else:
        entries = [describe_group(g) for g in group_decisions(run.decisions)]
    for entry in entries:
        lines.extend(textwrap.wrap(entry, width, subsequent_indent="       "))
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], f"... {len(run.decisions)} decisions in all: see report.html"]
    return lines or ["No decision was made in this run."]


def _short(knob: str) -> str:
    """A knob's name for a legend: `gradient_accumulation_steps` -> `grad. accumulation`."""
    return {"gradient_accumulation_steps": "grad. accumulation", "micro_batch_size": "micro-batch"}.get(
        knob, knob
    )


def _legend(ax: Any, **kw: Any) -> None:
    """The legend outside the plot, on the right: it never hides a line or a decision label."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False, **kw)


def _bytes_axis(ax: Any, top: float) -> None:
    """Ticks at round numbers of MiB or GiB."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    scale = 2**30 if top >= 2 * 2**30 else 2**20
    unit = "GiB" if scale == 2**30 else "MiB"
    ticks = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(0, top / scale)
    ax.set_yticks([v * scale for v in ticks if 0 <= v * scale <= top])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / scale:g} {unit}" if v > 0 else "0"))


def _steps_axis(ax: Any, run: Run) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(run.steps[0]["step"] - 0.5, run.steps[-1]["step"] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.grid(True, alpha=0.25)


def _new(
    Figure: Any, height: float, rows: int = 1, ratios: Sequence[float] | None = None
) -> tuple[Any, list[Any]]:
    fig = Figure(figsize=(WIDTH_IN, height), dpi=DPI)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": ratios})
    return fig, [a[0] for a in axes]


def _title(run: Run, what: str) -> str:
    return f"{what}: run {run.run_id}" + (" (running)" if run.summary is None else "")


def _headroom(ax: Any, lo: float, hi: float, top: float = 0.22) -> None:
    """y limits with room above the data for the decision labels."""
    pad = (hi - lo) or abs(hi) or 1.0
    ax.set_ylim(lo - 0.05 * pad, hi + top * pad)


def plot_loss(run: Run, Figure: Any) -> Any:
    fig, (ax,) = _new(Figure, 4.6)
    w = _window(run)
    xs = [float(r["step"]) for r in run.steps if r.get("loss") is not None]
    ys = [float(r["loss"]) for r in run.steps if r.get("loss") is not None]
    smoothed = "" if w == 1 else f", mean of {w} steps"
    if xs:
        if w > 1:
            tx, ty = _thin(xs, ys)
            ax.plot(tx, ty, color="#444444", alpha=0.25, linewidth=0.8, label="loss per step")
        ax.plot(xs, _smooth(ys, w), color="black", linewidth=2.2, label=f"loss{smoothed}")
        _headroom(ax, min(_smooth(ys, w)), max(ys if w > 1 else _smooth(ys, w)))
    domains = sorted({k for r in run.steps for k in (r.get("domain_loss") or {})})
    palette = ["#ff7f0e", "#2ca02c", "#17becf", "#e377c2", "#8c564b", "#bcbd22"]
    for i, dom in enumerate(domains):
        pts = [
            (float(r["step"]), float(r["domain_loss"][dom]))
            for r in run.steps
            if dom in (r.get("domain_loss") or {})
        ]
        ax.plot(
            [p[0] for p in pts],
            _smooth([p[1] for p in pts], w),
            color=palette[i % len(palette)],
            linewidth=1.4,
            label=f"domain {dom}",
        )
    return _finish_step_plot(fig, ax, run, "training loss", "Loss")


def _memory_series(run: Run) -> dict[tuple[int, str], list[tuple[float, float, float]]]:
    """(rank, device) -> [(step, peak, used)] at the steps that carry memory."""
    out: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for r in run.steps:
        for m in r.get("memory") or []:
            key = (int(m.get("rank", 0)), str(m.get("device", "?")))
            out.setdefault(key, []).append(
                (float(r["step"]), float(m.get("peak_bytes", 0)), float(m.get("used_bytes", 0)))
            )
    return out


RANK_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _draw_memory(ax: Any, run: Run, used: bool) -> None:
    series = _memory_series(run)
    top = 0.0
    for i, ((rank, device), pts) in enumerate(sorted(series.items())):
        color = RANK_COLORS[i % len(RANK_COLORS)]
        xs, peaks = _thin([p[0] for p in pts], [p[1] for p in pts])
        ax.plot(
            xs,
            peaks,
            color=color,
            linewidth=1.8,
            drawstyle="steps-pre",
            label=f"rank {rank} ({device}) step peak",
        )
        top = max(top, *peaks)
        if used:
            _, inuse = _thin([p[0] for p in pts], [p[2] for p in pts])
            ax.plot(
                xs,
                inuse,
                color=color,
                linewidth=1.0,
                linestyle=":",
                drawstyle="steps-pre",
                label=f"rank {rank} in use at sync",
            )
            top = max(top, *inuse)
    if run.cap_bytes:
        ax.axhline(
            run.cap_bytes,
            color=CAP_COLOR,
            linestyle="--",
            linewidth=2.0,
            label=f"cap {format_bytes(run.cap_bytes)}",
        )
        ax.axhspan(run.cap_bytes, max(top, run.cap_bytes) * 1.5, color=CAP_COLOR, alpha=0.07, zorder=0)
        top = max(top, run.cap_bytes)
    if not series:
        ax.text(0.5, 0.5, "no memory reported yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_ylim(0, (top or 2**20) * 1.25)
    _bytes_axis(ax, (top or 2**20) * 1.25)


def _finish_step_plot(fig: Any, ax: Any, run: Run, ylabel: str, title: str) -> Any:
    """The common end of a one-axis plot over optimizer steps: labels, title, decisions, legend."""
    _steps_axis(ax, run)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("optimizer step")
    ax.set_title(_title(run, title), loc="left")
    _mark_decisions([ax], run, lambda d: d["step"])
    _legend(ax)
    fig.tight_layout()
    return fig


def plot_memory(run: Run, Figure: Any) -> Any:
    fig, (ax,) = _new(Figure, 4.6)
    _draw_memory(ax, run, used=True)
    return _finish_step_plot(fig, ax, run, "memory per rank", "Memory per rank against the cap")


def _throughput(run: Run, w: int) -> tuple[list[float], list[float]]:
    """(steps, tokens/s): tokens over wall time between the steps `w` apart around each step."""
    h = max(1, w // 2)
    n = len(run.steps)
    xs, tps = [], []
    for i in range(1, n):
        a, b = run.steps[max(0, i - h)], run.steps[min(n - 1, i + h - 1) if w > 1 else i]
        dt = float(b["time"]) - float(a["time"])
        dk = float(b.get("tokens") or 0) - float(a.get("tokens") or 0)
        if dt > 0 and dk >= 0:
            xs.append(float(run.steps[i]["step"]))
            tps.append(dk / dt)
    return xs, tps


def plot_throughput(run: Run, Figure: Any) -> Any:
    fig, (ax1, ax2) = _new(Figure, 5.6, rows=2)
    w = _window(run)
    smoothed = "" if w == 1 else f", over {w} steps"
    xs, tps = _throughput(run, w)
    if xs:
        if w > 1:
            rx, rt = _throughput(run, 1)
            tx, ty = _thin(rx, rt)
            ax1.plot(tx, ty, color="#2ca02c", alpha=0.3, linewidth=0.8, label="between two steps")
        ax1.plot(xs, tps, color="#2ca02c", linewidth=2.0, label=f"tokens/s{smoothed}")
        ax1.set_ylim(0, _robust_max(tps) * 1.3)
    else:
        ax1.text(0.5, 0.5, "one step so far: no throughput yet", transform=ax1.transAxes, ha="center")
    sx = [float(r["step"]) for r in run.steps if r.get("step_time_s") is not None]
    sy = [float(r["step_time_s"]) for r in run.steps if r.get("step_time_s") is not None]
    if sx:
        if w > 1:
            tx, ty = _thin(sx, sy)
            ax2.plot(tx, ty, color="#ff7f0e", alpha=0.3, linewidth=0.8, label="per step")
        ax2.plot(sx, _smooth(sy, w), color="#ff7f0e", linewidth=2.0, label=f"step time{smoothed}")
        ax2.set_ylim(0, _robust_max(sy) * 1.3)
    ax1.set_ylabel("tokens / s")
    ax2.set_ylabel("step time (s)")
    ax2.set_xlabel("optimizer step")
    for ax in (ax1, ax2):
        _steps_axis(ax, run)
        _legend(ax)
    ax1.set_title(_title(run, "Throughput and step time"), loc="left")
    _mark_decisions([ax1, ax2], run, lambda d: d["step"])
    fig.tight_layout()
    return fig


def _robust_max(values: Sequence[float]) -> float:
    """The 98th percentile: one slow first step (compilation, warm-up) must not flatten the plot."""
    vals = sorted(v for v in values if math.isfinite(v))
    if not vals:
        return 1.0
    return vals[min(len(vals) - 1, int(0.98 * len(vals)))] or 1.0


def _knob_series(run: Run, knob: str) -> list[tuple[float, float]]:
    pts = [(float(r["step"]), _number((r.get("config") or {}).get(knob))) for r in run.steps]
    return [(x, y) for x, y in pts if y is not None]


def plot_config(run: Run, Figure: Any) -> Any:
    knobs = run.knobs()
    n = max(1, len(knobs))
    lines = decision_lines(run)
    plots_h, text_h = 1.15 * n + 0.9, 0.45 + 0.16 * len(lines)
    total = plots_h + text_h
    fig = Figure(figsize=(WIDTH_IN, total), dpi=DPI)
    gs = fig.add_gridspec(
        n, 1, top=1 - 0.4 / total, bottom=(text_h + 0.5) / total, left=0.13, right=0.985, hspace=0.12
    )
    axes = [fig.add_subplot(gs[i, 0]) for i in range(n)]
    for ax in axes[1:]:
        ax.sharex(axes[0])
    if not knobs:
        axes[0].text(0.5, 0.5, "the job reported no numeric knob", transform=axes[0].transAxes, ha="center")
    for ax, knob in zip(axes, knobs):
        pts = _knob_series(run, knob)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, drawstyle="steps-pre", color=_kind_color(knob, knobs), linewidth=2.0)
        ax.set_ylabel(
            "\n".join(textwrap.wrap(knob.replace("_", " "), 13)),
            rotation=0,
            ha="right",
            va="center",
            fontsize=8.5,
        )
        lo, hi = min(ys, default=0.0), max(ys, default=1.0)
        pad = (hi - lo) or 1.0
        ax.set_ylim(lo - 0.15 * pad, hi + (0.75 if ax is axes[0] else 0.35) * pad)
        if knob == "stop":
            ax.set_yticks([0, 1], ["no", "yes"])
        else:
            # The value, written where it changes; where changes crowd (a cooldown in many small
            # steps), only those 6% of the axis apart, and always the last.
            x0, x_end = run.steps[0]["step"], run.steps[-1]["step"]
            span = (x_end - x0) or 1
            changes = [(x, y) for i, (x, y) in enumerate(pts) if i == 0 or y != pts[i - 1][1]]
            shown: list[tuple[float, float]] = []
            for i, (x, y) in enumerate(changes):
                last = i == len(changes) - 1
                if shown and x - shown[-1][0] < 0.06 * span:
                    if not last:
                        continue
                    if len(shown) > 1:
                        shown.pop()
                shown.append((x, y))
            for x, y in shown:
                right = x > x_end - 0.06 * span
                ax.annotate(
                    f"{y:g}",
                    (x, y),
                    xytext=(-3 if right else 3, 3),
                    textcoords="offset points",
                    ha="right" if right else "left",
                    fontsize=8,
                    color="#333333",
                )
        _steps_axis(ax, run)
        if ax is not axes[-1]:
            ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("optimizer step")
    axes[0].set_title(_title(run, "Configuration and decisions"), loc="left")
    _mark_decisions(axes, run, lambda d: d["step"])
    y = text_h / total
    fig.text(
        0.01, y, "Decisions (step: knob = value (outcome): reason)", fontsize=10, fontweight="bold", va="top"
    )
    fig.text(
        0.01, y - 0.3 / total, "\n".join(lines), fontsize=8, family="monospace", va="top", linespacing=1.4
    )
    return fig


def _budget_fraction(run: Run, b: Budget) -> Callable[[dict[str, Any]], float]:
    """Fraction of budget `b` spent at a step: spend is proportional to wall time (wall_time,
    cost) or to tokens (tokens, flops), scaled to the last known fraction."""
    if b.name in ("tokens", "flops") and b.tokens > 0:
        return lambda r: float(r.get("tokens") or 0) / b.tokens * b.fraction
    return lambda r: (run.elapsed(r) / b.elapsed_s * b.fraction) if b.elapsed_s > 0 else 0.0


def plot_budget(run: Run, Figure: Any) -> Any:
    from matplotlib.ticker import FuncFormatter, PercentFormatter

    fig, (ax,) = _new(Figure, 4.6)
    t = [0.0] + [run.elapsed(r) for r in run.steps]
    tokens = [0.0] + [float(r.get("tokens") or 0) for r in run.steps]
    end = t[-1]
    if run.budgets:
        palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
        low = 0.0
        for i, b in enumerate(run.budgets):
            f = _budget_fraction(run, b)
            left = [1.0] + [1.0 - f(r) for r in run.steps]
            color = palette[i % len(palette)]
            tx, ty = _thin(t, left)
            ax.plot(tx, ty, color=color, linewidth=2.4, label=f"{b.name} budget left")
            low = min(low, left[-1])
            if 0 < left[-1] < 1 and run.summary is None and t[-1] > 0:
                t_end = t[-1] / (1.0 - left[-1])  # at the average rate so far
                ax.plot(
                    [t[-1], t_end],
                    [left[-1], 0.0],
                    color=color,
                    linestyle="--",
                    linewidth=1.3,
                    label=f"{b.name} forecast",
                )
                end = max(end, t_end)
            spent_at = _crossing(t, left)
            if spent_at is not None:
                ax.annotate(
                    f"{b.name} spent at {format_duration(spent_at)}",
                    (spent_at, 0),
                    xytext=(-6, 10),
                    textcoords="offset points",
                    ha="right",
                    fontsize=8,
                    color=color,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85},
                    zorder=6,
                )
        ax.axhline(0.0, color="black", linewidth=1.0)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(min(-0.05, low * 1.15), 1.25)
        ax.set_ylabel("budget left")
        src = "the running controller" if run.live else "summary.json"
        ax.set_title(_title(run, "Budget burn-down"), loc="left")
        ax.text(
            1.075,
            0.0,
            f"budget from {src};\nspend taken as\nproportional to wall\ntime or tokens",
            transform=ax.transAxes,
            va="bottom",
            fontsize=7.5,
            color="#666666",
        )
        tok_ax = ax.twinx()
        tok_ax.plot(
            t, tokens, color="#999999", linewidth=1.2, linestyle="-.", label="tokens trained (right axis)"
        )
        tok_ax.set_ylim(0, max(tokens[-1], 1) * 1.25)
        tok_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
        tok_ax.set_ylabel("tokens", color="#777777")
        handles = ax.get_legend_handles_labels()[0] + tok_ax.get_legend_handles_labels()[0]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.07, 1.0), fontsize=8, frameon=False)
    else:
        ax.plot(t, tokens, color="#1f77b4", linewidth=2.0, label="tokens trained")
        ax.set_ylabel("tokens")
        ax.set_ylim(0, max(tokens[-1], 1) * 1.25)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
        ax.set_title(_title(run, "Tokens over wall time (no budget known)"), loc="left")
        _legend(ax)
    ax.set_xlim(0, end * 1.03 or 1)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_duration(v) if v > 0 else "0"))
    ax.set_xlabel("wall time since the first step (decisions at the time they were made)")
    ax.grid(True, alpha=0.25)
    _mark_decisions([ax], run, lambda d: float(d.get("time", run.start_time)) - run.start_time)
    fig.tight_layout()
    return fig


def _crossing(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Where a falling line first reaches 0, interpolated between its points."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y0 > 0 >= y1:
            return x0 + (x1 - x0) * y0 / (y0 - y1)
    return None


def plot_overview(run: Run, Figure: Any) -> Any:
    """What happened, on one step axis: loss, memory against the cap, throughput, the knobs."""
    story = headline(run)
    wrapped = [line for s in story for line in textwrap.wrap(s, 150)]
    head_h = 0.25 + 0.19 * len(wrapped)
    fig = Figure(figsize=(WIDTH_IN, 8.6 + head_h), dpi=DPI)
    total = 8.6 + head_h
    gs = fig.add_gridspec(
        4,
        1,
        height_ratios=[1.1, 1, 0.8, 1],
        top=1 - (head_h + 0.35) / total,
        bottom=0.55 / total,
        left=0.08,
        right=0.78,
        hspace=0.12,
    )
    a_loss, a_mem, a_tps, a_cfg = (fig.add_subplot(gs[i, 0]) for i in range(4))
    for ax in (a_mem, a_tps, a_cfg):
        ax.sharex(a_loss)
    fig.text(0.01, 1 - 0.12 / total, _title(run, "What happened"), fontsize=12, fontweight="bold", va="top")
    fig.text(0.01, 1 - 0.42 / total, "\n".join(wrapped), fontsize=9, va="top", linespacing=1.45)
    w = _window(run)
    ys = [float(r["loss"]) for r in run.steps if r.get("loss") is not None]
    if ys:
        sm = _smooth(ys, w)
        a_loss.plot(
            [float(r["step"]) for r in run.steps if r.get("loss") is not None],
            sm,
            color="black",
            linewidth=1.8,
            label="loss" + ("" if w == 1 else f" (mean of {w})"),
        )
        _headroom(a_loss, min(sm), max(sm), 0.3)
    a_loss.set_ylabel("loss")
    _draw_memory(a_mem, run, used=False)
    a_mem.set_ylabel("memory")
    xs, tps = _throughput(run, w)
    if xs:
        a_tps.plot(xs, tps, color="#2ca02c", linewidth=1.6, label="tokens/s")
        a_tps.set_ylim(0, _robust_max(tps) * 1.25)
    a_tps.set_ylabel("tokens/s")
    knobs = [k for k in run.knobs() if k != "stop"]
    for knob in knobs:
        pts = _knob_series(run, knob)
        y0 = pts[0][1] or 1.0
        a_cfg.plot(
            [p[0] for p in pts],
            [p[1] / y0 for p in pts],
            drawstyle="steps-pre",
            linewidth=1.8,
            color=_kind_color(knob, knobs),
            label=f"{_short(knob)} (start {y0:g})",
        )
    a_cfg.set_yscale("symlog", base=2, linthresh=1 / 16)  # a multiplier may reach 0
    a_cfg.set_ylabel("knob / its start")
    a_cfg.set_xlabel("optimizer step")
    for ax in (a_loss, a_mem, a_tps, a_cfg):
        _steps_axis(ax, run)
        _legend(ax)
        if ax is not a_cfg:
            ax.tick_params(labelbottom=False)
    _mark_decisions([a_loss, a_mem, a_tps, a_cfg], run, lambda d: d["step"])
    return fig


# ---- the report ----------------------------------------------------------------------------------
@dataclass
class Report:
    out_dir: Path
    html: Path
    images: dict[str, Path]


PLOTS: list[tuple[str, str, Callable[[Run, Any], Any]]] = [
    ("overview", "Overview: loss, memory, throughput and knobs on one step axis", plot_overview),
    ("config", "Configuration timeline, every decision numbered, with its reason", plot_config),
    ("memory", "Memory per rank against the cap", plot_memory),
    ("loss", "Loss and per-domain loss", plot_loss),
    ("throughput", "Throughput and step time", plot_throughput),
    ("budget", "Budget burn-down", plot_budget),
]


def write_report(run_dir: Path, out_dir: Path | None = None) -> Report:
    """Write the PNG plots and report.html for a run directory; returns where they are."""
    Figure = _matplotlib()
    run = load_run(Path(run_dir))
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create {out} ({exc}); pass --out DIR") from exc
    images: dict[str, Path] = {}
    for name, _caption, draw in PLOTS:
        fig = draw(run, Figure)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=DPI, facecolor="white")
        images[name] = path
    page = out / "report.html"
    page.write_text(render_html(run, images), encoding="utf-8")
    return Report(out, page, images)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1240px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
.meta { color: #666; font-size: 13px; }
.summary { display: flex; gap: 24px; flex-wrap: wrap; background: #f5f7fa; border: 1px solid #dde3ea;
           border-radius: 6px; padding: 14px 18px; margin: 14px 0; }
.summary div { min-width: 130px; } .summary b { display: block; font-size: 18px; }
.summary span { color: #666; font-size: 12px; }
.story { font-size: 15px; line-height: 1.5; } .story li { margin: 2px 0; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f5f7fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fdecea; }
img { max-width: 100%; border: 1px solid #eee; margin: 6px 0 16px; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
"""


def _fmt_float(v: Any, fmt: str = "{:.4g}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "?"


def _fmt_seconds(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return ""
    if v < 1e-3:
        return f"{v * 1e6:.0f} µs"
    return f"{v * 1e3:.3g} ms" if v < 1 else f"{v:.3g} s"


def render_html(run: Run, images: dict[str, Path]) -> str:
    e = html.escape
    first, last = run.steps[0], run.steps[-1]
    s = run.summary or {}
    peak = max((m.get("peak_bytes", 0) for r in run.steps for m in r.get("memory") or []), default=0)
    applied = sum(1 for d in run.decisions if d.get("outcome") == "applied")
    tps = _throughput(run, 1)[1]
    boxes = [
        ("status", "finished" if run.finished else ("running" if run.summary is None else "ended")),
        ("steps", str(last["step"])),
        ("tokens", _count(last.get("tokens"))),
        ("wall time", format_duration(run.elapsed(last))),
        ("loss", f"{_fmt_float(first.get('loss'), '{:.3f}')} → {_fmt_float(last.get('loss'), '{:.3f}')}"),
        ("tokens/s (median)", _count(statistics.median(tps)) if tps else "?"),
        ("peak memory", format_bytes(peak) if peak else "?"),
        ("memory cap", format_bytes(run.cap_bytes) if run.cap_bytes else "none"),
        ("decisions", f"{len(run.decisions)} ({applied} applied)"),
    ]
    for b in run.budgets:
        boxes.append((f"{b.name} budget", f"{b.fraction:.0%} spent"))
    config = s.get("config") or last.get("config") or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>trainwarden report: {e(run.run_id)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>trainwarden report: run {e(run.run_id)}</h1>",
        f'<div class="meta">run directory <code>{e(str(run.run_dir))}</code> · made '
        f"{e(time.strftime('%Y-%m-%d %H:%M:%S'))}"
        + (
            f" · adapter {e(str(run.shape.get('adapter')))}, {run.shape.get('world_size')} rank(s), "
            f"{_count(run.shape.get('param_count'))} parameters, device {e(str(run.shape.get('device')))}"
            if run.shape
            else ""
        )
        + "</div>",
        '<div class="summary">'
        + "".join(f"<div><span>{e(k)}</span><b>{e(v)}</b></div>" for k, v in boxes)
        + "</div>",
        '<ul class="story">' + "".join(f"<li>{e(line)}</li>" for line in headline(run)) + "</ul>",
        f"<p>Configuration at the end: <code>{e(json.dumps(config))}</code></p>",
    ]

    def img(name: str, caption: str) -> str:
        data = base64.b64encode(images[name].read_bytes()).decode("ascii")
        return f'<h2>{e(caption)}</h2>\n<img alt="{e(caption)}" src="data:image/png;base64,{data}">'

    captions = {name: caption for name, caption, _ in PLOTS}
    parts.append(img("overview", captions["overview"]))
    parts.append("<h2>Decisions</h2>")
    if run.decisions:
        parts.append(
            "<table><tr><th>#</th><th>step</th><th>time</th><th>policy</th><th>kind</th><th>value</th>"
            "<th>outcome</th><th>duration</th><th>reason</th><th>detail</th></tr>"
        )
        for i, d in enumerate(run.decisions, start=1):
            when = run.elapsed({"time": d["time"]}) if isinstance(d.get("time"), (int, float)) else None
            parts.append(
                f'<tr class="{"bad" if d.get("outcome") in BAD_OUTCOMES else ""}"><td class="num">{i}</td>'
                f'<td class="num">{d["step"]}</td>'
                f'<td class="num">{e(format_duration(when)) if when is not None and when >= 0 else ""}</td>'
                f"<td>{e(str(d.get('policy', '')))}</td><td>{e(d['kind'])}</td><td>{e(_value(d))}</td>"
                f"<td>{e(str(d.get('outcome', '')))}</td>"
                f'<td class="num">{_fmt_seconds(d.get("duration_s"))}</td>'
                f"<td>{e(str(d.get('reason', '')))}</td><td>{e(str(d.get('detail', '')))}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>The controller made no decision in this run.</p>")
    for name, caption, _ in PLOTS:
        if name != "overview":
            parts.append(img(name, caption))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
