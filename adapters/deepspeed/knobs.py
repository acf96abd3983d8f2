"""The DeepSpeed handle's knobs: what it offers the controller, its configuration now, and how an
action is carried (ZeRO stage, precision, offloads, micro-batch, activation checkpointing; the
shared LR multiplier, stop and data-mixture knobs through core/boundary.py).

Configuration knobs are carried by the handle's `reconfigure` (adapters/deepspeed/switch.py);
several due at one boundary are folded into one switch, so a multi-knob move builds one engine.
Activation checkpointing changes on the module, with no new engine (`Checkpointing`).
"""

from __future__ import annotations

import inspect
import time
from typing import TYPE_CHECKING, Any

import torch

from trainwarden.adapters.deepspeed.config import PRECISIONS, ConfigError, micro_batch_choices
from trainwarden.adapters.deepspeed.errors import ReconfigureError, SwitchFailed
from trainwarden.controller.protocol import (
    KNOB_ACTIVATION_CHECKPOINTING,
    KNOB_MICRO_BATCH,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_ZERO_STAGE,
    Action,
    KnobSpec,
    Outcome,
)

if TYPE_CHECKING:
    from trainwarden.adapters.deepspeed.handle import DeepSpeedHandle

#: Knobs whose change needs a new engine.
ENGINE_KNOBS = (KNOB_ZERO_STAGE, KNOB_PRECISION, KNOB_OFFLOAD_OPTIMIZER, KNOB_OFFLOAD_PARAM)
#: Knobs that set the configuration: carried by `reconfigure`, folded when due together.
CONFIG_KNOBS = (*ENGINE_KNOBS, KNOB_MICRO_BATCH, KNOB_ACTIVATION_CHECKPOINTING)


def available_precisions() -> tuple[str, ...]:
    """Precisions DeepSpeed supports on this machine's accelerator."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    out = ["fp32"]
    if acc.is_bf16_supported():
        out.append("bf16")
    if acc.is_fp16_supported():
        out.append("fp16")
    return tuple(p for p in PRECISIONS if p in out)


def checkpointing_api(module: torch.nn.Module) -> str | None:
    """How `module` switches activation checkpointing: 'setter' (set_activation_checkpointing),
    'hf' (gradient_checkpointing_enable/disable), or None (it cannot)."""
    if callable(getattr(module, "set_activation_checkpointing", None)):
        return "setter"
    if (
        callable(getattr(module, "gradient_checkpointing_enable", None))
        and callable(getattr(module, "gradient_checkpointing_disable", None))
        and getattr(module, "supports_gradient_checkpointing", True) is not False
    ):
        return "hf"
    return None


class Checkpointing:
    """Activation checkpointing of the user's module, switched on the module itself (the next
    forward uses it; no new engine). A model with only the setter is taken to start with it off
    unless it has an `activation_checkpointing` attribute."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.api = checkpointing_api(module)
        self._value = bool(getattr(module, "activation_checkpointing", False))

    def get(self) -> bool | None:
        """Activation checkpointing now, or None where the model cannot switch it."""
        if self.api is None:
            return None
        module = self.module
        if self.api == "hf" and isinstance(getattr(module, "is_gradient_checkpointing", None), bool):
            return bool(module.is_gradient_checkpointing)
        value = getattr(module, "activation_checkpointing", None)
        return bool(value) if isinstance(value, bool) else self._value

    def set(self, on: bool) -> None:
        """Switch the model's activation checkpointing (HF models with use_reentrant=False where
        their enable accepts it)."""
        module = self.module
        if self.api == "setter":
            module.set_activation_checkpointing(on)
        elif on:
            enable = module.gradient_checkpointing_enable
            if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                enable()
        else:
            module.gradient_checkpointing_disable()
        self._value = on


