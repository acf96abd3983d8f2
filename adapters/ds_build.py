"""What a switch's `deepspeed.initialize` spends that is not moving state, and how it is avoided.

Profiled on a 25M-parameter GPT, one rank, CPU (bench/switch_profile.py): besides copies, a
DeepSpeed 0.19.8 engine build spends time on work whose result is thrown away, and the teardown
of the old engine on a full garbage collection:

- ZeRO 3's optimizer formats `f"... {locals()}"` for a debug message it does not print; its
  locals hold a dict keyed by every parameter, so it formats every parameter's values (~0.45 s).
- ZeRO 3's `defragment` calls `gc.collect()` to give a GPU's freed blocks back; on the CPU the
  tensors it replaces are freed by their reference counts already, and a full collection of a
  process that imported torch, DeepSpeed and transformers walks ~400k objects (0.3-0.5 s).
- Stages 0-2 broadcast every parameter from rank 0 at build time; with one rank that is a copy
  of each parameter onto itself through gloo.
- The old engine's optimizer wrapper holds its flat buffers, fp32 partitions and moments in
  reference cycles (bound methods kept as hooks), so they waited for `gc.collect()`; dropping
  the wrapper's attributes frees them at once by reference count.

`quiet_build()` applies the first three for the duration of one build (and restores them
after, also when the build raises); `release_engine` is the last. None changes a value the
engine holds: the exactness tests (tests/test_deepspeed_switch.py) compare every bit.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch


def _short_repr(self: torch.Tensor) -> str:
    return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"


def _single_rank() -> bool:
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1)


@contextlib.contextmanager
def quiet_build(device: torch.device) -> Iterator[None]:
    """Around one `deepspeed.initialize` of a switch: skip the work listed in the module docstring."""
    from deepspeed.runtime import engine as ds_engine
    from deepspeed.runtime.zero import utils as zero_utils

    restore: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        restore.append((owner, name, owner.__dict__.get(name, _MISSING)))
        setattr(owner, name, value)

    try:
        patch(torch.nn.Parameter, "__repr__", _short_repr)
        if device.type == "cpu" and getattr(zero_utils, "gc", None) is not None:
            patch(zero_utils, "gc", types.SimpleNamespace(collect=lambda *a, **k: 0))
        if _single_rank() and hasattr(ds_engine.DeepSpeedEngine, "_broadcast_model"):
            patch(ds_engine.DeepSpeedEngine, "_broadcast_model", lambda self: None)
        yield
    finally:
        for owner, name, old in reversed(restore):
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


_MISSING = object()


def release_engine(engine: Any, keep: Any = None) -> None:
    """Drop the tensors a destroyed engine's optimizer holds, so that they are freed now (by
    reference count) rather than at the next garbage collection. `keep`: an optimizer that is
    not DeepSpeed's own (the user's object) and is left untouched."""
    opt = engine.__dict__.get("optimizer")
    if opt is not None and opt is not keep:
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not keep:
            inner.state.clear()
        if type(opt).__module__.startswith("deepspeed"):
            opt.__dict__.clear()
        elif isinstance(opt, torch.optim.Optimizer):
            opt.state.clear()
    # The engine itself sits in cycles too (its bound methods kept by its own objects); what it
    # holds directly (buffers, flat gradients, timers) goes with its attributes.
    engine.__dict__.clear()


__all__ = ["quiet_build", "release_engine"]
