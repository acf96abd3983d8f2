"""What the DeepSpeed handle does after an out-of-memory error inside a step: the ladder it steps
down, and the cutting of one optimizer step's samples into micro-batches of another size.

The OOM ladder (`next_rung`), one rung per OOM, leanest last:

1. micro-batch halved (the largest divisor of the per-rank batch at most half the current
   one), gradient accumulation doubled, the global batch kept. Offered only where trainwarden
   cuts the micro-batches (its own loader, `micro_batch_knob=True`, or `train_batch`), since a
   user's loader keeps yielding micro-batches of the old size. Activation memory is the usual
   cause of a step's OOM, and this frees it at the smallest cost in speed.
2. activation checkpointing on, where the model can switch it: activations of all but one
   block at a time, for about one more forward pass of compute.
3. ZeRO stage up, with several ranks only (partitioning over one rank saves nothing): to
   stage 2 from 0 or 1 (stage 2 communicates as much as stage 1 and holds less), then to 3.
4. optimizer offload to the CPU (at stage 2 at least: it needs ZeRO).
5. parameter offload (stage 3).

Precision is never on it: it changes the numerics, a decision for the memory policy, not for
an error handler. Below the last rung the OOM is raised as it was.

Pure Python plus torch tensors for the cutting; costs nothing until an OOM happens, and then
a copy of one step's input batch at most (only when the micro-batch size changed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from trainwarden.adapters.deepspeed.config import Setting, micro_batch_choices, with_micro_batch


def default_oom_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "out of device memory": torch.cuda.OutOfMemoryError (since torch
    2.5 an alias of torch.OutOfMemoryError, which the other device backends raise too)."""
    return (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass(frozen=True)
class Rung:
    """One step down the OOM ladder: the setting to rebuild with, the checkpointing flag (None:
    the model cannot switch it), and why, in words."""

    setting: Setting
    activation_checkpointing: bool | None
    why: str


def next_rung(
    setting: Setting,
    activation_checkpointing: bool | None,
    *,
    world_size: int,
    can_recut: bool,
) -> Rung | None:
    """The next leaner configuration after an OOM at `setting`, or None at the bottom."""
    s, ckpt = setting, activation_checkpointing
    if can_recut and s.micro_batch_size > 1:
        choices = micro_batch_choices(s.train_batch_size, world_size)
        smaller = [c for c in choices if c <= s.micro_batch_size // 2]
        if smaller:
            target = with_micro_batch(s, max(smaller), world_size)
            return Rung(
                target,
                ckpt,
                f"micro-batch {s.micro_batch_size} -> {target.micro_batch_size} "
                f"(accumulation {s.gradient_accumulation_steps} -> {target.gradient_accumulation_steps})",
            )
    if ckpt is False:
        return Rung(s, True, "activation checkpointing on")
    if world_size > 1 and s.zero_stage < 3:
        stage = 2 if s.zero_stage < 2 else 3
        return Rung(replace(s, zero_stage=stage), ckpt, f"ZeRO stage {s.zero_stage} -> {stage}")
    if not s.offload_optimizer:
        stage = max(s.zero_stage, 2)
        why = "optimizer offload to the CPU"
        if stage != s.zero_stage:
            why += f" (ZeRO stage {s.zero_stage} -> {stage})"
        return Rung(replace(s, zero_stage=stage, offload_optimizer=True), ckpt, why)
    if not s.offload_param:
        why = "parameter offload to the CPU"
        if s.zero_stage != 3:
            why += f" (ZeRO stage {s.zero_stage} -> 3)"
        return Rung(replace(s, zero_stage=3, offload_param=True), ckpt, why)
    return None


__all__ = ["Rung", "default_oom_errors", "next_rung"]
