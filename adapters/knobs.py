"""The knobs every adapter carries the same way: the LR multiplier and the cooperative stop.

Kept in one place so the plain-PyTorch, DeepSpeed, Accelerate and HF Trainer adapters accept,
refuse and apply them identically. An adapter's handle has `lr_multiplier`, `should_stop` and
`stop_hooks` (a `StopHooks`); `apply_shared_knob` carries the two knobs, and the stop runs the
user's save hooks (`handle.on_stop(fn)`) at the step boundary where it applies, before
`should_stop` turns true, on every rank (a DeepSpeed checkpoint is a collective).
`report_eval` and `check_budget_at_start` are the other two pieces every handle shares, and
`advance_lr_ramp(handle)`, called once after every optimizer step (by core/boundary.py, after the
step is recorded and before what is due applies), moves the multiplier along the cooldown's ramp
between two actions.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action, JobShape

log = logging.getLogger("trainwarden")

#: Largest LR multiplier an adapter accepts (a policy asking for more is a bug).
MAX_LR_MULTIPLIER = 10.0


@dataclass(frozen=True)
class StopInfo:
    """What a save hook is told: the stop applies after `step`, because `reason`."""

    step: int
    reason: str
    cause: str
    """`budget` (a budget is spent) or `marginal_gain` (the stopping rule ended the run early)."""


class StopHooks:
    """The user's save hooks, run once, in order, when the stop applies.

    A hook that raises is logged and the stop still applies (the outcome's detail says so): the
    run is over either way, and an exception in the middle of the adapter's step would leave
    the user's loop in a state it did not ask for.
    """

    def __init__(self, hooks: Sequence[Callable[[StopInfo], Any]] = ()) -> None:
        self._hooks: list[Callable[[StopInfo], Any]] = []
        for fn in hooks:
            self.add(fn)
        self.fired = False

    def add(self, fn: Callable[[StopInfo], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"on_stop takes a function of one argument (a StopInfo), got {fn!r}")
        self._hooks.append(fn)

    def fire(self, info: StopInfo) -> str:
        """Run every hook once; '' or what went wrong."""
        if self.fired:
            return ""
        self.fired = True
        problems = []
        for fn in self._hooks:
            try:
                fn(info)
            except Exception as exc:
                log.exception("trainwarden: the on_stop hook %r failed", getattr(fn, "__name__", fn))
                name = getattr(fn, "__name__", fn)
                problems.append(f"on_stop hook {name!r} failed: {type(exc).__name__}: {exc}")
        return "; ".join(problems)


StopHook = Callable[[StopInfo], Any]


def stop_hooks_arg(on_stop: StopHook | Sequence[StopHook] | None) -> StopHooks:
    """`attach(..., on_stop=fn)` or `on_stop=[fn, ...]` as a StopHooks."""
    if on_stop is None:
        return StopHooks()
    return StopHooks([on_stop] if callable(on_stop) else list(on_stop))


class _Carrier(Protocol):
    lr_multiplier: float
    should_stop: bool


def apply_shared_knob(handle: _Carrier, action: Action, step: int = -1) -> tuple[str, str] | None:
    """(outcome, detail) for `lr_multiplier` and `stop`; None for any other kind."""
    value = action.params.get("value")
    if action.kind == KNOB_LR_MULTIPLIER:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0.0 <= value <= MAX_LR_MULTIPLIER
        ):
            return "rejected", f"lr_multiplier must be a number in [0, {MAX_LR_MULTIPLIER}], got {value!r}"
        ramp = _ramp_of(action)
        if isinstance(ramp, str):
            return "rejected", ramp
        if ramp is None:
            _RAMPS.pop(handle, None)
            if float(value) == handle.lr_multiplier:
                return "noop", ""
        else:
            # A descending segment (a cooldown) never lifts the multiplier: the policy drew it from
            # where it forecast the job to be, and a job that ran ahead of that forecast (an action
            # applied late, on a loaded machine) is already lower: it goes on down from there.
            if ramp[0] <= value and handle.lr_multiplier < value:
                value = max(ramp[0], handle.lr_multiplier)
            _RAMPS[handle] = [float(value), ramp[0], ramp[1], 0]
        handle.lr_multiplier = float(value)
        return "applied", "" if ramp is None else f"ramping to {ramp[0]:g} over {ramp[1]} steps"
    if action.kind == KNOB_STOP:
        if handle.should_stop:
            return "noop", ""
        hooks = getattr(handle, "stop_hooks", None)
        problem = ""
        if isinstance(hooks, StopHooks):
            cause = action.params.get("cause")
            problem = hooks.fire(StopInfo(step, action.reason, cause if isinstance(cause, str) else "budget"))
        handle.should_stop = True
        log.warning("trainwarden: stop requested: %s", action.reason)
        from trainwarden.adapters.core.stop import arm

        arm(handle, action, step, problem)  # what happens if the job trains on: adapters/core/stop.py
        return "applied", "should_stop is now true" + (f" ({problem})" if problem else "")
    return None


#: A cooldown arrives as a line segment per action (params "to" and "over_steps"): the multiplier
#: moves from "value" to "to" over that many optimizer steps, so it follows the schedule step by
#: step between two actions (which come about every 0.5 s, the agent's exchange) instead of in
#: stairs. handle -> [from, to, over_steps, steps done]. Weak: a closed handle leaves nothing.
_RAMPS: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
#: Longest ramp an action may ask for.
MAX_RAMP_STEPS = 1_000_000


def _ramp_of(action: Action) -> tuple[float, int] | str | None:
    to, over = action.params.get("to"), action.params.get("over_steps")
    if to is None and over is None:
        return None
    if isinstance(to, bool) or not isinstance(to, (int, float)) or not 0.0 <= to <= MAX_LR_MULTIPLIER:
        return f"lr_multiplier's ramp target 'to' must be a number in [0, {MAX_LR_MULTIPLIER}], got {to!r}"
    if isinstance(over, bool) or not isinstance(over, int) or not 1 <= over <= MAX_RAMP_STEPS:
        return f"lr_multiplier's 'over_steps' must be an integer in [1, {MAX_RAMP_STEPS}], got {over!r}"
    return float(to), over


def advance_lr_ramp(handle: Any) -> None:
    """Call once after each optimizer step: the next step's multiplier, on a ramp the last action
    asked for (nothing without one). Every adapter that carries `lr_multiplier` calls it."""
    ramp = _RAMPS.get(handle)
    if ramp is None:
        return
    start, to, over, done = ramp
    done += 1
    handle.lr_multiplier = start + (to - start) * min(1.0, done / over)
    if done >= over:
        del _RAMPS[handle]
    else:
        ramp[3] = done


@contextmanager
def lr_scaled(param_groups: Sequence[dict[str, Any]], multiplier: float) -> Iterator[None]:
    """The optimizer step inside runs at `multiplier` x the scheduled LR; afterwards each group
    has its scheduled LR back, so the user's scheduler never sees ours (a chainable scheduler
    would compound it)."""
    scheduled = [g["lr"] for g in param_groups]
    if multiplier != 1.0:
        for g, lr in zip(param_groups, scheduled):
            g["lr"] = lr * multiplier
    try:
        yield
    finally:
        for g, lr in zip(param_groups, scheduled):
            g["lr"] = lr


def check_eval_loss(eval_loss: Any) -> float:
    """`handle.report(eval_loss=...)`'s argument as a float, or a TypeError/ValueError naming it."""
    if hasattr(eval_loss, "item"):
        eval_loss = eval_loss.item()  # a 0-d tensor or numpy scalar
    if isinstance(eval_loss, bool) or not isinstance(eval_loss, (int, float)):
        raise TypeError(f"eval_loss must be a number (float, 0-d tensor), got {type(eval_loss).__name__}")
    if not math.isfinite(eval_loss):
        raise ValueError(f"eval_loss must be finite, got {eval_loss}: report a loss that was measured")
    return float(eval_loss)


def check_budget_at_start(controller: Any, shape: JobShape) -> None:
    """With an embedded controller, a budget spent before the first step is an AttachError now,
    not a job stopped at step 1 (a sidecar answers the agent's hello with the same message)."""
    if controller is None:
        return
    from trainwarden.adapters.core.connect import AttachError
    from trainwarden.controller.loop import BudgetSpentError

    try:
        controller.check_start(shape, new_job=True)
    except BudgetSpentError as exc:
        raise AttachError(str(exc)) from exc
