"""What a stop does to the job: the cooperative stop, and the end of a job that does not read it.

Every adapter (plain PyTorch `Handle`, `DeepSpeedHandle`, the Accelerate `Accelerator`, the HF
Trainer callback) calls the two functions here, so the rule is written once:

- `training_step_begins(handle, step)`: at the start of each training step, after its data was
  loaded (the first micro-batch the adapter hands out, or the first training forward). It starts
  the step's memory-peak window (an evaluation pass, a checkpoint save or the data loading
  between steps is not a training step's peak: adapters/core/agent.py), and it is where a stop that
  was not obeyed is seen: a job that reads `should_stop` never starts another step.
- `stop_closes(handle)`: from the handle's `close()`, before the agent's: a job that ended after
  the stop obeyed it.

The stop action (adapters/knobs.py) runs the `on_stop` hooks and sets `should_stop` on every rank
at the same step (the agent's collective), then arms the rule it carries in its params (the
controller puts the policy file's `controller.stop`, `stop_grace_steps` and `checkpoint_on_stop`
there, so every rank reads the same rule). Its outcome is held back until it is known:

- the job starts no training step after the stop: `applied` when it closes ("it read
  should_stop");
- it starts one more than `stop_grace_steps` allow, and the rule is `end_job`: trainwarden ends
  it at the start of that step, before any of its compute, on every rank at the same step (each
  rank reaches the same step; no collective decides it): a checkpoint through the framework's
  own save (`handle._tw_checkpoint(dir)`), the outcome `applied`, the agent's flush, the engine
  and the process group torn down (`handle._tw_teardown()`), then `SystemExit(0)`, raised from
  the call the job was in (its loader or forward). SystemExit, not `os._exit`: the job's
  `finally` blocks and atexit handlers still run, and `except Exception` in its loop does not
  catch it; torchrun sees every rank exit 0.
- it trains on under `cooperative`: `ignored`, said once loudly in the job's stderr; the
  controller says it on the status line, in summary.json and in the report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainwarden.controller.protocol import ENV_ATTACH, ENV_RUN_DIR, Action, Outcome

log = logging.getLogger("trainwarden")

#: The stop action's params that carry the rule (set by the controller from the policy file).
PARAM_MODE, PARAM_GRACE, PARAM_CHECKPOINT = "on_stop", "grace_steps", "checkpoint"


def attached_with_zero_lines() -> bool:
    """True in a job that `trainwarden run --attach` (or TRAINWARDEN_ATTACH=1) attached."""
    return os.environ.get(ENV_ATTACH, "") not in ("", "0")


@dataclasses.dataclass(frozen=True)
class StopRule:
    """What this stop does to a job that trains on after it."""

    end_job: bool
    grace_steps: int
    checkpoint: bool

    @staticmethod
    def of(action: Action) -> StopRule:
        p = action.params
        zero_line = attached_with_zero_lines()
        mode = p.get(PARAM_MODE, "auto")
        end = mode == "end_job" or (mode == "auto" and zero_line)
        grace = p.get(PARAM_GRACE, 0)
        grace = grace if isinstance(grace, int) and not isinstance(grace, bool) and grace >= 0 else 0
        ck = p.get(PARAM_CHECKPOINT, "auto")
        return StopRule(end, grace, ck == "always" or (ck == "auto" and zero_line))


@dataclasses.dataclass
class _Armed:
    action_id: str
    step: int
    """The step after which the stop applied."""
    rule: StopRule
    hooks_problem: str
    at: float
    started: set[int] = dataclasses.field(default_factory=set)
    """Training steps begun after the stop (by number)."""
    reported: bool = False


def arm(handle: Any, action: Action, step: int, hooks_problem: str) -> None:
    """Called by the stop knob once its hooks ran: remember the rule. The `applied` that `apply`
    returns says only that should_stop is true: the agent holds it back (`Agent.hold`), and the
    outcome the controller logs is the one `_report` sends once it is known."""
    object.__setattr__(
        handle, "_tw_stop", _Armed(action.id, step, StopRule.of(action), hooks_problem, time.time())
    )
    agent = getattr(handle, "agent", None)
    if agent is not None:
        agent.hold(action.id)


def _report(handle: Any, armed: _Armed, outcome: str, detail: str) -> None:
    armed.reported = True
    agent = getattr(handle, "agent", None)
    if armed.hooks_problem:
        detail += f" ({armed.hooks_problem})"
    if agent is not None:
        agent.release(armed.action_id)
        agent.report(Outcome(armed.action_id, outcome, armed.step, time.time() - armed.at, detail))


def training_step_begins(handle: Any, step: int) -> None:
    """The adapter is about to run training step `step` (1-based, the one after the last finished):
    see the module docstring. Never raises, except the SystemExit that ends the job."""
    if handle.__dict__.get("_tw_begun") == step:
        return  # said twice for one step (its loader and its forward)
    object.__setattr__(handle, "_tw_begun", step)
    agent = getattr(handle, "agent", None)
    if agent is not None:
        agent.step_begins()
    armed: _Armed | None = handle.__dict__.get("_tw_stop")
    if armed is None or step <= armed.step or step in armed.started:
        return
    armed.started.add(step)
    past = len(armed.started)
    if armed.rule.end_job:
        if past > armed.rule.grace_steps:
            end_job(handle, armed, step)
        return
    if not armed.reported:
        msg = (
            f"the job goes on training after trainwarden's stop at step {armed.step} (it does not read "
            "should_stop, and the policy file's controller.stop is `cooperative`): it is outside its budget"
        )
        log.error("trainwarden: %s", msg)
        _report(handle, armed, "ignored", msg)


def stop_closes(handle: Any) -> None:
    """The handle closes: a stop that is armed and was obeyed is `applied` now."""
    armed: _Armed | None = handle.__dict__.get("_tw_stop")
    if armed is None or armed.reported:
        return
    _report(handle, armed, "applied", f"the job stopped after step {armed.step} (it read should_stop)")


def checkpoint_dir(handle: Any, step: int) -> Path:
    """Where trainwarden's checkpoint goes: the run directory (the same on every rank under
    `trainwarden run`), else the embedded controller's, else ./trainwarden-checkpoints."""
    base = os.environ.get(ENV_RUN_DIR)
    if not base:
        controller = getattr(handle, "controller", None)
        base = str(getattr(controller, "run_dir", "") or "trainwarden-checkpoints")
    return Path(base) / f"checkpoint-step-{step}"


