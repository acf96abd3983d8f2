"""A recorded run, as the replay reads it: the job's shape, its step records, its decisions.

Every run directory has them (`telemetry.jsonl`, `decisions.jsonl`, controller/runlog.py);
the records are parsed with the channel's own strict decoder, so a replayed step is exactly
what the controller saw live. A damaged or foreign line is skipped, as the controller does
when it picks a run up from its logs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, JobShape, ProtocolError, StepRecord
from trainwarden.controller.runlog import DECISIONS_FILE, TELEMETRY_FILE, read_jsonl

#: Fewest step records a trace needs: the memory and time fits need a few samples at least.
MIN_STEPS = 5


class TraceError(ValueError):
    """A run directory that cannot be replayed; the message says why and what to do."""


@dataclass(frozen=True)
class Trace:
    """One recorded run."""

    path: str
    shape: JobShape
    steps: tuple[StepRecord, ...]
    decisions: tuple[dict[str, Any], ...]

    @property
    def stopped_by_policy(self) -> bool:
        """The run ended because a policy asked it to stop (else the job ran out of steps, and a
        replay of it ends at the same step)."""
        return any(d.get("kind") == KNOB_STOP and d.get("outcome") == "applied" for d in self.decisions)

    @property
    def last_step(self) -> int:
        return self.steps[-1].step

    def sequence_lengths(self) -> tuple[int, ...]:
        """Tokens per sample at each recorded step, from the running counts: the job's sequence
        length where it changes mid-run (a long-context phase), else the hello's every step."""
        out: list[int] = []
        tokens = samples = 0
        for rec in self.steps:
            dt, ds = rec.tokens - tokens, rec.samples - samples
            tokens, samples = rec.tokens, rec.samples
            last = out[-1] if out else self.shape.tokens_per_sample
            out.append(round(dt / ds) if ds > 0 and dt > 0 else last)
        return tuple(out)

    def base_lr(self) -> tuple[float, ...]:
        """The user's own schedule at each recorded step: the applied LR over the multiplier that
        was in force (a multiplier of 0 hides it: the previous step's base is kept)."""
        out: list[float] = []
        for rec in self.steps:
            mult = rec.config.get(KNOB_LR_MULTIPLIER, 1.0)
            lr = rec.lr
            if lr is None or not isinstance(mult, (int, float)) or mult <= 0:
                out.append(out[-1] if out else 0.0)
            else:
                out.append(lr / mult)
        return tuple(out)


def load_trace(run_dir: str | Path) -> Trace:
    """The trace in `run_dir`; TraceError when it is missing or too short to calibrate on."""
    run_dir = Path(run_dir)
    tpath = run_dir / TELEMETRY_FILE
    if not tpath.is_file():
        raise TraceError(
            f"{run_dir}: no {TELEMETRY_FILE}; give the run directory of a finished `trainwarden run` "
            "(runs/RUN_ID by default)"
        )
    shape: JobShape | None = None
    steps: list[StepRecord] = []
    for rec in read_jsonl(tpath):
        try:
            if rec.get("event") == "hello":
                shape = JobShape.from_json(rec.get("shape"))
            elif rec.get("event") == "step":
                step = StepRecord.from_json(rec)
                if not steps or step.step > steps[-1].step:
                    steps.append(step)
        except ProtocolError:
            continue
    if shape is None:
        raise TraceError(f"{tpath}: the job never said hello (no `hello` line); the run did not start")
    with_loss = [s for s in steps if s.loss is not None]
    if len(with_loss) < MIN_STEPS or not any(s.memory for s in steps):
        raise TraceError(
            f"{tpath}: {len(with_loss)} steps with a loss, and memory samples in "
            f"{sum(1 for s in steps if s.memory)}; a replay needs at least {MIN_STEPS} steps and one "
            "memory sample: record a longer run"
        )
    dpath = run_dir / DECISIONS_FILE
    decisions = tuple(read_jsonl(dpath)) if dpath.is_file() else ()
    return Trace(str(run_dir), shape, tuple(steps), decisions)
