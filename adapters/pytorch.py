"""The plain-PyTorch adapter: wrap model, optimizer and loader; keep your loop.

    handle = trainwarden.adapters.pytorch.attach(model, optimizer, scheduler=sched,
                                                 global_batch_size=64, micro_batch_size=16,
                                                 on_stop=save_checkpoint)   # optional
    for step_batch in handle.steps(loader):      # one optimizer step's samples
        for micro in step_batch:                 # cut at the current micro-batch size
            loss = loss_fn(model(micro[0]), micro[1])
            handle.backward(loss)                # scaled so the step's gradient is the global mean
        handle.step()                            # optimizer + scheduler + LR multiplier + telemetry
        if handle.should_stop:
            break
    handle.close()

Knobs: `micro_batch_size` (the global batch is kept: accumulation = global / micro),
`lr_multiplier` (applied on top of the user's scheduler at every step), and `stop`. With
`attach(..., mixture=mix)` (adapters/data/) also the data mixture's: `domain_weights`,
`curriculum_level`, `prune_fraction`; `step()` then reports the per-domain loss the loop gave
`mix.observe` and tells the mixture how many samples the step consumed (its resume position).
Actions are applied inside `step()`, after the optimizer step: a step boundary. When the stop
applies, the `on_stop` hooks (`attach(on_stop=fn)` or `handle.on_stop(fn)`) run there, once,
before `should_stop` turns true: the place to save the final, annealed checkpoint.
`handle.report(eval_loss=...)` sends a validation loss (the compute policy's stopping rule
prefers it to the training loss).
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from trainwarden.adapters.core.batching import batch_size, divisors, micro_slices, regroup, slice_batch
from trainwarden.adapters.core.boundary import StepBoundary
from trainwarden.adapters.core.connect import AttachError
from trainwarden.adapters.core.link import open_link, start_agent
from trainwarden.adapters.core.probes import probe_for
from trainwarden.adapters.core.stop import training_step_begins
from trainwarden.adapters.knobs import StopHook, lr_scaled, stop_hooks_arg
from trainwarden.controller.protocol import KNOB_MICRO_BATCH, Action, KnobSpec, Outcome

log = logging.getLogger("trainwarden")


class StepBatch:
    """The samples of one optimizer step; iterate it for micro-batches at the current size."""

    def __init__(self, handle: Handle, batch: Any, size: int) -> None:
        self._handle = handle
        self.batch = batch
        self.size = size

    def __len__(self) -> int:
        return len(micro_slices(self.size, self._handle.micro_batch_size))

    def __iter__(self) -> Iterator[Any]:
        h = self._handle
        training_step_begins(h, h.step_count + 1)
        h._step_samples = self.size
        for start, stop in micro_slices(self.size, h.micro_batch_size):
            h._micro_samples = stop - start
            if stop - start == self.size:
                # One micro-batch is the whole step: the batch itself, as `regroup` hands on a
                # batch of the step's size, not views of it rebuilt (~50 us of the step on a CPU,
                # a dataclass batch's `dataclasses.replace` the most of it).
                yield self.batch
            else:
                yield slice_batch(self.batch, start, stop)


class Handle:
    """A live handle on the job's training state; see the module docstring for the loop."""

    adapter_name = "pytorch"

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        global_batch_size: int,
        micro_batch_size: int | None = None,
        scheduler: Any = None,
        tokens_per_sample: int = 1,
        policy: str | os.PathLike[str] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        sync_every: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        on_stop: StopHook | list[StopHook] | None = None,
        mixture: Any = None,
    ) -> None:
        if global_batch_size < 1:
            raise AttachError(
                f"global_batch_size must be >= 1 (samples per optimizer step), got {global_batch_size}"
            )
        micro = micro_batch_size or global_batch_size
        if micro < 1 or global_batch_size % micro:
            raise AttachError(
                f"micro_batch_size {micro} must divide global_batch_size {global_batch_size} "
                f"(valid: {', '.join(map(str, divisors(global_batch_size)))})"
            )
        self.model = model
        self.optimizer = optimizer
        # The live data mixture (adapters/data/), whose knobs this handle carries and whose
        # per-domain loss it reports.
        self.mixture = mixture
        self.scheduler = scheduler
        self.global_batch_size = global_batch_size
        #: Tokens in each sample of the following steps. A job whose sequence length changes
        #: mid-run (a context-length curriculum, a long-context phase) sets it when it does: the
        #: token count is a running sum, so steps already counted keep their own length.
        self.tokens_per_sample = tokens_per_sample
        self._micro = micro
        self.lr_multiplier = 1.0
        self.should_stop = False
        self.stop_hooks = stop_hooks_arg(on_stop)
        self.step_count = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        """Tokens of every rank's samples so far (the job's, not this rank's)."""
        self._step_samples = global_batch_size
        self._micro_samples = micro
        self._loss_sum: torch.Tensor | None = None
        self._closed = False
        self.boundary = StepBoundary(self)
        self.last_lr = float(optimizer.param_groups[0]["lr"])
        self.last_loss: float | None = None

        link = open_link(policy, run_dir, sync_every, rank=rank, world_size=world_size)
        self.rank, self.world_size, self.controller = link.rank, link.world_size, link.controller
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.agent = start_agent(
            link,
            probe_for(device),
            adapter=self.adapter_name,
            param_count=sum(p.numel() for p in model.parameters()),
            global_batch_size=global_batch_size,
            tokens_per_sample=tokens_per_sample,
            knobs=self._knob_specs(),
        )
        atexit.register(self.close)

    # ---- knobs -----------------------------------------------------------------------------
    @property
    def micro_batch_size(self) -> int:
        return self._micro

    @property
    def gradient_accumulation_steps(self) -> int:
        return -(-self.global_batch_size // self._micro)

    def _knob_specs(self) -> tuple[KnobSpec, ...]:
        return (
            KnobSpec(KNOB_MICRO_BATCH, self._micro, choices=divisors(self.global_batch_size)),
            *self.boundary.shared_specs(),
        )

    def config(self) -> dict[str, Any]:
        """The configuration applied now (what `current()` of an adapter returns)."""
        return {
            KNOB_MICRO_BATCH: self._micro,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            **self.boundary.shared_config(),
        }

    current = config

    def apply(self, action: Action) -> Outcome:
        """Carry one action at this step boundary; never raises into the user's loop."""
        return self.boundary.carry(action, lambda: self.step_count, self._apply)

    def _apply(self, action: Action) -> tuple[str, str]:
        value = action.params.get("value")
        if action.kind == KNOB_MICRO_BATCH:
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < 1
                or self.global_batch_size % value
            ):
                return "rejected", (
                    f"micro_batch_size must divide the global batch {self.global_batch_size}, got {value!r}"
                )
            if value == self._micro:
                return "noop", "already at that micro-batch size"
            self._micro = value
            self.agent.probe.release()
            return "applied", f"gradient accumulation now {self.gradient_accumulation_steps}"
        shared = self.boundary.carry_shared(action, self.step_count)
        if shared is not None:
            return shared
        return "rejected", f"the pytorch adapter has no knob {action.kind!r}"

    def on_stop(self, fn: StopHook) -> StopHook:
        """Call `fn(info)` once when trainwarden stops the run, at that step boundary, before
        `should_stop` turns true (save the final checkpoint there). Usable as a decorator."""
        return self.boundary.on_stop(fn)

    def report(self, *, eval_loss: Any) -> None:
        """A validation loss measured now; it goes to the controller with the next step."""
        self.boundary.report(eval_loss)

    # ---- the loop ----------------------------------------------------------------------------
    def steps(self, loader: Iterable[Any]) -> Iterator[StepBatch]:
        """One StepBatch per optimizer step: exactly `global_batch_size` samples each, in order."""
        for batch in regroup(loader, self.global_batch_size):
            yield StepBatch(self, batch, batch_size(batch))

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), scaled by this micro-batch's share of the step (mean-reduced losses)."""
        weight = self._micro_samples / self._step_samples
        if weight == 1.0:
            # One micro-batch a step: x * 1.0 is x exactly, so the scaling is skipped, and with it a
            # multiply and its autograd node in the forward and the backward (two ops of the step's
            # critical path, tens of microseconds on a CPU).
            loss.backward()
            part = loss.detach()
        else:
            (loss * weight).backward()
            part = loss.detach() * weight
        self._loss_sum = part if self._loss_sum is None else self._loss_sum + part

    def step(self, domain_loss: dict[str, float] | None = None) -> None:
        """Optimizer step with the LR multiplier, scheduler step, zero_grad, telemetry, actions."""
        with lr_scaled(self.optimizer.param_groups, self.lr_multiplier):
            self.optimizer.step()
            applied_lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.step_count += 1
        self.samples_seen += self._step_samples
        loss = float(self._loss_sum) if self._loss_sum is not None else None
        self._loss_sum = None
        job_samples = self.samples_seen * self.world_size
        self.tokens_seen += self._step_samples * self.world_size * self.tokens_per_sample
        self.boundary.cross(
            self.step_count,
            loss=loss,
            lr=applied_lr,
            samples=job_samples,
            tokens=self.tokens_seen,
            step_samples=self._step_samples,
            domain_loss=domain_loss,
        )

    def close(self) -> None:
        """Flush telemetry, tell the controller the job is done; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.boundary.close()
        atexit.unregister(self.close)

    def _tw_checkpoint(self, directory: os.PathLike[str]) -> str:
        """The state at the stop, for trainwarden's end of the job (adapters/core/stop.py): model,
        optimizer and scheduler state dicts in `directory`/trainwarden.pt (rank 0 writes)."""
        path = os.path.join(directory, "trainwarden.pt")
        if self.rank == 0:
            os.makedirs(directory, exist_ok=True)
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step_count,
            }
            if self.scheduler is not None:
                state["scheduler"] = self.scheduler.state_dict()
            torch.save(state, path)
        return path

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Handle:
    """Attach trainwarden to a plain PyTorch loop; see `Handle` for the arguments."""
    return Handle(model, optimizer, **kwargs)