def end_job(handle: Any, armed: _Armed, step: int) -> None:
    """End the job now (every rank reaches this at the same step): checkpoint, report, flush,
    tear down, SystemExit(0)."""
    t = time.perf_counter()
    last = step - 1
    saved = ""
    save = getattr(handle, "_tw_checkpoint", None)  # the Trainer saves its own (control.should_save)
    if armed.rule.checkpoint and save is not None:
        where = checkpoint_dir(handle, last)
        try:
            saved = str(save(where))
        except Exception as exc:  # the job ends either way: it is past its budget
            log.exception("trainwarden: the checkpoint at the stop failed")
            saved = f"checkpoint failed: {type(exc).__name__}: {exc}"
    detail = (
        f"trainwarden ended the job at step {last} ({last - armed.step} step(s) after the stop; it does not "
        f"read should_stop)" + (f"; checkpoint {saved}" if saved else "")
    )
    _report(handle, armed, "applied", detail)
    try:
        handle.close()
    except Exception:
        log.exception("trainwarden: closing at the stop failed")
    teardown = getattr(handle, "_tw_teardown", None)
    try:
        if teardown is not None:
            teardown()
        _end_process_group()
    except Exception:
        log.exception("trainwarden: tearing down at the stop failed")
    print(
        f"trainwarden: {detail}; exit 0 ({time.time() - armed.at:.2f} s after the stop applied, "
        f"{time.perf_counter() - t:.2f} s to save and close)",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(0)


def _end_process_group() -> None:
    """Every rank is here at the same step: meet once, then destroy the group, so no rank exits
    while another still needs it and nothing aborts at interpreter exit."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["StopRule", "arm", "checkpoint_dir", "end_job", "stop_closes", "training_step_begins"]
