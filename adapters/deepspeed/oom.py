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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

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


# ---- one optimizer step's samples, cut into micro-batches ---------------------------------------
# A batch is a tensor whose first dimension counts samples, or a tuple, list or mapping of them
# (nested); anything else in it (a string, a number) is shared by every slice.


def batch_len(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    if torch.is_tensor(batch):
        if batch.dim() == 0:
            raise TypeError("a batch tensor needs a first (sample) dimension")
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        items: list[Any] = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        items = list(batch)
    else:
        items = []
    for item in items:
        try:
            return batch_len(item)
        except TypeError:
            continue
    raise TypeError(
        f"cannot tell how many samples a {type(batch).__name__} holds: a batch must be a tensor "
        "(samples first) or a tuple, list or dict of them"
    )


def _rebuild(batch: Any, parts: Any) -> Any:
    if isinstance(batch, Mapping):
        try:
            return type(batch)(parts)
        except Exception:
            return dict(parts)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*parts)
    return type(batch)(parts)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples [start, stop) of a batch (views of its tensors: no copy)."""
    if torch.is_tensor(batch):
        return batch[start:stop] if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return _rebuild(batch, {k: slice_batch(v, start, stop) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        return _rebuild(batch, [slice_batch(v, start, stop) for v in batch])
    return batch


def concat_batches(batches: Sequence[Any]) -> Any:
    """One batch of all the samples of `batches` (of the same structure), in order."""
    first = batches[0]
    if len(batches) == 1:
        return first
    if torch.is_tensor(first):
        return torch.cat(list(batches)) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return _rebuild(first, {k: concat_batches([b[k] for b in batches]) for k in first})
    if isinstance(first, (tuple, list)):
        return _rebuild(first, [concat_batches([b[i] for b in batches]) for i in range(len(first))])
    return first


def recut(batches: Sequence[Any], micro_batch_size: int) -> list[Any]:
    """The samples of `batches` in micro-batches of `micro_batch_size` (the last may be short).

    No copy when every batch already has that size (the usual case); otherwise one copy of the
    step's samples, then views."""
    if all(batch_len(b) == micro_batch_size for b in batches):
        return list(batches)
    whole = concat_batches(batches)
    n = batch_len(whole)
    return [slice_batch(whole, i, min(i + micro_batch_size, n)) for i in range(0, n, micro_batch_size)]


__all__ = ["Rung", "batch_len", "concat_batches", "default_oom_errors", "next_rung", "recut", "slice_batch"]
