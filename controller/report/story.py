"""What happened in a run, in words: the decisions grouped per knob and the headline lines."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainwarden.controller.report.run import Run
from trainwarden.policies.units import format_bytes, format_duration

BAD_OUTCOMES = ("rejected", "rolled_back")


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
