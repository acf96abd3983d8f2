"""The step-boundary protocol, written once: what every adapter does after an optimizer step.

Each adapter (plain PyTorch `Handle`, `DeepSpeedHandle`, the Accelerate `Accelerator`, the HF
Trainer callback) composes one `StepBoundary` over itself and calls `cross(...)` once per
optimizer step, after the update. In this order, the same in all four:

1. the live data mixture (adapters/data/) moves past the step's samples and gives its
   per-domain loss, unless the loop gave one;
2. the step is recorded: `agent.on_step` (rank 0 sends it; every rank agrees on what is due).
   Everything in the record is step N's: its loss, its LR, and the configuration it ran with,
   the LR multiplier included (so `lr` is the scheduled LR times the record's multiplier);
3. the LR multiplier moves one step along the cooldown's ramp (adapters/knobs.py): the next
   step runs at the ramp's next value;
4. what is due applies now, at this boundary, on every rank, and the outcomes are reported (a
   new ramp starts at its own `value`, which the next step runs at).
Training is the same whichever of 2 and 3 comes first; only the record differs, and before issue
16 the HF Trainer callback recorded the multiplier step N ran at while the three others recorded
the next step's.

What differs between adapters (where the step's loss, samples and LR come from; which knobs
exist) stays in the adapter. The handle carries `agent`, `mixture`, `lr_multiplier`,
`should_stop`, `stop_hooks`, `last_loss`, `last_lr` and `config()`; the shared knobs and the stop
rule work on the handle itself (adapters/knobs.py, adapters/core/stop.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from trainwarden.adapters.core.stop import stop_closes
from trainwarden.adapters.knobs import (
    MAX_LR_MULTIPLIER,
    StopHook,
    advance_lr_ramp,
    apply_shared_knob,
    check_eval_loss,
)
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action, KnobSpec, Outcome

log = logging.getLogger("trainwarden")

#: Carries one action at the boundary: (outcome, detail).
Carry = Callable[[Action], tuple[str, str]]


class StepBoundary:
    """The step-boundary protocol and the surface every adapter shares, over one handle."""

    def __init__(self, handle: Any, *, clock_started: bool = True) -> None:
        self.handle = handle
        #: When the current step began (None: at the first micro-batch, see `start_clock`).
        self.started: float | None = time.perf_counter() if clock_started else None
        self.last_domain_loss: dict[str, float] = {}

    # ---- the boundary ----------------------------------------------------------------------
    def start_clock(self) -> None:
        """The first step's clock starts with its data, not when the adapter was built."""
        if self.started is None:
            self.started = time.perf_counter()

    def lap(self) -> float:
        """Seconds since the step began; the next one begins now."""
        now = time.perf_counter()
        took, self.started = now - (self.started or now), now
        return took

    def cross(
        self,
        step: int,
        *,
        loss: float | None,
        lr: float | None,
        samples: int,
        tokens: int,
        step_samples: int,
        domain_loss: dict[str, float] | None = None,
        apply_all: Callable[[list[Action]], Sequence[Outcome]] | None = None,
        record: bool = True,
    ) -> list[Action]:
        """Optimizer step `step` is over (see the module docstring). `samples`, `tokens`: the
        job's totals so far; `step_samples`: this rank's samples in the step (the mixture's
        position). `apply_all` carries the due actions (default: `handle.apply` one by one);
        `record=False`: the agent is gone (closed), nothing is sent. Returns the due actions."""
        h = self.handle
        mixture = h.mixture
        if mixture is not None:
            # The step consumed its samples: the mixture's resume position moves past them.
            mixture.on_step(step, step_samples)
            if domain_loss is None:
                domain_loss = mixture.take_domain_loss()
        self.last_domain_loss = domain_loss or {}
        h.last_loss, h.last_lr = loss, lr
        step_time = self.lap()
        agent = h.agent
        if agent is None or not record:
            advance_lr_ramp(h)
            return []
        due = agent.on_step(
            step=step,
            loss=loss,
            samples=samples,
            tokens=tokens,
            step_time_s=step_time,
            lr=lr,
            config=h.config(),
            domain_loss=domain_loss,
        )
        advance_lr_ramp(h)  # after the record (step N's multiplier), before a new ramp's start
        outcomes = apply_all(due) if apply_all is not None else [h.apply(a) for a in due]
        for outcome in outcomes:
            agent.report(outcome)
        return due

    # ---- actions -----------------------------------------------------------------------------
    def carry(
        self,
        action: Action,
        step: Callable[[], int],
        fn: Carry,
        *,
        fatal: tuple[type[BaseException], ...] = (),
        rolled_back: tuple[type[BaseException], ...] = (),
    ) -> Outcome:
        """`fn(action)` as an Outcome; never raises into the user's loop, except `fatal` (an
        adapter left with nothing to train with). `rolled_back`: errors of a switch that was undone."""
        t = time.perf_counter()
        try:
            outcome, detail = fn(action)
        except fatal:
            raise
        except rolled_back as exc:
            outcome, detail = "rolled_back", str(exc)
        except Exception as exc:  # the job keeps its configuration
            log.exception("trainwarden: applying %s failed", action.kind)
            outcome, detail = "rejected", f"{type(exc).__name__}: {exc}"
        return Outcome(action.id, outcome, step(), time.perf_counter() - t, detail)

    def carry_shared(self, action: Action, step: int) -> tuple[str, str] | None:
        """The LR multiplier, the stop and the data mixture's knobs; None for any other kind."""
        shared = apply_shared_knob(self.handle, action, step)
        if shared is None and self.handle.mixture is not None:
            shared = self.handle.mixture.apply(action)
        return shared

    def shared_specs(self, *, lr_multiplier: bool = True) -> tuple[KnobSpec, ...]:
        """The shared knobs as the agent's hello reports them (the mixture's last)."""
        h = self.handle
        specs = [KnobSpec(KNOB_STOP, False, choices=(True,))]
        if lr_multiplier:
            specs.insert(
                0, KnobSpec(KNOB_LR_MULTIPLIER, h.lr_multiplier, minimum=0.0, maximum=MAX_LR_MULTIPLIER)
            )
        return tuple(specs) + (h.mixture.knob_specs() if h.mixture is not None else ())

    def shared_config(self) -> dict[str, Any]:
        h = self.handle
        return {
            KNOB_LR_MULTIPLIER: h.lr_multiplier,
            KNOB_STOP: h.should_stop,
            **(h.mixture.config() if h.mixture is not None else {}),
        }

    # ---- the rest of the shared surface ------------------------------------------------------
    def on_stop(self, fn: StopHook) -> StopHook:
        self.handle.stop_hooks.add(fn)
        return fn

    def report(self, eval_loss: Any) -> None:
        agent = self.handle.agent
        if agent is not None:
            agent.report_eval(check_eval_loss(eval_loss))

    def close(self) -> None:
        """A stop that was obeyed is `applied` now; then the agent flushes and says goodbye."""
        stop_closes(self.handle)
        if self.handle.agent is not None:
            self.handle.agent.close()


__all__ = ["StepBoundary"]
