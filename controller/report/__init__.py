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

What lives where:
- run.py: load_run and Run, from the run directory (and the live controller's /metrics);
- story.py: what happened, in words (decision groups, the headline);
- draw.py: what every plot shares (lazy matplotlib, thinning, colours, decision markers, axes);
- plots.py: the plots, a function each;
- page.py: write_report, the PNGs and the one self-contained report.html.
"""

from trainwarden.controller.report.draw import CAP_COLOR, DPI, KIND_COLORS, MAX_POINTS, OTHER_COLORS, WIDTH_IN
from trainwarden.controller.report.page import CSS, PLOTS, Report, render_html, write_report
from trainwarden.controller.report.plots import (
    RANK_COLORS,
    plot_budget,
    plot_config,
    plot_loss,
    plot_memory,
    plot_overview,
    plot_throughput,
)
from trainwarden.controller.report.run import INSTALL_HINT, Budget, ReportError, Run, _live_metrics, load_run
from trainwarden.controller.report.story import (
    BAD_OUTCOMES,
    Group,
    decision_lines,
    describe_group,
    group_decisions,
    headline,
)

__all__ = [
    "BAD_OUTCOMES",
    "CAP_COLOR",
    "CSS",
    "DPI",
    "INSTALL_HINT",
    "KIND_COLORS",
    "MAX_POINTS",
    "OTHER_COLORS",
    "PLOTS",
    "RANK_COLORS",
    "WIDTH_IN",
    "Budget",
    "Group",
    "Report",
    "ReportError",
    "Run",
    "_live_metrics",
    "decision_lines",
    "describe_group",
    "group_decisions",
    "headline",
    "load_run",
    "plot_budget",
    "plot_config",
    "plot_loss",
    "plot_memory",
    "plot_overview",
    "plot_throughput",
    "render_html",
    "write_report",
]
