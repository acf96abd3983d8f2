"""The plots, one function each: loss, memory per rank against the cap, throughput, the
configuration timeline, the budget burn-down, and the overview of all of them on one step axis.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from trainwarden.controller.report.draw import (
    CAP_COLOR,
    DPI,
    WIDTH_IN,
    _bytes_axis,
    _headroom,
    _kind_color,
    _legend,
    _mark_decisions,
    _new,
    _short,
    _smooth,
    _steps_axis,
    _thin,
    _title,
    _window,
)
from trainwarden.controller.report.run import Budget, Run, _number
from trainwarden.controller.report.story import _count, decision_lines, headline
from trainwarden.policies.units import format_bytes, format_duration


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
