"""The budget's end as the job itself can keep it, when no controller can be had.

A job under a compute policy is stopped by its controller at the budget's end. When that
controller is gone (killed and not restarted, `trainwarden run` itself killed, a sidecar that
never came up), the job must not train on without bound: the agent is given the budget's
limits at start (`trainwarden run` puts them in TRAINWARDEN_BUDGET_END; a sidecar's hello reply
carries them too) and, while it has no controller, stops the job itself at the first step
boundary past the end, through the same stop action the controller would send. Only the limits
the job can count on its own: wall time from its first step, money at a price per device-hour,
tokens and FLOPs (6 x parameters x tokens). Memory has no such end: without a controller there
is no memory protection, and the agent says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ENV_BUDGET_END = "TRAINWARDEN_BUDGET_END"

#: Latest (step, tokens so far) counts the job's forecast of a step's tokens runs over.
COUNT_WINDOW = 16


def steps_inside(counted: float, counts: Sequence[tuple[int, int]]) -> tuple[int, float]:
    """What the job's own count forecasts for a counted budget spent at `counted` tokens: steps
    after the latest count that stay inside it (0: the latest step is the last), and the tokens a
    step at the rate over `counts` ((step, tokens so far), oldest first, latest last, step > 0).
    The agent places its stop by it; the replay (policies/tuning/replay/) stops as the agent does."""
    (s0, t0), (step, tokens) = counts[0], counts[-1]
    per_step = (tokens - t0) / (step - s0) if step > s0 else tokens / step
    left = counted - tokens
    return (int(left // per_step) if left > 0 and per_step > 0 else 0), per_step


def _pos(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


@dataclass(frozen=True)
class BudgetEnd:
    wall_time_s: float | None = None
    tokens: float | None = None
    flops: float | None = None
    cost_max: float | None = None
    cost_per_device_hour: float | None = None

    @staticmethod
    def of_policy(pf: Any) -> BudgetEnd | None:
        """The end a policy file's compute policy stops the job at; None when none stops it."""
        if pf is None or not any(
            s.kind == "compute" and getattr(s.params, "stop_at_budget", False) for s in pf.policies
        ):
            return None
        b = pf.budget
        end = BudgetEnd(
            wall_time_s=b.wall_time_s,
            tokens=None if b.tokens is None else float(b.tokens),
            flops=b.flops,
            cost_max=None if b.cost is None else b.cost.max,
            cost_per_device_hour=None if b.cost is None else b.cost.per_device_hour,
        )
        return end if end.to_json() else None

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @staticmethod
    def from_json(obj: Any) -> BudgetEnd | None:
        """Lenient: a value that is not a positive finite number is left out; None if none is left."""
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except ValueError:
                return None
        if not isinstance(obj, dict):
            return None
        end = BudgetEnd(**{k: _pos(obj, k) for k in BudgetEnd.__dataclass_fields__})
        return end if end.to_json() else None

    def counted_tokens(self, param_count: int) -> float | None:
        """The token count at which the first counted budget (tokens, or FLOPs as 6 x parameters x
        tokens) is spent; None when neither is set. The job counts these itself, exactly."""
        ends = [self.tokens] if self.tokens is not None else []
        if self.flops is not None and param_count > 0:
            ends.append(self.flops / (6.0 * param_count))
        return min(ends) if ends else None

    def spent(self, elapsed_s: float, tokens: float, param_count: int, world_size: int) -> str | None:
        """Which budget is spent, in words, or None while none is."""
        if self.wall_time_s is not None and elapsed_s >= self.wall_time_s:
            return f"the wall_time budget is spent ({elapsed_s:.0f} s of {self.wall_time_s:.0f} s)"
        if self.tokens is not None and tokens >= self.tokens:
            return f"the tokens budget is spent ({tokens:.0f} of {self.tokens:.0f})"
        if self.flops is not None and 6.0 * param_count * tokens >= self.flops:
            return f"the flops budget is spent ({6.0 * param_count * tokens:.3g} of {self.flops:.3g})"
        if self.cost_max is not None and self.cost_per_device_hour is not None:
            cost = elapsed_s * self.cost_per_device_hour * max(1, world_size) / 3600.0
            if cost >= self.cost_max:
                return f"the cost budget is spent ({cost:.4g} of {self.cost_max:.4g})"
        return None
