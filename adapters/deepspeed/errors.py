"""What a switch or an OOM retry of the DeepSpeed handle reports: its result types and errors.

`ReconfigureResult` is what one switch did; `OomRetry` one OOM survived. `ReconfigureError`
(rolled back, the job may go on), `SwitchFailed` (the rollback failed too: no engine) and
`StepRetry` (the step was rewound one rung down the OOM ladder: train it again) are what the
user's loop may see; see the package docstring for when each is raised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class ReconfigureError(RuntimeError):
    """A switch failed and was rolled back: the job is on its previous configuration, state intact.
    `result` says what was tried and why it failed."""

    def __init__(self, message: str, result: ReconfigureResult) -> None:
        super().__init__(message)
        self.result = result


class SwitchFailed(RuntimeError):
    """A switch failed and so did the rollback: there is no engine to train with."""


class StepRetry(RuntimeError):
    """An optimizer step ran out of memory; the handle moved one rung down and rewound the step.

    Train the step again from its first sample: `train_batch` does it by itself; in your own loop,
    catch this and go on (trainwarden's loader gives the step's samples again). `retry` says what
    happened. Not an OutOfMemoryError subclass on purpose: code that halves its own batch on an
    OOM would step down a second time."""

    def __init__(self, message: str, retry: OomRetry) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class ReconfigureResult:
    """What one `reconfigure` did.

    `changes`: (knob, old, new) for every knob that changed, the implied ones included
    (`implied` says why those changed). `rebuilt`: a new engine was built. `rolled_back`: the
    switch failed after the old engine was gone and the previous configuration was rebuilt;
    `error` says why. Memory is the process RSS on the CPU, torch.cuda's allocated bytes on a GPU
    (`memory_kind`); `memory_peak_bytes` is the peak during the switch. `bytes_moved`: bytes of
    state carried through the host copy (weights and optimizer state). `phases`: seconds spent in
    each part of a rebuild, in order (`capture` the state to the host, `destroy` the old engine
    and give its memory back, `clean` the module, `initialize` the new engine, `restore` the state
    into it, `agree` with the other ranks); empty without a rebuild.
    """

    changes: tuple[tuple[str, Any, Any], ...]
    implied: tuple[str, ...]
    rebuilt: bool
    rolled_back: bool
    error: str | None
    step: int
    duration_s: float
    memory_kind: str
    memory_before_bytes: int
    memory_after_bytes: int
    memory_peak_bytes: int
    bytes_moved: int
    phases: tuple[tuple[str, float], ...] = ()

    @property
    def applied(self) -> bool:
        return bool(self.changes) and not self.rolled_back

    def describe(self) -> str:
        if not self.changes:
            return "no change"
        what = ", ".join(f"{k} {a} -> {b}" for k, a, b in self.changes)
        if self.rolled_back:
            return f"rolled back ({what}): {self.error}"
        mb = 1 << 20
        return (
            f"{what} in {self.duration_s:.2f} s; {self.memory_kind} {self.memory_before_bytes / mb:.0f} -> "
            f"{self.memory_after_bytes / mb:.0f} MiB (peak {self.memory_peak_bytes / mb:.0f}); "
            f"{self.bytes_moved / mb:.1f} MiB of state moved"
        )


@dataclass(frozen=True)
class OomRetry:
    """One OOM survived: the optimizer step it interrupted (`step`, as global_steps will count it),
    where (`forward`, `backward`, `step`, `loss_fn`), the error's first line, the rung taken
    (`rung`, in words), the rebuild (`result`, as a switch reports it), and whether the samples
    the step had already used will be given again (`replayed`: trainwarden's loader or
    train_batch; False with a loader of your own)."""

    step: int
    where: str
    micro_step: int
    error: str
    rung: str
    result: ReconfigureResult
    replayed: bool


__all__ = ["OomRetry", "ReconfigureError", "ReconfigureResult", "StepRetry", "SwitchFailed"]
