"""The failure-aware TPE learns from failed trials, which stay FAIL in a real SQLite study."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from trainwarden.policies.tuning.sampler import FailureAwareTPESampler, _FailuresAsInfeasible

SPACE = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def run(tmp_path: Path, sampler: optuna.samplers.BaseSampler, name: str) -> optuna.Study:
    """40 trials of a problem whose feasible region is x <= 0.2 (80% of the space breaks the
    "cap"); the value is x, maximised, so the best lies on the edge of the failures."""
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'db.sqlite'}", study_name=name, direction="maximize", sampler=sampler
    )
    for _ in range(40):
        trial = study.ask(SPACE)
        x = trial.params["x"]
        if x > 0.2:
            trial.set_user_attr("failure", "memory cap broken: test")
            trial.set_user_attr("cap_violations", int(x * 10))
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, x)
    return study


def test_failed_trials_steer_the_search_but_stay_failed(tmp_path: Path) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    aware = run(tmp_path, FailureAwareTPESampler(seed=0, n_startup_trials=8), "aware")
    plain = run(tmp_path, optuna.samplers.TPESampler(seed=0, n_startup_trials=8), "plain")

    def late_failures(study: optuna.Study) -> int:
        return sum(t.state == TrialState.FAIL for t in study.trials[20:])

    # Plain TPE never sees a failure: it samples the failing 80% as often as random search does.
    assert late_failures(aware) < late_failures(plain)
    # The storage is untouched: failed trials are FAIL with no value, and never the best.
    failed = [t for t in aware.trials if t.state == TrialState.FAIL]
    assert failed and all(t.value is None for t in failed)
    assert aware.best_value <= 0.2
    # What TPE is shown: each failure as an infeasible completed trial, ranked by its violations.
    shown = _FailuresAsInfeasible(aware)._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    infeasible = [t for t in shown if t.constraints]
    assert len(infeasible) == len(failed)
    assert all(t.constraints["0"] >= 1 for t in infeasible)


def test_an_interrupted_trial_is_not_shown_as_infeasible(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    trial = study.ask(SPACE)
    trial.set_user_attr("failure", "interrupted")
    study.tell(trial, state=TrialState.FAIL)
    assert _FailuresAsInfeasible(study)._get_trials(states=(TrialState.COMPLETE,)) == []


def test_a_replayed_failure_is_ranked_by_how_far_over_the_cap_it_went(tmp_path: Path) -> None:
    """A replay trial carries `cap_excess` (worst step over the cap, a fraction of it): that is
    the constraint TPE ranks it by, not the count of steps over; a real-run trial has none and
    keeps its count."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    for violations, excess in ((3, 0.45), (15, 0.02), (4, None)):
        trial = study.ask(SPACE)
        trial.set_user_attr("failure", "memory cap broken: test")
        trial.set_user_attr("cap_violations", violations)
        if excess is not None:
            trial.set_user_attr("cap_excess", excess)
        study.tell(trial, state=TrialState.FAIL)
    shown = _FailuresAsInfeasible(study)._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [t.constraints["0"] for t in shown] == [0.45, 0.02, 4.0]
