"""`DeepSpeedHandle.train_batch`: one whole optimizer step from an iterator of micro-batches, retried
over the same samples one rung down after an OOM (adapters/deepspeed/oom.py).

The step's samples are taken first (exactly `train_batch_size / world_size` of them, a batch
crossing the step's end split and its rest kept for the next call), then cut at the current
micro-batch size (adapters/core/batching.py): after a retry that halved the micro-batch, the
same samples are cut again, so no step and no sample is lost and the step is bitwise the one a
run switched by hand at that boundary takes. Holds no reference to a loss between calls, so
an OOM in backward frees its graph at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from trainwarden.adapters.core.batching import batch_size, recut, slice_batch
from trainwarden.adapters.deepspeed.errors import StepRetry
from trainwarden.adapters.deepspeed.oom import detach_traceback

if TYPE_CHECKING:
    from trainwarden.adapters.deepspeed.handle import DeepSpeedHandle

log = logging.getLogger("trainwarden")

LossFn = Callable[[Any], torch.Tensor]


def loss_of(out: Any) -> torch.Tensor:
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


def repeat(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (DeepSpeed's RepeatingLoader), until one is empty."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


class WholeSteps:
    """Whole optimizer steps for one handle. `running`: inside `run`, so an OOM's samples will be
    given again by `run` itself (the OOM recovery may then cut them anew)."""

    def __init__(self, handle: DeepSpeedHandle) -> None:
        self.handle = handle
        self.running = False
        self._train_iter: Iterator[Any] | None = None
        #: (iterator, the rest of a batch that crossed the last step's end).
        self._carry: tuple[Iterator[Any], Any] | None = None

    def run(self, data_iter: Iterator[Any] | None, loss_fn: LossFn | None) -> float | None:
        """`DeepSpeedHandle.train_batch` (see there)."""
        h = self.handle
        engine = h.engine
        if type(engine).__name__ == "PipelineEngine":
            return engine.train_batch(data_iter=data_iter)
        if not h.at_step_boundary():
            raise RuntimeError(
                "train_batch runs whole optimizer steps: finish the step begun by hand first (micro-step "
                f"{engine.micro_steps}, gradient accumulation {engine.gradient_accumulation_steps()})"
            )
        it = data_iter if data_iter is not None else self._loader_iter()
        batches = self._take_step(it)
        self.running = True
        try:
            while True:
                err: BaseException | None = None
                try:
                    return self._run_step(batches, loss_fn)
                except StepRetry:
                    continue  # one rung down, the step rewound: the same samples again
                except h.oom_errors as exc:  # raised outside the engine's calls (in loss_fn)
                    if not h.oom.retries(exc):
                        raise
                    err = detach_traceback(exc)
                h.oom.recover(err, "loss_fn")
        finally:
            self.running = False

    def _loader_iter(self) -> Iterator[Any]:
        loader = self.handle._loader
        if loader is None:
            raise TypeError(
                "train_batch needs data_iter= (an iterator of micro-batches) when initialize was not "
                "given training_data"
            )
        if self._train_iter is None:
            self._train_iter = repeat(loader)
        return self._train_iter

    def _take_step(self, it: Iterator[Any]) -> list[Any]:
        """Batches holding exactly one optimizer step's samples for this rank."""
        setting = self.handle.setting
        need = setting.micro_batch_size * setting.gradient_accumulation_steps
        got: list[Any] = []
        n = 0
        carry, self._carry = self._carry, None
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
                self._carry = (it, slice_batch(batch, cut, k))
                batch, k = slice_batch(batch, 0, cut), cut
            if k:
                got.append(batch)
                n += k
        return got

    def _run_step(self, batches: list[Any], loss_fn: LossFn | None) -> float | None:
        h = self.handle
        for micro in recut(batches, h.setting.micro_batch_size):
            # No local name holds the loss: after an OOM in backward its graph is freed at once.
            h.backward(self._micro_loss(micro, loss_fn))
            h.step()
        return h.last_loss

    def _micro_loss(self, batch: Any, loss_fn: LossFn | None) -> torch.Tensor:
        if loss_fn is not None:
            return loss_fn(batch)
        h = self.handle
        if isinstance(batch, Mapping):
            return loss_of(h(**batch))
        if isinstance(batch, (tuple, list)):
            return loss_of(h(*batch))
        return loss_of(h(batch))


__all__ = ["LossFn", "WholeSteps", "loss_of", "repeat"]
