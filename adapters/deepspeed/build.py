"""Building DeepSpeed engines for one job again and again, and destroying them for good.

`Builder` keeps everything `deepspeed.initialize` was given, so that a switch builds the same
job with only the switched config keys rewritten (adapters/deepspeed/config.py); a client
optimizer object is re-created for each engine (`optimizer_factory`). `destroy` removes what
keeps a destroyed engine's memory alive.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainwarden.adapters import attach as attach_hook
from trainwarden.adapters.deepspeed.config import Setting, load_config, rewrite
from trainwarden.adapters.deepspeed.module import ModuleSnapshot, module_params

log = logging.getLogger("trainwarden")


class Builder:
    """Everything `deepspeed.initialize` was given, to build the same job again with another setting."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = dict(kwargs)
        self.model: torch.nn.Module = kwargs["model"]
        self.config = load_config(kwargs.pop("config", None), kwargs.get("args"))
        self.kwargs.pop("config", None)
        self.kwargs.pop("config_params", None)
        args = kwargs.get("args")
        if args is not None and getattr(args, "deepspeed_config", None) is not None:
            self.kwargs["args"] = _ArgsWithoutConfig(args)
        params = kwargs.get("model_parameters")
        self.model_parameters = list(params) if params is not None else None
        self.kwargs["model_parameters"] = self.model_parameters
        opt = kwargs.get("optimizer")
        self.client_optimizer = opt is not None
        self.optimizer_factory: Callable[[Any], Any] | None = None
        if isinstance(opt, torch.optim.Optimizer):
            self.optimizer_factory = optimizer_factory(opt)
        elif callable(opt):
            self.optimizer_factory = opt
        sched = kwargs.get("lr_scheduler")
        # An object is used as is by DeepSpeed (a callable is called with the optimizer).
        self.scheduler_object = sched if sched is not None and not callable(sched) else None
        self.snapshot = ModuleSnapshot.take(self.model)
        #: Why engines of this job cannot be rebuilt in another configuration (None: they can).
        self.cannot_rebuild: str | None = None
        if any(hasattr(p, "ds_id") for p in module_params(self.model)):
            self.cannot_rebuild = (
                "the model was built under deepspeed.zero.Init (its parameters are partitioned from "
                "the start); build it without zero.Init to switch its configuration"
            )
        elif type(self.model).__name__ == "PipelineModule":
            self.cannot_rebuild = "pipeline-parallel engines (PipelineModule) cannot be switched yet"
        self.param_count = sum(p.numel() for p in module_params(self.model))

    def build(self, setting: Setting | None) -> Any:
        """One engine: the user's own arguments the first time (`setting` None), then a rewrite.
        A switch builds under `lean_initialize`."""
        import deepspeed

        kw = dict(self.kwargs)
        if setting is None:
            kw["config"] = load_config(self.config)
        else:
            kw["config"] = rewrite(self.config, setting, client_optimizer=self.client_optimizer)
            kw["training_data"] = None
            kw["collate_fn"] = None
            if self.optimizer_factory is not None:
                if isinstance(kw.get("optimizer"), torch.optim.Optimizer):
                    kw["optimizer"] = self.optimizer_factory(None)
                else:
                    kw["optimizer"] = self.optimizer_factory
        engine, _, _, _ = attach_hook.original_initialize(deepspeed)(**kw)
        if setting is not None and self.scheduler_object is not None:
            # The user's scheduler object steps the new engine's optimizer from now on.
            self.scheduler_object.optimizer = engine.basic_optimizer
            engine.lr_scheduler = self.scheduler_object
        return engine


