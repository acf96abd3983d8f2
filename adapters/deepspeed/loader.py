"""trainwarden's data loader for `training_data`: DeepSpeed's sampler, cut at the live micro-batch.

A micro-batch change applies exactly at the next micro-batch, and no sample is lost or
repeated; the indices of the current optimizer step are kept so that a step interrupted by an
OOM can be given again (adapters/deepspeed/oom.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any


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


__all__ = ["SamplerLoader"]
