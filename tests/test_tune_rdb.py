"""Tuning on many machines: several `trainwarden tune` processes at once on one study held by a
real PostgreSQL server (tests/pg_helpers.py starts it; skipped with the reason where it cannot
be, required in CI). The study must end with exactly the asked number of finished trials, each
trial run by one worker only, and the tuned file written once, by one worker."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TRAINWARDEN, job_env, tiny_job
from pg_helpers import new_database, postgres_server, require
from test_tune_study import POLICY as STUDY_POLICY
from test_tune_study import TRACE_DIRS as TRACES

pytestmark = pytest.mark.slow
optuna = pytest.importorskip("optuna")

#: The replay tests' policy (tests/test_tune_study.py), at the cap the recorded traces ran under.
REPLAY_POLICY = STUDY_POLICY.format(cap="600MiB")
RUN_POLICY = """\
version: 1
budget:
  device_memory: 8GiB
  wall_time: 2m
controller:
  decide_interval_s: 0.1
policies:
  - kind: compute
objective:
  minimize: final_loss
"""


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    require()
    with postgres_server() as url:
        yield url


def workers(n: int, args: list[str], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """`n` tune processes started together (each its own sampler seed), waited for."""
    procs = [
        subprocess.Popen(
            [*TRAINWARDEN, "tune", "--sampler", "random", "--seed", str(i), *args],
            cwd=cwd,
            env=job_env(OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def check_study(
    url: str, study: str, n: int, results: list[subprocess.CompletedProcess[str]], out: Path
) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    trials = optuna.load_study(study_name=study, storage=url).get_trials()
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    # Exactly the asked number, every one finished: none lost (left running), none past it.
    assert len(trials) == n and all(t.state in done for t in trials), [t.state for t in trials]
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    # Each trial was run by exactly one worker (each says "trial N: ..." once for a trial it ran).
    ran = [int(m) for r in results for m in re.findall(r"^trial (\d+): (?!running)", r.stderr, re.M)]
    assert sorted(ran) == list(range(n)), sorted(ran)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n  # no draw run twice
    # The tuned file: written once, by one worker, from the finished study's best trial.
    writers = [r for r in results if f"wrote {out}" in r.stderr]
    assert len(writers) == 1, [r.stderr[-500:] for r in results]
    from trainwarden.policies.loader import load_policy_file

    tuned = load_policy_file(out).tuned
    best = optuna.load_study(study_name=study, storage=url).best_trial
    assert tuned is not None and (tuned.trial, tuned.value, tuned.trials) == (best.number, best.value, n)
    assert "@" not in tuned.storage or ":" not in tuned.storage.split("@")[0].split("//")[-1]


def test_three_replay_workers_share_one_study(postgres: str, tmp_path: Path) -> None:
    url = new_database(postgres, "replay")
    (tmp_path / "job.yaml").write_text(REPLAY_POLICY)
    out = tmp_path / "tuned.yaml"
    args = ["--policy", "job.yaml", "--storage", url, "--study", "s", "--out", str(out), "--trials", "24"]
    for trace in TRACES:
        args += ["--trace", trace]
    check_study(url, "s", 24, workers(3, args, tmp_path), out)


def test_two_run_workers_share_one_study(postgres: str, tmp_path: Path) -> None:
    """Real runs (the demo script on a one-layer model, a few seconds each): 3 trials, 2 workers."""
    url = new_database(postgres, "runs")
    (tmp_path / "job.yaml").write_text(RUN_POLICY)
    out = tmp_path / "tuned.yaml"
    args = ["--policy", "job.yaml", "--storage", url, "--study", "r", "--out", str(out), "--trials", "3"]
    results = workers(2, [*args, "--", *tiny_job(30)], tmp_path)
    check_study(url, "r", 3, results, out)
    # Each trial ran in its own work folder, once (tune-runs/<study>/trial-NNNN).
    assert sorted(p.name for p in (tmp_path / "tune-runs" / "r").iterdir()) == [
        f"trial-{i:04d}" for i in range(3)
    ]


def test_sqlite_stays_the_default(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text(REPLAY_POLICY)
    args = ["tune", "--policy", "job.yaml", "--trials", "2", "--trace", TRACES[0]]
    r = subprocess.run([*TRAINWARDEN, *args], cwd=tmp_path, env=job_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "job-tune.db").exists() and "sqlite:///job-tune.db" in r.stderr
    assert (
        len(
            optuna.load_study(
                study_name="job-replay", storage="sqlite:///" + str(tmp_path / "job-tune.db")
            ).get_trials()
        )
        == 2
    )
