"""Tuning on many machines: trials per minute with 1, 2 and 3 `trainwarden tune` workers on one
PostgreSQL study, against one worker on SQLite (the default), in replay mode.

Every configuration evaluates the same trials: the same N parameter sets (drawn once by a seeded
RandomSampler) are enqueued in each fresh study before its workers start, and the workers take
them (Optuna gives enqueued trials first), so the best value found must be the same everywhere
(the replay is deterministic) and only the rate differs. Each worker is a real `trainwarden tune`
process (`--trace` the recorded demo runs under tests/traces); the server is a real PostgreSQL
started here as in the tests (tests/pg_helpers.py: Debian's package), with fsync on as a real
server runs (SQLite's default synchronous mode syncs each commit too).

Rates: `study` counts trials over the study's own span (first trial started to last trial
finished, from Optuna's timestamps: the workers' work and the database); `wall` over the
commands' whole time (process start, imports and the trace fit included). Ratios are against
SQLite with one worker.

Prints one JSON object and saves it (default bench/results/tune_workers.json). Progress on stderr.

    .venv/bin/python bench/tune_workers.py             # 120 trials per configuration, ~2 min
    .venv/bin/python bench/tune_workers.py --trials 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pg_helpers import new_database, postgres_server, unavailable  # noqa: E402
from test_tune_study import POLICY as STUDY_POLICY  # noqa: E402
from test_tune_study import TRACE_DIRS as TRACES  # noqa: E402

from trainwarden.policies.loader import load_policy_text  # noqa: E402
from trainwarden.policies.tuning.space import distributions, search_space  # noqa: E402

#: The replay tests' policy (tests/test_tune_study.py), at the cap the recorded traces ran under.
POLICY = STUDY_POLICY.format(cap="600MiB")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def draws(n: int) -> list[dict[str, Any]]:
    """N parameter sets from a seeded RandomSampler: the same work for every configuration."""
    pf = load_policy_text(POLICY)
    dists = distributions(search_space(pf))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        t = study.ask(dists)
        out.append(dict(t.params))
        study.tell(t, 0.0)
    return out


def one(name: str, storage: str, workers: int, params: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    study = optuna.create_study(storage=storage, study_name="bench", direction="minimize")
    for p in params:
        study.enqueue_trial(p)
    policy = work / "job.yaml"
    policy.write_text(POLICY)
    args = ["--policy", str(policy), "--storage", storage, "--study", "bench", "--trials", str(len(params))]
    args += ["--out", str(work / "tuned.yaml"), "--sampler", "random"]
    for t in TRACES:
        args += ["--trace", t]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trainwarden.controller.cli", "tune", *args, "--seed", str(i)],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    errs = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - t0
    for p, err in zip(procs, errs):
        if p.returncode != 0:
            raise SystemExit(f"{name}: a worker failed:\n{err[-2000:]}")
    trials = optuna.load_study(study_name="bench", storage=storage).get_trials()
    done = [t for t in trials if t.datetime_complete is not None]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    best = optuna.load_study(study_name="bench", storage=storage).best_trial
    per_worker = [len([ln for ln in e.splitlines() if ln.startswith("trial ")]) for e in errs]
    result = {
        "storage": name,
        "workers": workers,
        "trials": len(trials),
        "finished": len(done),
        "trials_per_worker": per_worker,
        "tuned_file_writers": sum("  wrote " in e for e in errs),
        "study_s": round(span, 3),
        "wall_s": round(wall, 3),
        "trials_per_min_study": round(60 * len(done) / span, 1) if span > 0 else None,
        "trials_per_min_wall": round(60 * len(done) / wall, 1),
        "best_value": best.value,
        "best_trial": best.number,
    }
    say(f"{name} x{workers}: {json.dumps(result)}")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "tune_workers.json"))
    args = ap.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(f"tune_workers: {why}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    params = draws(args.trials)
    runs = []
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as tmp, postgres_server(fsync=True) as url:
        root = Path(tmp)
        (root / "sqlite").mkdir()
        runs.append(one("sqlite", f"sqlite:///{root / 'sqlite' / 'tune.db'}", 1, params, root / "sqlite"))
        for n in (1, 2, 3):
            work = root / f"pg{n}"
            work.mkdir()
            runs.append(one("postgresql", new_database(url, f"bench{n}"), n, params, work))
    base = runs[0]
    for r in runs:
        for key in ("trials_per_min_study", "trials_per_min_wall"):
            r[key.replace("trials_per_min", "ratio")] = (
                round(r[key] / base[key], 3) if r[key] and base[key] else None
            )
    out = {
        "bench": "tune_workers",
        "trials": args.trials,
        "traces": [Path(t).name for t in TRACES],
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "optuna": optuna.__version__,
        },
        "runs": runs,
        "best_value_matches": len({r["best_value"] for r in runs}) == 1,
        "exact_trial_counts": all(r["trials"] == args.trials == r["finished"] for r in runs),
        "one_writer_each": all(r["tuned_file_writers"] == 1 for r in runs),
    }
    text = json.dumps(out, indent=2)
    Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
