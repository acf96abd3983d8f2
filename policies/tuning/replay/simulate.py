"""Replay a recorded run through a policy file: the live control loop on a simulated job.

The controller is the real one (controller/loop.py `Controller`, on a simulated clock): the same
fold of step records into `JobState`, the same frozen Snapshot, the same `decide` calls, pending
actions, back-off and decision log as a live run. Only the job is simulated, step by step, from
a `KnobModel` calibrated on recordings, and it behaves as trainwarden's agent does: it records
each step with the configuration it ran under, and applies the actions it had received before
that step's boundary, at sync steps (so a decision lands one step after it is made, as live).

A counted budget (tokens, FLOPs) is ended as the agent ends it live (adapters/core/agent.py):
the job counts its own tokens and stops after the last step its count forecasts inside the
budget, whatever the controller's stop says; a job whose steps spend unlike amounts (a longer
sequence length from some step on) is stopped where its count says, not where the controller's
early forecast did.

The result is deterministic for a given trace, model and policy file: no wall clock, no random
numbers (the noise is the trace's own, replayed by index). A few hundred steps take well under
a second.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.controller.budget_end import COUNT_WINDOW, BudgetEnd, steps_inside
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    KNOB_MICRO_BATCH,
    KNOB_STOP,
    Action,
    Outcome,
    RankMemory,
    StepRecord,
)
from trainwarden.controller.schema import PolicyFile
from trainwarden.policies.tuning.replay.model import KnobModel, LossCurve, Residuals, residuals
from trainwarden.policies.tuning.replay.trace import Trace

#: A run the policy never stops is replayed for at most this many times the recorded steps.
MAX_STEPS_FACTOR = 4


@dataclass(frozen=True)
class ReplayResult:
    """What a replayed run did: the objective's metrics, memory against the cap, its actions."""

    trace: str
    steps: int
    tokens: int
    wall_time_s: float
    final_loss: float | None
    eval_loss: float | None
    """The loss law's value at the last step: the expected loss, without the EMA's lag or a batch's
    noise. Fitted on training losses, it stands for a validation loss as far as the two agree."""
    tokens_per_second: float
    peak_bytes: int
    """Highest per-step peak after the grace steps."""
    median_peak_bytes: int
    """Median per-step peak after the grace steps: the footprint the run settled at."""
    cap_bytes: int | None
    cap_violations: int
    """Memory samples after the grace steps whose peak was above the cap."""
    stopped: bool
    """A policy stopped the run (else it ran out of steps)."""
    actions: tuple[tuple[int, str, Any], ...]
    """(step applied, knob, value) of every applied action."""
    unseen_configs: tuple[str, ...] = ()
    """Configurations the run entered that no recording had: their memory and time are guesses."""

    def metric(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if value is None else float(value)


@contextmanager
def _quiet_controller() -> Iterator[None]:
    """The controller logs each decision at INFO; a replay makes hundreds a second."""
    logger = logging.getLogger("trainwarden.controller.loop")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class _SimJob:
    """The simulated job: configuration, clock, loss curve, and the agent's inbox."""

    def __init__(
        self, trace: Trace, model: KnobModel, noise: Residuals, counted: float | None, shift: int = 0
    ) -> None:
        self.trace, self.model, self.noise, self.shift = trace, model, noise, shift
        self.counted = counted
        """Tokens at which a counted budget is spent (None: none is set, or no policy stops it)."""
        self.counts: deque[tuple[int, int]] = deque(maxlen=COUNT_WINDOW)  # the agent's window
        self.config: dict[str, Any] = dict(trace.steps[0].config)
        self.now = trace.steps[0].time - trace.steps[0].step_time_s
        self.curve = LossCurve(model.loss)
        self.base_lr = trace.base_lr()
        self.inbox: dict[str, Action] = {}
        self.seen: set[str] = set()
        self.extra_s = 0.0
        self.samples = 0
        self.tokens = 0
        # The recording's sequence length at each step; past its end, its last.
        self.lengths = trace.sequence_lengths()
        self.length = self.lengths[0]
        self.unseen: set[str] = set()
        first_mem = next(s.memory for s in trace.steps if s.memory)
        self.total_bytes = first_mem[0].total_bytes
        self.device = first_mem[0].device

    def clock(self) -> float:
        return self.now

    def run_step(self, step: int) -> tuple[float, float, float]:
        """Advance one optimizer step: (step time, applied LR, loss)."""
        gb = self.trace.shape.global_batch_size
        self.length = self.lengths[min(step, len(self.lengths)) - 1]
        base, known = self.model.seconds_per_step(self.config, gb, self.length)
        if not known:
            self.unseen.add(str(self.config))
        dt = base * self.noise.time_at(step - 1 + self.shift) + self.extra_s
        self.extra_s = 0.0
        self.now += dt
        base_lr = self.base_lr[min(step, len(self.base_lr)) - 1]
        mult = self.config.get(KNOB_LR_MULTIPLIER, 1.0)
        lr = base_lr * (float(mult) if isinstance(mult, (int, float)) else 1.0)
        self.samples += gb
        self.tokens += gb * self.length
        return dt, lr, self.curve.next(lr)

    def peak(self, sample: int) -> float:
        peak, known = self.model.peak_bytes(self.config, self.length)
        if not known:
            self.unseen.add(str(self.config))
        return peak * self.noise.memory_at(sample + self.shift)

    def spends_the_count_next(self, step: int) -> bool:
        """The agent's check after `step` (its `_keep_budget_end`, the same forecast): the next
        step, at the tokens a step has spent lately, would be past the counted budget, so this
        step is the last."""
        self.counts.append((step, self.tokens))
        return self.counted is not None and steps_inside(self.counted, self.counts)[0] == 0

    def receive(self, actions: Sequence[Action]) -> None:
        for a in actions:
            if a.id not in self.seen:
                self.seen.add(a.id)
                self.inbox[a.id] = a

    def apply_due(self, step: int) -> tuple[list[Outcome], list[tuple[int, str, Any]]]:
        """Apply what the agent would at this sync step: actions received before it, due by now."""
        due = sorted((a for a in self.inbox.values() if a.step <= step + 1), key=lambda a: a.step)
        outcomes, applied = [], []
        for a in due:
            del self.inbox[a.id]
            value = True if a.kind == KNOB_STOP else a.params.get("value")
            self.config[a.kind] = value
            if a.kind == KNOB_MICRO_BATCH and isinstance(value, int) and value > 0:
                gb = self.trace.shape.global_batch_size
                self.config["gradient_accumulation_steps"] = max(1, gb // value)
            cost = self.model.switch_s.get(a.kind, 0.0)
            self.extra_s += cost
            outcomes.append(Outcome(a.id, "applied", step, cost))
            applied.append((step, a.kind, value))
        return outcomes, applied


def replay(
    pf: PolicyFile, trace: Trace, model: KnobModel, grace_steps: int = 0, noise_shift: int = 0
) -> ReplayResult:
    """Replay `trace`'s job under the policies and budget of `pf`; `noise_shift` replays the
    trace's noise that many steps later (`trial_replay.noise_shifts`: the same spikes at other
    steps, so a file must hold the cap wherever they land, not only where they did)."""
    shape = trace.shape
    end = BudgetEnd.of_policy(pf)
    counted = end.counted_tokens(shape.param_count) if end is not None else None
    job = _SimJob(trace, model, residuals(model, trace), counted, noise_shift)
    sync_every = pf.controller.sync_every
    limit = trace.last_step * (MAX_STEPS_FACTOR if trace.stopped_by_policy else 1)
    peaks: list[int] = []
    violations, sample = 0, 0
    cap: int | None = None
    if pf.budget.device_memory is not None:
        cap = pf.budget.device_memory.resolve(job.total_bytes)
    applied: list[tuple[int, str, Any]] = []
    window_peak = 0.0
    loss = None
    with tempfile.TemporaryDirectory(prefix="trainwarden-replay-") as tmp, _quiet_controller():
        ctl = Controller(Path(tmp), "replay", policy_file=pf, clock=job.clock)
        ctl.hello(dataclasses.replace(shape, sync_every=sync_every, pids=()))  # no live pids here
        outcomes: list[Outcome] = []
        step = 0
        try:
            for step in range(1, limit + 1):
                dt, lr, loss = job.run_step(step)
                # The probe's peak covers every step since the previous sample (agent.py).
                window_peak = max(window_peak, job.peak(sample))
                memory: tuple[RankMemory, ...] = ()
                is_sync = step % sync_every == 0
                if is_sync:
                    peak = int(window_peak)
                    window_peak, sample = 0.0, sample + 1
                    memory = tuple(
                        RankMemory(r, peak, peak, job.total_bytes, job.device, 0)
                        for r in range(shape.world_size)
                    )
                    if step > grace_steps:
                        peaks.append(peak)
                        violations += cap is not None and peak > cap
                record = StepRecord(
                    step=step,
                    time=job.now,
                    loss=loss,
                    samples=job.samples,
                    tokens=job.tokens,
                    step_time_s=dt,
                    lr=lr,
                    config=dict(job.config),
                    memory=memory,
                )
                done: list[Outcome] = []
                if is_sync:
                    done, now_applied = job.apply_due(step)
                    applied += now_applied
                job.receive(ctl.exchange([record], outcomes + done))
                outcomes = []
                if job.config.get(KNOB_STOP):
                    break
                if job.spends_the_count_next(step):
                    job.config[KNOB_STOP] = True
                    break
            ctl.exchange([], outcomes, finished=True)
            state = ctl.state
            elapsed = state.elapsed_s
            result = ReplayResult(
                trace=trace.path,
                steps=state.step,
                tokens=state.tokens,
                wall_time_s=elapsed,
                final_loss=state.loss_ema,
                eval_loss=loss,
                tokens_per_second=state.tokens / elapsed if elapsed > 0 else 0.0,
                peak_bytes=max(peaks, default=0),
                median_peak_bytes=int(statistics.median(peaks)) if peaks else 0,
                cap_bytes=cap,
                cap_violations=violations,
                stopped=bool(job.config.get(KNOB_STOP)),
                actions=tuple(applied),
                unseen_configs=tuple(sorted(job.unseen)),
            )
        finally:
            ctl.close()
    return result
