"""Compute policy: spend the budget, finish annealed at its end, stop early when it stops paying.

Warmup-stable-decay: the user's schedule runs as is (multiplier 1) through the stable phase;
over the last `cooldown_fraction` of the binding budget (the one forecast to run out first)
the LR multiplier decays to `min_lr_multiplier`, and the job is asked to stop at the step
boundary nearest the budget's end (cooperatively: the handle's `should_stop` turns true, after
the user's `on_stop` save hooks ran).

Timing. A decision reaches the job some steps after the step it was made on (the agent's
exchange, the sync cadence): the measured `Snapshot.action_lag_steps`, or `sync_every` before
any was measured. So the multiplier is the one for where the run will be when it applies, and
the stop is sent ahead, for the exact step whose end is nearest the budget's end, from the
throughput forecast (seconds per step since the last throughput change); the agent holds it
until that step. For a token or FLOP budget the fraction spent per step is fixed by the batch,
so the cooldown tracks it exactly; for wall time (and money) it is the forecast that places it.

Stopping rule (`min_gain` > 0): the marginal gain is the loss improvement per 10% of the budget,
the least-squares slope of the loss against the fraction spent over the last `gain_window`
(the validation loss the job reports with `handle.report(eval_loss=)`, else the smoothed
training loss). From `gain_after` on, during the stable phase, the first point where it falls
below `min_gain` starts the cooldown there, sized as the same share of the now shorter run
(`cooldown_fraction` of it), and the run stops at its end, leaving the rest of the budget. The
point is found again from the whole loss curve on every decision, so `decide` stays pure and
a restarted controller finds the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainwarden.controller.forecast import GAIN_UNIT, MIN_EVAL_POINTS, loss_curve, marginal_gain
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action
from trainwarden.controller.schema import Budget
from trainwarden.controller.snapshot import BudgetUse, Snapshot
from trainwarden.policies.base import PolicyKind, Range, param, register

#: Seconds of decisions a stop is sent ahead of, on top of the lag: the controller decides at most
#: every 0.5 s and the agent exchanges every 0.5 s, so one second covers the next chance to send it.
STOP_LEAD_S = 1.0

#: Budgets spent by the clock (wall time, and money at a price per device-hour).
TIMED_BUDGETS = ("wall_time", "cost")

CAUSE_BUDGET = "budget"
CAUSE_GAIN = "marginal_gain"


@dataclass(frozen=True)
class ComputeParams:
    cooldown_fraction: float = param(
        0.2,
        valid=Range(0.0, 1.0),
        tune=Range(0.05, 0.5),
        doc="Fraction of the binding budget at its end over which the LR decays.",
    )
    cooldown_shape: str = param(
        "linear",
        choices=("linear", "1-sqrt"),
        doc="Decay shape: linear, or 1-sqrt (Hägele et al. 2024, better at the same length).",
    )
    min_lr_multiplier: float = param(0.0, valid=Range(0.0, 1.0), doc="Multiplier at the end of the cooldown.")
    resolution: float = param(
        0.02,
        valid=Range(0.001, 0.5),
        tune=Range(0.005, 0.1),
        doc="Smallest multiplier change worth an action (each action is a log line and a round trip).",
    )
    stop_at_budget: bool = param(True, doc="Ask the job to stop when the binding budget is spent.")
    min_gain: float = param(
        0.0,
        valid=Range(0.0, 100.0),
        tune=Range(0.001, 0.1, log=True),
        doc="Stopping rule: least loss improvement per 10% of the budget worth spending it on; below "
        "it the cooldown starts early and the run stops, saving the rest. 0 turns the rule off.",
    )
    gain_window: float = param(
        0.1,
        valid=Range(0.01, 0.5),
        tune=Range(0.05, 0.3),
        doc="Fraction of the budget the marginal gain is fitted over (at least 4 loss points).",
    )
    gain_after: float = param(
        0.25,
        valid=Range(0.0, 0.95),
        tune=Range(0.1, 0.5),
        doc="Fraction of the budget spent before the stopping rule may judge (warmup, the early drop).",
    )


@dataclass(frozen=True)
class Plan:
    """Where the cooldown runs: from `start` to `end` (fractions of the binding budget)."""

    start: float
    end: float
    cause: str
    why: str = ""


def cooldown_multiplier(
    fraction_spent: float, p: ComputeParams, start: float | None = None, end: float = 1.0
) -> float:
    """LR multiplier when `fraction_spent` of the binding budget is spent, for a cooldown from
    `start` (default `1 - cooldown_fraction`) to `end`."""
    start = 1 - p.cooldown_fraction if start is None else start
    if end <= start:
        return 1.0  # no cooldown: the stop ends the run at full LR
    if fraction_spent <= start:
        return 1.0
    if fraction_spent >= end:
        return p.min_lr_multiplier  # exactly: float rounding must not leave it a hair above
    progress = min(1.0, (fraction_spent - start) / (end - start))
    decay = progress if p.cooldown_shape == "linear" else math.sqrt(progress)
    return p.min_lr_multiplier + (1.0 - decay) * (1.0 - p.min_lr_multiplier)


def stopping_point(snapshot: Snapshot, p: ComputeParams) -> tuple[float, float] | None:
    """(fraction spent, marginal gain per 10% there) where the stopping rule fires first, or None.

    The validation curve when the job reports one, else the training loss. Judged only in the
    stable phase (from `gain_after` to the budget's own cooldown): in warmup the loss falls for
    reasons the rest of the run does not share, in a cooldown it falls because of the cooldown.
    """
    if p.min_gain <= 0:
        return None
    curve = loss_curve(snapshot)
    stable_end = 1.0 - p.cooldown_fraction
    for i, (x, _) in enumerate(curve):
        if x < p.gain_after:
            continue
        if x >= stable_end:
            break
        g = marginal_gain(curve, p.gain_window, end=i + 1)
        if g is not None and g * GAIN_UNIT < p.min_gain:
            return x, g * GAIN_UNIT
    return None


def plan(snapshot: Snapshot, p: ComputeParams) -> Plan:
    found = stopping_point(snapshot, p)
    if found is None:
        return Plan(1.0 - p.cooldown_fraction, 1.0, CAUSE_BUDGET)
    at, gain = found
    # The cooldown keeps its share of the (now shorter) run: WSD's proportion.
    end = min(1.0, at / (1.0 - p.cooldown_fraction)) if p.cooldown_fraction < 1.0 else at
    source = "validation" if len(snapshot.eval_curve) >= MIN_EVAL_POINTS else "training"
    why = (
        f"stopping rule: at {at:.0%} of the budget the {source} loss improved {gain:.3g} per 10% of it "
        f"(below {p.min_gain:g})"
    )
    return Plan(at, end, CAUSE_GAIN, why)


def fraction_per_step(snapshot: Snapshot, b: BudgetUse) -> float | None:
    """Fraction of budget `b` one optimizer step spends now (None until measured)."""
    spf = snapshot.seconds_per_step or snapshot.step_time_s
    if not spf or not b.rate_per_s or b.limit <= 0:
        return None
    return b.rate_per_s * spf / b.limit


def lead_steps(snapshot: Snapshot) -> int:
    """Steps between deciding on `snapshot` and the action applying in the job."""
    if snapshot.action_lag_steps is not None:
        return max(1, snapshot.action_lag_steps)
    return max(1, snapshot.sync_every)


#: A token or FLOP budget whose steps spend unlike amounts (tokens counted from each batch) is sent
#: this many horizons ahead: a job much faster than the exchange otherwise received it after its
#: step had passed (measured: 2 steps over a 3000-token budget on a quiet 2-core machine).
COUNTED_HORIZON_FACTOR = 3


def horizon_steps(snapshot: Snapshot, lead: int) -> int:
    """Steps ahead a decision must look: the lead, and a second of decisions after it."""
    spf = snapshot.seconds_per_step or snapshot.step_time_s or 0.0
    return lead + (max(2, math.ceil(STOP_LEAD_S / spf)) if spf > 0 else 2)


@register
class ComputePolicy(PolicyKind):
    kind = "compute"
    Params = ComputeParams
    knobs = frozenset({KNOB_LR_MULTIPLIER, KNOB_STOP})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        p: ComputeParams = self.params
        binding = snapshot.binding_budget
        if binding is None:
            return []
        pl = plan(snapshot, p)
        f = binding.fraction
        per_step = fraction_per_step(snapshot, binding)
        lead = lead_steps(snapshot)
        actions: list[Action] = []
        stop = self._stop(snapshot, binding, pl, per_step, lead) if p.stop_at_budget else None
        if stop is not None:
            actions.append(stop)
        current = snapshot.config.get(KNOB_LR_MULTIPLIER)
        if (
            KNOB_LR_MULTIPLIER in snapshot.knobs
            and KNOB_LR_MULTIPLIER not in snapshot.pending
            and isinstance(current, (int, float))
        ):
            # The multiplier for where the run will be when the action applies.
            f_apply = f + lead * per_step if per_step else f
            target = cooldown_multiplier(f_apply, p, pl.start, pl.end)
            params: dict[str, object] = {"value": round(target, 4)}
            if per_step and target != p.min_lr_multiplier and f_apply > pl.start:
                # A line to where the schedule will be when the next action is likely to apply:
                # the job moves along it step by step (adapters/knobs.py), no stairs between actions.
                # It ends at the cooldown's end when that comes sooner: a line drawn past it would
                # still be above the floor when the run stops.
                ahead = horizon_steps(snapshot, lead)
                f_to = min(pl.end, f_apply + ahead * per_step)
                params["to"] = round(cooldown_multiplier(f_to, p, pl.start, pl.end), 4)
                params["over_steps"] = max(1, round((f_to - f_apply) / per_step))
            if abs(target - current) >= p.resolution or (target == p.min_lr_multiplier != current):
                lead_note = f" (where the run will be in {lead} step(s))" if per_step else ""
                why = (
                    f"{pl.why}; cooling down from {pl.start:.0%} to stop at {pl.end:.0%} of the budget"
                    if pl.cause == CAUSE_GAIN
                    else f"{p.cooldown_shape} cooldown over the last {p.cooldown_fraction:.0%}"
                )
                actions.append(
                    Action(
                        kind=KNOB_LR_MULTIPLIER,
                        params=params,
                        step=snapshot.step + 1,
                        reason=f"{f:.0%} of the {binding.name} budget spent{lead_note}: {why}, "
                        f"LR multiplier {current:g} -> {target:.3g}",
                    )
                )
        return actions

    def watch_s(self, snapshot: Snapshot, budget: Budget) -> float:
        """At every exchange from the cooldown on (the LR ramp and the stop are placed from fresh
        telemetry); before it, a quarter of the time left until it starts, so the start is seen
        from four snapshots at least. At every exchange while the spend rate is not yet measured."""
        binding = snapshot.binding_budget
        if binding is None:
            return math.inf
        if not binding.rate_per_s or binding.limit <= 0:
            return 0.0
        start = plan(snapshot, self.params).start
        return max(0.0, (start - binding.fraction) * binding.limit / binding.rate_per_s / 4)

    def _stop(
        self, snapshot: Snapshot, b: BudgetUse, pl: Plan, per_step: float | None, lead: int
    ) -> Action | None:
        if KNOB_STOP not in snapshot.knobs or KNOB_STOP in snapshot.pending or snapshot.config.get(KNOB_STOP):
            return None
        f = b.fraction
        params: dict[str, object] = {"cause": pl.cause}
        end_words = (
            f"the {b.name} budget is spent"
            if pl.cause == CAUSE_BUDGET
            else f"the early end at {pl.end:.0%} of the {b.name} budget comes ({pl.why})"
        )
        if f >= pl.end:
            spent = (
                f"the {b.name} budget is spent ({b.spent:.4g} of {b.limit:.4g} {b.unit})"
                if pl.cause == CAUSE_BUDGET
                else f"{f:.0%} of the {b.name} budget spent, the early end: {pl.why}"
            )
            return Action(kind=KNOB_STOP, params=params, step=snapshot.step + 1, reason=spent)
        if not per_step:
            return None
        # The boundary nearest the end: after step T, T = now + round(steps left).
        steps_left = (pl.end - f) / per_step
        spf = snapshot.seconds_per_step or snapshot.step_time_s or 0.0
        timed = b.name in TIMED_BUDGETS
        # A token or FLOP budget ends at a step known as soon as every step has spent the same
        # share (the batch fixes it; checked against the measured rate): sent at once, the agent
        # holds it for that step, so a controller slower than the job cannot make the run
        # overshoot. A clock budget's end is a forecast, sent only when near.
        exact = f / snapshot.step if not timed and pl.cause == CAUSE_BUDGET and snapshot.step > 0 else 0.0
        if exact > 0 and abs(exact - per_step) <= 0.01 * exact:
            steps_left = (pl.end - f) / exact
        elif steps_left > horizon_steps(snapshot, lead) * (1 if timed else COUNTED_HORIZON_FACTOR):
            return None
        # A clock's end goes to the nearest boundary; a count (tokens counted from each batch, which
        # vary) to the last boundary the forecast keeps inside it: past it is over the budget.
        # (1e-6: a count that ends exactly on a boundary, 38 steps computed as 37.999999, is 38.)
        last = snapshot.step + max(0, round(steps_left) if timed else math.floor(steps_left + 1e-6))
        where = f"stopping after step {last}, the boundary nearest it"
        if timed and snapshot.time is not None and b.rate_per_s:
            # Spent by the clock: the job places the stop by its own clock and step times (the
            # agent, adapters/agent.py), so a slowdown after this decision moves it too.
            params["at_time"] = round(snapshot.time + (pl.end - f) * b.limit / b.rate_per_s, 3)
            where = f"stopping at the boundary nearest it (forecast: after step {last}; the job places it)"
        return Action(
            kind=KNOB_STOP,
            params=params,
            step=last + 1,
            reason=f"{end_words} {steps_left:.2g} step(s) after step {snapshot.step}: {where} "
            f"(steps take {spf:.3g} s)",
        )
