"""The user's module before and after a DeepSpeed engine: what it looked like first
(`ModuleSnapshot`), its parameters in a fixed order (`module_params`), and `clean_module`, which
undoes what an engine did to it (ZeRO-3 partitions, hooks' bookkeeping, low-precision casts,
mappings attached to each parameter) and sets every parameter to its fp32 master, so that the
next engine is built from a plain module holding exactly the carried weights (its low-precision
copies are then the masters' rounding by construction).

Cost: one walk over the module's submodules and parameters; the parameter copies are the
weights once (adapters/deepspeed/state.py carries them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ModuleSnapshot:
    """What the user's module looked like before DeepSpeed touched it."""

    module_keys: dict[int, frozenset[str]]
    parameters_type: dict[int, type]
    param_keys: dict[int, frozenset[str]]
    buffer_dtypes: dict[tuple[int, str], torch.dtype]

    @staticmethod
    def take(module: torch.nn.Module) -> ModuleSnapshot:
        mods = list(module.modules())
        return ModuleSnapshot(
            module_keys={id(m): frozenset(vars(m)) for m in mods},
            parameters_type={id(m): type(m._parameters) for m in mods},
            param_keys={id(p): frozenset(vars(p)) for p in module.parameters()},
            buffer_dtypes={
                (id(m), name): b.dtype for m in mods for name, b in m._buffers.items() if b is not None
            },
        )


def module_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The module's parameters in a fixed order, each once (tied weights once), without
    triggering ZeRO-3's fetch-on-access."""
    seen: set[int] = set()
    out: list[torch.nn.Parameter] = []
    for m in module.modules():
        for p in dict.values(m._parameters):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def clean_module(
    module: torch.nn.Module, snapshot: ModuleSnapshot, values: list[torch.Tensor] | None
) -> None:
    """Undo what a destroyed engine did to `module`, and set each parameter to `values[i]`.

    Removes the attributes DeepSpeed attached to each parameter (ZeRO-3's ds_* and partition
    methods, ZeRO-1/2's fp32 mappings) and to each submodule (ds_* bookkeeping), gives each
    submodule a plain parameter dict again (ZeRO-3 wraps it to fetch on access), casts floating
    buffers back to their original dtype, and drops gradients. Idempotent.
    """
    for m in module.modules():
        _drop_deepspeed_hooks(m, _MODULE_HOOK_DICTS)
        params = m._parameters
        want = snapshot.parameters_type.get(id(m), dict)
        if type(params) is not want:
            plain = want()
            for k, v in dict.items(params):  # not the wrapper's __getitem__ (it would fetch)
                plain[k] = v
            m._parameters = plain
        keys = snapshot.module_keys.get(id(m))
        if keys is not None:
            for name in [
                k for k in vars(m) if k not in keys and (k.startswith("ds_") or k in _ZERO3_MODULE_ATTRS)
            ]:
                delattr(m, name)
        for name, b in list(m._buffers.items()):
            dtype = snapshot.buffer_dtypes.get((id(m), name))
            if b is not None and dtype is not None and b.dtype != dtype:
                m._buffers[name] = b.to(dtype)
    params_list = module_params(module)
    for i, p in enumerate(params_list):
        keys = snapshot.param_keys.get(id(p), frozenset())
        for name in [k for k in vars(p) if k not in keys]:
            try:
                delattr(p, name)
            except AttributeError:
                pass
        _drop_deepspeed_hooks(p, _TENSOR_HOOK_DICTS)
        p.grad = None
        if values is not None:
            # On the parameter's device (ZeRO-3 left it an empty tensor there): where a freshly
            # built module would have it. Already there, the host copy itself (no second copy:
            # 4 bytes a parameter, a tenth of a switch's time measured here): building an engine
            # never writes into a parameter's tensor (ZeRO copies it into its flat buffers, a
            # precision change casts it to a new one), and at stage 0 in fp32 it becomes the
            # parameter the optimizer steps, which is what the host copy was carried for.
            v = values[i]
            p.data = v if v.device == p.device else v.to(device=p.device, copy=True)


#: What ZeRO-3 attaches to each submodule besides its ds_* attributes (DeepSpeed 0.19).
_ZERO3_MODULE_ATTRS = frozenset(
    {
        "_external_params",
        "_original_parameters",
        "all_parameters",
        "applied_pre_backward_ref_cnt",
        "post_bwd_fn",
        "pre_bwd_fn",
    }
)
_MODULE_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_TENSOR_HOOK_DICTS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _is_deepspeed_hook(fn: Any) -> bool:
    fn = getattr(fn, "__func__", fn)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    module = getattr(fn, "__module__", None) or getattr(type(fn), "__module__", "")
    return module.startswith("deepspeed")


def _drop_deepspeed_hooks(obj: Any, dict_names: tuple[str, ...]) -> None:
    """Remove the hooks a destroyed engine left behind. `engine.destroy()` leaves the engine's own
    forward hooks on the module: their closures keep the whole dead engine (optimizer, state,
    buffers) alive and run it at the next forward. Only DeepSpeed's functions are removed."""
    for name in dict_names:
        hooks = getattr(obj, name, None)
        if not hooks:
            continue
        for key in [k for k, fn in hooks.items() if _is_deepspeed_hook(fn)]:
            del hooks[key]
            for extra in (
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
                "_forward_pre_hooks_with_kwargs",
            ):
                side = getattr(obj, extra, None)
                if isinstance(side, dict):
                    side.pop(key, None)


__all__ = ["ModuleSnapshot", "clean_module", "module_params"]
