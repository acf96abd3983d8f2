"""The DeepSpeed handle: what `initialize` returns in DeepSpeed's engine's place.

It forwards everything to the current engine (`engine(x)`, attributes, `save_checkpoint`), runs
the step (`forward`, `backward`, `step`: the LR multiplier, the loss and token counts, the step
boundary through core/boundary.py's StepBoundary), and composes the rest, one concern each:

- `switch` (adapters/deepspeed/switch.py): the engine now and the switch to another setting,
  with rollback and rank agreement;
- `oom` (adapters/deepspeed/oom.py): the step's start, and the retry one rung down after an OOM;
- `knobs` (adapters/deepspeed/knobs.py): the knobs offered, `config()`, carrying actions;
- `whole_steps` (adapters/deepspeed/train_batch.py): `train_batch`.

The components hold the handle; the handle's own attributes are the ones every adapter shares
(`agent`, `lr_multiplier`, `should_stop`, `stop_hooks`, ...) and the user's OOM settings.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from trainwarden.adapters.core.batching import counted_tokens
from trainwarden.adapters.core.boundary import StepBoundary
from trainwarden.adapters.core.link import open_link, start_agent
from trainwarden.adapters.core.probes import probe_for
from trainwarden.adapters.core.stop import training_step_begins
from trainwarden.adapters.deepspeed import state as ds_state
from trainwarden.adapters.deepspeed.build import Builder
from trainwarden.adapters.deepspeed.config import ConfigError, Setting
from trainwarden.adapters.deepspeed.errors import OomRetry, ReconfigureResult
from trainwarden.adapters.deepspeed.knobs import Knobs
from trainwarden.adapters.deepspeed.loader import SamplerLoader
from trainwarden.adapters.deepspeed.oom import OomRecovery, default_oom_errors, detach_traceback
from trainwarden.adapters.deepspeed.switch import EngineSwitch
from trainwarden.adapters.deepspeed.train_batch import WholeSteps
from trainwarden.adapters.knobs import StopHook, StopHooks, lr_scaled
from trainwarden.controller.protocol import Action, KnobSpec, Outcome

log = logging.getLogger("trainwarden")


class DeepSpeedHandle:
    """A live handle on the current DeepSpeed engine; see the package docstring."""

    adapter_name = "deepspeed"
    #: The handle's own public attributes: set on the handle, not forwarded to the engine (every
    #: other public name is the engine's; names with a leading underscore are the handle's).
    _OWN = frozenset(
        {
            "agent",
            "boundary",
            "controller",
            "knobs",
            "last_loss",
            "last_lr",
            "last_reconfigure",
            "lr_multiplier",
            "mixture",
            "oom",
            "oom_errors",
            "oom_retries",
            "oom_retry",
            "should_stop",
            "stop_hooks",
            "switch",
            "tokens_per_sample",
            "whole_steps",
        }
    )

    def __init__(
        self,
        builder: Builder,
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
        self.switch = EngineSwitch(self, builder, engine)
        self._loader: SamplerLoader | None = None
        self._pending_backward = False
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._closed = False
        self.lr_multiplier = 1.0
        self.should_stop = False
        self.stop_hooks = StopHooks()
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        self.last_reconfigure: ReconfigureResult | None = None
        self.tokens_per_sample = tokens_per_sample or 1
        #: tokens_per_sample not declared: count them from the batches the model sees.
        self._count_tokens = tokens_per_sample is None
        self._tokens_counted = 0
        self.agent: Any = None
        self.controller: Any = None
        self.boundary = StepBoundary(self)
        #: Exceptions that mean "out of memory" (see the package docstring); `oom_retry=False`
        #: lets them through untouched.
        self.oom_errors = tuple(oom_errors) if oom_errors else default_oom_errors()
        self.oom_retry = oom_retry
        #: Every OOM survived, in order.
        self.oom_retries: list[OomRetry] = []
        self.oom = OomRecovery(self)
        self.knobs = Knobs(self, micro_batch=micro_batch_knob or own_loader)
        self.whole_steps = WholeSteps(self)
        if own_loader and engine.training_dataloader is not None:
            self._loader = SamplerLoader(
                engine.training_dataloader, lambda: self.switch.setting.micro_batch_size
            )
            engine.training_dataloader = self._loader
        #: The live data mixture (adapters/data/): it draws the indices of `training_data` in
        #: DeepSpeed's sampler's place; its knobs are this handle's too.
        self.mixture = mixture
        if mixture is not None:
            if self._loader is None:
                raise ConfigError(
                    "mixture= draws the indices of training_data: pass training_data=MixtureDataset(...) too"
                )
            self._loader.data_sampler = mixture
        self.oom.mark_step_start()
        if attach_agent:
            self._attach(policy, run_dir, sync_every)
            atexit.register(self.close)

    # ---- forwarding ----------------------------------------------------------------------------
    @property
    def engine(self) -> Any:
        """The current DeepSpeed engine (a new object after each switch: do not keep it)."""
        return self.switch.engine

    @property
    def _builder(self) -> Builder:
        return self.switch.builder

    def __getattr__(self, name: str) -> Any:
        switch = self.__dict__.get("switch")
        engine = switch.engine if switch is not None else None
        if engine is None:
            raise AttributeError(name)
        return getattr(engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__ or name.startswith("_") or name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.engine, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<trainwarden DeepSpeedHandle ({self.setting.describe()}) for {type(self.engine).__name__}>"

    @property
    def module(self) -> torch.nn.Module:
        return self.switch.module

    @property
    def optimizer(self) -> Any:
        return self.engine.optimizer

    @property
    def lr_scheduler(self) -> Any:
        return self.engine.lr_scheduler

    @property
    def training_dataloader(self) -> Any:
        return self._loader if self._loader is not None else self.engine.training_dataloader

    def train(self, mode: bool = True) -> DeepSpeedHandle:
        self.engine.train(mode)
        return self

    def eval(self) -> DeepSpeedHandle:
        self.engine.eval()
        return self

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self.engine.parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.engine.named_parameters(*args, **kwargs)

    # ---- the step --------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """engine(...); an OOM in a training forward is retried (StepRetry, see the package
        docstring). One in eval mode or under no_grad (an evaluation) is raised as it is: the
        training configuration is not stepped down for it."""
        if self.module.training and torch.is_grad_enabled():
            if self._loss_count == 0:  # a step's first forward
                training_step_begins(self, int(self.engine.global_steps) + 1)
            if self._count_tokens:
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                n = counted_tokens(dict(kwargs) if first is None else {**kwargs, "input_ids": first})
                if n is not None and (first is None or not first.is_floating_point()):
                    self._tokens_counted += n
        err: BaseException | None = None
        try:
            return self.engine(*args, **kwargs)
        except self.oom_errors as exc:
            if not self.oom.retries(exc) or not (self.module.training and torch.is_grad_enabled()):
                raise
            err = detach_traceback(exc)
        del args, kwargs
        raise self.oom.recover(err, "forward") from err

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """engine.backward(loss); an OOM in it is retried (StepRetry, see the package docstring)."""
        err: BaseException | None = None
        try:
            out = self.engine.backward(loss, *args, **kwargs)
        except self.oom_errors as exc:
            if not self.oom.retries(exc):
                raise
            err = detach_traceback(exc)
        if err is not None:
            del loss  # what autograd had not freed of the graph goes now, unless the caller holds it
            raise self.oom.recover(err, "backward") from err
        self._pending_backward = True
        part = loss.detach().float()
        self._loss_sum = part if self._loss_sum is None else self._loss_sum + part
        self._loss_count += 1
        return out

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """engine.step(); at an optimizer-step boundary also telemetry and the actions now due. An
        OOM in it is retried (StepRetry) unless the optimizer had begun changing the weights."""
        engine = self.engine
        boundary = engine.is_gradient_accumulation_boundary()
        before = engine.global_steps
        applied_lr = self._scheduled_lr()
        progress = self.oom.progress() if boundary and self.oom_retry else None
        err: BaseException | None = None
        try:
            if boundary and self.lr_multiplier != 1.0:
                out = self._step_with_multiplier(args, kwargs)
                applied_lr = None if applied_lr is None else applied_lr * self.lr_multiplier
            else:
                out = engine.step(*args, **kwargs)
        except self.oom_errors as exc:
            if not self.oom.retries(exc):
                raise
            err = detach_traceback(exc)
        if err is not None:
            raise self.oom.recover(err, "step", progress=progress if boundary else ()) from err
        if engine.global_steps != before:
            self._pending_backward = False
            self._on_boundary(applied_lr)
            self.oom.mark_step_start()
        return out

    def drop_step(self) -> None:
        """Forget the step begun (an OOM retry rewound it): no backward pending, no loss summed."""
        self._pending_backward = False
        self._loss_sum, self._loss_count = None, 0

    def _scheduled_lr(self) -> float | None:
        groups = self.engine.optimizer.param_groups if self.engine.optimizer is not None else []
        return float(groups[0]["lr"]) if groups else None

    def _step_with_multiplier(self, args: Any, kwargs: Any) -> Any:
        """The optimizer step at lr x multiplier; the scheduler (stepped inside engine.step) never
        sees it, so chainable schedulers do not compound it."""
        inner = ds_state.inner_optimizer(self.engine)
        had = "step" in inner.__dict__
        original = inner.__dict__.get("step")
        bound = inner.step
        m = self.lr_multiplier

        def step_at_multiplied_lr(*a: Any, **k: Any) -> Any:
            with lr_scaled(inner.param_groups, m):
                return bound(*a, **k)

        inner.step = step_at_multiplied_lr
        try:
            return self.engine.step(*args, **kwargs)
        finally:
            if had:
                inner.step = original
            else:
                del inner.step

    def _on_boundary(self, applied_lr: float | None) -> None:
        engine = self.engine
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
        An OOM (see the package docstring) is retried over the same samples one rung down, as
        often as the ladder has rungs. On a pipeline engine this is DeepSpeed's own train_batch.
        """
        return self.whole_steps.run(data_iter, loss_fn)

    # ---- knobs and the switch --------------------------------------------------------------------
    @property
    def setting(self) -> Setting:
        return self.switch.setting

    def config(self) -> dict[str, Any]:
        """The configuration applied now (what `current()` of an adapter returns)."""
        return self.knobs.config()

    current = config

    def _knob_specs(self) -> tuple[KnobSpec, ...]:
        return self.knobs.specs()

    def apply(self, action: Action) -> Outcome:
        """Carry one action at this step boundary; never raises into the user's loop (except
        SwitchFailed: a failed rollback leaves no engine to train with)."""
        return self.knobs.apply(action)

    def apply_all(self, actions: list[Action]) -> list[Outcome]:
        """Carry the actions due at this step boundary, in order; the configuration knobs among
        them in one switch (adapters/deepspeed/knobs.py)."""
        return self.knobs.apply_all(actions)

    def training_state(self) -> ds_state.HostState:
        """A host-side fp32 copy of the training state now (what a switch carries). Collective
        with several ranks: call it on every rank."""
        return ds_state.capture(self.engine, self.switch.params)

    def held_bytes(self) -> ds_state.HeldBytes:
        """Bytes of parameters, fp32 masters and optimizer state this rank's engine holds."""
        return ds_state.held_bytes(self.engine)

    def at_step_boundary(self) -> bool:
        """No gradient is pending: the last backward was followed by an optimizer step."""
        engine = self.engine
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
        it (see the package docstring) and never needs a new engine. Raises ConfigError (nothing
        changed) for a request that cannot work or when called between a backward and its
        optimizer step; ReconfigureError after a failed switch was rolled back; SwitchFailed if the
        rollback failed too.
        """
        return self.switch.reconfigure(
            zero_stage=zero_stage,
            precision=precision,
            offload_optimizer=offload_optimizer,
            offload_param=offload_param,
            micro_batch_size=micro_batch_size,
            activation_checkpointing=activation_checkpointing,
        )

    # ---- the agent -------------------------------------------------------------------------------
    def _attach(
        self,
        policy: str | os.PathLike[str] | None,
        run_dir: str | os.PathLike[str] | None,
        sync_every: int | None,
    ) -> None:
        link = open_link(policy, run_dir, sync_every)
        self.controller = link.controller
        self.agent = start_agent(
            link,
            probe_for(self.switch.meter.device),
            adapter=self.adapter_name,
            param_count=self._builder.param_count,
            global_batch_size=self.setting.train_batch_size,
            tokens_per_sample=self.tokens_per_sample,
            knobs=self._knob_specs(),
        )

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
        self.engine.save_checkpoint(str(directory))
        return str(directory)

    def _tw_teardown(self) -> None:
        self.destroy()

    def destroy(self) -> None:
        """Close, then destroy the current engine (DeepSpeed's engine.destroy())."""
        self.close()
        engine = self.engine
        if engine is not None:
            engine.destroy()

    def __enter__(self) -> DeepSpeedHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["DeepSpeedHandle"]
