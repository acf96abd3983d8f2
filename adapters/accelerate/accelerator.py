"""The Accelerate adapter: `Accelerator` as a drop-in, switched mid-run at step boundaries.

    from trainwarden.adapters.accelerate import Accelerator      # instead of `from accelerate import ...`
    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if accelerator.should_stop:       # the budget is spent (optional: the stop knob)
            break

It is `accelerate.Accelerator` (a subclass: same constructor, `prepare`, `backward`, `accumulate`,
`autocast`, `save_state`, everything else inherited), plus an agent that reports each optimizer
step (loss, samples, tokens, step time, memory, per-domain loss given to `log_domain_loss`) and
carries the controller's actions at step boundaries:

- `precision` (fp32 / bf16 / fp16 where Accelerate really applies it: not fp16 on a CPU, where
  Accelerate's fp16 is a silent no-op): adapters/accelerate/precision.py, no tensor copied;
- `micro_batch_size`: the gradient accumulation follows with the global batch kept; offered when
  the training loader was prepared here (the first DataLoader given to `prepare`; it is returned
  as a `MicroBatchLoader`, adapters/accelerate/loader.py) and the loop uses `accumulate()`;
- `lr_multiplier` (on top of the user's scheduler, for the optimizer step only) and `stop`
  (`should_stop`), as every adapter does them (adapters/knobs.py).

Where: the optimizer-step boundary is the prepared optimizer's `step()` with gradients synced:
right after the update, the step is recorded and the actions due there are applied, at the same
step on every rank (the agent's collective). Nothing there needs the old configuration again:
the precision lives in the next forward, the micro-batch in the loader's next cut, and the
scheduler and `zero_grad` that follow in the loop act on the same optimizer. An action that
fails is reported (`rejected`, or `rolled_back` when the switch had begun and was undone), never
raised into the loop. The agent starts at the `prepare` that brings the optimizer (prepare the
training loader with it, or before it: the micro-batch knob is known from the loader).

With a DeepSpeed plugin, the engine Accelerate builds is the DeepSpeed adapter's live handle
(adapters/accelerate/deepspeed_plugin.py): `zero_stage`, `offload_optimizer`, `offload_param`,
`precision` (DeepSpeed's) and `activation_checkpointing` switch through its in-memory state
transfer; the step boundary is then `accelerator.backward` on a synced micro-batch (DeepSpeed
steps inside it). Not carried: FSDP's and Megatron's engine knobs, fp8; the micro-batch under
DeepSpeed (its config's value stays).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import accelerate
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from trainwarden.adapters.accelerate import deepspeed_plugin as accelerate_deepspeed
from trainwarden.adapters.accelerate import precision as precision_switch
from trainwarden.adapters.accelerate.loader import MicroBatchLoader
from trainwarden.adapters.core.agent import Agent
from trainwarden.adapters.core.agreement import agree
from trainwarden.adapters.core.batching import divisors
from trainwarden.adapters.core.boundary import StepBoundary
from trainwarden.adapters.core.link import open_link, start_agent
from trainwarden.adapters.core.probes import probe_for
from trainwarden.adapters.core.stop import training_step_begins
from trainwarden.adapters.knobs import (
    StopHook,
    lr_scaled,
    stop_hooks_arg,
)
from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    KNOB_MICRO_BATCH,
    KNOB_PRECISION,
    KNOB_STOP,
    Action,
    KnobSpec,
    Outcome,
)

log = logging.getLogger("trainwarden")

#: Distributed types whose precision lives in Accelerate's autocast (the switch is carried);
#: DeepSpeed, FSDP and Megatron keep it in their own engines.
_AUTOCAST_TYPES = frozenset(
    {
        DistributedType.NO,
        DistributedType.MULTI_CPU,
        DistributedType.MULTI_GPU,
        DistributedType.MULTI_XPU,
        DistributedType.MULTI_NPU,
        DistributedType.MULTI_MLU,
    }
)


class TrackedOptimizer(AcceleratedOptimizer):
    """Accelerate's prepared optimizer, whose synced `step()` is the job's step boundary.

    Made from the AcceleratedOptimizer that `prepare` returns by changing its class (no new
    fields, no copy), so `isinstance(opt, AcceleratedOptimizer)` and everything it does stay."""

    _tw_accelerator: Accelerator

    def step(self, closure: Any = None) -> Any:
        acc = self._tw_accelerator
        synced = self.gradient_state.sync_gradients
        with lr_scaled(self.optimizer.param_groups, acc.lr_multiplier):
            out = super().step(closure)
            applied_lr = float(self.optimizer.param_groups[0]["lr"])
        if synced and acc._optimizers and self is acc._optimizers[0]:  # one boundary per step
            acc._tw_boundary(applied_lr)
        return out


class Accelerator(accelerate.Accelerator):
    """`accelerate.Accelerator` with trainwarden attached; see the module docstring.

    trainwarden's own arguments are keyword-only: `policy`, `run_dir`, `sync_every` (as for the
    other adapters' attach), `tokens_per_sample` (default: counted from each micro-batch's
    `input_ids`, or its first 2-D tensor), `on_stop` (save hooks run when trainwarden stops the
    run, as `accelerator.on_stop(fn)`), `mixture` (the live data mixture, adapters/data/: its
    knobs are carried and its per-domain loss reported), `attach_agent=False` (no controller, no
    telemetry; `reconfigure` still works).
    """

    adapter_name = "accelerate"

    def __init__(
        self,
        *args: Any,
        policy: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        sync_every: int | None = None,
        tokens_per_sample: int | None = None,
        on_stop: StopHook | list[StopHook] | None = None,
        mixture: Any = None,
        attach_agent: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # Kept to build the fresh Accelerator a precision switch takes its settings from.
        self._tw_init = (args, dict(kwargs))
        self._tw_options = {"policy": policy, "run_dir": run_dir, "sync_every": sync_every}
        self._tw_attach_agent = attach_agent
        self.tokens_per_sample = tokens_per_sample
        self.lr_multiplier = 1.0
        self.should_stop = False
        self.stop_hooks = stop_hooks_arg(on_stop)
        self.mixture = mixture
        self.step_count = 0
        self.micro_batch_size: int | None = None
        self.agent: Agent | None = None
        self.controller: Any = None
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        self.last_switch_s: float | None = None
        self._tw_loader: MicroBatchLoader | None = None
        self._tw_ds: Any = None  # the DeepSpeed adapter's handle, with a DeepSpeed plugin
        self._tw_loss_sum: torch.Tensor | None = None
        self._tw_loss_n = 0
        self._tw_samples = 0
        self._tw_tokens = 0
        self._tw_samples_seen = 0
        self._tw_tokens_seen = 0
        self._tw_domain: dict[str, list[float]] = {}
        self._tw_slice_last: bool | None = None
        self._tw_accumulate_used = False
        self._tw_closed = False
        # The first step's clock starts with its data, not at construction: it would include
        # building the model and data.
        self._tw_boundary_core = StepBoundary(self, clock_started=False)
        if precision_switch.refusal(self.mixed_precision, self.device) and self.mixed_precision == "fp16":
            log.warning(
                "trainwarden: mixed_precision='fp16' has no effect on the CPU in Accelerate (no autocast, "
                "no grad scaler): this job computes in fp32"
            )
        atexit.register(self.close)

    # ---- prepare ------------------------------------------------------------------------------
    def prepare(self, *args: Any, device_placement: Any = None) -> Any:
        deepspeed = self.distributed_type == DistributedType.DEEPSPEED
        with accelerate_deepspeed.dropin_initialize() if deepspeed else nullcontext():
            out = super().prepare(*args, device_placement=device_placement)
        if deepspeed and self._tw_ds is None:
            self._tw_ds = accelerate_deepspeed.handle_of(self)
        single = len(args) == 1
        items = [out] if single else list(out)
        for i, item in enumerate(items):
            if type(item) is AcceleratedOptimizer:  # not DeepSpeed's wrapper: its step is a no-op
                item.__class__ = TrackedOptimizer
                item._tw_accelerator = self
            elif isinstance(item, torch.utils.data.DataLoader) and self._tw_loader is None:
                # Under DeepSpeed the engine owns the micro-batch: the loader only counts.
                self._tw_loader = MicroBatchLoader(
                    item,
                    self,
                    self.gradient_accumulation_steps,
                    self.tokens_per_sample,
                    batch_size=self._per_process_batch(item),
                    cut=self._tw_ds is None and self.distributed_type in _AUTOCAST_TYPES,
                )
                items[i] = self._tw_loader
        if self.agent is None and self._tw_attach_agent and not self._tw_closed and self._optimizers:
            # The job's shape is known once the model and optimizer are prepared (prepare the
            # training loader with them, or before: the micro-batch knob needs it).
            self._tw_attach()
        return items[0] if single else tuple(items)

    def _per_process_batch(self, loader: Any) -> int | None:
        """Samples each process gets per batch from a prepared loader (None: not said)."""
        size = getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        if isinstance(size, int) and not getattr(loader, "split_batches", False):
            return size
        total = getattr(loader, "total_batch_size", None)
        return total // self.num_processes if isinstance(total, int) else None

    def prepare_data_loader(
        self, data_loader: Any, device_placement: bool | None = None, slice_fn_for_dispatch: Any = None
    ) -> Any:
        """Accelerate's, except for a loader drawing from trainwarden's data mixture on several
        processes: the mixture already draws one stream per rank, so Accelerate must not shard
        its batches across processes as well (each rank would keep every other batch of its own
        stream, and the mixture's position would count the ones it skipped)."""
        from trainwarden.adapters.data.control import MixtureControl

        sampler = getattr(data_loader, "sampler", None)
        if self.num_processes == 1 or not isinstance(sampler, MixtureControl):
            return super().prepare_data_loader(data_loader, device_placement, slice_fn_for_dispatch)
        from accelerate.data_loader import prepare_data_loader

        prepared = prepare_data_loader(
            data_loader,
            self.device,
            num_processes=1,
            process_index=0,
            put_on_device=self.device_placement if device_placement is None else device_placement,
            rng_types=[],  # the mixture's own seed and rank fix its stream
            non_blocking=self.non_blocking,
        )
        self._dataloaders.append(prepared)
        return prepared

    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> Any:
        """Accelerate's, for trainwarden's training loader too (`num_batches` of the prepared
        loader's own batches are skipped; the result is cut at the current micro-batch)."""
        if isinstance(dataloader, MicroBatchLoader):
            return dataloader.with_loader(super().skip_first_batches(dataloader.loader, num_batches))
        return super().skip_first_batches(dataloader, num_batches)

    # ---- the loop -----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        if self._tw_loss_n == 0:
            # Said already by the loader prepared here; a loop over its own loader is seen only
            # now, after the first forward (whose transient memory is then not in the step's peak).
            training_step_begins(self, self.step_count + 1)
        self._tw_start_clock()
        part = loss.detach().float()
        self._tw_loss_sum = part if self._tw_loss_sum is None else self._tw_loss_sum + part
        self._tw_loss_n += 1
        ds = self._tw_ds
        if ds is None:
            super().backward(loss, **kwargs)
            return
        # With DeepSpeed the optimizer steps inside backward (Accelerate's engine wrapper calls
        # engine.step() on a synced micro-batch): that is the boundary, and the handle applies
        # the LR multiplier inside the engine's step.
        ds.lr_multiplier = self.lr_multiplier
        synced = self.sync_gradients
        super().backward(loss, **kwargs)
        if synced:
            self._tw_boundary(ds.last_lr if ds.last_lr is not None else float("nan"))

    @contextmanager
    def accumulate(self, *models: Any) -> Iterator[None]:
        self._tw_start_clock()
        self._tw_accumulate_used = True
        with super().accumulate(*models):
            yield

    def _do_sync(self) -> None:
        # With trainwarden's loader, a step ends on its last micro-batch (whatever the
        # micro-batch size now, and for a short last step of an epoch too).
        last = self._tw_slice_last
        if last is None:
            super()._do_sync()
            return
        self.step = 0 if last else self.step + 1
        self.gradient_state._set_sync_gradients(last)

    def log_domain_loss(self, losses: Mapping[str, float], counts: Mapping[str, int] | None = None) -> None:
        """Per-domain loss of this micro-batch (mean per domain; `counts` weigh them within the
        step, default 1 each). Reported with the step, for the data policies."""
        for name, value in losses.items():
            n = float(counts.get(name, 1)) if counts is not None else 1.0
            acc = self._tw_domain.setdefault(name, [0.0, 0.0])
            acc[0] += float(value) * n
            acc[1] += n

    # Called by the MicroBatchLoader for each micro-batch it gives.
    def _tw_micro_batch(self, samples: int, tokens: int, last: bool | None) -> None:
        if self._tw_samples == 0 and self._tw_loss_n == 0:  # a step's first micro-batch, loaded
            training_step_begins(self, self.step_count + 1)
        self._tw_start_clock()
        self._tw_samples += samples
        self._tw_tokens += tokens
        self._tw_slice_last = last

    # ---- the step boundary ----------------------------------------------------------------
    def _tw_start_clock(self) -> None:
        self._tw_boundary_core.start_clock()

    @property
    def last_domain_loss(self) -> dict[str, float]:
        """The per-domain loss reported with the last step."""
        return self._tw_boundary_core.last_domain_loss

    def _tw_boundary(self, applied_lr: float) -> None:
        self.step_count += 1
        loss = float(self._tw_loss_sum) / self._tw_loss_n if self._tw_loss_sum is not None else None
        self._tw_loss_sum, self._tw_loss_n = None, 0
        step_samples = self._tw_samples
        self._tw_samples_seen += self._tw_samples
        self._tw_tokens_seen += self._tw_tokens
        self._tw_samples = self._tw_tokens = 0
        domain = {k: s / n for k, (s, n) in self._tw_domain.items() if n}
        self._tw_domain = {}
        world = self.agent.world_size if self.agent is not None else 1
        self._tw_boundary_core.cross(
            self.step_count,
            loss=loss,
            lr=applied_lr,
            samples=self._tw_samples_seen * world,
            tokens=self._tw_tokens_seen * world,
            step_samples=step_samples,
            domain_loss=domain or None,
            record=not self._tw_closed,
        )

    # ---- knobs --------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """The precision in effect, in trainwarden's names (fp32, bf16, fp16)."""
        return precision_switch.knob_value(self.mixed_precision)

    def _precision_knob(self) -> bool:
        return self.distributed_type in _AUTOCAST_TYPES

    def _micro_knob(self, applying: bool = False) -> str | None:
        """Why the micro-batch is not a knob of this job, or None when it is. Whether the loop
        uses `accumulate()` is known only once it ran: checked when a change is applied."""
        if self._tw_loader is None or self._tw_loader.step_samples is None:
            return "no training DataLoader was prepared by this Accelerator (the first one given to prepare)"
        if not self._tw_loader.cut:
            return f"under {self.distributed_type.value} the engine's config sets the micro-batch"
        if applying and not self._tw_accumulate_used:
            return "the loop does not use accelerator.accumulate(model), which is where accumulation happens"
        return None

    def config(self) -> dict[str, Any]:
        """The configuration applied now (what `current()` of an adapter returns)."""
        out: dict[str, Any] = {
            KNOB_PRECISION: self.precision,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            KNOB_LR_MULTIPLIER: self.lr_multiplier,
            KNOB_STOP: self.should_stop,
        }
        if self.micro_batch_size is not None:
            out[KNOB_MICRO_BATCH] = self.micro_batch_size
        if self._tw_ds is not None:
            out.update(accelerate_deepspeed.config(self._tw_ds))
        out.update(self._tw_boundary_core.shared_config())
        return out

    current = config

    def _knob_specs(self) -> tuple[KnobSpec, ...]:
        specs: list[KnobSpec] = []
        if self._precision_knob():
            specs.append(
                KnobSpec(
                    KNOB_PRECISION,
                    self.precision,
                    choices=precision_switch.available_precisions(self.device),
                )
            )
        if self._micro_knob() is None:
            assert self._tw_loader is not None and self._tw_loader.step_samples is not None
            specs.append(
                KnobSpec(
                    KNOB_MICRO_BATCH, self.micro_batch_size, choices=divisors(self._tw_loader.step_samples)
                )
            )
        if self._tw_ds is not None:
            specs[:0] = accelerate_deepspeed.knob_specs(self._tw_ds)
        return (*specs, *self._tw_boundary_core.shared_specs())

    def apply(self, action: Action) -> Outcome:
        """Carry one action now (call it at a step boundary); never raises into the user's loop."""
        return self._tw_boundary_core.carry(action, lambda: self.step_count, self._apply)

    def _apply(self, action: Action) -> tuple[str, str]:
        value = action.params.get("value")
        if self._tw_ds is not None and action.kind in accelerate_deepspeed.ENGINE_KNOBS:
            return self._set_engine(action.kind, value)
        if action.kind == KNOB_PRECISION:
            return self._set_precision(value)
        if action.kind == KNOB_MICRO_BATCH:
            return self._set_micro_batch(value)
        shared = self._tw_boundary_core.carry_shared(action, self.step_count)
        if shared is not None:
            return shared
        return "rejected", f"the accelerate adapter has no knob {action.kind!r}"

    def reconfigure(
        self, precision: str | None = None, micro_batch_size: int | None = None, **engine: Any
    ) -> None:
        """Switch by hand, at a step boundary (between an optimizer step and the next forward).
        With a DeepSpeed plugin, `engine` takes the DeepSpeed adapter's knobs (zero_stage,
        offload_optimizer, offload_param, activation_checkpointing). Raises ValueError for a
        request that cannot be carried, RuntimeError after a failed switch was rolled back."""
        changes = [(KNOB_PRECISION, precision), (KNOB_MICRO_BATCH, micro_batch_size), *engine.items()]
        for kind, value in changes:
            # Through the same path as the controller's actions (validation, rollback, agreement).
            if value is None:
                continue
            outcome, detail = self._apply(Action(kind, {"value": value}, "by hand", self.step_count))
            if outcome == "rejected":
                raise ValueError(detail)
            if outcome == "rolled_back":
                raise RuntimeError(detail)

    def _set_engine(self, kind: str, value: Any) -> tuple[str, str]:
        """A ZeRO stage, offload, precision or checkpointing switch: the DeepSpeed adapter's own."""
        from trainwarden.adapters.deepspeed import ConfigError, ReconfigureError

        handle = self._tw_ds
        try:
            result = handle.reconfigure(**{kind: value})
        except ConfigError as exc:
            return "rejected", str(exc)
        except ReconfigureError as exc:  # rolled back by the handle: the old engine, same state
            return "rolled_back", str(exc)
        if not result.changes:
            return "noop", result.describe()
        accelerate_deepspeed.after_switch(self, handle)
        self.last_switch_s = result.duration_s
        return "applied", result.describe()

    def _set_precision(self, value: Any) -> tuple[str, str]:
        if not self._precision_knob():
            return "rejected", (
                f"precision is not switched by trainwarden under {self.distributed_type.value}: the "
                "engine keeps its own precision (see docs/hf.md)"
            )
        why = precision_switch.refusal(value, self.device)
        if why is not None:
            return "rejected", why
        if any(hasattr(precision_switch.inner_module(m), "_orig_mod") for m in self._models):
            return "rejected", (
                "a torch.compile'd model keeps the autocast it was compiled with: precision is not "
                "switched for it (compile after the switch, or not at all)"
            )
        target = "fp32" if value == "no" else str(value)
        if target == self.precision:
            return "noop", f"already {target}"
        old = self.precision
        t = time.perf_counter()
        error: str | None = None
        try:
            precision_switch.switch(self, target, *self._tw_init)
        except Exception as exc:  # everything was put back by switch()
            error = f"{type(exc).__name__}: {exc}"
        error = agree(error, self.device)
        if error is not None:
            if self.precision != old:  # another rank failed: undo ours too
                precision_switch.switch(self, old, *self._tw_init)
            log.warning("trainwarden: precision switch %s -> %s rolled back: %s", old, target, error)
            return "rolled_back", f"precision {old} -> {target} failed and was undone: {error}"
        self.last_switch_s = time.perf_counter() - t
        log.info("trainwarden: precision %s -> %s in %.1f ms", old, target, 1e3 * self.last_switch_s)
        return "applied", f"precision now {target}"

    def _set_micro_batch(self, value: Any) -> tuple[str, str]:
        why = self._micro_knob(applying=True)
        if why is not None:
            return "rejected", f"micro_batch_size is not a knob of this job: {why}"
        assert self._tw_loader is not None and self._tw_loader.step_samples is not None
        step = self._tw_loader.step_samples
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or step % value:
            return (
                "rejected",
                f"micro_batch_size must divide the step's {step} samples per process, got {value!r}",
            )
        if value == self.micro_batch_size:
            return "noop", "already at that micro-batch size"
        self.micro_batch_size = value
        self.gradient_accumulation_steps = step // value
        self.step = 0  # Accelerate counts micro-batches modulo the accumulation from here
        if self.agent is not None:
            self.agent.probe.release()
        return "applied", f"gradient accumulation now {step // value}"

    def on_stop(self, fn: StopHook) -> StopHook:
        """Call `fn(info)` once when trainwarden stops the run, at that step boundary, before
        `should_stop` turns true (save the final state there). Usable as a decorator."""
        return self._tw_boundary_core.on_stop(fn)

    def report(self, *, eval_loss: Any) -> None:
        """A validation loss measured now; it goes to the controller with the next step."""
        self._tw_boundary_core.report(eval_loss)

    # ---- the agent ----------------------------------------------------------------------------
    def _tw_attach(self) -> None:
        opts = self._tw_options
        link = open_link(opts["policy"], opts["run_dir"], opts["sync_every"])
        self.controller = link.controller
        model = self._models[0] if self._models else None
        params = list(precision_switch.inner_module(model).parameters()) if model is not None else []
        probe = probe_for(params[0].device if params else self.device)
        step_samples = self._tw_loader.step_samples if self._tw_loader is not None else None
        self.agent = start_agent(
            link,
            probe,
            adapter=self.adapter_name,
            param_count=sum(p.numel() for p in params),
            global_batch_size=(step_samples or 0) * link.world_size,
            tokens_per_sample=self.tokens_per_sample or 1,
            knobs=self._knob_specs(),
        )

    def close(self) -> None:
        """Flush telemetry, tell the controller the job is done; idempotent. Training may go on."""
        if self._tw_closed:
            return
        self._tw_closed = True
        self._tw_boundary_core.close()
        atexit.unregister(self.close)

    def _tw_checkpoint(self, directory: os.PathLike[str]) -> str:
        """The state at the stop through Accelerate's own `save_state` (adapters/core/stop.py)."""
        self.save_state(str(directory))
        return str(directory)

    def end_training(self) -> None:
        self.close()
        super().end_training()


__all__ = ["Accelerator", "MicroBatchLoader", "TrackedOptimizer"]
