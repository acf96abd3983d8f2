"""Switching an Accelerate job's mixed precision at a step boundary, with every object kept.

Accelerate fixes the precision when the `Accelerator` is built: it lives in the process-wide
`AcceleratorState` (a second Accelerator with another `mixed_precision` raises "AcceleratorState
has already been initialized"), in the accelerator's `native_amp` and `scaler`, in an autocast
wrapper `prepare` bakes into each model's `forward`, and in each prepared optimizer's `scaler`.
A disabled `autocast()` context does not undo the baked-in one, so the switch must redo all four.

How, using Accelerate's own code for each part:
1. `AcceleratorState._reset_state()` (the distributed `PartialState` is kept), then a fresh
   `accelerate.Accelerator(**the user's arguments, mixed_precision=new)`: Accelerate itself
   re-initialises the shared state and decides `native_amp` and the grad scaler (and raises
   where the device cannot do it). The fresh object is used for those two attributes only and
   dropped; the user's accelerator takes them, so the user's references (the accelerator, the
   prepared model or its DDP wrapper, optimizer, scheduler, data loaders) all stay valid.
2. each prepared model's inner module gets its original `forward` back and is passed to
   `prepare_model(module, evaluation_mode=True)`: the autocast wrapper for the new precision, and
   no second DDP wrapper (the existing one keeps its reducer and hooks).
3. each prepared optimizer gets the new scaler (None except fp16 on an accelerator device).
The torch optimizer itself is never touched: fp32 parameters, Adam moments and step counts are
the same objects before and after (Accelerate without DeepSpeed keeps fp32 weights and casts in
autocast). An fp16 GradScaler's running scale is dropped when leaving fp16 and starts afresh
when entering it.

What it costs: one `Accelerator.__init__` (a few milliseconds) and no tensor copy. On failure
every piece is put back as it was (the shared state from a copy of its dict, the forward
attributes, the scalers) and the caller reports `rolled_back`.

Accelerate's fp16 on a CPU is silently a no-op (no autocast, no scaler: the job would compute in
fp32 while saying fp16); `available_precisions` leaves it out there, so it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: trainwarden's names for the precision knob (the same as the DeepSpeed adapter's), and
#: Accelerate's `mixed_precision` value for each.
TO_ACCELERATE = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
FROM_ACCELERATE = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}
#: Accelerator attributes that depend on the precision (diffing two fresh Accelerators, no vs
#: bf16, on accelerate 1.15: `native_amp`; `scaler` differs for fp16 on an accelerator device).
PRECISION_ATTRS = ("native_amp", "scaler")
_MISSING = object()


class PrecisionError(RuntimeError):
    """The precision cannot be switched; the message says why."""


def knob_value(mixed_precision: str) -> str:
    """trainwarden's name for Accelerate's `mixed_precision` (fp8 passes through unchanged)."""
    return FROM_ACCELERATE.get(str(mixed_precision), str(mixed_precision))


def available_precisions(device: torch.device) -> tuple[str, ...]:
    """Precisions Accelerate really applies on `device` (trainwarden names)."""
    out = ["fp32"]
    if device.type == "cpu":
        out.append("bf16")  # CPU autocast computes matmuls in bf16; fp16 is a no-op in Accelerate
    elif device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            out.append("bf16")
        out.append("fp16")
    elif device.type in ("xpu", "npu", "mlu", "musa", "hpu", "sdaa", "mps"):
        out += ["bf16", "fp16"]
    return tuple(out)


def refusal(value: Any, device: torch.device) -> str | None:
    """Why `value` cannot be switched to on `device`, or None."""
    if value == "no":
        value = "fp32"
    if value not in TO_ACCELERATE:
        return f"precision must be one of {', '.join(TO_ACCELERATE)} (or Accelerate's 'no'), got {value!r}"
    if value not in available_precisions(device):
        if value == "fp16" and device.type == "cpu":
            return (
                "fp16 is refused on the CPU: Accelerate's fp16 there is a silent no-op (no autocast, no "
                "grad scaler), so the job would compute in fp32 while reporting fp16; use bf16"
            )
        return f"{value} is not supported by Accelerate on {device.type}"
    return None


def inner_module(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DDP wrapper (the module whose `forward` Accelerate patches)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def restore_forward(module: torch.nn.Module) -> None:
    """Undo Accelerate's autocast patch of `module.forward` (no-op when not patched)."""
    original = module.__dict__.pop("_original_forward", _MISSING)
    if original is _MISSING:
        return
    func = getattr(original, "__func__", None)
    if getattr(original, "__self__", None) is module and func is getattr(type(module), "forward", None):
        module.__dict__.pop("forward", None)  # the class's forward again, as before prepare
    else:
        module.__dict__["forward"] = original


