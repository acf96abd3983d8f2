"""The report: writes every plot as a PNG and report.html, one self-contained page (images as
base64 data URIs).
"""

from __future__ import annotations

import base64
import html
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.controller.report.draw import DPI, _matplotlib
from trainwarden.controller.report.plots import (
    _throughput,
    plot_budget,
    plot_config,
    plot_loss,
    plot_memory,
    plot_overview,
    plot_throughput,
)
from trainwarden.controller.report.run import ReportError, Run, load_run
from trainwarden.controller.report.story import BAD_OUTCOMES, _count, _value, headline
from trainwarden.policies.units import format_bytes, format_duration


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
