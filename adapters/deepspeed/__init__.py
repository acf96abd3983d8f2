"""The DeepSpeed adapter: switch ZeRO stage, offload, precision and micro-batch mid-run, in place.

    engine, optimizer, loader, scheduler = trainwarden.adapters.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config)   # as deepspeed.initialize
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()            # at each optimizer-step boundary: telemetry, due actions
    engine.reconfigure(zero_stage=3, offload_optimizer=True)   # by hand, at a step boundary

Why: DeepSpeed changes ZeRO stage, precision or offload only through a checkpoint, an
offline conversion and a restart, and for many pairs (stage 1/2 <-> 3, fp32 -> bf16) its
checkpoints cannot carry the optimizer state at all. Here the switch happens inside the
running job at a step boundary: the whole training state is read into one host-side fp32
copy (adapters/deepspeed/state.py), the old engine is destroyed and its memory released, a new engine
is built over the same module from the user's config with only the switched keys rewritten
(adapters/deepspeed/config.py), and the state is written into it bit for bit. If anything fails once
the old engine is gone, the previous configuration is rebuilt from the same host copy.

What it costs: a switch takes the time of one `deepspeed.initialize` plus memory copies of
12 bytes per parameter (Adam) each way. Measured on the 2-core CPU machines here: 0.2-0.7 s on
a 34k-parameter GPT, 0.7-2.3 s on a 25M-parameter one (290 MiB of state moved; ZeRO-3 and
offload targets are the slow end), about 1.4 s more when DeepSpeed's CPU Adam op is loaded.
Peak memory during it is the old engine plus that host copy: the old engine is destroyed
before the new one is built, never kept beside it, and its memory is really released
(`_destroy` removes the hooks through which DeepSpeed keeps destroyed engines alive). A
micro-batch change needs no new engine: the gradient accumulation steps follow, the global
batch is kept (milliseconds).

The objects `initialize` returns stay valid across switches: the engine is a live handle that
forwards everything (`engine(x)`, `backward`, `step`, `save_checkpoint`, attributes) to the
current DeepSpeed engine, and the optimizer and scheduler are proxies for the current
engine's. The data loader (when `training_data` is given) is trainwarden's: it reads
DeepSpeed's sampler in the training process and cuts micro-batches at the current size, so a
micro-batch change applies exactly at the next micro-batch and no sample is lost or repeated;
its position survives every switch. With your own loader, the micro-batch knob is offered only
with `micro_batch_knob=True` (your loader must then cut at `engine.train_micro_batch_size_per_gpu()`).

A client optimizer object is re-created for each new engine as `type(opt)(groups, **opt.defaults)`
with the state carried over; a client scheduler object is re-bound to the new optimizer;
callables are called again. Hold the returned objects, not DeepSpeed's inner ones
(`engine.optimizer` read once and kept is the old engine's after a switch).

`reconfigure` called by hand raises `ReconfigureError` after rolling back (the job is left on
its previous configuration with its state intact, and may go on); `ConfigError` for a request
that can never work, before anything changes. Actions from the controller never raise into
the loop: `apply` reports them applied, rejected or rolled back. Only a failed rollback (no
engine can be built at all) raises `SwitchFailed`: the job cannot continue without an engine.

Activation checkpointing is a knob (`activation_checkpointing`, reported only where the model
can switch it): a model with `set_activation_checkpointing(bool)` (trainwarden.examples.gpt.GPT)
or HF transformers' `gradient_checkpointing_enable()` / `gradient_checkpointing_disable()` (called
with `use_reentrant=False` where accepted). It changes at a step boundary, on the module, with no
new engine; recomputation is exact, so the weights follow the run that never switched. A model
with only the setter is taken to start with it off unless it has an `activation_checkpointing`
attribute.

Out of memory inside a step (`torch.cuda.OutOfMemoryError`, or the types given as
`oom_errors=`) raised from the handle's forward, backward or step: the handle drops the step
(the partial gradients go with the engine, which is rebuilt from the state as it was when the
step began: counters and RNG included), moves one rung down the OOM ladder (adapters/deepspeed/oom.py:
micro-batch halved with the global batch kept, then activation checkpointing, ZeRO stage up with
several ranks, optimizer offload, parameter offload), and raises `StepRetry` so that the step is
trained again from its first sample. Each retry reaches the controller as an adapter event (one
line of decisions.jsonl, kind `oom_retry`, policy `adapter`; counted in
`trainwarden_actions_total`). Two ways to have it retried:

    loss = engine.train_batch(data_iter, loss_fn=lambda b: engine(b["x"], b["y"]))   # one step

`train_batch` takes one optimizer step's samples from `data_iter` (any iterator of micro-batches:
tensors with samples first, or tuples/lists/dicts of them; default: the loader `initialize` made
from `training_data`, repeated), cuts them at the current micro-batch size, runs forward,
backward and step on each, and on an OOM retries the same samples one rung down: no step and no
sample is lost, and the step is bitwise the one a run switched by hand at that boundary takes.
Or keep DeepSpeed's usual loop over trainwarden's loader and catch `StepRetry`:

    for batch in loader:
        try:
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
        except StepRetry:
            continue          # the loader rewound to the step's first sample

With a loader of your own, the micro-batch rung is not used (your loader keeps its size) and
the micro-batches of the interrupted step that your loader already gave are not replayed
(`StepRetry.retry.replayed` is False). Without a catch, `StepRetry` ends the loop as the OOM
would have, after the step down. Not retried (the OOM is raised as it was, with a log line
saying why): an OOM inside the optimizer's update once it has changed a weight (detected from
the optimizer's step counts; with device-side step counts, as fused or capturable torch
optimizers keep them, any OOM inside the update), an engine that cannot be rebuilt (zero.Init,
pipelines), and one at the bottom of the ladder. With several ranks, the retry needs every rank
to hit the OOM in the same call (the rebuild is collective); a rank that OOMs alone leaves the
others waiting in their next collective, as without trainwarden. In your own loop, the `loss`
your loop still holds after an OOM in backward keeps what autograd had not yet freed of its
graph until it is rebound (train_batch holds no such reference). What it costs: per optimizer
step, a copy of the torch RNG state (~5 KB) and a read of the optimizer's step counts (about
12 us together, measured here); an OOM costs one engine rebuild (as a switch, above).

`trainwarden run --attach` makes `deepspeed.initialize` return this handle in a job whose code is
not changed (adapters/attach/).
"""

from __future__ import annotations

import atexit
import gc
import itertools
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from trainwarden.adapters import attach as attach_hook
from trainwarden.adapters.core.agreement import agree
from trainwarden.adapters.core.batching import batch_size, counted_tokens, recut, slice_batch
from trainwarden.adapters.core.boundary import StepBoundary
from trainwarden.adapters.core.link import open_link, start_agent
from trainwarden.adapters.core.probes import probe_for
from trainwarden.adapters.core.stop import training_step_begins
from trainwarden.adapters.deepspeed import oom as ds_oom
from trainwarden.adapters.deepspeed import state as ds_state
from trainwarden.adapters.deepspeed.config import (
    PRECISIONS,
    ConfigError,
    Setting,
    load_config,
    micro_batch_choices,
    resolve,
    rewrite,
    setting_of,
)
from trainwarden.adapters.knobs import (
    StopHook,
    StopHooks,
    lr_scaled,
    stop_hooks_arg,
)
from trainwarden.controller.protocol import (
    KNOB_ACTIVATION_CHECKPOINTING,
    KNOB_MICRO_BATCH,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_ZERO_STAGE,
    MAX_EVENT_REASON_CHARS,
    Action,
    AdapterEvent,
    KnobSpec,
    Outcome,
)

