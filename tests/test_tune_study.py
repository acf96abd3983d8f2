"""`trainwarden tune` on replayed traces: a real Optuna study in a real SQLite file.

Each trial replays the real traces under tests/traces/ (test_replay.py says what they are).
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from trainwarden.controller.cli import main
from trainwarden.policies.loader import PolicyFileError, load_policy_file, load_policy_text
from trainwarden.policies.tuning.study import open_study, run_study
from trainwarden.policies.tuning.trial_replay import load_traces, replay_evaluator

TRACES = Path(__file__).parent / "traces"
TRACE_DIRS = [str(p) for p in sorted(TRACES.glob("demo-*"))]

POLICY = """\
version: 1
budget:
  device_memory: {cap}
  wall_time: 25s
controller:
  sync_every: 1
policies:
  - kind: memory
    high_water: 0.9
    low_water: 0.5
    cooldown_steps: 3
  - kind: compute
    cooldown_fraction: 0.2
    cooldown_shape: 1-sqrt
objective:
  minimize: final_loss
  max_cap_violations: 0
  grace_steps: 6
"""


def policy(tmp_path: Path, cap: str = "600MiB") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(POLICY.format(cap=cap))
    return path


def tune(*args: str) -> int:
    return main(["tune", *args])


def trials_of(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def test_a_study_completes_resumes_and_writes_a_valid_policy(tmp_path: Path) -> None:
    pf_path = policy(tmp_path)
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    out = tmp_path / "tuned.yaml"
    common = [
        "--policy",
        str(pf_path),
        "--storage",
        storage,
        "--study",
        "s",
        "--out",
        str(out),
        "--seed",
        "3",
    ]
    for trace in TRACE_DIRS:
        common += ["--trace", trace]
    assert tune(*common, "--trials", "3") == 0
    first = trials_of(storage, "s")
    assert len(first) == 3 and first[0].state == TrialState.COMPLETE
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAIL) for t in first)
    # The first trial is the file's own values.
    assert first[0].user_attrs.get("baseline") is True
    assert first[0].params["memory.high_water"] == 0.9 and first[0].params["compute.cooldown_fraction"] == 0.2

    # Again with more trials: the same study goes on from where it was (the 3 are kept).
    assert tune(*common, "--trials", "5") == 0
    after = trials_of(storage, "s")
    assert len(after) == 5
    assert [(t.number, t.params, t.value) for t in after[:3]] == [
        (t.number, t.params, t.value) for t in first
    ]

    tuned = load_policy_file(out)  # the strict loader accepts it
    study = optuna.load_study(study_name="s", storage=storage)
    best = study.best_trial
    assert tuned.tuned is not None
    assert (tuned.tuned.study, tuned.tuned.trial, tuned.tuned.value) == ("s", best.number, best.value)
    assert tuned.tuned.mode == "replay" and tuned.tuned.trials == 5
    assert [Path(t).name for t in tuned.tuned.traces] == [Path(t).name for t in TRACE_DIRS]
    params = {spec.name: spec.params for spec in tuned.policies}
    for name, value in best.params.items():
        pol, _, field = name.rpartition(".")
        assert getattr(params[pol], field) == value
    assert tuned.budget == load_policy_file(pf_path).budget and tuned.objective is not None
    # validate says OK too
    assert main(["validate", str(out)]) == 0
    # A tuned file tuned again: its provenance is the new study's, pointing at the tuned file.
    again = tmp_path / "again.yaml"
    args = ["--policy", str(out), "--storage", storage, "--study", "s2", "--out", str(again)]
    assert tune(*args, "--trials", "1", "--trace", TRACE_DIRS[0]) == 0
    retuned = load_policy_file(again).tuned
    assert retuned is not None and retuned.study == "s2" and retuned.base == str(out)


def test_an_interrupted_trial_is_failed_and_the_study_resumes(tmp_path: Path) -> None:
    pf = load_policy_file(policy(tmp_path))
    assert pf.objective is not None
    traces = load_traces(TRACE_DIRS)
    evaluate, _ = replay_evaluator(traces, pf.objective)
    calls = []

    def interrupted_on_the_third(trial, trial_pf):  # type: ignore[no-untyped-def]
        calls.append(trial.number)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(trial, trial_pf)

    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    study = open_study(storage, "s", "minimize", optuna.samplers.RandomSampler(seed=0))
    with pytest.raises(KeyboardInterrupt):
        run_study(pf, study, interrupted_on_the_third, 6, say=lambda _: None)
    trials = trials_of(storage, "s")
    assert len(trials) == 3 and trials[0].state == TrialState.COMPLETE
    assert trials[2].state == TrialState.FAIL and trials[2].user_attrs["failure"] == "interrupted"
    # A new process opens the same study and finishes it.
    study = open_study(storage, "s", "minimize", optuna.samplers.RandomSampler(seed=1))
    assert run_study(pf, study, evaluate, 6, say=lambda _: None) == 3
    assert len(trials_of(storage, "s")) == 6


def test_a_trial_that_breaks_the_cap_is_failed_not_good(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """With a cap below what any micro-batch of the demo needs, every trial breaks it: every one
    is FAIL with the reason, none has a value, and no tuned file is written."""
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    out = tmp_path / "tuned.yaml"
    args = ["--policy", str(policy(tmp_path, cap="300MiB")), "--storage", storage, "--study", "s"]
    rc = tune(*args, "--out", str(out), "--trials", "4", "--trace", TRACE_DIRS[0])
    assert rc == 2
    trials = trials_of(storage, "s")
    assert [t.state for t in trials] == [TrialState.FAIL] * 4
    assert all(t.value is None for t in trials)
    reasons = [t.user_attrs["failure"] for t in trials]
    assert reasons[0].startswith("memory cap broken")  # the file's own values
    assert all(r.startswith(("memory cap broken", "parameters refused by the policy")) for r in reasons)
    assert "no trial of study 's' completed" in capsys.readouterr().err
    assert not out.exists()


def test_a_cap_broken_in_some_trials_only_fails_those(tmp_path: Path) -> None:
    """At a 520 MiB cap micro-batch 16 fits only sometimes: a high high-water mark breaks it."""
    pf = load_policy_file(policy(tmp_path, cap="520MiB"))
    assert pf.objective is not None
    evaluate, _ = replay_evaluator(load_traces(TRACE_DIRS), pf.objective)
    study = open_study(
        f"sqlite:///{tmp_path / 'tune.db'}", "s", "minimize", optuna.samplers.RandomSampler(seed=0)
    )
    run_study(pf, study, evaluate, 12, say=lambda _: None)
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    broke = [t for t in failed if t.user_attrs["failure"].startswith("memory cap broken")]
    assert broke and done
    for t in broke:
        assert t.value is None and t.user_attrs["cap_violations"] > 0
    for t in failed:  # the rest: low_water drawn above high_water, which the policy refuses
        assert t in broke or t.user_attrs["failure"].startswith("parameters refused by the policy")
    for t in done:
        assert t.user_attrs["cap_violations"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "2"], "nothing to tune on: give --trace RUN_DIR"),
        (["--trials", "2", "--trace", "T", "--", "python", "x.py"], "not both"),
        (["--trials", "0", "--trace", "T"], "--trials 0: give at least 1"),
        (["--trials", "2", "--trace", "T", "--noise-shifts", "0"], "--noise-shifts 0: give at least 1"),
        (["--trials", "2", "--trace", "T", "--only", "nosuch"], "--only: no policy named nosuch"),
        (["--trials", "2", "--trace", "T", "--storage", "tune.db"], "for a file use sqlite:///tune.db"),
        (["--trials", "2", "--trace", "T", "--storage", "sqlite:////no/such/dir/x.db"], "does not exist"),
        (["--trials", "2", "--trace", "T", "--storage", "nosuchdb://h/x"], "cannot open the Optuna storage"),
        (["--trials", "2", "--trace", "/no/such/run"], "no telemetry.jsonl"),
    ],
)
def test_bad_flags_are_clear_errors(tmp_path: Path, capsys, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    args = [a.replace("T", TRACE_DIRS[0]) if a == "T" else a for a in args]
    storage = [] if "--storage" in args else ["--storage", f"sqlite:///{tmp_path / 'x.db'}"]
    assert tune("--policy", str(policy(tmp_path)), *storage, *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_policy_without_an_objective_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "p.yaml"
    path.write_text(POLICY.format(cap="600MiB").split("objective:")[0])
    assert tune("--policy", str(path), "--trials", "1", "--trace", TRACE_DIRS[0]) == 2
    assert "has no `objective:` section; add one" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ("  minimize: final_loss\n  maximize: tokens\n", "give exactly one of `minimize:` or `maximize:`"),
        ("  minimize: val_loss\n", "is not one of the choices"),
        ("  minimize: final_loss\n  grace_steps: -1\n", "grace_steps must be 0 or more"),
    ],
)
def test_the_objective_section_is_strict(objective: str, message: str) -> None:
    text = POLICY.format(cap="600MiB").split("objective:")[0] + "objective:\n" + objective
    with pytest.raises(PolicyFileError, match=message):
        load_policy_text(text)
