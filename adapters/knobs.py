"""The knobs every adapter carries the same way: the LR multiplier and the cooperative stop.

Kept in one place so the plain-PyTorch, DeepSpeed (and later Accelerate) adapters accept,
refuse and apply them identically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action

log = logging.getLogger("trainwarden")

#: Largest LR multiplier an adapter accepts (a policy asking for more is a bug).
MAX_LR_MULTIPLIER = 10.0


class _Carrier(Protocol):
    lr_multiplier: float
    should_stop: bool


def apply_shared_knob(handle: _Carrier, action: Action) -> tuple[str, str] | None:
    """(outcome, detail) for `lr_multiplier` and `stop`; None for any other kind."""
    value = action.params.get("value")
    if action.kind == KNOB_LR_MULTIPLIER:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0.0 <= value <= MAX_LR_MULTIPLIER
        ):
            return "rejected", f"lr_multiplier must be a number in [0, {MAX_LR_MULTIPLIER}], got {value!r}"
        if float(value) == handle.lr_multiplier:
            return "noop", ""
        handle.lr_multiplier = float(value)
        return "applied", ""
    if action.kind == KNOB_STOP:
        if handle.should_stop:
            return "noop", ""
        handle.should_stop = True
        log.warning("trainwarden: stop requested: %s", action.reason)
        return "applied", "should_stop is now true"
    return None


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