log = logging.getLogger("trainwarden")

#: Largest LR multiplier the adapter accepts (a policy asking for more is a bug).
#: Knobs whose change needs a new engine.
ENGINE_KNOBS = (KNOB_ZERO_STAGE, KNOB_PRECISION, KNOB_OFFLOAD_OPTIMIZER, KNOB_OFFLOAD_PARAM)

__all__ = [
    "ConfigError",
    "DeepSpeedHandle",
    "OomRetry",
    "ReconfigureError",
    "ReconfigureResult",
    "StepRetry",
    "SwitchFailed",
    "available_precisions",
    "initialize",
]


class ReconfigureError(RuntimeError):
    """A switch failed and was rolled back: the job is on its previous configuration, state intact.
    `result` says what was tried and why it failed."""

    def __init__(self, message: str, result: ReconfigureResult) -> None:
        super().__init__(message)
        self.result = result


class SwitchFailed(RuntimeError):
    """A switch failed and so did the rollback: there is no engine to train with."""


class StepRetry(RuntimeError):
    """An optimizer step ran out of memory; the handle moved one rung down and rewound the step.

    Train the step again from its first sample: `train_batch` does it by itself; in your own loop,
    catch this and go on (trainwarden's loader gives the step's samples again). `retry` says what
    happened. Not an OutOfMemoryError subclass on purpose: code that halves its own batch on an
    OOM would step down a second time."""

    def __init__(self, message: str, retry: OomRetry) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class ReconfigureResult:
    """What one `reconfigure` did.

    `changes`: (knob, old, new) for every knob that changed, the implied ones included
    (`implied` says why those changed). `rebuilt`: a new engine was built. `rolled_back`: the
    switch failed after the old engine was gone and the previous configuration was rebuilt;
    `error` says why. Memory is the process RSS on the CPU, torch.cuda's allocated bytes on a GPU
    (`memory_kind`); `memory_peak_bytes` is the peak during the switch. `bytes_moved`: bytes of
    state carried through the host copy (weights and optimizer state).
    """

    changes: tuple[tuple[str, Any, Any], ...]
    implied: tuple[str, ...]
    rebuilt: bool
    rolled_back: bool
    error: str | None
    step: int
    duration_s: float
    memory_kind: str
    memory_before_bytes: int
    memory_after_bytes: int
    memory_peak_bytes: int
    bytes_moved: int

    @property
    def applied(self) -> bool:
        return bool(self.changes) and not self.rolled_back

    def describe(self) -> str:
        if not self.changes:
            return "no change"
        what = ", ".join(f"{k} {a} -> {b}" for k, a, b in self.changes)
        if self.rolled_back:
            return f"rolled back ({what}): {self.error}"
        mb = 1 << 20
        return (
            f"{what} in {self.duration_s:.2f} s; {self.memory_kind} {self.memory_before_bytes / mb:.0f} -> "
            f"{self.memory_after_bytes / mb:.0f} MiB (peak {self.memory_peak_bytes / mb:.0f}); "
            f"{self.bytes_moved / mb:.1f} MiB of state moved"
        )


@dataclass(frozen=True)
class OomRetry:
    """One OOM survived: the optimizer step it interrupted (`step`, as global_steps will count it),
    where (`forward`, `backward`, `step`, `loss_fn`), the error's first line, the rung taken
    (`rung`, in words), the rebuild (`result`, as a switch reports it), and whether the samples
    the step had already used will be given again (`replayed`: trainwarden's loader or
    train_batch; False with a loader of your own)."""

    step: int
    where: str
    micro_step: int
    error: str
    rung: str
    result: ReconfigureResult
    replayed: bool


@dataclass
class _StepStart:
    """What a step began with, to begin it again after an OOM: the engine's counters and the torch
    RNG states (the rest of the state is not touched before the optimizer's update)."""

    counters: dict[str, int]
    rng: dict[str, Any]


def _detach_traceback(exc: BaseException) -> BaseException:
    """Let the frames of a failed forward or backward go (their activations with them) before
    anything is rebuilt: the traceback is kept as text in a note, the frames are cleared."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None
        e = e.__cause__ or e.__context__
    if hasattr(exc, "add_note"):
        exc.add_note("trainwarden: where it was raised (frames released for the retry):\n" + text)
    return exc


#: Attribute set on an OOM the handle judged impossible to retry, so that no outer call retries it.
_NOT_RETRIED = "trainwarden_not_retried"


def _mark_not_retried(exc: BaseException, reason: str) -> None:
    try:
        setattr(exc, _NOT_RETRIED, reason)
    except AttributeError:  # an exception type with __slots__: nothing outer will retry it anyway
        pass


class _ProgressReader:
    """Reads the step counts of the optimizer that really steps: each param group's own
    (DeepSpeed's Adams keep it there) and that of the tensors it steps (torch's keep it per
    tensor; for a per-parameter optimizer only the first and last of each group, which torch steps
    first and last), 0 before the first step. `read()` is None where reading one would cost a
    device synchronisation. About 10 us a read; what to read is found once per engine.

    Read from the flat partitions, not from the inner optimizer's param groups: ZeRO-3 puts a
    partition in its group only for the time of the update (and leaves it there when the update
    raises), so the groups alone would say the step had moved when it had not."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.inner: Any = None
        self.tensors: list[torch.Tensor] = []
        try:
            kind = ds_state.engine_kind(engine)
            self.inner = ds_state.inner_optimizer(engine)
            if kind == "plain":
                groups = self.inner.param_groups
                self.tensors = [t for g in groups for t in (g["params"][:1] + g["params"][-1:])]
            elif kind == "unfused16":
                groups = engine.optimizer.fp32_groups
                self.tensors = [t for group in groups for t in (group[:1] + group[-1:])]
            else:
                self.tensors = ds_state.flat_partitions(engine)
        except Exception:
            self.inner = None

    def read(self) -> tuple[int, ...] | None:
        inner = self.inner
        if inner is None:
            return None
        values = [g.get("step") for g in inner.param_groups]
        values += [(inner.state.get(t) or {}).get("step") for t in self.tensors]
        out: list[int] = []
        for v in values:
            if torch.is_tensor(v):
                if v.device.type != "cpu":
                    return None
                v = v.item()
            out.append(0 if v is None else int(v))
        return tuple(out)


def _checkpointing_api(module: torch.nn.Module) -> str | None:
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


def _loss_of(out: Any) -> torch.Tensor:
    """The loss in a model's output: the output itself (one element), its `loss` attribute or key
    (HF models), or the one single-element tensor of a tuple or list."""
    if torch.is_tensor(out) and out.numel() == 1:
        return out
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if torch.is_tensor(loss):
        return loss
    if isinstance(out, (tuple, list)):
        scalars = [t for t in out if torch.is_tensor(t) and t.numel() == 1]
        if len(scalars) == 1:
            return scalars[0]
    raise TypeError(
        f"train_batch cannot find the loss in the model's output ({type(out).__name__}); pass "
        "loss_fn=lambda batch: <the loss of one micro-batch>"
    )


