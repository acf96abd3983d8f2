"""`trainwarden tune -- CMD`: each trial a real short `trainwarden run` of the demo's script.

The job is tests/helpers.py `tiny_job` (examples/train_gpt.py on a one-layer model, ~100 steps a
second); the study is a real Optuna study in SQLite.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import optuna
import pytest
from helpers import tiny_job
from optuna.trial import TrialState

from trainwarden.controller.cli import main
from trainwarden.controller.runlog import read_jsonl
from trainwarden.policies.loader import load_policy_file
from trainwarden.policies.tuning.study import open_study, run_study
from trainwarden.policies.tuning.trial_run import run_evaluator

pytestmark = pytest.mark.slow

POLICY = """\
version: 1
budget:
  device_memory: {cap}
  wall_time: 2m
controller:
  decide_interval_s: 0.1
policies:
  - kind: memory
    min_micro_batch: 2
  - kind: compute
objective:
  minimize: final_loss
  grace_steps: {grace}
"""


def policy(tmp_path: Path, cap: str = "8GiB", grace: int = 0) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(POLICY.format(cap=cap, grace=grace))
    return path


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_trials_are_real_runs_and_the_best_is_written(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    out = tmp_path / "tuned.yaml"
    rc = main(
        [
            "tune",
            *("--policy", str(policy(tmp_path)), "--trials", "2", "--storage", storage, "--study", "s"),
            *("--out", str(out), "--work-dir", str(tmp_path / "work"), "--seed", "0"),
            "--",
            *tiny_job(40),
        ]
    )
    assert rc == 0
    trials = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    for t in trials:
        run_dir = Path(t.user_attrs["run_dir"])
        # The trial's run used the trial's parameters...
        pf = load_policy_file(run_dir.parent / "policy.yaml")
        params = {s.name: s.params for s in pf.policies}
        assert all(getattr(params[k.split(".")[0]], k.split(".")[1]) == v for k, v in t.params.items())
        # ... ran to its end, and the value is the run's own smoothed loss, as its summary says.
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["step"] == 40 and t.user_attrs["steps"] == 40
        assert t.value == pytest.approx(summary["loss"], rel=1e-9)
    tuned = load_policy_file(out)
    assert tuned.tuned is not None and tuned.tuned.mode == "run"
    assert tuned.tuned.command == tuple(tiny_job(40))


def test_a_crashing_run_and_a_run_over_the_cap_are_failed_trials(tmp_path: Path) -> None:
    pf = load_policy_file(policy(tmp_path))
    assert pf.objective is not None
    study = open_study(
        f"sqlite:///{tmp_path / 'tune.db'}", "s", "minimize", optuna.samplers.RandomSampler(seed=0)
    )
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    evaluate = run_evaluator(crash, pf.objective, tmp_path / "crash", poll_s=0.2, say=lambda _: None)
    run_study(pf, study, evaluate, 1, say=lambda _: None)
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and t.value is None
    assert t.user_attrs["failure"].startswith("the run exited with 3")

    # A 64 MiB cap is below any Python process: the first sampled step breaks it, the run is
    # stopped there (long before its 3000 steps) and the trial fails.
    tight = load_policy_file(policy(tmp_path, cap="64MiB"))
    assert tight.objective is not None
    evaluate = run_evaluator(
        tiny_job(3000), tight.objective, tmp_path / "cap", poll_s=0.2, say=lambda _: None
    )
    run_study(tight, study, evaluate, 2, say=lambda _: None)
    t = study.get_trials()[1]
    assert t.state == TrialState.FAIL and t.value is None
    assert t.user_attrs["failure"].startswith("memory cap broken")
    steps = [r["step"] for r in read_jsonl(Path(t.user_attrs["run_dir"]) / "telemetry.jsonl") if "step" in r]
    assert 0 < max(steps) < 3000


def test_a_pruned_trial_is_stopped_and_recorded_as_pruned(tmp_path: Path) -> None:
    """A real Optuna pruner (ThresholdPruner: any loss above 0 is hopeless) prunes at the first
    report; the run is stopped there, its processes are gone, and the trial is PRUNED."""
    pf = load_policy_file(policy(tmp_path))
    assert pf.objective is not None
    study = open_study(
        f"sqlite:///{tmp_path / 'tune.db'}",
        "s",
        "minimize",
        optuna.samplers.RandomSampler(seed=0),
        optuna.pruners.ThresholdPruner(upper=0.0),
    )
    evaluate = run_evaluator(tiny_job(5000), pf.objective, tmp_path / "w", poll_s=0.2, say=lambda _: None)
    run_study(pf, study, evaluate, 1, say=lambda _: None)
    (t,) = study.get_trials()
    assert t.state == TrialState.PRUNED
    assert t.user_attrs["pruned_at_step"] % 5 == 0 and t.intermediate_values
    run_dir = Path(t.user_attrs["run_dir"])
    steps = [r["step"] for r in read_jsonl(run_dir / "telemetry.jsonl") if "step" in r]
    assert max(steps) < 5000
    controller_pid = json.loads((run_dir / "controller.json").read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(controller_pid, 0)


def test_the_objective_can_be_the_jobs_validation_loss(tmp_path: Path) -> None:
    """`minimize: eval_loss` reads the last validation loss the job reported (train_gpt.py
    evaluates every --eval-every steps and sends it with `handle.report(eval_loss=...)`)."""
    path = policy(tmp_path)
    path.write_text(path.read_text().replace("minimize: final_loss", "minimize: eval_loss"))
    pf = load_policy_file(path)
    assert pf.objective is not None and pf.objective.metric == "eval_loss"
    study = open_study(
        f"sqlite:///{tmp_path / 'tune.db'}", "s", "minimize", optuna.samplers.RandomSampler(seed=0)
    )
    job = [*tiny_job(30), "--eval-every", "10"]
    run_study(pf, study, run_evaluator(job, pf.objective, tmp_path / "w", poll_s=0.2, say=lambda _: None), 1)
    (t,) = study.get_trials()
    assert t.state == TrialState.COMPLETE
    evals = [
        r["eval_loss"]
        for r in read_jsonl(Path(t.user_attrs["run_dir"]) / "telemetry.jsonl")
        if "eval_loss" in r
    ]
    assert len(evals) >= 2 and t.value == evals[-1] != t.user_attrs["final_loss"]


def test_a_run_past_the_trial_timeout_is_stopped_and_failed(tmp_path: Path) -> None:
    pf = load_policy_file(policy(tmp_path))
    assert pf.objective is not None
    study = open_study(
        f"sqlite:///{tmp_path / 'tune.db'}", "s", "minimize", optuna.samplers.RandomSampler(seed=0)
    )
    evaluate = run_evaluator(
        tiny_job(100_000), pf.objective, tmp_path / "w", timeout_s=8.0, poll_s=0.2, say=lambda _: None
    )
    run_study(pf, study, evaluate, 1, say=lambda _: None)
    (t,) = study.get_trials()
    assert t.state == TrialState.FAIL and t.user_attrs["failure"] == "the run took over 8 s (--trial-timeout)"
    run_dir = Path(t.user_attrs["run_dir"])
    controller_pid = json.loads((run_dir / "controller.json").read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(controller_pid, 0)
