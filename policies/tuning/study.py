"""`trainwarden tune`: search a policy file's tunable parameters with Optuna.

One loop for both ways of scoring a trial (replayed traces, policies/tuning/trial_replay.py; short real
runs, policies/tuning/trial_run.py): ask Optuna for parameters, build the trial's policy file, score it,
tell Optuna. The study lives in an Optuna storage (SQLite by default; any RDB URL lets many
machines tune one study, Optuna's own distributed mode), so a tune is resumed by running the
same command again: `--trials N` is the number of finished trials the study should have.

A trial that breaks the memory cap, whose run crashes, or whose parameters the policy refuses is
told to Optuna as FAIL, with the reason in its `failure` user attribute: it never counts as a
value, good or bad. The first trial of a new study is the file's own values (where they lie in
the tunable ranges), so a tuned file is never worse on the study's own scoring than the file it
came from.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainwarden.controller.schema import PolicyFile
from trainwarden.policies.tuning.space import InvalidParams, distributions, search_space, with_params


class TuneError(ValueError):
    """A tune that cannot go on; the message says why and how to fix it."""


@dataclass(frozen=True)
class TrialResult:
    """How a trial went: a value, or a failure (cap broken, crash, refused), or pruned."""

    value: float | None = None
    failure: str = ""
    pruned: bool = False
    attrs: dict[str, Any] = field(default_factory=dict)
    """Extra figures stored on the trial as user attributes (what the dashboard shows)."""


#: Scores one trial: (the Optuna trial, for reports and pruning; the trial's policy file).
Evaluate = Callable[[Any, PolicyFile], TrialResult]


def redact(url: str) -> str:
    """The storage URL without its password (it goes into files and logs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def default_storage(policy_path: str) -> str:
    return f"sqlite:///{Path(policy_path).stem}-tune.db"


def open_study(
    storage: str, study_name: str, direction: str, sampler: Any, pruner: Any = None, lock: Any = None
) -> Any:
    """The study, created or loaded (`load_if_exists`); TuneError for a storage that cannot be used.
    `lock` (policies/tuning/claim.py) is held meanwhile: workers starting together on a new database
    otherwise race to create Optuna's tables (PostgreSQL: a duplicate-key error on its enum type)."""
    from trainwarden.policies.tuning.claim import NoLock

    with lock or NoLock():
        return _open_study(storage, study_name, direction, sampler, pruner)


def _open_study(storage: str, study_name: str, direction: str, sampler: Any, pruner: Any) -> Any:
    import optuna

    if "://" not in storage:
        raise TuneError(
            f"--storage {storage!r} is not a database URL; for a file use sqlite:///{storage}"
            f"{'' if storage.endswith('.db') else '.db'} (or an RDB URL such as postgresql://user@host/db)"
        )
    if storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///") :]
        parent = Path(path).parent if path and path != ":memory:" else None
        if parent is not None and not parent.is_dir():
            raise TuneError(f"--storage {storage}: the folder {parent} does not exist; create it first")
    try:
        rdb = optuna.storages.RDBStorage(storage)
    except Exception as exc:  # sqlalchemy's errors for a bad URL, a missing driver, no server
        raise TuneError(
            f"cannot open the Optuna storage {redact(storage)} ({type(exc).__name__}: {exc}); "
            "use sqlite:///tune.db, or an RDB URL whose driver is installed"
        ) from None
    try:
        return optuna.create_study(
            storage=rdb,
            study_name=study_name,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except ValueError as exc:  # e.g. the study exists with the other direction
        raise TuneError(
            f"study {study_name!r} in {redact(storage)} cannot be used: {exc}; give another --study"
        ) from None


def make_sampler(name: str, seed: int | None) -> Any:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        from trainwarden.policies.tuning.sampler import FailureAwareTPESampler

        return FailureAwareTPESampler(seed=seed, n_startup_trials=8)
    raise TuneError(f"--sampler {name!r} is not known; use tpe or random")


def finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False) if t.state in done]


