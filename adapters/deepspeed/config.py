"""DeepSpeed configurations as trainwarden sees them: what a config sets, and its rewrite for a target.

A DeepSpeed engine is built from a JSON config. Switching ZeRO stage, precision or offload
means building a new engine from the user's config with those few keys changed and nothing
else: `rewrite` does that on a deep copy, so every setting the user chose (buckets, clipping,
loss-scale window, optimizer and scheduler sections, ...) carries over. `Setting` is the part
trainwarden controls; `resolve` turns a request into a valid target setting, dropping an
offload that the target stage cannot carry (and saying so) and refusing what can never work.

Pure Python, no torch, no DeepSpeed: what it costs is a deep copy of a small dict.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
STAGES = (0, 1, 2, 3)


class ConfigError(ValueError):
    """A requested configuration is impossible; the message says why and what would work."""


@dataclass(frozen=True)
class Setting:
    """The knobs trainwarden switches, as applied to one engine."""

    zero_stage: int
    precision: str
    offload_optimizer: bool
    offload_param: bool
    micro_batch_size: int
    gradient_accumulation_steps: int
    train_batch_size: int

    def describe(self) -> str:
        parts = [f"ZeRO {self.zero_stage}", self.precision]
        if self.offload_optimizer:
            parts.append("optimizer offload")
        if self.offload_param:
            parts.append("param offload")
        parts.append(f"micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps}")
        return ", ".join(parts)


def load_config(config: Any, args: Any = None) -> dict[str, Any]:
    """The user's DeepSpeed config as a dict (a dict, a path to JSON/HJSON, or args.deepspeed_config),
    deep-copied: DeepSpeed may mutate the dict it is given, and every engine is built from a copy."""
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ConfigError("DeepSpeed needs a config: pass config=<dict or path> (or args.deepspeed_config)")
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if isinstance(config, (str, os.PathLike)):
        text = open(config).read()  # noqa: SIM115 - short read
        try:
            return dict(json.loads(text))
        except json.JSONDecodeError:
            import hjson  # DeepSpeed's own dependency; it reads HJSON configs too

            return dict(hjson.loads(text))
    raise ConfigError(f"config must be a dict or a path, got {type(config).__name__}")


def _enabled(section: Any) -> bool:
    if isinstance(section, Mapping):
        return bool(section.get("enabled", False))
    return bool(section)


def _offload_on(section: Any) -> bool:
    return isinstance(section, Mapping) and section.get("device", "none") not in (None, "none")


def batch_of(config: Mapping[str, Any], world_size: int) -> tuple[int, int, int]:
    """(train_batch_size, micro_batch_size, gradient_accumulation_steps), completed from the two
    of three a config may give, as DeepSpeed completes them."""
    tb = config.get("train_batch_size")
    mb = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    if tb is not None and mb is not None and gas is None:
        gas = tb // (mb * world_size)
    elif tb is not None and gas is not None and mb is None:
        mb = tb // (gas * world_size)
    elif mb is not None and gas is not None and tb is None:
        tb = mb * gas * world_size
    elif tb is not None and mb is None and gas is None:
        gas, mb = 1, tb // world_size
    elif mb is not None and tb is None and gas is None:
        gas, tb = 1, mb * world_size
    if tb is None or mb is None or gas is None:
        raise ConfigError("the config must give train_batch_size or train_micro_batch_size_per_gpu")
    return int(tb), int(mb), int(gas)


def setting_of(config: Mapping[str, Any], world_size: int) -> Setting:
    """What a config sets, in trainwarden's terms."""
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0
    if _enabled(config.get("fp16")):
        precision = "fp16"
    elif _enabled(config.get("bf16")) or _enabled(config.get("bfloat16")):
        precision = "bf16"
    else:
        precision = "fp32"
    tb, mb, gas = batch_of(config, world_size)
    return Setting(
        zero_stage=stage,
        precision=precision,
        offload_optimizer=_offload_on(zero.get("offload_optimizer")) if isinstance(zero, Mapping) else False,
        offload_param=_offload_on(zero.get("offload_param")) if isinstance(zero, Mapping) else False,
        micro_batch_size=mb,
        gradient_accumulation_steps=gas,
        train_batch_size=tb,
    )


