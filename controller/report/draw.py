"""What every plot shares: matplotlib loaded lazily (an optional extra), thinning and smoothing of
series, colours, decision markers and axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from trainwarden.controller.report.run import INSTALL_HINT, ReportError, Run
from trainwarden.controller.report.story import BAD_OUTCOMES

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
