"""Memory policy: fit under the device memory cap by trading micro-batch for accumulation.

The ladder here is the micro-batch size (the global batch is kept: gradient accumulation
grows as the micro-batch shrinks). Later adapters add rungs (ZeRO stage, offload,
activation checkpointing). Step down when a rank's per-step peak crosses the high-water
mark; step up only when the rung above is forecast to fit, from a linear fit of the peaks
observed at each micro-batch size (memory ~ fixed + per-sample x micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainwarden.controller.protocol import KNOB_MICRO_BATCH, Action
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies.base import PolicyKind, Range, param, register
from trainwarden.policies.schema import Budget
from trainwarden.policies.units import format_bytes


@dataclass(frozen=True)
class MemoryParams:
    high_water: float = param(
        0.9,
        valid=Range(0.1, 1.0),
        tune=Range(0.7, 0.98),
        doc="Step down when a rank's per-step peak exceeds this fraction of the cap.",
    )
    low_water: float = param(
        0.6,
        valid=Range(0.05, 0.99),
        tune=Range(0.3, 0.85),
        doc="Consider stepping up only when every rank's peak is below this fraction of the cap.",
    )
    cooldown_steps: int = param(
        5,
        valid=Range(0, 1_000_000),
        tune=Range(1, 50),
        doc="Optimizer steps to wait after a change before the next one (hysteresis).",
    )
    min_micro_batch: int = param(1, valid=Range(1, 1_000_000), doc="Never go below this micro-batch.")
    step_up: bool = param(True, doc="Step back up when the rung above is forecast to fit.")

    def check(self) -> list[str]:
        if self.low_water >= self.high_water:
            return [f"low_water ({self.low_water}) must be below high_water ({self.high_water})"]
        return []


def forecast_peak(peaks: dict[int, int], micro_batch: int) -> float | None:
    """Least-squares line through the observed (micro-batch, peak) points, at `micro_batch`.

    Needs two distinct sizes; the slope is clamped at zero (memory never shrinks with more
    samples, and noise must not say it does)."""
    if micro_batch in peaks:
        return float(peaks[micro_batch])
    if len(peaks) < 2:
        return None
    xs, ys = list(peaks), [float(v) for v in peaks.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return my + slope * (micro_batch - mx)


@register
class MemoryPolicy(PolicyKind):
    kind = "memory"
    Params = MemoryParams
    knobs = frozenset({KNOB_MICRO_BATCH})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        p: MemoryParams = self.params
        spec = snapshot.knobs.get(KNOB_MICRO_BATCH)
        cap = snapshot.memory_cap_bytes
        mb = snapshot.config.get(KNOB_MICRO_BATCH)
        if spec is None or cap is None or not isinstance(mb, int) or not snapshot.memory:
            return []
        if KNOB_MICRO_BATCH in snapshot.pending:
            return []
        last = snapshot.last_action_step.get(KNOB_MICRO_BATCH)
        if last is not None and snapshot.step - last < p.cooldown_steps:
            return []
        rungs = sorted(int(c) for c in spec.choices) if spec.choices else _powers_of_two(mb)
        rungs = [r for r in rungs if r >= p.min_micro_batch]
        peak = snapshot.memory_peak_bytes
        high, low = p.high_water * cap, p.low_water * cap
        peaks = dict(snapshot.peak_by_micro_batch)

        if peak > high:
            lower = [r for r in rungs if r <= mb // 2] or [r for r in rungs if r < mb]
            if not lower:
                return []  # already on the leanest rung: nothing this policy can do
            # The largest rung forecast to fit; without a forecast, halve.
            target = lower[-1]
            for r in reversed(lower):
                f = forecast_peak(peaks, r)
                if f is None or f <= high:
                    target = r
                    break
                target = r
            why = (
                f"memory peak {format_bytes(peak)} is above the high-water mark {format_bytes(high)} "
                f"({p.high_water:g} of the {format_bytes(cap)} cap)"
            )
            return [self._set(snapshot, mb, target, why)]

        if p.step_up and peak < low:
            upper = [r for r in rungs if r > mb]
            if not upper:
                return []
            target = upper[0]
            f = forecast_peak(peaks, target)
            if f is None:
                # One point only: assume all memory scales with the micro-batch (conservative).
                f = peak * target / mb
            if f > high:
                return []
            why = (
                f"memory peak {format_bytes(peak)} is below the low-water mark {format_bytes(low)} and "
                f"micro-batch {target} is forecast at {format_bytes(f)}, under {format_bytes(high)}"
            )
            return [self._set(snapshot, mb, target, why)]
        return []

    def _set(self, snapshot: Snapshot, mb: int, target: int, why: str) -> Action:
        gb = snapshot.global_batch_size or mb
        accum_from, accum_to = -(-gb // mb), -(-gb // target)
        reason = (
            f"{why}: micro-batch {mb} -> {target}, gradient accumulation {accum_from} -> {accum_to}, "
            f"global batch {gb} kept"
        )
        return Action(kind=KNOB_MICRO_BATCH, params={"value": target}, reason=reason, step=snapshot.step + 1)


def _powers_of_two(mb: int) -> list[int]:
    out, r = [], 1
    while r <= max(mb, 1) * 2:
        out.append(r)
        r *= 2
    return out
