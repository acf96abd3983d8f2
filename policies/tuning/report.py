"""What tuning bought: the best trial against the policy file's own values, scored the same way.

A tuned file is only worth deploying if it beats the file it came from on the study's own
scoring, by more than the scoring's noise. `trainwarden tune` prints this line at its end and
writes it into the tuned file's header, so a user sees at once whether the search paid.

- Replay mode: the file itself is replayed on the same traces with the same fitted model (the
  replay is deterministic and takes well under a second), so the two values differ only by the
  parameters.
- Run mode: a real run of the file would cost as much as a trial, so the comparison is with the
  study's baseline trial (trial 0 of a new study is the file's own values, `run_study`) when it
  holds exactly the file's values; otherwise the line says there is nothing to compare with.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from trainwarden.controller.schema import PolicyFile
from trainwarden.policies.tuning.space import current_values, search_space
from trainwarden.policies.tuning.study import Evaluate, finished


@dataclass(frozen=True)
class Comparison:
    """The best trial's value against the file's own values' (None when those failed or are unknown)."""

    metric: str
    direction: str
    best: float
    baseline: float | None
    how: str
    """How the baseline was scored ('replayed on the same traces', 'trial N, a real run')."""
    failure: str = ""
    """Why the file's own values have no value (they broke the cap, the run crashed, no trial)."""

    @property
    def gain(self) -> float | None:
        """Improvement in the objective's direction, as a fraction of the baseline (> 0: better)."""
        if self.baseline is None or not math.isfinite(self.baseline) or self.baseline == 0:
            return None
        sign = 1.0 if self.direction == "minimize" else -1.0
        return sign * (self.baseline - self.best) / abs(self.baseline)

    def line(self) -> str:
        if self.baseline is None:
            return (
                f"the file's own values have no {self.metric} ({self.how}): {self.failure}; "
                f"the best trial's {self.best:.6g} is the only feasible result"
            )
        gain = self.gain
        verdict = (
            "tuning bought nothing: keep the file's own values"
            if gain is None or gain <= 0
            else f"{gain * 100:.2f}% better than the file's own values"
        )
        return (
            f"best {self.metric} {self.best:.6g} against {self.baseline:.6g} for the file's own values "
            f"({self.how}): {verdict}"
        )


def replay_comparison(pf: PolicyFile, best: Any, evaluate: Evaluate) -> Comparison:
    """The file replayed exactly as the trials were (the same `evaluate`, not through the study)."""
    assert pf.objective is not None
    result = evaluate(None, pf)
    value = result.value if result.value is not None and math.isfinite(result.value) else None
    return Comparison(
        pf.objective.metric,
        pf.objective.direction,
        float(best.value),
        value,
        "replayed on the same traces",
        failure="" if value is not None else (result.failure or "no value"),
    )


def study_comparison(
    pf: PolicyFile, study: Any, best: Any, only: Collection[str] | None = None
) -> Comparison:
    """The study's trial of exactly the file's values, if it has one (run mode); `only` as the
    study was run with."""
    assert pf.objective is not None
    own = current_values(pf, search_space(pf, only))
    objective = pf.objective
    for t in finished(study):
        if t.params == own:
            if t.value is not None:
                how = f"trial {t.number}, run the same way"
                return Comparison(objective.metric, objective.direction, float(best.value), t.value, how)
            failure = str(t.user_attrs.get("failure", t.state.name.lower()))
            return Comparison(
                objective.metric, objective.direction, float(best.value), None, f"trial {t.number}", failure
            )
    return Comparison(
        objective.metric,
        objective.direction,
        float(best.value),
        None,
        "no trial of the study ran them",
        "the study was started from another file",
    )
