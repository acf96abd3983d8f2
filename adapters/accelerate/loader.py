"""The training data loader of an attached Accelerate job: cut at the current micro-batch.

Accelerate's gradient accumulation counts micro-batches (`accumulate()` syncs every
`gradient_accumulation_steps`-th), and the micro-batch is the loader's batch. Changing the
accumulation alone would change the global batch; to keep it, the loader must cut smaller (or
larger) micro-batches at the same moment. This wrapper owns that cut, as the plain-PyTorch adapter
does (adapters/core/batching.py): the prepared loader's batches are regrouped into optimizer steps of
exactly `step_samples` samples (its batch size x the accumulation it was prepared with), in
order, and each step is cut at the current micro-batch size. A switch therefore changes only
how a step is cut, never which samples it holds.

It also tells the accelerator where each step ends (`accumulate()` syncs on a step's last
micro-batch, so a short last step of an epoch syncs too). The micro-batch size is read once per
step, when the step is cut: a switch made at a step boundary takes effect with the next step.
Everything else is forwarded to the prepared loader (`len` counts micro-batches at the current
size, `set_epoch`, `batch_size`, ...).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from trainwarden.adapters.core.batching import batch_size, counted_tokens, micro_slices, regroup, slice_batch


class _Owner(Protocol):
    micro_batch_size: int | None

    def _tw_micro_batch(self, samples: int, tokens: int, last: bool | None) -> None: ...


def tokens_in(batch: Any, samples: int, tokens_per_sample: int | None) -> int:
    """Tokens in a micro-batch: samples x tokens_per_sample when given, else counted from an HF
    batch (batching.counted_tokens: its attention mask, non-padding labels or input_ids), else
    the element count of the batch's first tensor with two or more dims."""
    if tokens_per_sample is not None:
        return samples * tokens_per_sample
    counted = counted_tokens(dict(batch)) if isinstance(batch, Mapping) else None
    if counted is not None:
        return counted
    from trainwarden.adapters.core.batching import _leaves

    for leaf in _leaves(batch):
        if leaf.dim() >= 2:
            return int(leaf.shape[0] * leaf.shape[1])
    return samples


class MicroBatchLoader:
    """Iterate it as the prepared loader; see the module docstring."""

    def __init__(
        self,
        loader: Any,
        owner: _Owner,
        accumulation: int,
        tokens_per_sample: int | None,
        batch_size: int | None = None,
        cut: bool = True,
    ) -> None:
        self.loader = loader
        #: False: the batches pass through as Accelerate made them, only counted (under an engine
        #: that owns its micro-batch, DeepSpeed's).
        self.cut = cut
        self._owner = owner
        self._accumulation = max(1, accumulation)
        self.tokens_per_sample = tokens_per_sample
        #: Samples per optimizer step on this process: the loader's batch x the accumulation (from
        #: the first batch when the loader does not say its batch size).
        self.step_samples: int | None = batch_size * self._accumulation if batch_size else None
        if batch_size and owner.micro_batch_size is None:
            owner.micro_batch_size = batch_size

    def __iter__(self) -> Iterator[Any]:
        if not self.cut:
            for batch in self.loader:
                n = batch_size(batch)
                self._owner._tw_micro_batch(n, tokens_in(batch, n, self.tokens_per_sample), None)
                yield batch
            return
        batches = iter(self.loader)
        first = next(batches, None)
        if first is None:
            return
        if self.step_samples is None:
            self.step_samples = batch_size(first) * self._accumulation
            if self._owner.micro_batch_size is None:
                self._owner.micro_batch_size = batch_size(first)
        for step in regroup(itertools.chain([first], batches), self.step_samples):
            micro = self._owner.micro_batch_size or self.step_samples
            n = batch_size(step)
            cuts = micro_slices(n, micro)
            for i, (start, stop) in enumerate(cuts):
                piece = step if (start, stop) == (0, n) else slice_batch(step, start, stop)
                samples = stop - start
                self._owner._tw_micro_batch(
                    samples, tokens_in(piece, samples, self.tokens_per_sample), i == len(cuts) - 1
                )
                yield piece

    def with_loader(self, loader: Any) -> MicroBatchLoader:
        """The same cut over another prepared loader (e.g. Accelerate's `skip_first_batches`)."""
        out = MicroBatchLoader(loader, self._owner, self._accumulation, self.tokens_per_sample, cut=self.cut)
        out.step_samples = self.step_samples
        return out

    def __len__(self) -> int:
        inner = len(self.loader)
        if not self.cut or self.step_samples is None or not self._owner.micro_batch_size:
            return inner
        per_batch = self.step_samples // self._accumulation
        steps = -(-inner * per_batch // self.step_samples)
        return steps * -(-self.step_samples // self._owner.micro_batch_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __repr__(self) -> str:
        return f"trainwarden.MicroBatchLoader({self.loader!r})"


__all__ = ["MicroBatchLoader", "tokens_in"]