def claimed(study: Any) -> int:
    """Trials that count toward `--trials`: finished ones and those running now (in any worker)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
    return sum(t.state in states for t in study.get_trials(deepcopy=False))


def run_study(
    pf: PolicyFile,
    study: Any,
    evaluate: Evaluate,
    n_trials: int,
    say: Callable[[str], None] = print,
    lock: Any = None,
    only: Collection[str] | None = None,
) -> int:
    """Run trials until the study has `n_trials` finished or running (in this or other workers);
    returns how many this call ran. `lock` (policies/tuning/claim.py) serializes the claim of a
    trial across workers, so the study ends at exactly `n_trials` and no trial runs twice.
    `only`: the policies whose parameters are searched (default all)."""
    from optuna.trial import TrialState

    from trainwarden.policies.tuning.claim import NoLock

    lock = lock or NoLock()
    dims = search_space(pf, only)
    if not dims:
        kinds = ", ".join(spec.kind for spec in pf.policies) or "none"
        raise TuneError(f"{pf.path}: no policy in it has a tunable parameter (policies: {kinds})")
    dists = distributions(dims)
    ran = 0
    while True:
        with lock:
            if not study.get_trials(deepcopy=False):
                from trainwarden.policies.tuning.space import current_values

                baseline = current_values(pf, dims)
                if baseline:
                    study.enqueue_trial(baseline, user_attrs={"baseline": True}, skip_if_exists=True)
            if claimed(study) >= n_trials:
                break
            trial = study.ask(dists)
        ran += 1
        try:
            result = _score(pf, trial, evaluate)
        except BaseException:  # Ctrl-C, or a bug: the trial is not left RUNNING for ever
            trial.set_user_attr("failure", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            raise
        for key, value in result.attrs.items():
            trial.set_user_attr(key, value)
        if result.pruned:
            study.tell(trial, state=TrialState.PRUNED)
            say(f"trial {trial.number}: pruned at step {trial.user_attrs.get('pruned_at_step', '?')}")
        elif result.failure or result.value is None or not math.isfinite(result.value):
            reason = result.failure or f"no value ({result.value})"
            trial.set_user_attr("failure", reason)
            study.tell(trial, state=TrialState.FAIL)
            say(f"trial {trial.number}: failed: {reason}")
        else:
            study.tell(trial, result.value)
            best = _best(study)
            mark = " (best)" if best is not None and best.number == trial.number else ""
            say(f"trial {trial.number}: {result.value:.6g}{mark}  {_fmt_params(trial.params)}")
    return ran


def claim_writing(study: Any, n_trials: int, lock: Any = None) -> bool | None:
    """Whether this worker writes the tuned file: True for the first to find the study complete
    (`n_trials` finished, none running) for this trial count, False for any other, None while
    trials still run in other workers (the one that tells the last of them writes it)."""
    from optuna.trial import TrialState

    from trainwarden.policies.tuning.claim import WRITTEN_ATTR, NoLock

    with lock or NoLock():
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.RUNNING for t in trials) or len(finished(study)) < n_trials:
            return None
        if study.user_attrs.get(WRITTEN_ATTR) == n_trials:
            return False
        study.set_user_attr(WRITTEN_ATTR, n_trials)
        return True


def _score(pf: PolicyFile, trial: Any, evaluate: Evaluate) -> TrialResult:
    try:
        trial_pf = with_params(pf, trial.params)
    except InvalidParams as exc:
        return TrialResult(failure=f"parameters refused by the policy: {exc}")
    return evaluate(trial, trial_pf)


def _best(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:
        return None


def _fmt_params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def best_trial(study: Any) -> Any:
    """The best completed trial; TuneError when every trial failed or was pruned."""
    best = _best(study)
    if best is None:
        reasons = sorted({str(t.user_attrs.get("failure", t.state.name)) for t in finished(study)})
        raise TuneError(
            f"no trial of study {study.study_name!r} completed; reasons: {'; '.join(reasons)[:500]}. "
            "Widen the budget or the objective's max_cap_violations, check the traces, or run more "
            "trials (--trials: a small feasible region can take a hundred or more)"
        )
    return best


def policy_text(
    pf: PolicyFile, params: dict[str, Any], header: str, tuned: dict[str, Any] | None = None
) -> str:
    """The text of `pf`'s file with `params` (`policy.field` -> value) set and, when given, a
    `tuned:` section; checked with the strict loader (a file that would not load is a bug here,
    never the user's: TuneError says so rather than write it). Comments of the file are lost."""
    import yaml

    from trainwarden.policies.loader import PolicyFileError, build_policies, load_plain, load_policy_text

    data = load_plain(Path(pf.path).read_text(encoding="utf-8"), pf.path)
    items = data.get("policies") or []
    for name, value in params.items():
        policy, _, key = name.rpartition(".")  # a policy name may hold dots; a field never does
        for item in items:
            if (item.get("name") or item.get("kind")) == policy:
                item[key] = value
    data.pop("tuned", None)  # a tuned file tuned again: its old provenance is not this file's
    if tuned is not None:
        data["tuned"] = tuned
    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    try:
        build_policies(load_policy_text(text, pf.path))
    except PolicyFileError as exc:
        raise TuneError(f"the policy file written for a trial would not load ({exc})") from None
    return text


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_tuned(
    pf: PolicyFile,
    study: Any,
    trial: Any,
    out: str | os.PathLike[str],
    *,
    mode: str,
    storage: str,
    traces: Sequence[str] = (),
    command: Sequence[str] = (),
    note: str = "",
) -> Path:
    """Write the policy file with `trial`'s parameters and a `tuned:` section saying where they
    came from; `note` (e.g. the comparison with the file's own values) goes into the header."""
    assert pf.objective is not None
    base = Path(pf.path)
    tuned = {
        "study": study.study_name,
        "trial": trial.number,
        "value": float(trial.value),
        "metric": pf.objective.metric,
        "direction": pf.objective.direction,
        "mode": mode,
        "trials": len(finished(study)),
        "traces": [str(t) for t in traces],
        "command": [str(c) for c in command],
        "storage": redact(storage),
        "base": str(base),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    header = (
        f"# Tuned by `trainwarden tune` from {base.name}: study {study.study_name!r}, trial {trial.number}, "
        f"{pf.objective.metric} {trial.value:.6g} ({mode}).\n"
    )
    header += "".join(f"# {line}\n" for line in note.splitlines())
    out = Path(out)
    write_atomic(out, policy_text(pf, dict(trial.params), header, tuned))
    return out