@contextlib.contextmanager
def lean_initialize(*, state_follows: bool = False) -> Iterator[None]:
    """Around a switch's `deepspeed.initialize`: skip costs of DeepSpeed 0.19's that build nothing.

    - ZeRO-3's constructor formats its `locals()` into a debug message it then drops; they hold
      `param_names`, whose keys are the parameters, so every parameter's values are formatted
      (0.3-0.6 s for a 25M-parameter GPT on this CPU). `Parameter.__repr__` is a short one
      meanwhile (shape and dtype); the process is inside a switch, at a step boundary, so only
      another thread printing a parameter then would see the short form.
    - ZeRO-3's `defragment` runs a full `gc.collect()` (0.15-0.45 s: 400k tracked objects). The
      objects alive before the build are frozen meanwhile (`gc.freeze`), so it walks only what
      the build created; they are unfrozen after, and nothing is lost: garbage among them waits
      for the next collection. Left alone when the program froze objects itself.
    - With `state_follows` (the caller writes a stepped optimizer state into the engine next,
      adapters/deepspeed/state.py restore): stage 0 in bf16/fp16 (FP16_Optimizer,
      FP16_UnfusedOptimizer) creates its optimizer state by running a whole optimizer step on
      zero gradients (0.3-0.5 s for a 25M-parameter GPT: Adam over every element), state that
      the carried one replaces at once; `restore` creates the state tensors itself (as it does
      for ZeRO, whose own first state is lazy); ZeRO 1/2 without offload allocates a zero
      gradient partition there only to drop it. Without a carried step the engine is built as
      DeepSpeed builds it.
    - The broadcast of every parameter from rank 0 (`_broadcast_model`): every rank holds the
      same full host copy, so the module is already identical on all ranks (100 collectives a
      switch for a 25M-parameter GPT, about a tenth of a ZeRO 1/2 switch here)."""
    param_repr = torch.nn.Parameter.__repr__
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    torch.nn.Parameter.__repr__ = _short_parameter_repr  # type: ignore[method-assign]
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    saved: list[tuple[type, str, Any]] = [(DeepSpeedEngine, "_broadcast_model", _no_first_step)]
    if state_follows:
        saved += [(cls, "initialize_optimizer_states", _no_first_step) for cls in _first_step_owners()]
        zero12 = DeepSpeedZeroOptimizer.__dict__.get("initialize_optimizer_states")
        if zero12 is not None:
            saved.append((DeepSpeedZeroOptimizer, "initialize_optimizer_states", _only_where_needed(zero12)))
    saved = [(cls, name, (cls.__dict__[name], new)) for cls, name, new in saved if name in cls.__dict__]
    for cls, name, (_, new) in saved:
        setattr(cls, name, new)
    try:
        yield
    finally:
        torch.nn.Parameter.__repr__ = param_repr  # type: ignore[method-assign]
        for cls, name, (old, _) in saved:
            setattr(cls, name, old)
        if freeze:
            gc.unfreeze()


