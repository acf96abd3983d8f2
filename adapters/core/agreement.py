"""Rank agreement on a switch: every rank goes on only if every rank succeeded.

A switch (a DeepSpeed engine rebuilt, an Accelerate precision changed) runs on every rank at the
same step; if it failed on one, every rank must roll back, or the ranks would wait forever in
their next collective on different configurations. What it costs: one all-reduce of one int.
"""

from __future__ import annotations

import torch


def agree(error: str | None, device: torch.device | str) -> str | None:
    """This rank's error, or one saying another rank failed; None only if every rank succeeded."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and error is None:
        return "the switch failed on another rank; every rank rolls back"
    return error


__all__ = ["agree"]
