"""Compute policy: spend the budget, finish annealed, stop when it is spent.

Warmup-stable-decay: the user's schedule runs as is (multiplier 1) through the stable
phase; over the last `cooldown_fraction` of the binding budget (the one forecast to run
out first) the LR multiplier decays to `min_lr_multiplier`, and when the budget is spent
the job is asked to stop (cooperatively: the handle's `should_stop` turns true).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies.base import PolicyKind, Range, param, register
from trainwarden.policies.schema import Budget


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


def cooldown_multiplier(fraction_spent: float, p: ComputeParams) -> float:
    """LR multiplier when `fraction_spent` of the binding budget is spent."""
    if p.cooldown_fraction <= 0 or fraction_spent <= 1 - p.cooldown_fraction:
        return 1.0
    if fraction_spent >= 1.0:
        return p.min_lr_multiplier  # exactly: float rounding must not leave it a hair above
    progress = min(1.0, (fraction_spent - (1 - p.cooldown_fraction)) / p.cooldown_fraction)
    decay = progress if p.cooldown_shape == "linear" else math.sqrt(progress)
    return p.min_lr_multiplier + (1.0 - decay) * (1.0 - p.min_lr_multiplier)


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
        f = binding.fraction
        # Stop at the boundary nearest the budget's end: when the next step would end more than
        # half a step past it, this boundary is the nearer one (a slow step would overrun by its
        # whole length otherwise).
        remaining, step_time = binding.remaining_s, snapshot.step_time_s
        why_stop = (
            f"the {binding.name} budget is spent ({binding.spent:.4g} of {binding.limit:.4g} {binding.unit})"
        )
        if f < 1.0 and remaining is not None and step_time and remaining < 0.5 * step_time:
            f = 1.0
            why_stop = (
                f"the next step would end past the {binding.name} budget ({remaining:.3g} s left, "
                f"steps take {step_time:.3g} s)"
            )
        actions: list[Action] = []
        if (
            p.stop_at_budget
            and f >= 1.0
            and KNOB_STOP in snapshot.knobs
            and KNOB_STOP not in snapshot.pending
            and not snapshot.config.get(KNOB_STOP)
        ):
            actions.append(
                Action(
                    kind=KNOB_STOP,
                    params={},
                    step=snapshot.step + 1,
                    reason=why_stop,
                )
            )
        current = snapshot.config.get(KNOB_LR_MULTIPLIER)
        if (
            KNOB_LR_MULTIPLIER in snapshot.knobs
            and KNOB_LR_MULTIPLIER not in snapshot.pending
            and isinstance(current, (int, float))
        ):
            target = cooldown_multiplier(f, p)
            if abs(target - current) >= p.resolution or (target == p.min_lr_multiplier != current):
                actions.append(
                    Action(
                        kind=KNOB_LR_MULTIPLIER,
                        params={"value": round(target, 4)},
                        step=snapshot.step + 1,
                        reason=f"{f:.0%} of the {binding.name} budget spent: {p.cooldown_shape} cooldown "
                        f"over the last {p.cooldown_fraction:.0%}, LR multiplier {current:g} -> {target:.3g}",
                    )
                )
        return actions