def _first_step_owners() -> list[type]:
    """DeepSpeed's optimizer wrappers whose `initialize_optimizer_states` runs an optimizer step."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return [c for c in (FP16_Optimizer, FP16_UnfusedOptimizer) if "initialize_optimizer_states" in c.__dict__]


def _no_first_step(self: Any) -> None:
    return None


def _only_where_needed(init: Callable[[Any], None]) -> Callable[[Any], None]:
    """ZeRO 1/2's `initialize_optimizer_states`, run only where it does more than allocate and drop
    a zero gradient partition: with offload (the gradient stays) or Adagrad (its state is eager)."""

    def first_state(self: Any) -> None:
        if getattr(self, "cpu_offload", False) or isinstance(self.optimizer, torch.optim.Adagrad):
            init(self)

    return first_state


def _short_parameter_repr(self: torch.nn.Parameter) -> str:
    return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"


#: Constructor arguments DeepSpeed's optimizers keep under another attribute name.
_INIT_ARG_ATTRIBUTES = {"adamw_mode": "adam_w_mode"}


def optimizer_factory(opt: torch.optim.Optimizer) -> Callable[[Any], torch.optim.Optimizer]:
    """A maker of fresh copies of a client optimizer: same class, same param groups (recorded now,
    before DeepSpeed replaces them with its flat partitions), same constructor arguments (from
    `defaults`, and from attributes of the same name for those not kept there)."""
    import inspect

    cls = type(opt)
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
        for g in opt.param_groups
    ]
    sig = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    names = [n for n in list(sig)[2:] if sig[n].kind not in (inspect.Parameter.VAR_POSITIONAL,)]
    kwargs = {k: v for k, v in opt.defaults.items() if takes_any or k in sig}
    for name in names:
        attr = _INIT_ARG_ATTRIBUTES.get(name, name)
        if name not in kwargs and sig[name].kind is not inspect.Parameter.VAR_KEYWORD and hasattr(opt, attr):
            value = getattr(opt, attr)
            if not callable(value):
                kwargs[name] = value

    def remake(_params: Any = None) -> torch.optim.Optimizer:
        return cls([{**g, "params": list(g["params"])} for g in groups], **kwargs)

    return remake


class _ArgsWithoutConfig:
    """`args` with deepspeed_config hidden (trainwarden passes the rewritten config itself)."""

    def __init__(self, args: Any) -> None:
        self._args = args

    def __getattr__(self, name: str) -> Any:
        if name in ("deepspeed_config", "deepscale_config"):
            return None
        return getattr(self._args, name)


def destroy(engine: Any) -> None:
    """Destroy an engine and drop what keeps its memory alive.

    `DeepSpeedEngine.destroy()` (0.19) leaves the engine's forward pre- and post-hooks on the
    user's module. Their closures hold the engine, so every destroyed engine, with its optimizer,
    fp32 masters and moments, stays reachable from the module for as long as the module lives:
    that is the leak of re-creating engines in one process (measured here: 20 engines of a
    3.2M-parameter GPT kept 1.2 GiB; with the hooks removed, RSS stays flat). They are removed
    here; `clean_module` (adapters/deepspeed/module.py) removes any other DeepSpeed hook left on the module.
    """
    wrapper = engine.__dict__.get("optimizer")
    optimizers = [wrapper, getattr(wrapper, "optimizer", None), engine.__dict__.get("basic_optimizer")]
    try:
        engine.destroy()
    except Exception:  # a half-built engine may not destroy cleanly; its memory goes with it
        log.debug("trainwarden: engine.destroy() failed", exc_info=True)
    _drop_optimizer_state(optimizers)
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = engine.__dict__.get(name)
        if handle is not None:
            handle.remove()
    for name in ("optimizer", "basic_optimizer", "lr_scheduler", "training_dataloader"):
        try:
            engine.__dict__.pop(name, None)
        except Exception:
            pass


def _drop_optimizer_state(optimizers: list[Any]) -> None:
    """Let reference counting free a dead engine's optimizer memory, with no garbage collection.

    The engine, its ZeRO wrapper and their hooks form reference cycles, so their tensors (fp32
    masters, moments, flat low-precision and gradient buffers) would wait for a full
    `gc.collect()`: 0.15-0.45 s in a process with torch and DeepSpeed imported (400k tracked
    objects), more than the copies of a 25M-parameter model's state. Emptying the torch
    optimizers' state and the wrapper's attributes drops the only references to those tensors
    (measured on ZeRO 0-3, fp32/bf16: RSS after this equals RSS after a full collection). The
    wrapper is dead; a client optimizer the user passed in is too (each engine gets a fresh copy),
    so its emptied state is not lost training state: the switch carried it."""
    for opt in optimizers:
        if isinstance(opt, torch.optim.Optimizer):
            opt.state.clear()
    wrapper = optimizers[0]
    if wrapper is not None and not isinstance(wrapper, torch.optim.Optimizer):
        try:
            wrapper.__dict__.clear()
        except Exception:  # an object without a plain __dict__: left to the collector
            log.debug("trainwarden: could not clear the optimizer wrapper", exc_info=True)


__all__ = ["Builder", "destroy", "lean_initialize", "optimizer_factory"]