def _repeat(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (DeepSpeed's RepeatingLoader), until one is empty."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


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


# ---- memory as a switch reports it ------------------------------------------------------------------


class _MemoryMeter:
    """Memory now and the peak since `start`: process RSS on the CPU, allocated bytes on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.device = device

    def start(self) -> int:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM (Linux >= 4.0)
            except OSError:
                pass
        return self.now()

    def now(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self._status("VmRSS:")

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(self._status("VmHWM:"), self.now())

    @staticmethod
    def _status(field_name: str) -> int:
        try:
            with open("/proc/self/status", "rb") as fh:
                for line in fh:
                    if line.startswith(field_name.encode()):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


def _release_memory(device: torch.device) -> None:
    """Give freed memory back: collect cycles, hand glibc's free heap pages back, empty the cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- proxies that stay valid across switches ------------------------------------------------------


class _Proxy:
    """Forwards every attribute to what `_tw_target()` returns now."""

    def __init__(self, target: Callable[[], Any]) -> None:
        object.__setattr__(self, "_tw_target", target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tw_target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._tw_target(), name, value)

    def __repr__(self) -> str:
        return f"<trainwarden {type(self).__name__} for {self._tw_target()!r}>"


class OptimizerProxy(_Proxy):
    """The current engine's optimizer (DeepSpeed's wrapper), whatever engine that is now."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self._tw_target().step(*args, **kwargs)

    def zero_grad(self, *args: Any, **kwargs: Any) -> Any:
        return self._tw_target().zero_grad(*args, **kwargs)

    def state_dict(self) -> Any:
        return self._tw_target().state_dict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._tw_target().param_groups


class SchedulerProxy(_Proxy):
    """The current engine's LR scheduler."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self._tw_target().step(*args, **kwargs)

    def get_last_lr(self) -> Any:
        return self._tw_target().get_last_lr()

    def state_dict(self) -> Any:
        return self._tw_target().state_dict()

    def load_state_dict(self, state: Any) -> Any:
        return self._tw_target().load_state_dict(state)


class SamplerLoader:
    """Micro-batches in DeepSpeed's order (its sampler), cut at the engine's current micro-batch size.

    Reads in the training process (no worker processes): a worker would already have cut the
    next micro-batches at the old size when a switch changes it. The position in the epoch
    survives every switch (this object is kept; each new engine is given it). The indices given
    since the last optimizer step are kept (a few ints a sample) so that a step interrupted by
    an OOM can be given again from its first sample (`rewind_step`).
    """

    def __init__(self, ds_loader: Any, micro_batch_size: Callable[[], int]) -> None:
        from torch.utils.data import default_collate

        self.deepspeed_loader = ds_loader
        self.dataset = ds_loader.dataset
        self.data_sampler = ds_loader.data_sampler
        self.collate_fn = ds_loader.collate_fn or default_collate
        self.drop_last = bool(getattr(ds_loader, "dataloader_drop_last", False))
        self._size = micro_batch_size
        self._indices: Iterator[int] | None = None
        self._consumed: list[int] = []

    def __iter__(self) -> SamplerLoader:
        self._indices = iter(self.data_sampler)
        return self

    def __next__(self) -> Any:
        if self._indices is None:
            self._indices = iter(self.data_sampler)
        n = self._size()
        idx = list(itertools.islice(self._indices, n))
        if not idx or (self.drop_last and len(idx) < n):
            self._indices = None
            raise StopIteration
        self._consumed.extend(idx)
        return self.collate_fn([self.dataset[i] for i in idx])

    def mark_step(self) -> None:
        """An optimizer step begins here: forget the indices of the previous one."""
        self._consumed = []

    def rewind_step(self) -> int:
        """Give the samples of the current optimizer step again, from its first, cut at the size
        then current; returns how many samples will be given again."""
        n = len(self._consumed)
        if n:
            rest = self._indices if self._indices is not None else iter(())
            self._indices = itertools.chain(self._consumed, rest)
            self._consumed = []
        return n

    def __len__(self) -> int:
        n, size = len(self.data_sampler), self._size()
        return n // size if self.drop_last else -(-n // size)


# ---- building engines ---------------------------------------------------------------------------------


class _Builder:
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
            self.optimizer_factory = _optimizer_factory(opt)
        elif callable(opt):
            self.optimizer_factory = opt
        sched = kwargs.get("lr_scheduler")
        # An object is used as is by DeepSpeed (a callable is called with the optimizer).
        self.scheduler_object = sched if sched is not None and not callable(sched) else None
        self.snapshot = ds_state.ModuleSnapshot.take(self.model)
        #: Why engines of this job cannot be rebuilt in another configuration (None: they can).
        self.cannot_rebuild: str | None = None
        if any(hasattr(p, "ds_id") for p in ds_state.module_params(self.model)):
            self.cannot_rebuild = (
                "the model was built under deepspeed.zero.Init (its parameters are partitioned from "
                "the start); build it without zero.Init to switch its configuration"
            )
        elif type(self.model).__name__ == "PipelineModule":
            self.cannot_rebuild = "pipeline-parallel engines (PipelineModule) cannot be switched yet"
        self.param_count = sum(p.numel() for p in ds_state.module_params(self.model))

    def build(self, setting: Setting | None) -> Any:
        """One engine: the user's own arguments the first time (`setting` None), then a rewrite."""
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


#: Constructor arguments DeepSpeed's optimizers keep under another attribute name.
_INIT_ARG_ATTRIBUTES = {"adamw_mode": "adam_w_mode"}


def _optimizer_factory(opt: torch.optim.Optimizer) -> Callable[[Any], torch.optim.Optimizer]:
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


# ---- the handle --------------------------------------------------------------------------------------


class DeepSpeedHandle:
    """A live handle on the current DeepSpeed engine; see the module docstring."""

    adapter_name = "deepspeed"

    def __init__(
        self,
        builder: _Builder,
        engine: Any,
        *,
        own_loader: bool,
        micro_batch_knob: bool,
        tokens_per_sample: int | None,
        policy: str | os.PathLike[str] | None,
        run_dir: str | os.PathLike[str] | None,
        sync_every: int | None,
        attach_agent: bool,
        oom_errors: tuple[type[BaseException], ...] | None = None,
        oom_retry: bool = True,
        mixture: Any = None,
    ) -> None:
        s = object.__setattr__
        s(self, "_builder", builder)
        s(self, "_engine", engine)
        s(self, "_module", engine.module)
        s(self, "_snapshot", builder.snapshot)
        s(self, "_params", ds_state.module_params(engine.module))
        s(self, "_loader", None)
        s(self, "_pending_backward", False)
        s(self, "_loss_sum", None)
        s(self, "_loss_count", 0)
        s(self, "_closed", False)
        s(self, "_precisions", available_precisions())
        s(self, "_micro_knob", micro_batch_knob or own_loader)
        s(self, "lr_multiplier", 1.0)
        s(self, "should_stop", False)
        s(self, "stop_hooks", StopHooks())
        s(self, "last_loss", None)
        s(self, "last_lr", None)
        s(self, "last_reconfigure", None)
        s(self, "tokens_per_sample", tokens_per_sample or 1)
        #: tokens_per_sample not declared: count them from the batches the model sees.
        s(self, "_count_tokens", tokens_per_sample is None)
        s(self, "_tokens_counted", 0)
        s(self, "agent", None)
        s(self, "controller", None)
        s(self, "boundary", StepBoundary(self))
        #: Exceptions that mean "out of memory" (see the module docstring); `oom_retry=False`
        #: lets them through untouched.
        s(self, "oom_errors", tuple(oom_errors) if oom_errors else ds_oom.default_oom_errors())
        s(self, "oom_retry", oom_retry)
        #: Every OOM survived, in order.
        s(self, "oom_retries", [])
        s(self, "_in_train_batch", False)
        s(self, "_train_iter", None)
        s(self, "_carry", None)
        s(self, "_step_start", None)
        s(self, "_progress_reader", None)
        s(self, "_ckpt_api", _checkpointing_api(engine.module))
        s(self, "_ckpt_value", bool(getattr(engine.module, "activation_checkpointing", False)))
        base = setting_of(builder.config, engine.dp_world_size)
        s(
            self,
            "_setting",
            replace(
                base,
                micro_batch_size=engine.train_micro_batch_size_per_gpu(),
                gradient_accumulation_steps=engine.gradient_accumulation_steps(),
                train_batch_size=engine.train_batch_size(),
            ),
        )
        s(
            self,
            "_meter",
            _MemoryMeter(
                engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
            ),
        )
        if own_loader and engine.training_dataloader is not None:
            loader = SamplerLoader(engine.training_dataloader, lambda: self._setting.micro_batch_size)
            s(self, "_loader", loader)
            engine.training_dataloader = loader
        #: The live data mixture (adapters/data/): it draws the indices of `training_data` in
        #: DeepSpeed's sampler's place; its knobs are this handle's too.
        s(self, "mixture", mixture)
        if mixture is not None:
            if self._loader is None:
                raise ConfigError(
                    "mixture= draws the indices of training_data: pass training_data=MixtureDataset(...) too"
                )
            self._loader.data_sampler = mixture
        self._mark_step_start()
        if attach_agent:
            self._attach(policy, run_dir, sync_every)
            atexit.register(self.close)

    # ---- forwarding ----------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        """The current DeepSpeed engine (a new object after each switch: do not keep it)."""
        return self._engine

    def __getattr__(self, name: str) -> Any:
        engine = self.__dict__.get("_engine")
        if engine is None:
            raise AttributeError(name)
        return getattr(engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ or name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._engine, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """engine(...); an OOM in a training forward is retried (StepRetry, see the module
        docstring). One in eval mode or under no_grad (an evaluation) is raised as it is: the
        training configuration is not stepped down for it."""
        if self._module.training and torch.is_grad_enabled():
            if self._loss_count == 0:  # a step's first forward
                training_step_begins(self, int(self._engine.global_steps) + 1)
            if self._count_tokens:
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                n = counted_tokens(dict(kwargs) if first is None else {**kwargs, "input_ids": first})
                if n is not None and (first is None or not first.is_floating_point()):
                    object.__setattr__(self, "_tokens_counted", self._tokens_counted + n)
        err: BaseException | None = None
        try:
            return self._engine(*args, **kwargs)
        except self.oom_errors as exc:
            if not self._retries(exc) or not (self._module.training and torch.is_grad_enabled()):
                raise
            err = _detach_traceback(exc)
        del args, kwargs
        raise self._recover_oom(err, "forward") from err

    def __repr__(self) -> str:
        return f"<trainwarden DeepSpeedHandle ({self._setting.describe()}) for {type(self._engine).__name__}>"

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def optimizer(self) -> Any:
        return self._engine.optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self._engine.lr_scheduler

    @property
    def training_dataloader(self) -> Any:
        return self._loader if self._loader is not None else self._engine.training_dataloader

    def train(self, mode: bool = True) -> DeepSpeedHandle:
        self._engine.train(mode)
        return self

    def eval(self) -> DeepSpeedHandle:
        self._engine.eval()
        return self

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self._engine.parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self._engine.named_parameters(*args, **kwargs)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """engine.backward(loss); an OOM in it is retried (StepRetry, see the module docstring)."""
        err: BaseException | None = None
        try:
            out = self._engine.backward(loss, *args, **kwargs)
        except self.oom_errors as exc:
            if not self._retries(exc):
                raise
            err = _detach_traceback(exc)
        if err is not None:
            del loss  # what autograd had not freed of the graph goes now, unless the caller holds it
            raise self._recover_oom(err, "backward") from err
        self._pending_backward = True
        part = loss.detach().float()
        self._loss_sum = part if self._loss_sum is None else self._loss_sum + part
        self._loss_count += 1
        return out

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """engine.step(); at an optimizer-step boundary also telemetry and the actions now due. An
        OOM in it is retried (StepRetry) unless the optimizer had begun changing the weights."""
        engine = self._engine
        boundary = engine.is_gradient_accumulation_boundary()
        before = engine.global_steps
        applied_lr = self._scheduled_lr()
        progress = self._progress() if boundary and self.oom_retry else None
        err: BaseException | None = None
        try:
            if boundary and self.lr_multiplier != 1.0:
                out = self._step_with_multiplier(args, kwargs)
                applied_lr = None if applied_lr is None else applied_lr * self.lr_multiplier
            else:
                out = engine.step(*args, **kwargs)
        except self.oom_errors as exc:
            if not self._retries(exc):
                raise
            err = _detach_traceback(exc)
        if err is not None:
            raise self._recover_oom(err, "step", progress=progress if boundary else ()) from err
        if engine.global_steps != before:
            self._pending_backward = False
            self._on_boundary(applied_lr)
            self._mark_step_start()
        return out

    # ---- whole steps, and OOM -------------------------------------------------------------------
    def train_batch(
        self,
        data_iter: Iterator[Any] | None = None,
        loss_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> float | None:
        """One optimizer step: its micro-batches' forward, backward and step; the mean loss.

        `data_iter`: micro-batches (tensors with samples first, or tuples/lists/dicts of them), of
        any size: one step takes exactly `train_batch_size / world_size` samples from it, cut at
        the current micro-batch size (a batch that crosses the step's end is split, its rest kept
        for the next call with the same iterator). Default: trainwarden's loader (`training_data`),
        repeated epoch after epoch, as DeepSpeed's pipeline engine does. If the data ends inside
        a step, that partial step is dropped and StopIteration raised.
        `loss_fn(micro_batch) -> loss`; default: the model called on the micro-batch (a tuple as
        positional arguments, a dict as keywords) and the loss found in its output.
        An OOM (see the module docstring) is retried over the same samples one rung down, as
        often as the ladder has rungs. On a pipeline engine this is DeepSpeed's own train_batch.
        """
        engine = self._engine
        if type(engine).__name__ == "PipelineEngine":
            return engine.train_batch(data_iter=data_iter)
        if not self.at_step_boundary():
            raise RuntimeError(
                "train_batch runs whole optimizer steps: finish the step begun by hand first (micro-step "
                f"{engine.micro_steps}, gradient accumulation {engine.gradient_accumulation_steps()})"
            )
        it = data_iter if data_iter is not None else self._loader_iter()
        batches = self._take_step(it)
        object.__setattr__(self, "_in_train_batch", True)
        try:
            while True:
                err: BaseException | None = None
                try:
                    return self._run_step(batches, loss_fn)
                except StepRetry:
                    continue  # one rung down, the step rewound: the same samples again
                except self.oom_errors as exc:  # raised outside the engine's calls (in loss_fn)
                    if not self._retries(exc):
                        raise
                    err = _detach_traceback(exc)
                self._recover_oom(err, "loss_fn")
        finally:
            object.__setattr__(self, "_in_train_batch", False)

    def _loader_iter(self) -> Iterator[Any]:
        if self._loader is None:
            raise TypeError(
                "train_batch needs data_iter= (an iterator of micro-batches) when initialize was not "
                "given training_data"
            )
        if self._train_iter is None:
            object.__setattr__(self, "_train_iter", _repeat(self._loader))
        return self._train_iter

    def _take_step(self, it: Iterator[Any]) -> list[Any]:
        """Batches holding exactly one optimizer step's samples for this rank."""
        need = self._setting.micro_batch_size * self._setting.gradient_accumulation_steps
        got: list[Any] = []
        n = 0
        carry = self._carry
        object.__setattr__(self, "_carry", None)
        if carry is not None and carry[0] is it:
            got.append(carry[1])
            n = batch_size(carry[1])
        while n < need:
            try:
                batch = next(it)
            except StopIteration:
                if n:
                    log.info("trainwarden: the data ended inside a step; its %d samples are dropped", n)
                raise
            k = batch_size(batch)
            if n + k > need:
                cut = need - n
                object.__setattr__(self, "_carry", (it, slice_batch(batch, cut, k)))
                batch, k = slice_batch(batch, 0, cut), cut
            if k:
                got.append(batch)
                n += k
        return got

    def _run_step(self, batches: list[Any], loss_fn: Callable[[Any], torch.Tensor] | None) -> float | None:
        for micro in recut(batches, self._setting.micro_batch_size):
            # No local name holds the loss: after an OOM in backward its graph is freed at once.
            self.backward(self._micro_loss(micro, loss_fn))
            self.step()
        return self.last_loss

    def _micro_loss(self, batch: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor:
        if loss_fn is not None:
            return loss_fn(batch)
        if isinstance(batch, Mapping):
            return _loss_of(self(**batch))
        if isinstance(batch, (tuple, list)):
            return _loss_of(self(*batch))
        return _loss_of(self(batch))

    def _mark_step_start(self) -> None:
        """Remember what this optimizer step begins with (for a retry after an OOM)."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        engine = self._engine
        object.__setattr__(
            self, "_step_start", _StepStart({k: int(getattr(engine, k, 0)) for k in ds_state.COUNTERS}, rng)
        )
        if self._loader is not None:
            self._loader.mark_step()

    def _progress(self) -> tuple[int, ...] | None:
        """The current engine's optimizer step counts (see _ProgressReader)."""
        reader = self._progress_reader
        if reader is None or reader.engine is not self._engine:
            reader = _ProgressReader(self._engine)
            object.__setattr__(self, "_progress_reader", reader)
        return reader.read()

    def _retries(self, exc: BaseException) -> bool:
        """Whether an exception of one of the OOM types is to be retried here: not a StepRetry,
        retry on, and not one already judged impossible to retry (raised through a nested call)."""
        return self.oom_retry and not isinstance(exc, StepRetry) and getattr(exc, _NOT_RETRIED, None) is None

    def _recover_oom(
        self, err: BaseException, where: str, progress: tuple[int, ...] | None = ()
    ) -> StepRetry:
        """After an OOM in `where`: rebuild one rung down at the step's start and return the
        StepRetry to raise; raise `err` itself when the step cannot be retried exactly.

        `progress`: the optimizer's step counts read before an optimizer step (`()`: the OOM was
        not inside one; None: they could not be read)."""
        engine = self._engine
        start = self._step_start
        assert start is not None
        step = start.counters["global_steps"] + 1
        micro = max(0, int(engine.micro_steps) - start.counters["micro_steps"])
        first_line = (str(err).splitlines() or [""])[0]
        what = f"{type(err).__name__} in {where} at step {step} (micro-step {micro + 1})"
        reason: str | None = None
        if progress != ():
            now = self._progress()
            if progress is None or now is None:
                reason = (
                    "the optimizer keeps its step counts on the device, so whether it had begun "
                    "updating the weights is unknown"
                )
            elif now != progress:
                reason = "the optimizer had already begun updating the weights; the step cannot be undone"
        if reason is None and self._builder.cannot_rebuild:
            reason = self._builder.cannot_rebuild
        if reason is not None:
            log.error("trainwarden: %s: %s; not retried: %s", what, first_line, reason)
            _mark_not_retried(err, reason)
            raise err
        old, old_ckpt = self._setting, self._ckpt()
        can_recut = self._micro_knob or self._in_train_batch
        meter = self._meter
        t0 = time.perf_counter()
        before = meter.start()

        def at_step_start(state: ds_state.HostState) -> None:
            state.counters.update(start.counters)
            state.rng = dict(start.rng)

        current, ckpt = old, old_ckpt
        failures: list[str] = []
        moved = 0
        while True:
            rung = ds_oom.next_rung(current, ckpt, world_size=engine.dp_world_size, can_recut=can_recut)
            if rung is None:
                log.error(
                    "trainwarden: %s: %s; no leaner configuration to retry it in (%s)%s",
                    what,
                    first_line,
                    old.describe(),
                    "; " + "; ".join(failures) if failures else "",
                )
                _mark_not_retried(err, "no leaner configuration")
                raise err
            try:
                moved, error = self._rebuild(old, rung.setting, fix=at_step_start)
            except ds_state.StateError as exc:  # raised by the capture, before anything changed
                log.error("trainwarden: %s: %s; not retried: %s", what, first_line, exc)
                _mark_not_retried(err, str(exc))
                raise err from None
            if error is None:
                break
            failures.append(f"{rung.why} failed: {error}")
            current, ckpt = rung.setting, rung.activation_checkpointing
            engine = self._engine
        self._setting = rung.setting
        if rung.activation_checkpointing is not None and rung.activation_checkpointing != old_ckpt:
            self._set_ckpt(rung.activation_checkpointing)
        self._pending_backward = False
        self._loss_sum, self._loss_count = None, 0
        if self._in_train_batch:
            replayed = True
        elif self._loader is not None:
            self._loader.rewind_step()
            replayed = True
        else:
            replayed = False
        if self.agent is not None:
            self.agent.probe.release()
        result = ReconfigureResult(
            changes=self._changes(old, rung.setting, old_ckpt, self._ckpt()),
            implied=(),
            rebuilt=True,
            rolled_back=False,
            error=None,
            step=step - 1,
            duration_s=time.perf_counter() - t0,
            memory_kind=meter.kind,
            memory_before_bytes=before,
            memory_after_bytes=meter.now(),
            memory_peak_bytes=meter.peak(),
            bytes_moved=moved,
        )
        retry = OomRetry(step, where, micro + 1, first_line, rung.why, result, replayed)
        self.oom_retries.append(retry)
        message = (
            f"{what}: {first_line}; moved one rung down ({rung.why}) in {result.duration_s:.2f} s and "
            + (
                "rewound the step: its samples are given again"
                if replayed
                else f"rewound the step; the {micro + 1} micro-batch(es) your loader gave for it are lost"
            )
        )
        log.warning("trainwarden: %s", message)
        if self.agent is not None:
            # The controller did not ask for this move: tell it, for the decision log and its
            # picture of the job (rank 0 sends; every rank moved alike).
            self.agent.report_event(
                AdapterEvent(
                    kind="oom_retry",
                    step=step - 1,
                    changes=result.changes,
                    config=self.config(),
                    reason=message[:MAX_EVENT_REASON_CHARS],
                    duration_s=result.duration_s,
                )
            )
        return StepRetry(message, retry)

    def _scheduled_lr(self) -> float | None:
        groups = self._engine.optimizer.param_groups if self._engine.optimizer is not None else []
        return float(groups[0]["lr"]) if groups else None

    def _step_with_multiplier(self, args: Any, kwargs: Any) -> Any:
        """The optimizer step at lr x multiplier; the scheduler (stepped inside engine.step) never
        sees it, so chainable schedulers do not compound it."""
        inner = ds_state.inner_optimizer(self._engine)
        had = "step" in inner.__dict__
        original = inner.__dict__.get("step")
        bound = inner.step
        m = self.lr_multiplier

        def step_at_multiplied_lr(*a: Any, **k: Any) -> Any:
            with lr_scaled(inner.param_groups, m):
                return bound(*a, **k)

        inner.step = step_at_multiplied_lr
        try:
            return self._engine.step(*args, **kwargs)
        finally:
            if had:
                inner.step = original
            else:
                del inner.step

    def _on_boundary(self, applied_lr: float | None) -> None:
        engine = self._engine
        loss = float(self._loss_sum) / self._loss_count if self._loss_sum is not None else None
        self._loss_sum, self._loss_count = None, 0
        samples = int(engine.global_samples)
        # Counted from the batches (attach mode, no tokens_per_sample declared): this rank's count
        # times the data-parallel ranks; else the declared tokens per sample.
        counted = self._tokens_counted * engine.dp_world_size
        self.boundary.cross(
            int(engine.global_steps),
            loss=loss,
            lr=applied_lr,
            samples=samples,
            tokens=counted if counted else samples * self.tokens_per_sample,
            step_samples=engine.train_batch_size() // engine.dp_world_size,
            apply_all=self.apply_all,
        )

    # ---- knobs -----------------------------------------------------------------------------------
    @property
    def setting(self) -> Setting:
        return self._setting

    def config(self) -> dict[str, Any]:
        """The configuration applied now (what `current()` of an adapter returns)."""
        s = self._setting
        return {
            KNOB_ZERO_STAGE: s.zero_stage,
            KNOB_PRECISION: s.precision,
            KNOB_OFFLOAD_OPTIMIZER: s.offload_optimizer,
            KNOB_OFFLOAD_PARAM: s.offload_param,
            KNOB_MICRO_BATCH: s.micro_batch_size,
            "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "train_batch_size": s.train_batch_size,
            **self.boundary.shared_config(),
            **({KNOB_ACTIVATION_CHECKPOINTING: self._ckpt()} if self._ckpt_api else {}),
        }

    current = config

    def _ckpt(self) -> bool | None:
        """Activation checkpointing now, or None where the model cannot switch it."""
        if self._ckpt_api is None:
            return None
        module = self._module
        if self._ckpt_api == "hf" and isinstance(getattr(module, "is_gradient_checkpointing", None), bool):
            return bool(module.is_gradient_checkpointing)
        value = getattr(module, "activation_checkpointing", None)
        return bool(value) if isinstance(value, bool) else self._ckpt_value

    def _set_ckpt(self, on: bool) -> None:
        """Switch the model's activation checkpointing (no new engine: the next forward uses it)."""
        module = self._module
        if self._ckpt_api == "setter":
            module.set_activation_checkpointing(on)
        elif on:
            import inspect

            enable = module.gradient_checkpointing_enable
            if "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters:
                enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                enable()
        else:
            module.gradient_checkpointing_disable()
        object.__setattr__(self, "_ckpt_value", on)

    @staticmethod
    def _changes(
        old: Setting, new: Setting, old_ckpt: bool | None, new_ckpt: bool | None
    ) -> tuple[tuple[str, Any, Any], ...]:
        changes = [
            (k, getattr(old, k), getattr(new, k))
            for k in ("zero_stage", "precision", "offload_optimizer", "offload_param", "micro_batch_size")
            if getattr(old, k) != getattr(new, k)
        ]
        if old_ckpt != new_ckpt:
            changes.append((KNOB_ACTIVATION_CHECKPOINTING, old_ckpt, new_ckpt))
        return tuple(changes)

    def _knob_specs(self) -> tuple[KnobSpec, ...]:
        s = self._setting
        specs = [
            KnobSpec(KNOB_ZERO_STAGE, s.zero_stage, choices=(0, 1, 2, 3)),
            KnobSpec(KNOB_PRECISION, s.precision, choices=self._precisions),
            KnobSpec(KNOB_OFFLOAD_OPTIMIZER, s.offload_optimizer, choices=(False, True)),
            KnobSpec(KNOB_OFFLOAD_PARAM, s.offload_param, choices=(False, True)),
        ]
        if self._micro_knob:
            ws = self._engine.dp_world_size
            specs.append(
                KnobSpec(
                    KNOB_MICRO_BATCH, s.micro_batch_size, choices=micro_batch_choices(s.train_batch_size, ws)
                )
            )
        if self._ckpt_api is not None:
            specs.append(KnobSpec(KNOB_ACTIVATION_CHECKPOINTING, self._ckpt(), choices=(False, True)))
        specs += [
            *self.boundary.shared_specs(),
        ]
        return tuple(specs)

    def apply(self, action: Action) -> Outcome:
        """Carry one action at this step boundary; never raises into the user's loop (except
        SwitchFailed: a failed rollback leaves no engine to train with)."""
        return self.boundary.carry(
            action,
            lambda: int(self._engine.global_steps),
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
        config_kinds = (*ENGINE_KNOBS, KNOB_MICRO_BATCH, KNOB_ACTIVATION_CHECKPOINTING)
        batch = [a for a in actions if a.kind in config_kinds]
        kinds = [a.kind for a in batch]
        if (
            len(batch) < 2
            or len(set(kinds)) != len(kinds)
            or (KNOB_MICRO_BATCH in kinds and not self._micro_knob)
        ):
            return [self.apply(a) for a in actions]
        folded = self._apply_folded(batch)
        if folded is None:
            return [self.apply(a) for a in actions]
        return [folded[a.id] if a.id in folded else self.apply(a) for a in actions]

    def _apply_folded(self, batch: list[Action]) -> dict[str, Outcome] | None:
        """One reconfigure for `batch` (distinct configuration knobs); each action's outcome by id,
        or None when the combination was refused before anything changed."""
        t = time.perf_counter()
        try:
            result = self.reconfigure(**{a.kind: a.params.get("value") for a in batch})
        except ConfigError:
            return None
        except SwitchFailed:
            raise
        except ReconfigureError as exc:
            step = int(self._engine.global_steps)
            took = time.perf_counter() - t
            return {a.id: Outcome(a.id, "rolled_back", step, took, str(exc)) for a in batch}
        step = int(self._engine.global_steps)
        took = time.perf_counter() - t
        changed = {k for k, _, _ in result.changes}
        detail = result.describe() + f" (one switch for {len(batch)} actions)"
        return {
            a.id: Outcome(a.id, "applied" if a.kind in changed else "noop", step, took, detail) for a in batch
        }

    def _apply(self, action: Action) -> tuple[str, str]:
        value = action.params.get("value")
        kind = action.kind
        if kind in ENGINE_KNOBS or kind in (KNOB_MICRO_BATCH, KNOB_ACTIVATION_CHECKPOINTING):
            if kind == KNOB_MICRO_BATCH and not self._micro_knob:
                return "rejected", "micro_batch_size is not a knob of this job (it brings its own loader)"
            try:
                result = self.reconfigure(**{kind: value})
            except ConfigError as exc:
                return "rejected", str(exc)
            return ("applied" if result.changes else "noop"), result.describe()
        shared = self.boundary.carry_shared(action, int(self._engine.global_steps))
        if shared is not None:
            return shared
        return "rejected", f"the deepspeed adapter has no knob {kind!r}"

    # ---- the switch ----------------------------------------------------------------------------
    def training_state(self) -> ds_state.HostState:
        """A host-side fp32 copy of the training state now (what a switch carries). Collective
        with several ranks: call it on every rank."""
        return ds_state.capture(self._engine, self._params)

    def held_bytes(self) -> ds_state.HeldBytes:
        """Bytes of parameters, fp32 masters and optimizer state this rank's engine holds."""
        return ds_state.held_bytes(self._engine)

    def at_step_boundary(self) -> bool:
        """No gradient is pending: the last backward was followed by an optimizer step."""
        engine = self._engine
        return not self._pending_backward and engine.micro_steps % engine.gradient_accumulation_steps() == 0

    def reconfigure(
        self,
        zero_stage: int | None = None,
        precision: str | None = None,
        offload_optimizer: bool | None = None,
        offload_param: bool | None = None,
        micro_batch_size: int | None = None,
        activation_checkpointing: bool | None = None,
    ) -> ReconfigureResult:
        """Switch to another setting at this step boundary, with the training state exact.

        Knobs left None keep their value. `activation_checkpointing` needs a model that can switch
        it (see the module docstring) and never needs a new engine. Raises ConfigError (nothing
        changed) for a request that cannot work or when called between a backward and its
        optimizer step; ReconfigureError after a failed switch was rolled back; SwitchFailed if the
        rollback failed too.
        """
        if not self.at_step_boundary():
            raise ConfigError(
                "reconfigure runs only at a step boundary: after engine.step() completed an optimizer "
                f"step (micro-step {self._engine.micro_steps}, gradient accumulation "
                f"{self._engine.gradient_accumulation_steps()}, backward pending: {self._pending_backward})"
            )
        old = self._setting
        target, implied = resolve(
            old,
            zero_stage=zero_stage,
            precision=precision,
            offload_optimizer=offload_optimizer,
            offload_param=offload_param,
            micro_batch_size=micro_batch_size,
            world_size=self._engine.dp_world_size,
            precisions=self._precisions,
        )
        old_ckpt = self._ckpt()
        new_ckpt = old_ckpt
        if activation_checkpointing is not None:
            if old_ckpt is None:
                raise ConfigError(
                    "this model cannot switch activation checkpointing: it has neither "
                    "set_activation_checkpointing(bool) nor gradient_checkpointing_enable/disable"
                )
            if not isinstance(activation_checkpointing, bool):
                raise ConfigError(
                    f"activation_checkpointing must be true or false, got {activation_checkpointing!r}"
                )
            new_ckpt = activation_checkpointing
        changes = self._changes(old, target, old_ckpt, new_ckpt)
        meter = self._meter
        t0 = time.perf_counter()
        before = meter.start()
        step = int(self._engine.global_steps)
        if not changes:
            return ReconfigureResult(
                (), (), False, False, None, step, 0.0, meter.kind, before, before, before, 0
            )
        rebuild = any(k not in ("micro_batch_size", KNOB_ACTIVATION_CHECKPOINTING) for k, _, _ in changes)
        if rebuild and self._builder.cannot_rebuild:
            raise ConfigError(self._builder.cannot_rebuild)
        moved = 0
        error: str | None = None
        if rebuild:
            moved, error = self._rebuild(old, target)
        elif target != old:
            self._set_batch(target)
        self._setting = old if error else target
        if error is None and new_ckpt != old_ckpt:
            assert new_ckpt is not None
            self._set_ckpt(new_ckpt)
        if self.agent is not None:
            self.agent.probe.release()
        result = ReconfigureResult(
            changes=changes,
            implied=tuple(implied),
            rebuilt=rebuild,
            rolled_back=error is not None,
            error=error,
            step=step,
            duration_s=time.perf_counter() - t0,
            memory_kind=meter.kind,
            memory_before_bytes=before,
            memory_after_bytes=meter.now(),
            memory_peak_bytes=meter.peak(),
            bytes_moved=moved,
        )
        self.last_reconfigure = result
        if error is not None:
            log.warning("trainwarden: %s", result.describe())
            raise ReconfigureError(
                f"switch to {target.describe()} failed and was rolled back: {error}", result
            )
        log.info("trainwarden: %s", result.describe())
        self._mark_step_start()
        return result

    def _set_batch(self, target: Setting) -> None:
        """Micro-batch and accumulation on the live engine, the global batch kept; no rebuild."""
        engine = self._engine
        engine.set_train_micro_batch_size(target.micro_batch_size)
        engine.set_train_batch_size(target.train_batch_size)
        if hasattr(engine.optimizer, "gradient_accumulation_steps"):
            engine.optimizer.gradient_accumulation_steps = target.gradient_accumulation_steps
        self._align_micro_steps(target.gradient_accumulation_steps)

    def _align_micro_steps(self, gas: int) -> None:
        # The engine finds its boundary from micro_steps modulo the accumulation steps.
        engine = self._engine
        engine.micro_steps = -(-engine.micro_steps // gas) * gas

    def _rebuild(
        self,
        old: Setting,
        target: Setting,
        fix: Callable[[ds_state.HostState], None] | None = None,
    ) -> tuple[int, str | None]:
        """Capture, destroy, build `target`, restore; on failure rebuild `old`. (bytes moved, error).

        `fix` amends the captured state before either build (an OOM retry puts the counters and
        RNG of the step's start back). With several ranks, they agree before going on: if the
        switch failed on any rank, every rank rolls back (a rank on another configuration would
        wait forever in a collective)."""
        state = ds_state.capture(self._engine, self._params)  # StateError here: nothing changed yet
        if fix is not None:
            fix(state)
        self._destroy_engine()
        error: str | None = None
        try:
            self._install(self._build(target, state), target)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        error = agree(error, self._meter.device)
        if error is None:
            return state.nbytes, None
        log.warning(
            "trainwarden: switching to %s failed (%s); rebuilding %s",
            target.describe(),
            error,
            old.describe(),
        )
        self._destroy_engine()
        try:
            self._install(self._build(old, state), old)
        except Exception as exc2:
            raise SwitchFailed(
                f"switching to {target.describe()} failed ({error}) and rebuilding {old.describe()} "
                f"failed too ({type(exc2).__name__}: {exc2}); there is no engine to train with"
            ) from exc2
        return state.nbytes, error

    def _build(self, setting: Setting, state: ds_state.HostState) -> Any:
        """A new engine for `setting` over the same module, holding exactly `state`."""
        mode = self._module.training
        ds_state.clean_module(self._module, self._snapshot, state.values)
        engine = self._builder.build(setting)
        try:
            same_scheduler = self._builder.scheduler_object is not None
            ds_state.restore(engine, self._params, state, same_scheduler=same_scheduler)
            engine.train(mode)
        except BaseException:
            _destroy(engine)
            raise
        return engine

    def _install(self, engine: Any, setting: Setting) -> None:
        object.__setattr__(self, "_engine", engine)
        if self._loader is not None:
            engine.training_dataloader = self._loader
        if engine.gradient_accumulation_steps() != setting.gradient_accumulation_steps:
            raise ConfigError("the new engine's gradient accumulation does not match its config")
        self._align_micro_steps(setting.gradient_accumulation_steps)

    def _destroy_engine(self) -> None:
        engine = self.__dict__.get("_engine")
        object.__setattr__(self, "_engine", None)
        object.__setattr__(self, "_progress_reader", None)  # it holds the engine's partitions
        if engine is not None:
            _destroy(engine)
        del engine
        _release_memory(self._meter.device)

    # ---- the agent -------------------------------------------------------------------------------
    def _attach(
        self,
        policy: str | os.PathLike[str] | None,
        run_dir: str | os.PathLike[str] | None,
        sync_every: int | None,
    ) -> None:
        link = open_link(policy, run_dir, sync_every)
        object.__setattr__(self, "controller", link.controller)
        agent = start_agent(
            link,
            probe_for(self._meter.device),
            adapter=self.adapter_name,
            param_count=self._builder.param_count,
            global_batch_size=self._setting.train_batch_size,
            tokens_per_sample=self.tokens_per_sample,
            knobs=self._knob_specs(),
        )
        object.__setattr__(self, "agent", agent)

    def on_stop(self, fn: StopHook) -> StopHook:
        """Call `fn(info)` once when trainwarden stops the run, at that step boundary, on every
        rank, before `should_stop` turns true: `engine.save_checkpoint` there is the final,
        annealed checkpoint (adapters/knobs.py). Usable as a decorator."""
        return self.boundary.on_stop(fn)

    def report(self, *, eval_loss: Any) -> None:
        """A validation loss measured now (rank 0's is sent, with the next step)."""
        self.boundary.report(eval_loss)

    def close(self) -> None:
        """Flush telemetry, tell the controller the job is done; idempotent. The engine stays usable."""
        if self._closed:
            return
        self._closed = True
        self.boundary.close()
        atexit.unregister(self.close)

    def _tw_checkpoint(self, directory: os.PathLike[str]) -> str:
        """The state at the stop through DeepSpeed's own `save_checkpoint` (every rank; core/stop.py)."""
        self._engine.save_checkpoint(str(directory))
        return str(directory)

    def _tw_teardown(self) -> None:
        self.destroy()

    def destroy(self) -> None:
        """Close, then destroy the current engine (DeepSpeed's engine.destroy())."""
        self.close()
        engine = self.__dict__.get("_engine")
        if engine is not None:
            engine.destroy()

    def __enter__(self) -> DeepSpeedHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _destroy(engine: Any) -> None:
    """Destroy an engine and drop what keeps its memory alive.

    `DeepSpeedEngine.destroy()` (0.19) leaves the engine's forward pre- and post-hooks on the
    user's module. Their closures hold the engine, so every destroyed engine, with its optimizer,
    fp32 masters and moments, stays reachable from the module for as long as the module lives:
    that is the leak of re-creating engines in one process (measured here: 20 engines of a
    3.2M-parameter GPT kept 1.2 GiB; with the hooks removed, RSS stays flat). They are removed
    here; `ds_state.clean_module` removes any other DeepSpeed hook left on the module.
    """
    try:
        engine.destroy()
    except Exception:  # a half-built engine may not destroy cleanly; its memory goes with it
        log.debug("trainwarden: engine.destroy() failed", exc_info=True)
    for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = engine.__dict__.get(name)
        if handle is not None:
            handle.remove()
    for name in ("optimizer", "basic_optimizer", "lr_scheduler", "training_dataloader"):
        try:
            engine.__dict__.pop(name, None)
        except Exception:
            pass


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int | None = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: Any = None,
    mesh_param: Any = None,
    config_params: Any = None,
    *,
    tokens_per_sample: int | None = None,
    micro_batch_knob: bool = False,
    policy: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    sync_every: int | None = None,
    attach_agent: bool = True,
    oom_errors: tuple[type[BaseException], ...] | None = None,
    oom_retry: bool = True,
    on_stop: StopHook | list[StopHook] | None = None,
    mixture: Any = None,
) -> tuple[DeepSpeedHandle, OptimizerProxy | None, SamplerLoader | None, SchedulerProxy | None]:
    """`deepspeed.initialize`, returning (engine handle, optimizer, loader, scheduler) that stay
    valid across switches. Same arguments; trainwarden's own are keyword-only:

    tokens_per_sample: for the token counts in telemetry (default: counted from the batches the
    model is called with: attention mask, non-padding labels or input_ids; 1 per sample for a batch
    with none of these). micro_batch_knob: offer the micro-batch
    knob although the job brings its own loader (which then must cut at
    `engine.train_micro_batch_size_per_gpu()`). policy, run_dir, sync_every: as for the other
    adapters' attach. attach_agent=False: no controller, no telemetry; `reconfigure` still works.
    oom_errors: the exception types that mean out of memory (default torch.cuda.OutOfMemoryError);
    oom_retry=False: an OOM is raised as it is, with no step down (module docstring).
    on_stop: save hook(s) run once when trainwarden stops the run (`DeepSpeedHandle.on_stop`).
    mixture: the live data mixture (adapters/data/) drawing `training_data`, a MixtureDataset: the
    loader reads its indices from it instead of DeepSpeed's sampler, and the handle carries its knobs.
    """
    if model is None:
        raise ConfigError("initialize needs a model")
    kwargs: dict[str, Any] = {
        "args": args,
        "model": model,
        "optimizer": optimizer,
        "model_parameters": model_parameters,
        "training_data": training_data,
        "lr_scheduler": lr_scheduler,
        "mpu": mpu,
        "dist_init_required": dist_init_required,
        "collate_fn": collate_fn,
        "config": config if config is not None else config_params,
        "mesh_param": mesh_param,
    }
    if distributed_port is not None:
        kwargs["distributed_port"] = distributed_port
    builder = _Builder(kwargs)
    engine = builder.build(None)
    handle = DeepSpeedHandle(
        builder,
        engine,
        own_loader=training_data is not None,
        micro_batch_knob=micro_batch_knob,
        tokens_per_sample=tokens_per_sample,
        policy=policy,
        run_dir=run_dir,
        sync_every=sync_every,
        attach_agent=attach_agent,
        oom_errors=oom_errors,
        oom_retry=oom_retry,
        mixture=mixture,
    )
    object.__setattr__(handle, "stop_hooks", stop_hooks_arg(on_stop))
    opt_proxy = OptimizerProxy(lambda: handle._engine.optimizer) if engine.optimizer is not None else None
    sched_proxy = (
        SchedulerProxy(lambda: handle._engine.lr_scheduler) if engine.lr_scheduler is not None else None
    )
    return handle, opt_proxy, handle._loader, sched_proxy
