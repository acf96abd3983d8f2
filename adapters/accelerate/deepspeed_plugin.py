"""Accelerate with a DeepSpeed plugin: the engine is the DeepSpeed adapter's live handle.

Accelerate builds the DeepSpeed engine in `prepare` (`_prepare_deepspeed` calls
`deepspeed.initialize`). For the length of that `prepare`, `deepspeed.initialize` is the DeepSpeed
adapter's drop-in (adapters/deepspeed/, with no agent of its own: the accelerator's agent
reports), so Accelerate receives a `DeepSpeedHandle` and wraps it as it would an engine. The
ZeRO stage, offload and precision switches are then the DeepSpeed adapter's own, unchanged: the
whole training state read into a host copy (adapters/deepspeed/state.py), the engine rebuilt from
Accelerate's DeepSpeed config with only the switched keys rewritten, the state written back
exactly, a rollback on failure. Everything Accelerate holds keeps working across a switch: its
`DeepSpeedEngineWrapper` and optimizer wrapper point at the handle and its optimizer proxy, which
forward to the current engine.

Two things here follow a switch: the plugin's config (Accelerate reads the ZeRO stage from it,
e.g. in `get_state_dict`, to gather ZeRO-3 weights) is updated to the engine's, and a torch
scheduler Accelerate keeps outside DeepSpeed is re-bound to the new engine's optimizer (the
DeepSpeed adapter re-creates a client optimizer for each engine).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trainwarden.controller.protocol import (
    KNOB_ACTIVATION_CHECKPOINTING,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_ZERO_STAGE,
    KnobSpec,
)

#: The DeepSpeed adapter's knobs carried through Accelerate (the micro-batch stays Accelerate's
#: config value: Accelerate's loader is not cut by the handle).
ENGINE_KNOBS = (
    KNOB_ZERO_STAGE,
    KNOB_PRECISION,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_ACTIVATION_CHECKPOINTING,
)


@contextmanager
def dropin_initialize() -> Iterator[None]:
    """`deepspeed.initialize` returns the DeepSpeed adapter's handle inside this block."""
    import deepspeed

    from trainwarden.adapters import attach as attach_hook
    from trainwarden.adapters import deepspeed as twds

    previous = deepspeed.initialize
    original = attach_hook.original_initialize(deepspeed)

    def initialize(**kwargs: Any) -> Any:
        return twds.initialize(**kwargs, attach_agent=False)

    # The handle builds its engines with DeepSpeed's own initialize, found under this attribute.
    setattr(initialize, attach_hook.ORIGINAL_ATTR, original)
    deepspeed.initialize = initialize
    try:
        yield
    finally:
        deepspeed.initialize = previous


def handle_of(accelerator: Any) -> Any:
    """The DeepSpeed adapter's handle among the accelerator's prepared models, or None."""
    from trainwarden.adapters.deepspeed import DeepSpeedHandle

    for m in accelerator._models:
        if isinstance(m, DeepSpeedHandle):
            return m
    return None


def knob_specs(handle: Any) -> tuple[KnobSpec, ...]:
    return tuple(k for k in handle._knob_specs() if k.name in ENGINE_KNOBS)


def config(handle: Any) -> dict[str, Any]:
    return {k: v for k, v in handle.config().items() if k in ENGINE_KNOBS and v is not None}


def after_switch(accelerator: Any, handle: Any) -> None:
    """Bring what Accelerate holds in line with the handle's new engine (see the docstring)."""
    from trainwarden.adapters.deepspeed.config import rewrite

    builder = handle._builder
    now = rewrite(builder.config, handle.setting, client_optimizer=builder.client_optimizer)
    plugin_config = accelerator.state.deepspeed_plugin.deepspeed_config
    for key in ("zero_optimization", "bf16", "fp16"):
        if key in now:
            plugin_config[key] = copy.deepcopy(now[key])
        else:
            plugin_config.pop(key, None)
    optimizer = handle.engine.basic_optimizer
    for sched in accelerator._schedulers:
        inner = getattr(sched, "scheduler", None)
        if inner is not None and hasattr(inner, "optimizer") and inner is not handle.engine.lr_scheduler:
            inner.optimizer = optimizer


__all__ = ["ENGINE_KNOBS", "after_switch", "config", "dropin_initialize", "handle_of", "knob_specs"]