class Knobs:
    """The knobs of one DeepSpeed handle. `micro_batch`: the micro-batch is a knob (trainwarden
    cuts the micro-batches, or the job said its own loader follows the engine's size)."""

    def __init__(self, handle: DeepSpeedHandle, *, micro_batch: bool) -> None:
        self.handle = handle
        self.micro_batch = micro_batch
        self.checkpointing = Checkpointing(handle.module)

    def config(self) -> dict[str, Any]:
        """The configuration applied now (what `current()` of an adapter returns)."""
        h = self.handle
        s = h.setting
        ckpt = self.checkpointing
        return {
            KNOB_ZERO_STAGE: s.zero_stage,
            KNOB_PRECISION: s.precision,
            KNOB_OFFLOAD_OPTIMIZER: s.offload_optimizer,
            KNOB_OFFLOAD_PARAM: s.offload_param,
            KNOB_MICRO_BATCH: s.micro_batch_size,
            "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "train_batch_size": s.train_batch_size,
            **h.boundary.shared_config(),
            **({KNOB_ACTIVATION_CHECKPOINTING: ckpt.get()} if ckpt.api else {}),
        }

    def specs(self) -> tuple[KnobSpec, ...]:
        """The knobs as the agent's hello reports them."""
        h = self.handle
        s = h.setting
        specs = [
            KnobSpec(KNOB_ZERO_STAGE, s.zero_stage, choices=(0, 1, 2, 3)),
            KnobSpec(KNOB_PRECISION, s.precision, choices=h.switch.precisions),
            KnobSpec(KNOB_OFFLOAD_OPTIMIZER, s.offload_optimizer, choices=(False, True)),
            KnobSpec(KNOB_OFFLOAD_PARAM, s.offload_param, choices=(False, True)),
        ]
        if self.micro_batch:
            ws = h.engine.dp_world_size
            specs.append(
                KnobSpec(
                    KNOB_MICRO_BATCH, s.micro_batch_size, choices=micro_batch_choices(s.train_batch_size, ws)
                )
            )
        if self.checkpointing.api is not None:
            specs.append(
                KnobSpec(KNOB_ACTIVATION_CHECKPOINTING, self.checkpointing.get(), choices=(False, True))
            )
        specs += [
            *h.boundary.shared_specs(),
        ]
        return tuple(specs)

    def apply(self, action: Action) -> Outcome:
        """Carry one action at this step boundary; never raises into the user's loop (except
        SwitchFailed: a failed rollback leaves no engine to train with)."""
        return self.handle.boundary.carry(
            action,
            lambda: int(self.handle.engine.global_steps),
            self._apply,
            fatal=(SwitchFailed,),
            rolled_back=(ReconfigureError,),
        )

    def apply_all(self, actions: list[Action]) -> list[Outcome]:
        """Carry the actions due at this step boundary, in order; those that set the configuration
        (ZeRO stage, precision, offloads, micro-batch, checkpointing) in one `reconfigure`, so a
        multi-knob move (the memory policy sends one action per knob, for the same step) builds one
        engine, not one per knob: each rebuild costs an initialize and two copies of the state. If
        the combination is refused as a whole (ConfigError, nothing changed), they are carried one
        by one, as `apply` does."""
        batch = [a for a in actions if a.kind in CONFIG_KNOBS]
        kinds = [a.kind for a in batch]
        if (
            len(batch) < 2
            or len(set(kinds)) != len(kinds)
            or (KNOB_MICRO_BATCH in kinds and not self.micro_batch)
        ):
            return [self.apply(a) for a in actions]
        folded = self._apply_folded(batch)
        if folded is None:
            return [self.apply(a) for a in actions]
        return [folded[a.id] if a.id in folded else self.apply(a) for a in actions]

    def _apply_folded(self, batch: list[Action]) -> dict[str, Outcome] | None:
        """One reconfigure for `batch` (distinct configuration knobs); each action's outcome by id,
        or None when the combination was refused before anything changed."""
        h = self.handle
        t = time.perf_counter()
        try:
            result = h.reconfigure(**{a.kind: a.params.get("value") for a in batch})
        except ConfigError:
            return None
        except SwitchFailed:
            raise
        except ReconfigureError as exc:
            step = int(h.engine.global_steps)
            took = time.perf_counter() - t
            return {a.id: Outcome(a.id, "rolled_back", step, took, str(exc)) for a in batch}
        step = int(h.engine.global_steps)
        took = time.perf_counter() - t
        changed = {k for k, _, _ in result.changes}
        detail = result.describe() + f" (one switch for {len(batch)} actions)"
        return {
            a.id: Outcome(a.id, "applied" if a.kind in changed else "noop", step, took, detail) for a in batch
        }

    def _apply(self, action: Action) -> tuple[str, str]:
        h = self.handle
        value = action.params.get("value")
        kind = action.kind
        if kind in CONFIG_KNOBS:
            if kind == KNOB_MICRO_BATCH and not self.micro_batch:
                return "rejected", "micro_batch_size is not a knob of this job (it brings its own loader)"
            try:
                result = h.reconfigure(**{kind: value})
            except ConfigError as exc:
                return "rejected", str(exc)
            return ("applied" if result.changes else "noop"), result.describe()
        shared = h.boundary.carry_shared(action, int(h.engine.global_steps))
        if shared is not None:
            return shared
        return "rejected", f"the deepspeed adapter has no knob {kind!r}"


__all__ = [
    "CONFIG_KNOBS",
    "ENGINE_KNOBS",
    "Checkpointing",
    "Knobs",
    "available_precisions",
    "checkpointing_api",
]
