"""`trainwarden tune`: the command's arguments, checked, and the two modes put together.

    trainwarden tune --policy P.yaml --trace RUN_DIR [--trace ...] --trials N [--storage URL]
    trainwarden tune --policy P.yaml --trials N [--storage URL] -- <launch command>

Errors a user can fix (no objective, a bad trace, a storage that cannot be opened, both modes
or neither) are TuneError or TraceError; the CLI prints them as one line, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from trainwarden.controller.schema import PolicyFile
from trainwarden.policies.tuning.replay.trace import TraceError
from trainwarden.policies.tuning.space import InvalidParams, search_space
from trainwarden.policies.tuning.study import (
    TuneError,
    best_trial,
    claim_writing,
    default_storage,
    finished,
    make_sampler,
    open_study,
    redact,
    run_study,
    write_tuned,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy", required=True, help="the policy file to tune; it needs an `objective:` section"
    )
    p.add_argument(
        "--trace",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="a recorded run to replay (repeat for several); without --trace, give -- and a launch command",
    )
    p.add_argument(
        "--trials",
        type=int,
        required=True,
        help="finished trials the study should have: running the same command again resumes it",
    )
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default sqlite:///<policy name>-tune.db here; an RDB URL lets "
        "several machines tune one study)",
    )
    p.add_argument("--study", help="study name (default <policy name>-replay or <policy name>-run)")
    p.add_argument("--out", help="tuned policy file to write (default <policy name>.tuned.yaml here)")
    p.add_argument("--sampler", default="tpe", choices=("tpe", "random"), help="Optuna sampler (default tpe)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed, for a repeatable search")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="POLICY",
        help="search only this policy's parameters (its name: the kind unless the file names it; "
        "repeat for several); the others keep the file's values",
    )
    p.add_argument(
        "--noise-shifts",
        type=int,
        default=1,
        metavar="N",
        help="replay mode: replay each trace N times, its recorded noise shifted by 1/N of the run "
        "each time; a file must hold the cap in every replay (default 1: as recorded)",
    )
    p.add_argument(
        "--work-dir",
        help="run mode: where each trial's policy and run directory go (default tune-runs/<study>)",
    )
    p.add_argument(
        "--trial-timeout",
        type=float,
        default=1800.0,
        help="run mode: seconds after which a trial's run is stopped and the trial failed (default 1800)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="run mode: -- then the job's launch command")


def load(path: str) -> PolicyFile:
    from trainwarden.policies.loader import PolicyFileError, load_policy_file

    try:
        pf = load_policy_file(path)
    except PolicyFileError as exc:
        raise TuneError(f"the policy file is not valid:\n{exc}") from None
    if pf.objective is None:
        raise TuneError(
            f"{path} has no `objective:` section; add one, e.g.\n"
            "objective:\n  minimize: final_loss\n  max_cap_violations: 0"
        )
    return pf


def tune_main(args: argparse.Namespace, say: Any = None) -> int:
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.trials < 1:
        raise TuneError(f"--trials {args.trials}: give at least 1")
    if args.noise_shifts < 1:
        raise TuneError(f"--noise-shifts {args.noise_shifts}: give at least 1 (1: each trace as recorded)")
    if args.trace and command:
        raise TuneError("give either --trace RUN_DIR (replay) or -- a launch command (real runs), not both")
    if not args.trace and not command:
        raise TuneError(
            "nothing to tune on: give --trace RUN_DIR (a recorded run) or -- and the job's launch command"
        )
    pf = load(args.policy)
    objective = pf.objective
    assert objective is not None
    only = frozenset(args.only) or None
    try:
        search_space(pf, only)
    except InvalidParams as exc:
        raise TuneError(f"--only: {exc}") from None
    try:
        import optuna
    except ImportError:
        raise TuneError("Optuna is not installed: pip install 'trainwarden[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mode = "replay" if args.trace else "run"
    stem = Path(args.policy).stem
    storage = args.storage or default_storage(args.policy)
    study_name = args.study or f"{stem}-{mode}"
    out = Path(args.out or f"{stem}.tuned.yaml")
    sampler = make_sampler(args.sampler, args.seed)
    if mode == "replay":
        from trainwarden.policies.tuning.trial_replay import load_traces, replay_evaluator, unmodelled

        traces = load_traces(args.trace)
        evaluate, model = replay_evaluator(traces, objective, args.noise_shifts)
        say(
            f"trainwarden tune: replaying {len(traces)} trace(s); loss law fitted with rmse "
            f"{model.loss.rmse:.3g}"
        )
        for note in (*model.notes, *unmodelled(pf)):
            say(f"  note: {note}")
        pruner = optuna.pruners.NopPruner()
    else:
        from trainwarden.policies.tuning.trial_run import run_evaluator

        work = Path(args.work_dir or Path("tune-runs") / study_name)
        evaluate = run_evaluator(command, objective, work, timeout_s=args.trial_timeout, say=say)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=10)
    from trainwarden.policies.tuning.claim import StudyLock

    lock = StudyLock(storage, study_name)
    try:
        study = open_study(storage, study_name, objective.direction, sampler, pruner, lock=lock)
    except BaseException:
        lock.close()
        raise
    say(
        f"trainwarden tune: study {study_name!r} in {redact(storage)}: {len(finished(study))} finished "
        f"trial(s), running to {args.trials}; {objective.direction} {objective.metric}"
    )
    if not lock.exact:
        say(
            "  note: no lock for this storage (PostgreSQL, MySQL and SQLite have one): several workers "
            "on it at once may end the study a trial or two past --trials"
        )
    try:
        ran = run_study(pf, study, evaluate, args.trials, say=say, lock=lock, only=only)
        writer = claim_writing(study, args.trials, lock)
    except KeyboardInterrupt:
        say(f"trainwarden tune: interrupted; run the same command again to resume study {study_name!r}")
        return 130
    finally:
        lock.close()
    if writer is None:
        say(
            f"trainwarden tune: this worker ran {ran} trial(s); the study's last trials still run in other "
            "workers, and the one that finishes the study writes the tuned file"
        )
        return 0
    if not writer and (ran or out.exists()):
        say(
            f"trainwarden tune: this worker ran {ran} trial(s); the study is complete and another worker "
            "wrote its tuned file (run the same command again once to write one here)"
        )
        return 0
    best = best_trial(study)
    from trainwarden.policies.tuning.report import replay_comparison, study_comparison

    comparison = (
        replay_comparison(pf, best, evaluate) if mode == "replay" else study_comparison(pf, study, best, only)
    )
    path = write_tuned(
        pf,
        study,
        best,
        out,
        mode=mode,
        storage=storage,
        traces=[str(Path(t).resolve()) for t in args.trace],
        command=command,
        note=f"Against the base file: {comparison.line()}.",
    )
    states = [t.state.name for t in finished(study)]
    counts = ", ".join(
        f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "FAIL", "PRUNED") if s in states
    )
    say(
        f"trainwarden tune: {len(states)} trials ({counts}); best trial {best.number}: "
        f"{objective.metric} {best.value:.6g}\n  {comparison.line()}\n"
        f"  wrote {path} (check it: trainwarden validate {path})"
    )
    print(path)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """The CLI's entry: user errors become the CLI's UsageError (one line, exit 2)."""
    from trainwarden.controller.cli import UsageError

    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        return tune_main(args)
    except (TuneError, TraceError) as exc:
        raise UsageError(str(exc)) from None
