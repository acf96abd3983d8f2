"""Scoring a trial by a short real run (`trainwarden tune --policy P.yaml --trials N -- CMD`).

Each trial writes its policy file (the base file with the trial's parameters) and runs the
user's command under `trainwarden run` with it, in its own folder (`<work>/trial-NNNN/`: the
policy, the run directory, the run's output). While the run goes on its telemetry is read as it
is written and folded exactly as the controller folds it (controller/state.py `JobState`), and
the objective's metric so far is reported to Optuna every `report_every` steps, at the same
steps in every trial (so Optuna's MedianPruner compares like with like). A pruned trial, one
that breaks the memory cap past what the objective allows, or one that runs past the trial
timeout is stopped: SIGTERM to `trainwarden run`, which passes it to the job and stops its
controller; SIGKILL to the process group if it has not ended in `STOP_GRACE_S`. These are trial
runs, not the user's production job: a stopped trial's run is thrown away.

A run that exits non-zero (crashed, or killed) is a failed trial; so is one that breaks the cap.
The value is read from the run's own telemetry at its end, with the same definitions as a
replay's (smoothed loss, tokens, tokens per second of job time, job time).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainwarden.controller.protocol import ProtocolError, StepRecord
from trainwarden.controller.runlog import TELEMETRY_FILE
from trainwarden.controller.schema import Objective, PolicyFile
from trainwarden.controller.state import JobState
from trainwarden.policies.tuning.study import TrialResult, policy_text, write_atomic

#: Seconds a stopped trial run gets to end on SIGTERM before its process group is killed.
STOP_GRACE_S = 15.0


class RunWatcher:
    """Reads a run's telemetry.jsonl as it grows (whole lines only) and folds it into a JobState."""

    def __init__(self, run_dir: Path, pf: PolicyFile, objective: Objective) -> None:
        self.path = run_dir / TELEMETRY_FILE
        self.pf, self.objective = pf, objective
        self.state = JobState(budget=pf.budget)  # with the budget, it keeps the eval loss too
        self.offset = 0
        self.violations = 0
        self.new_steps: list[int] = []

    def poll(self) -> None:
        """Fold what was appended since the last poll; `new_steps` lists the steps it added."""
        import json

        self.new_steps = []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or rec.get("event") != "step":
                    continue
                step = StepRecord.from_json(rec)
            except (ValueError, ProtocolError):
                continue
            before = self.state.step
            self.state.ingest(step)
            if self.state.step == before:
                continue
            self.new_steps.append(step.step)
            cap = self.pf.budget.device_memory
            if cap is not None and step.memory and step.step > self.objective.grace_steps:
                limit = cap.resolve(min(m.total_bytes for m in step.memory))
                self.violations += max(m.peak_bytes for m in step.memory) > limit

    def metric(self) -> float | None:
        s = self.state
        name = self.objective.metric
        if name == "final_loss":
            return s.loss_ema
        if name == "eval_loss":
            return s.eval_loss  # the job's last `report(eval_loss=...)`; None if it never sent one
        if name == "tokens":
            return float(s.tokens)
        if name == "wall_time_s":
            return s.elapsed_s
        if name == "tokens_per_second":
            return s.tokens / s.elapsed_s if s.elapsed_s > 0 else None
        raise ValueError(f"unknown metric {name!r}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End a trial run: SIGTERM to `trainwarden run` (it passes it on), then SIGKILL to its group."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _trial_dir(work: Path, number: int) -> Path:
    """A fresh folder for the trial (a resumed study may reuse a number a crashed process had)."""
    base = work / f"trial-{number:04d}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}.{n}"), n + 1
    path.mkdir(parents=True)
    return path


def run_evaluator(
    command: Sequence[str],
    objective: Objective,
    work: Path,
    *,
    timeout_s: float = 1800.0,
    poll_s: float = 1.0,
    report_every: int = 5,
    say: Callable[[str], None] = print,
) -> Callable[[Any, PolicyFile], TrialResult]:
    """The `Evaluate` of `tune.run_study` for real runs of `command`."""

    def evaluate(trial: Any, pf: PolicyFile) -> TrialResult:
        tdir = _trial_dir(work, trial.number)
        policy = tdir / "policy.yaml"
        header = (
            f"# Trial {trial.number} of `trainwarden tune` (run mode): the base file with its parameters.\n"
        )
        write_atomic(policy, policy_text(pf, dict(trial.params), header))
        run_dir = tdir / "run"
        cmd = [sys.executable, "-m", "trainwarden.controller.cli", "run", "--policy", str(policy)]
        cmd += ["--run-dir", str(run_dir), "--quiet", "--stop-grace", str(STOP_GRACE_S / 2), "--", *command]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
        trial.set_user_attr("run_dir", str(run_dir))
        say(f"trial {trial.number}: running in {tdir}")
        with open(tdir / "output.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
            try:
                return _watch(trial, proc, RunWatcher(run_dir, pf, objective), tdir)
            finally:
                _stop(proc)

    def _watch(trial: Any, proc: subprocess.Popen[bytes], watch: RunWatcher, tdir: Path) -> TrialResult:
        deadline = time.monotonic() + timeout_s
        next_report = report_every
        while proc.poll() is None:
            time.sleep(poll_s)
            watch.poll()
            if watch.state.step >= next_report:
                # Report at a multiple of report_every: the steps every trial reports at.
                value = watch.metric()
                step = watch.state.step - watch.state.step % report_every
                if value is not None:
                    trial.report(value, step)
                next_report = step + report_every
                if trial.should_prune():
                    _stop(proc)
                    trial.set_user_attr("pruned_at_step", step)
                    return TrialResult(pruned=True, attrs=_attrs(watch))
            if watch.violations > objective.max_cap_violations:
                _stop(proc)
                return TrialResult(failure=_cap_message(watch), attrs=_attrs(watch))
            if time.monotonic() > deadline:
                _stop(proc)
                return TrialResult(failure=f"the run took over {timeout_s:g} s (--trial-timeout)")
        watch.poll()
        rc = proc.returncode
        if rc != 0:
            return TrialResult(
                failure=f"the run exited with {rc} at step {watch.state.step} (see {tdir / 'output.log'})",
                attrs=_attrs(watch),
            )
        if watch.violations > objective.max_cap_violations:
            return TrialResult(failure=_cap_message(watch), attrs=_attrs(watch))
        value = watch.metric()
        if value is None:
            return TrialResult(failure=f"the run reported no {objective.metric}", attrs=_attrs(watch))
        return TrialResult(value=value, attrs=_attrs(watch))

    def _cap_message(watch: RunWatcher) -> str:
        return (
            f"memory cap broken: {watch.violations} step(s) over the cap (at most "
            f"{objective.max_cap_violations} allowed) by step {watch.state.step}"
        )

    return evaluate


def _attrs(watch: RunWatcher) -> dict[str, Any]:
    s = watch.state
    return {
        "steps": s.step,
        "final_loss": s.loss_ema,
        "eval_loss": s.eval_loss,
        "tokens": s.tokens,
        "wall_time_s": s.elapsed_s,
        "cap_violations": watch.violations,
    }