def resolve(
    current: Setting,
    *,
    zero_stage: int | None = None,
    precision: str | None = None,
    offload_optimizer: bool | None = None,
    offload_param: bool | None = None,
    micro_batch_size: int | None = None,
    world_size: int = 1,
    precisions: tuple[str, ...] = PRECISIONS,
) -> tuple[Setting, list[str]]:
    """The target setting for a request, and the changes it implies beyond the request.

    A knob left None keeps its value. Lowering the stage below 3 drops parameter offload, and
    stage 0 drops optimizer offload (neither exists there): those are reported as implied.
    Asking for an offload the target stage cannot carry, a precision this device lacks, or a
    micro-batch that does not divide the global batch is refused with ConfigError.
    """
    implied: list[str] = []
    stage = current.zero_stage if zero_stage is None else zero_stage
    if isinstance(stage, bool) or stage not in STAGES:
        raise ConfigError(f"zero_stage must be one of 0, 1, 2, 3, got {stage!r}")
    prec = current.precision if precision is None else precision
    if prec not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {prec!r}")
    if prec not in precisions:
        raise ConfigError(
            f"precision {prec} is not supported on this device (supported: {', '.join(precisions)})"
        )
    for name, value in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    off_opt = current.offload_optimizer if offload_optimizer is None else offload_optimizer
    off_par = current.offload_param if offload_param is None else offload_param
    if off_par and stage != 3:
        if offload_param:
            raise ConfigError(f"parameter offload needs ZeRO stage 3 (target stage is {stage})")
        off_par = False
        implied.append("offload_param True -> False (parameter offload needs ZeRO stage 3)")
    if off_opt and stage == 0:
        if offload_optimizer:
            raise ConfigError("optimizer offload needs ZeRO stage 1, 2 or 3 (target stage is 0)")
        off_opt = False
        implied.append("offload_optimizer True -> False (optimizer offload needs ZeRO stage 1-3)")
    target = replace(
        current, zero_stage=stage, precision=prec, offload_optimizer=off_opt, offload_param=off_par
    )
    if micro_batch_size is not None:
        target = with_micro_batch(target, micro_batch_size, world_size)
    return target, implied


def micro_batch_choices(train_batch_size: int, world_size: int) -> tuple[int, ...]:
    """Micro-batch sizes that keep the global batch: divisors of train_batch_size / world_size."""
    per_rank = train_batch_size // world_size
    return tuple(d for d in range(1, per_rank + 1) if per_rank % d == 0)


def with_micro_batch(setting: Setting, micro_batch_size: int, world_size: int) -> Setting:
    choices = micro_batch_choices(setting.train_batch_size, world_size)
    if isinstance(micro_batch_size, bool) or micro_batch_size not in choices:
        raise ConfigError(
            f"micro_batch_size must divide the per-rank batch {setting.train_batch_size // world_size} "
            f"(global batch {setting.train_batch_size} kept; valid: {', '.join(map(str, choices))}), "
            f"got {micro_batch_size!r}"
        )
    gas = setting.train_batch_size // (micro_batch_size * world_size)
    return replace(setting, micro_batch_size=micro_batch_size, gradient_accumulation_steps=gas)


def rewrite(config: Mapping[str, Any], target: Setting, *, client_optimizer: bool = False) -> dict[str, Any]:
    """A deep copy of `config` that builds an engine with `target`, everything else as given.

    `client_optimizer`: the user passed an optimizer object or callable, not an `optimizer`
    section. DeepSpeed refuses a client optimizer under optimizer offload unless
    `zero_force_ds_cpu_optimizer` is false; trainwarden keeps the user's optimizer class across
    a switch (so the state and the trajectory stay exact), so it sets that flag.
    """
    out = copy.deepcopy(dict(config))
    zero = dict(out.get("zero_optimization") or {})
    zero["stage"] = target.zero_stage
    if target.offload_optimizer:
        section = dict(zero.get("offload_optimizer") or {})
        section["device"] = "cpu"
        zero["offload_optimizer"] = section
    else:
        zero.pop("offload_optimizer", None)
    if target.offload_param:
        section = dict(zero.get("offload_param") or {})
        section["device"] = "cpu"
        zero["offload_param"] = section
    else:
        zero.pop("offload_param", None)
    out["zero_optimization"] = zero
    if target.offload_optimizer and client_optimizer:
        out["zero_force_ds_cpu_optimizer"] = False

    fp16 = out.get("fp16")
    fp16 = dict(fp16) if isinstance(fp16, Mapping) else {}
    bf16 = out.get("bf16", out.get("bfloat16"))
    bf16 = dict(bf16) if isinstance(bf16, Mapping) else {}
    out.pop("bfloat16", None)
    fp16["enabled"] = target.precision == "fp16"
    bf16["enabled"] = target.precision == "bf16"
    out["fp16"], out["bf16"] = fp16, bf16
    types = out.get("data_types")
    if isinstance(types, Mapping):
        types = dict(types)
        types.pop("param_dtype", None)  # follows the precision
        if target.precision == "fp32":
            types.pop("grad_accum_dtype", None)
        out["data_types"] = types

    out["train_batch_size"] = target.train_batch_size
    out["train_micro_batch_size_per_gpu"] = target.micro_batch_size
    out["gradient_accumulation_steps"] = target.gradient_accumulation_steps
    return out
