"""TPE that learns from failed trials, which stay FAIL in the storage.

Optuna's TPE reads only COMPLETE and PRUNED trials: a FAIL trial teaches it nothing. When most
of a search space breaks the memory cap (a long hysteresis under a cap far below the job's
starting point), TPE then never leaves its random start-up phase, and is random search by
another name (measured: bench/tune_replay.py, 35 of 40 trials failed and TPE drew exactly what
RandomSampler drew).

This sampler shows TPE a view of the study in which each trial that failed for a reason of its
parameters (a broken cap, parameters the policy refused: user attribute `failure`, with
`cap_violations` when there were any) is a completed, infeasible trial, constraint = how far
over the cap its worst step went, as a fraction of the cap (`cap_excess`, replay trials), else
its violations (at least 1). TPE's own constrained-optimisation rule then puts it below every
feasible trial, and the further over, the worse. Why the distance and not the count of steps
over: the count misleads. On a job whose memory grows mid-run (bench/README.md, tune_replay),
a late but quick step-down (high-water 0.95, cooldown 1) broke the cap on fewer steps than an
early one held too long (0.77, cooldown 16), and TPE, ranked by the count, drifted to the high
marks and found no feasible file in 100 trials; the early one went less far over (at
micro-batch 16 when the windows grew, not 32), which is the way to a file that holds. The
storage is not touched: the trial is FAIL there, has no value, and can never be the best. A
trial that failed for a reason outside its parameters (interrupted, a crash of the job) stays
invisible, as with plain TPE.
"""

from __future__ import annotations

from typing import Any

from optuna.samplers import TPESampler
from optuna.trial import FrozenTrial, TrialState

#: `failure` user attributes that say nothing about the parameters: not shown to TPE.
_NOT_THE_PARAMETERS = ("interrupted", "the run exited with", "the run took over")


def _as_infeasible(t: FrozenTrial) -> FrozenTrial | None:
    failure = str(t.user_attrs.get("failure", ""))
    if t.state != TrialState.FAIL or not failure or failure.startswith(_NOT_THE_PARAMETERS):
        return None
    violations = float(t.user_attrs.get("cap_violations") or 0)
    excess = t.user_attrs.get("cap_excess")
    far = float(excess) if isinstance(excess, (int, float)) and excess > 0 else max(1.0, violations)
    system = {**t.system_attrs, "constraints": [far]}
    return FrozenTrial(
        number=t.number,
        state=TrialState.COMPLETE,
        value=0.0,  # never read: TPE ranks infeasible trials by their constraint alone
        datetime_start=t.datetime_start,
        datetime_complete=t.datetime_complete,
        params=t.params,
        distributions=t.distributions,
        user_attrs=t.user_attrs,
        system_attrs=system,
        intermediate_values=t.intermediate_values,
        trial_id=t._trial_id,
    )


class _FailuresAsInfeasible:
    """The study as TPE sees it; everything but the trial list is the study's own."""

    def __init__(self, study: Any) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self, deepcopy: bool = True, states: Any = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=None, use_cache=use_cache)
        out = []
        for t in trials:
            shown = _as_infeasible(t) or t
            if states is None or shown.state in states:
                out.append(shown)
        return out

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)


class FailureAwareTPESampler(TPESampler):
    """TPESampler over a view where parameter-caused failures are infeasible completed trials."""

    def infer_relative_search_space(self, study: Any, trial: FrozenTrial) -> dict[str, Any]:
        return super().infer_relative_search_space(_FailuresAsInfeasible(study), trial)

    def sample_relative(self, study: Any, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return super().sample_relative(_FailuresAsInfeasible(study), trial, search_space)

    def sample_independent(self, study: Any, trial: FrozenTrial, name: str, distribution: Any) -> Any:
        return super().sample_independent(_FailuresAsInfeasible(study), trial, name, distribution)
