"""Regrouping the user's batches into optimizer steps and micro-batches.

The adapter owns the split: whatever batch size the user's loader yields, the samples are
regrouped into steps of exactly `step_size` samples (joining or cutting the user's
batches, in order) and each step is cut into micro-batches of the current size. A switch
of micro-batch size therefore changes only how a step is cut, never which samples it
holds or their order. A batch is a tensor, or a tuple, list, dict or dataclass of them
(split along dim 0); other leaves (0-d tensors, strings, numbers) are passed through to every
piece unchanged. The one batch library of the adapters: the plain-PyTorch handle regroups and
cuts with it, the Accelerate loader cuts with it, and the DeepSpeed handle's `train_batch` and
OOM retry re-cut a step's samples with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch


def batch_size(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor that has one (a 0-d tensor is shared)."""
    for leaf in _leaves(batch):
        return int(leaf.shape[0])
    raise TypeError(
        f"cannot find a tensor in a batch of type {type(batch).__name__}, so cannot tell how many samples "
        "it holds: trainwarden splits batches "
        "that are tensors (samples first) or tuples, lists, dicts or dataclasses of tensors"
    )


def _leaves(batch: Any) -> Iterator[torch.Tensor]:
    """The batch's tensors that have a sample dimension, in order."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() > 0:
            yield batch
    elif isinstance(batch, (tuple, list)):
        for b in batch:
            yield from _leaves(b)
    elif isinstance(batch, Mapping):
        for b in batch.values():
            yield from _leaves(b)
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for f in dataclasses.fields(batch):
            yield from _leaves(getattr(batch, f.name))


def _rebuild(batch: Any, parts: Any) -> Any:
    """A container of `batch`'s type around new `parts` (a plain dict for a mapping type that
    cannot be built from one)."""
    if isinstance(batch, Mapping):
        try:
            return type(batch)(parts)
        except Exception:
            return dict(parts)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*parts)
    return type(batch)(parts)


def _map(batch: Any, fn: Any) -> Any:
    """`fn` on every tensor with a sample dimension; the structure and other leaves kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() > 0 else batch
    if isinstance(batch, (tuple, list)):
        return _rebuild(batch, [_map(b, fn) for b in batch])
    if isinstance(batch, Mapping):
        return _rebuild(batch, {k: _map(v, fn) for k, v in batch.items()})
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: _map(getattr(batch, f.name), fn) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples [start, stop) of a batch, as views (no copy)."""
    return _map(batch, lambda t: t[start:stop])


def concat_batches(pieces: Sequence[Any]) -> Any:
    """One batch from several of the same structure, in order (copies; only when a step spans
    batches)."""
    if len(pieces) == 1:
        return pieces[0]
    tensors = [list(_leaves(p)) for p in pieces]
    joined = iter([torch.cat([t[i] for t in tensors]) for i in range(len(tensors[0]))])
    return _map(pieces[0], lambda _t: next(joined))


def recut(batches: Sequence[Any], micro_batch_size: int) -> list[Any]:
    """The samples of `batches` in micro-batches of `micro_batch_size` (the last may be short).

    No copy when every batch already has that size (the usual case); otherwise one copy of the
    step's samples, then views."""
    if all(batch_size(b) == micro_batch_size for b in batches):
        return list(batches)
    whole = concat_batches(batches)
    return [slice_batch(whole, s, e) for s, e in micro_slices(batch_size(whole), micro_batch_size)]


def divisors(n: int) -> tuple[int, ...]:
    """The micro-batch sizes that cut `n` samples into equal micro-batches."""
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def regroup(batches: Iterable[Any], step_size: int) -> Iterator[Any]:
    """Batches of exactly `step_size` samples, in order; a shorter remainder comes last."""
    pieces: list[Any] = []
    held = 0
    for batch in batches:
        n = batch_size(batch)
        start = 0
        while start < n:
            take = min(step_size - held, n - start)
            pieces.append(batch if (start == 0 and take == n) else slice_batch(batch, start, start + take))
            held += take
            start += take
            if held == step_size:
                yield concat_batches(pieces)
                pieces, held = [], 0
    if pieces:
        yield concat_batches(pieces)


def micro_slices(n: int, micro: int) -> list[tuple[int, int]]:
    """[start, stop) of each micro-batch of a step of n samples."""
    return [(s, min(s + micro, n)) for s in range(0, n, micro)]


#: The label HF losses ignore (padding in `labels`).
IGNORE_INDEX = -100


def counted_tokens(batch: Any) -> int | None:
    """Tokens a batch trains on, counted, not guessed: the attention mask's ones where the batch
    has one (2-D), else the `labels` that are not -100, else every element of `input_ids`. None for
    a batch with none of these (images, a bare tensor): the caller keeps its declared count."""
    if not isinstance(batch, dict):
        return None
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int((mask != 0).sum())
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() >= 1 and not labels.is_floating_point():
        return int((labels != IGNORE_INDEX).sum())
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor):
        return int(ids.numel())
    return None
