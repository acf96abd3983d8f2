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
copy (adapters/deepspeed/state.py; in one process whose state is already in host memory, a CPU
job or optimizer offload, the old engine's own tensors are kept instead of copied), the old
engine is destroyed and its memory released, a new engine
is built over the same module from the user's config with only the switched keys rewritten
(adapters/deepspeed/config.py), and the state is written into it bit for bit. If anything fails once
the old engine is gone, the previous configuration is rebuilt from the same host copy.

What it costs: a switch takes the time of one `deepspeed.initialize` (less what a switch does not
need: adapters/deepspeed/build.py `lean_initialize`) plus memory copies of 12 bytes per parameter
(Adam) each way, or only into the new engine where the old engine's tensors are kept: on this CPU
in one process, for a 25M-parameter GPT, a median 1.6x two copies of the state with transparent
huge pages (`THP_MEM_ALLOC_ENABLE=1` in the job's environment) and 2.5x without them (fresh pages
fault 4 KiB at a time); ZeRO 3 targets ~4x and ~5x, stage 0 fp32 targets adopt the state (0.2x).
bench/switch_latency.py measures it against the checkpoint path; its figures are in
bench/README.md. Peak memory during it is the old engine
plus the host copy where one is made (several ranks, a GPU), else the larger engine plus the
state it carries: the old engine is destroyed before the new one is built, never kept beside
it, and its memory is really released
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
step, a copy of the torch RNG state (~5 KB) and a read of the optimizer's step counts (tens of
microseconds); an OOM costs one engine rebuild (as a switch, above).

`trainwarden run --attach` makes `deepspeed.initialize` return this handle in a job whose code is
not changed (adapters/attach/).

Where it lives: `initialize` here; the handle (handle.py) composes the engine switch with
rollback (switch.py; engines built by build.py, memory read by memory.py), the OOM recovery and
its ladder (oom.py), the knobs (knobs.py) and `train_batch` (train_batch.py); the loader
(loader.py), the optimizer and scheduler proxies (proxies.py), the result and error types
(errors.py), the config rewrite (config.py), the host copy of the state (state.py) and the
user's module between two engines (module.py).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from trainwarden.adapters.deepspeed.build import Builder
from trainwarden.adapters.deepspeed.config import ConfigError
from trainwarden.adapters.deepspeed.errors import (
    OomRetry,
    ReconfigureError,
    ReconfigureResult,
    StepRetry,
    SwitchFailed,
)
from trainwarden.adapters.deepspeed.handle import DeepSpeedHandle
from trainwarden.adapters.deepspeed.knobs import ENGINE_KNOBS, available_precisions
from trainwarden.adapters.deepspeed.loader import SamplerLoader
from trainwarden.adapters.deepspeed.memory import MemoryMeter
from trainwarden.adapters.deepspeed.proxies import OptimizerProxy, SchedulerProxy
from trainwarden.adapters.knobs import StopHook, stop_hooks_arg

#: The memory meter under the name bench/gpu_check.py imports.
_MemoryMeter = MemoryMeter

__all__ = [
    "ENGINE_KNOBS",
    "ConfigError",
    "DeepSpeedHandle",
    "OomRetry",
    "OptimizerProxy",
    "ReconfigureError",
    "ReconfigureResult",
    "SamplerLoader",
    "SchedulerProxy",
    "StepRetry",
    "SwitchFailed",
    "available_precisions",
    "initialize",
]


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
    builder = Builder(kwargs)
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
    handle.stop_hooks = stop_hooks_arg(on_stop)
    opt_proxy = OptimizerProxy(lambda: handle.engine.optimizer) if engine.optimizer is not None else None
    sched_proxy = (
        SchedulerProxy(lambda: handle.engine.lr_scheduler) if engine.lr_scheduler is not None else None
    )
    return handle, opt_proxy, handle._loader, sched_proxy