@dataclass
class _Saved:
    """Everything a precision switch changes, to put back on failure."""

    shared_state: dict[str, Any]
    attrs: dict[str, Any]
    forwards: list[tuple[torch.nn.Module, Any, Any, Any]]
    scalers: list[tuple[Any, Any]]
    plugin_kwargs: dict[str, Any]
    models: list[Any]

    @staticmethod
    def take(accelerator: Any) -> _Saved:
        from accelerate.state import AcceleratorState

        modules = [inner_module(m) for m in accelerator._models]
        return _Saved(
            shared_state=dict(AcceleratorState._shared_state),
            attrs={k: accelerator.__dict__.get(k, _MISSING) for k in PRECISION_ATTRS},
            forwards=[
                (
                    m,
                    m.__dict__.get("forward", _MISSING),
                    m.__dict__.get("_original_forward", _MISSING),
                    m.__dict__.get("_is_accelerate_prepared", _MISSING),
                )
                for m in modules
            ],
            scalers=[(o, getattr(o, "scaler", None)) for o in accelerator._optimizers],
            plugin_kwargs=dict(accelerator.gradient_state.plugin_kwargs),
            models=list(accelerator._models),
        )

    def put_back(self, accelerator: Any) -> None:
        from accelerate.state import AcceleratorState

        AcceleratorState._shared_state.clear()
        AcceleratorState._shared_state.update(self.shared_state)
        for k, v in self.attrs.items():
            if v is _MISSING:
                accelerator.__dict__.pop(k, None)
            else:
                accelerator.__dict__[k] = v
        for module, fwd, orig, prepared in self.forwards:
            for name, value in (
                ("forward", fwd),
                ("_original_forward", orig),
                ("_is_accelerate_prepared", prepared),
            ):
                if value is _MISSING:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value
        for opt, scaler in self.scalers:
            opt.scaler = scaler
        accelerator.gradient_state.plugin_kwargs = self.plugin_kwargs
        accelerator._models[:] = self.models


def switch(accelerator: Any, value: str, init_args: tuple[Any, ...], init_kwargs: dict[str, Any]) -> None:
    """Switch `accelerator` (and what it prepared) to precision `value` (trainwarden name), in
    place. Raises after putting everything back if any part fails."""
    import accelerate
    from accelerate.state import AcceleratorState

    saved = _Saved.take(accelerator)
    try:
        AcceleratorState._reset_state()
        fresh = accelerate.Accelerator(*init_args, **{**init_kwargs, "mixed_precision": TO_ACCELERATE[value]})
        # The fresh Accelerator re-initialised GradientState with the constructor's plugin: the
        # accumulation now in effect (a knob too) is put back.
        accelerator.gradient_state.plugin_kwargs = dict(saved.plugin_kwargs)
        for k in PRECISION_ATTRS:
            accelerator.__dict__[k] = fresh.__dict__.get(k)
        del fresh
        for module, _, _, prepared in saved.forwards:
            restore_forward(module)
            module.__dict__.pop("_is_accelerate_prepared", None)  # else prepare_model returns early
            accelerator.prepare_model(module, evaluation_mode=True)
            if prepared is not _MISSING:
                module.__dict__["_is_accelerate_prepared"] = prepared
        accelerator._models[:] = saved.models  # prepare_model appended the inner modules
        for opt, _ in saved.scalers:
            opt.scaler = accelerator.scaler
        if accelerator.state.mixed_precision != TO_ACCELERATE[value]:
            raise PrecisionError(
                f"Accelerate kept mixed_precision={accelerator.state.mixed_precision!r} "
                f"after asking for {TO_ACCELERATE[value]!r}"
            )
    except BaseException:
        saved.put_back(accelerator)
        raise


__all__ = [
    "FROM_ACCELERATE",
    "TO_ACCELERATE",
    "PrecisionError",
    "available_precisions",
    "inner_module",
    "knob_value",
    "refusal",
    "restore_forward",
    "switch",
]
