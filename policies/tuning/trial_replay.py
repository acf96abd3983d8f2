"""Scoring a trial by replaying recorded runs (`trainwarden tune --trace RUN_DIR ...`).

The model is calibrated once on all the traces; each trace is then replayed under the trial's
policy file (policies/tuning/replay/simulate.py), and the trial's value is the mean of the objective's metric
over the traces. A memory cap broken in any trace, beyond what the objective allows, fails
the trial.

With `--noise-shifts N` each trace is replayed N times, its recorded noise (each step's memory
and time as a ratio to the fit) shifted by a fraction of the run each time. Why: a policy's
decisions hinge on a few peaks near its thresholds, and two recordings hold one draw of the
noise each; a file tuned on that draw alone can sit just on the safe side of it and break the
cap on the next real run (measured: bench/README.md, tune_replay, the long-context phase). N
times the replays per trial; the value is the mean of all, and a cap broken in any fails it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_MICRO_BATCH, KNOB_STOP
from trainwarden.controller.schema import Objective, PolicyFile
from trainwarden.policies.memory import RUNG_KNOBS
from trainwarden.policies.tuning.replay.model import KnobModel, fit_model
from trainwarden.policies.tuning.replay.simulate import ReplayResult, replay
from trainwarden.policies.tuning.replay.trace import Trace, load_trace
from trainwarden.policies.tuning.study import TrialResult


def load_traces(paths: Sequence[str]) -> list[Trace]:
    """Every trace (TraceError names the first bad one); all must be runs of one job."""
    traces = [load_trace(p) for p in paths]
    shapes = {(t.shape.param_count, t.shape.global_batch_size, t.shape.world_size) for t in traces}
    if len(shapes) > 1:
        from trainwarden.policies.tuning.replay.trace import TraceError

        raise TraceError(
            "the traces are of different jobs (parameters, global batch, world size differ: "
            f"{sorted(shapes)}); tune on runs of the job the policy is for"
        )
    return traces


def noise_shifts(trace: Trace, n: int) -> list[int]:
    """`n` shifts of the trace's noise, spread evenly over its steps (0 first: as recorded)."""
    return sorted({round(i * len(trace.steps) / n) for i in range(n)})


def score(
    pf: PolicyFile, traces: Sequence[Trace], model: KnobModel, objective: Objective, shifts: int = 1
) -> TrialResult:
    """The trial's value over the traces (each replayed at `shifts` alignments of its noise), or
    its failure."""
    runs = [(t, shift) for t in traces for shift in noise_shifts(t, shifts)]
    try:
        results = [replay(pf, t, model, objective.grace_steps, shift) for t, shift in runs]
    except Exception as exc:  # a policy that raises in the replay would raise live: a failed trial
        return TrialResult(failure=f"the replay raised {type(exc).__name__}: {exc}")
    attrs = summarize(results)
    for r, (_, shift) in zip(results, runs):
        if r.cap_violations > objective.max_cap_violations:
            where = f" with its noise shifted {shift} steps" if shift else ""
            return TrialResult(
                failure=(
                    f"memory cap broken: {r.cap_violations} step(s) over {r.cap_bytes} bytes "
                    f"(at most {objective.max_cap_violations} allowed) replaying {r.trace}{where}"
                ),
                attrs=attrs,
            )
    values = [r.metric(objective.metric) for r in results]
    if any(v is None for v in values):
        return TrialResult(failure=f"a replay has no {objective.metric}", attrs=attrs)
    return TrialResult(value=statistics.mean(v for v in values if v is not None), attrs=attrs)


def summarize(results: Sequence[ReplayResult]) -> dict[str, Any]:
    """Mean figures over the replays, stored on the trial."""

    def mean(name: str) -> float | None:
        vals = [r.metric(name) for r in results]
        known = [v for v in vals if v is not None]
        return statistics.mean(known) if known else None

    return {
        "final_loss": mean("final_loss"),
        "eval_loss": mean("eval_loss"),
        "tokens": mean("tokens"),
        "tokens_per_second": mean("tokens_per_second"),
        "wall_time_s": mean("wall_time_s"),
        "median_peak_bytes": mean("median_peak_bytes"),
        "peak_bytes": mean("peak_bytes"),
        "cap_violations": sum(r.cap_violations for r in results),
        # How far over the cap the worst replay went, as a fraction of the cap: the failure-aware
        # sampler's distance to feasibility (policies/tuning/sampler.py).
        "cap_excess": max(
            (max(0, r.peak_bytes - r.cap_bytes) / r.cap_bytes for r in results if r.cap_bytes), default=0.0
        ),
        "actions": sum(len(r.actions) for r in results),
    }


#: Knobs whose effect the replay models: memory and step time (micro-batch, engine rungs), loss
#: (the LR multiplier), the end of the run (stop).
MODELLED_KNOBS = frozenset({KNOB_MICRO_BATCH, KNOB_LR_MULTIPLIER, KNOB_STOP, *RUNG_KNOBS})


def unmodelled(pf: PolicyFile) -> list[str]:
    """One line per policy of the file that sets knobs the replay does not model: its parameters
    are searched, but cannot move a replayed objective (tune them on real runs instead)."""
    from trainwarden.policies.base import kinds

    registry = kinds()
    lines = []
    for spec in pf.policies:
        missing = sorted(set(getattr(registry[spec.kind], "knobs", ())) - MODELLED_KNOBS)
        if missing:
            lines.append(
                f"policy {spec.name!r} sets {', '.join(missing)}, which the replay does not model: its "
                "parameters cannot change a replayed objective; tune it with real runs (-- CMD)"
            )
    return lines


def replay_evaluator(traces: Sequence[Trace], objective: Objective, shifts: int = 1) -> tuple[Any, KnobModel]:
    """The `Evaluate` of `tune.run_study` for these traces, and the model it replays with."""
    model = fit_model(traces)

    def evaluate(trial: Any, pf: PolicyFile) -> TrialResult:
        return score(pf, traces, model, objective, shifts)

    return evaluate, model
