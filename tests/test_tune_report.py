"""`trainwarden tune` ends with the best trial against the file's own values, scored the same way.

Replay mode on the real traces under tests/traces/ with a real SQLite study; run mode's
comparison (with the study's trial of the file's values) on a real in-memory Optuna study.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial
from test_tune_study import TRACE_DIRS
from test_tune_study import policy as write

from trainwarden.controller.cli import main
from trainwarden.policies.loader import load_policy_file
from trainwarden.policies.schema import PolicyFile
from trainwarden.policies.tuning.report import replay_comparison, study_comparison
from trainwarden.policies.tuning.space import current_values, distributions, search_space
from trainwarden.policies.tuning.trial_replay import load_traces, replay_evaluator

LINE = re.compile(
    r"best final_loss (\S+) against (\S+) for the file's own values \(replayed on the same traces\)"
)


def tune(tmp_path: Path, pf_path: Path, trials: int) -> tuple[int, str, Path]:
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    out = tmp_path / "tuned.yaml"
    args = ["tune", "--policy", str(pf_path), "--storage", storage, "--study", "s", "--out", str(out)]
    args += ["--seed", "5", "--trials", str(trials)]
    for trace in TRACE_DIRS:
        args += ["--trace", trace]
    return main(args), storage, out


def test_tune_prints_and_records_the_best_against_the_files_own_values(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rc, storage, out = tune(tmp_path, write(tmp_path), 6)
    assert rc == 0
    err = capsys.readouterr().err
    found = LINE.search(err)
    assert found, err
    best, own = float(found.group(1)), float(found.group(2))
    study = optuna.load_study(study_name="s", storage=storage)
    # The file's own values replayed outside the study give what its baseline trial gave: the same scoring.
    baseline = study.trials[0]
    assert baseline.user_attrs.get("baseline") is True
    assert own == float(f"{baseline.value:.6g}")
    assert best == float(f"{study.best_value:.6g}") and best <= own
    verdict = "tuning bought nothing" if best == own else "% better than the file's own values"
    assert verdict in err
    # The same line is in the tuned file's header, and the file still loads.
    header = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert any("Against the base file: best final_loss" in line for line in header), header
    assert load_policy_file(out).tuned is not None


def test_files_own_values_that_break_the_cap_are_said(tmp_path: Path) -> None:
    """At 480 MiB the file's high-water mark lets micro-batch 16 break the cap in the replay: the
    line says the file's own values fail, and why, rather than inventing a gain."""
    pf = load_policy_file(write(tmp_path, cap="480MiB"))
    assert pf.objective is not None
    evaluate, _ = replay_evaluator(load_traces(TRACE_DIRS), pf.objective)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.add_trial(create_trial(value=4.3))  # a feasible best, found some other way
    cmp = replay_comparison(pf, study.best_trial, evaluate)
    assert cmp.baseline is None and cmp.gain is None
    assert cmp.line().startswith(
        "the file's own values have no final_loss (replayed on the same traces): memory cap broken"
    )


def _study(
    pf: PolicyFile, values: list[tuple[float, float | None]], direction: str = "minimize"
) -> optuna.Study:
    """Trials of the file's space as `run_study` makes them: the file's values, cooldown_fraction varied."""
    study = optuna.create_study(direction=direction, storage=optuna.storages.InMemoryStorage())
    own = current_values(pf, search_space(pf))
    dist = {k: v for k, v in distributions(search_space(pf)).items() if k in own}
    for x, v in values:
        params = {**own, "compute.cooldown_fraction": x}
        if v is None:
            study.add_trial(
                create_trial(
                    params=params,
                    distributions=dist,
                    state=TrialState.FAIL,
                    user_attrs={"failure": "the run exited with 1"},
                )
            )
        else:
            study.add_trial(create_trial(params=params, distributions=dist, value=v))
    return study


def _one_knob(tmp_path: Path, direction: str = "minimize") -> Path:
    path = tmp_path / "one.yaml"
    path.write_text(
        "version: 1\nbudget:\n  tokens: 100k\npolicies:\n  - kind: compute\n    cooldown_fraction: 0.2\n"
        f"objective:\n  {direction}: final_loss\n"
    )
    return path


def test_run_mode_compares_with_the_trial_of_the_files_values(tmp_path: Path) -> None:
    pf = load_policy_file(_one_knob(tmp_path))
    study = _study(pf, [(0.2, 4.0), (0.4, 3.0), (0.1, 3.5)])
    cmp = study_comparison(pf, study, study.best_trial)
    assert (cmp.best, cmp.baseline) == (3.0, 4.0) and cmp.gain == 0.25
    assert "trial 0, run the same way" in cmp.line() and "25.00% better" in cmp.line()

    maximize = load_policy_file(_one_knob(tmp_path, "maximize"))
    study = _study(maximize, [(0.2, 4.0), (0.4, 3.0)], "maximize")
    cmp = study_comparison(maximize, study, study.best_trial)
    assert cmp.gain == 0.0 and "tuning bought nothing" in cmp.line()

    study = _study(pf, [(0.2, None), (0.4, 3.0)])
    cmp = study_comparison(pf, study, study.best_trial)
    assert cmp.baseline is None and "the run exited with 1" in cmp.line()

    study = _study(pf, [(0.3, 3.0)])  # a study begun from another file: nothing to compare with
    cmp = study_comparison(pf, study, study.best_trial)
    assert cmp.baseline is None and "no trial of the study ran them" in cmp.line()
