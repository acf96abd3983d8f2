"""The HF Trainer adapter: one callback gives telemetry, the LR multiplier, cooldown and stop.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[TrainwardenCallback()])        # or trainer.add_callback(...)
    trainer.train()

Modelled on the Trainer's own split between callbacks (which observe) and `TrainerControl`
(through which they steer the loop): at each optimizer-step boundary (`on_step_end`: after the
optimizer, the scheduler and zero_grad) the callback records the step and applies what the
controller decided; the Trainer's own control flags carry the rest.

- telemetry: the loss of each optimizer step (the mean of its micro-batches' losses, read by a
  forward hook on the model from its output's `loss` while it trains), samples and tokens (from
  each micro-batch's `input_ids`), step time, memory; per-domain loss given to `log_domain_loss`.
  A `compute_loss` that computes the loss outside the model gives it to `log_loss` instead.
- `lr_multiplier` (the compute budget's cooldown): in `on_pre_optimizer_step` each param group's
  LR is multiplied, and in `on_optimizer_step` (before the Trainer steps its scheduler) the
  scheduled LR is put back, so the Trainer's scheduler never sees it, as in the other adapters.
- `stop`: `control.should_training_stop`, and `control.should_save` (unless `save_on_stop=False`)
  so the Trainer writes its checkpoint at that step, as it does at the end of training; the
  `on_stop` hooks run first, as in the other adapters.
- the validation loss of each evaluation (`eval_loss` in `on_evaluate`) goes to the controller,
  for the compute policy's stopping rule.
- the live data mixture (`mixture=`, adapters/data/): its knobs are carried and its per-domain
  loss reported. The Trainer must draw from it: give the Trainer a `MixtureSampler` (override
  `_get_train_sampler` to return it) and call `mixture.observe(per_sample_loss, inputs["index"])`
  in `compute_loss`.

What the Trainer cannot switch mid-run (precision, micro-batch and accumulation, ZeRO stage,
...) and why: docs/hf.md. Those knobs are not reported, so the controller never asks for them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from trainwarden.adapters.core.agent import Agent
from trainwarden.adapters.core.batching import counted_tokens
from trainwarden.adapters.core.boundary import StepBoundary
from trainwarden.adapters.core.link import open_link, start_agent
from trainwarden.adapters.core.probes import probe_for
from trainwarden.adapters.core.stop import training_step_begins
from trainwarden.adapters.knobs import (
    StopHook,
    check_eval_loss,
    stop_hooks_arg,
)
from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    Action,
    Outcome,
)

log = logging.getLogger("trainwarden")


def _output_loss(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class TrainwardenCallback(TrainerCallback):
    """Attach trainwarden to a `transformers.Trainer`; see the module docstring.

    Arguments (all optional): `policy`, `run_dir`, `sync_every` as for the other adapters;
    `tokens_per_sample` (default: the element count of each micro-batch's `input_ids`);
    `save_on_stop` (default True): ask the Trainer for a checkpoint when trainwarden stops it;
    `on_stop` (hooks run at the stop, as `callback.on_stop(fn)`); `mixture` (see the module
    docstring).
    """

    adapter_name = "hf-trainer"

    def __init__(
        self,
        *,
        policy: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        sync_every: int | None = None,
        tokens_per_sample: int | None = None,
        save_on_stop: bool = True,
        on_stop: StopHook | list[StopHook] | None = None,
        mixture: Any = None,
    ) -> None:
        self._options = {"policy": policy, "run_dir": run_dir, "sync_every": sync_every}
        self.tokens_per_sample = tokens_per_sample
        self.save_on_stop = save_on_stop
        self.lr_multiplier = 1.0
        self.should_stop = False
        self.stop_hooks = stop_hooks_arg(on_stop)
        self.mixture = mixture
        self.agent: Agent | None = None
        self.controller: Any = None
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        self._hook: Any = None
        self._scheduled: list[float] | None = None
        self._applied_lr: float | None = None
        self._loss_sum = 0.0
        self._loss_n = 0
        self._given_loss_sum = 0.0
        self._given_loss_n = 0
        self._scaled_losses = False
        self._samples = 0
        self._tokens = 0
        self._samples_seen = 0
        self._tokens_seen = 0
        self._domain: dict[str, list[float]] = {}
        self.boundary = StepBoundary(self)
        self._world = 1
        self._deepspeed = False
        self._closed = False

    # ---- what the model sees ----------------------------------------------------------------
    def _on_forward(self, module: torch.nn.Module, _args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation and prediction are not training steps
        loss = _output_loss(output)
        if loss is not None:
            self._loss_sum += float(loss.detach())
            self._loss_n += 1
            # With `num_items_in_batch` the model divides by the whole step's token count, so
            # the step's loss is the sum of its micro-batches' losses, not their mean.
            self._scaled_losses = kwargs.get("num_items_in_batch") is not None
        ids = kwargs.get("input_ids", _args[0] if _args and isinstance(_args[0], torch.Tensor) else None)
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1:
            samples = int(ids.shape[0])
            self._samples += samples
            counted = counted_tokens({**kwargs, "input_ids": ids})
            self._tokens += samples * self.tokens_per_sample if self.tokens_per_sample else (counted or 0)

    def log_loss(self, loss: Any) -> None:
        """The loss of a micro-batch, for a `compute_loss` that computes it outside the model
        (the model's output then has no `loss` for the forward hook to read). Once used, only
        these are reported."""
        self._given_loss_sum += float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
        self._given_loss_n += 1

    def log_domain_loss(self, losses: Mapping[str, float], counts: Mapping[str, int] | None = None) -> None:
        """Per-domain loss of a micro-batch (e.g. from `compute_loss`); reported with its step."""
        for name, value in losses.items():
            n = float(counts.get(name, 1)) if counts is not None else 1.0
            acc = self._domain.setdefault(name, [0.0, 0.0])
            acc[0] += float(value) * n
            acc[1] += n

    # ---- the Trainer's events ---------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._world = max(1, int(args.world_size))
        self._deepspeed = bool(getattr(args, "deepspeed", None))
        self.boundary.started = time.perf_counter()
        if self.agent is None and not self._closed:
            self._attach(args, model)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # After the step's batches were loaded, before its first forward (adapters/core/stop.py).
        training_step_begins(self, int(state.global_step) + 1)

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        opt = kwargs.get("optimizer")
        if opt is None:
            return
        groups = opt.param_groups
        if self._deepspeed:  # the step already happened (see _attach); just report its LR
            self._applied_lr = float(groups[0]["lr"]) if groups else None
            return
        self._scheduled = [g["lr"] for g in groups]
        if self.lr_multiplier != 1.0:
            for g, lr in zip(groups, self._scheduled):
                g["lr"] = lr * self.lr_multiplier
        self._applied_lr = float(groups[0]["lr"]) if groups else None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # Before the Trainer steps its scheduler: it must never see our multiplier.
        opt = kwargs.get("optimizer")
        if opt is not None and self._scheduled is not None:
            for g, lr in zip(opt.param_groups, self._scheduled):
                g["lr"] = lr
        self._scheduled = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._given_loss_n:
            loss: float | None = self._given_loss_sum / self._given_loss_n
        elif self._loss_n:
            loss = self._loss_sum if self._scaled_losses else self._loss_sum / self._loss_n
            if self._scaled_losses and getattr(args, "average_tokens_across_devices", False):
                loss = self._loss_sum * self._world  # the model divided by every rank's tokens
        else:
            loss = None
        self._loss_sum, self._loss_n = 0.0, 0
        self._given_loss_sum, self._given_loss_n = 0.0, 0
        step_samples = self._samples
        self._samples_seen += self._samples
        self._tokens_seen += self._tokens
        self._samples = self._tokens = 0
        domain = {k: s / n for k, (s, n) in self._domain.items() if n}
        self._domain = {}
        step = int(state.global_step)
        self.boundary.cross(
            step,
            loss=loss,
            lr=self._applied_lr,
            samples=self._samples_seen * self._world,
            tokens=self._tokens_seen * self._world,
            step_samples=step_samples,
            domain_loss=domain or None,
            apply_all=lambda due: [self.apply(a, step) for a in due],
        )
        if self.should_stop and not control.should_training_stop:
            control.should_training_stop = True
            if self.save_on_stop:
                control.should_save = True
        return control

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        loss = (kwargs.get("metrics") or {}).get("eval_loss")
        if self.agent is not None and loss is not None:
            try:
                self.agent.report_eval(check_eval_loss(loss))
            except (TypeError, ValueError) as exc:  # a NaN evaluation: not a point on the curve
                log.warning("trainwarden: eval_loss not reported: %s", exc)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.close()

    # ---- knobs ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return self.boundary.shared_config()

    @property
    def last_domain_loss(self) -> dict[str, float]:
        """The per-domain loss reported with the last step."""
        return self.boundary.last_domain_loss

    def on_stop(self, fn: StopHook) -> StopHook:
        """Call `fn(info)` once when trainwarden stops the run, before the Trainer is told."""
        return self.boundary.on_stop(fn)

    current = config

    def apply(self, action: Action, step: int = 0) -> Outcome:
        """Carry one action at this step boundary; never raises into the Trainer."""
        return self.boundary.carry(action, lambda: step, lambda a: self._apply(a, step))

    def _apply(self, action: Action, step: int) -> tuple[str, str]:
        if action.kind == KNOB_LR_MULTIPLIER and self._deepspeed:
            return (
                "rejected",
                "the Trainer runs DeepSpeed's optimizer step inside backward, before any callback "
                "event: the LR multiplier is not carried under DeepSpeed (docs/hf.md)",
            )
        return self.boundary.carry_shared(action, step) or (
            "rejected",
            f"the HF Trainer adapter has no knob {action.kind!r} (docs/hf.md says what the Trainer "
            "cannot switch mid-run)",
        )

    # ---- the agent --------------------------------------------------------------------------
    def _attach(self, args: TrainingArguments, model: torch.nn.Module | None) -> None:
        opts = self._options
        link = open_link(opts["policy"], opts["run_dir"], opts["sync_every"])
        self.controller = link.controller
        params = list(model.parameters()) if model is not None else []
        probe = probe_for(params[0].device if params else None)
        per_device = int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps)
        self.agent = start_agent(
            link,
            probe,
            adapter=self.adapter_name,
            param_count=sum(p.numel() for p in params),
            global_batch_size=per_device * link.world_size,
            tokens_per_sample=self.tokens_per_sample or 1,
            # Under DeepSpeed the optimizer steps inside backward, before the Trainer's
            # pre-optimizer event: a multiplier set there would miss the step it was for.
            knobs=self.boundary.shared_specs(lr_multiplier=not self._deepspeed),
        )

    def close(self) -> None:
        """Flush telemetry and tell the controller the job is done; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.boundary.close()


__all__ = ["TrainwardenCallback"]
