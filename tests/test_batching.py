"""Regrouping user batches into optimizer steps of exactly N samples, and cutting micro-batches."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch

from trainwarden.adapters.core.batching import batch_size, concat_batches, micro_slices, regroup, slice_batch
from trainwarden.examples.corpus import Batch


def _index_batches(sizes: list[int]) -> list[torch.Tensor]:
    """User batches of consecutive sample indices: sample i is the row [i, 10 i]."""
    out, start = [], 0
    for n in sizes:
        idx = torch.arange(start, start + n)
        out.append(torch.stack([idx, idx * 10], dim=1))
        start += n
    return out


@pytest.mark.parametrize(
    ("sizes", "step"),
    [
        ([3] * 11, 8),  # smaller than the step, not dividing it
        ([4] * 6, 8),  # smaller, dividing it
        ([8] * 3, 8),  # exactly the step
        ([20, 20, 5], 8),  # larger than the step, not a multiple
        ([5, 1, 13, 2, 7, 16], 6),  # mixed
    ],
)
def test_regroup_makes_steps_of_exactly_n_samples_in_order(sizes: list[int], step: int) -> None:
    batches = _index_batches(sizes)
    total = sum(sizes)
    steps = list(regroup(batches, step))
    assert [batch_size(s) for s in steps[:-1]] == [step] * (len(steps) - 1)
    remainder = total % step
    assert batch_size(steps[-1]) == (remainder or step)
    assert len(steps) == -(-total // step)
    # Every sample once, in the loader's order, with its row intact.
    joined = torch.cat(steps)
    assert torch.equal(joined[:, 0], torch.arange(total))
    assert torch.equal(joined[:, 1], torch.arange(total) * 10)


def test_regroup_of_an_empty_loader_yields_nothing() -> None:
    assert list(regroup([], 4)) == []


Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass(frozen=True)
class Tagged:
    x: torch.Tensor
    tag: str  # not a tensor: passed through unchanged


def _structures(idx: torch.Tensor) -> dict[str, object]:
    n = len(idx)
    return {
        "tuple": (idx, -idx),
        "list": [idx, -idx],
        "dict": {"input_ids": idx, "labels": -idx},
        "namedtuple": Pair(idx, -idx),
        "dataclass": Tagged(idx, "meta"),
        "corpus.Batch": Batch(
            idx.view(n, 1).repeat(1, 3), idx.view(n, 1).repeat(1, 3) + 1, idx % 2, ("code", "prose")
        ),
    }


def _first(batch: object) -> torch.Tensor:
    """The index tensor of a structure made by `_structures`, as a flat vector."""
    if isinstance(batch, Batch):
        return batch.x[:, 0]
    if isinstance(batch, Tagged):
        return batch.x
    if isinstance(batch, dict):
        return batch["input_ids"]
    return batch[0]


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "namedtuple", "dataclass", "corpus.Batch"])
def test_regroup_keeps_the_structure_and_the_order(kind: str) -> None:
    sizes, step = [5, 3, 9, 2], 4
    batches, start = [], 0
    for n in sizes:
        batches.append(_structures(torch.arange(start, start + n))[kind])
        start += n
    steps = list(regroup(batches, step))
    assert [batch_size(s) for s in steps] == [4, 4, 4, 4, 3]
    for s in steps:
        assert type(s) is type(batches[0])
    assert torch.equal(torch.cat([_first(s) for s in steps]), torch.arange(19))

    # The other leaves are split the same way (they stay aligned with the first).
    for s in steps:
        idx = _first(s)
        if kind in ("tuple", "list", "namedtuple"):
            assert torch.equal(s[1], -idx)
        elif kind == "dict":
            assert list(s) == ["input_ids", "labels"]
            assert torch.equal(s["labels"], -idx)
        elif kind == "dataclass":
            assert s.tag == "meta"
        else:
            assert torch.equal(s.y[:, 0], idx + 1)
            assert torch.equal(s.domain, idx % 2)
            assert s.domain_names == ("code", "prose")


def test_micro_slices_cover_a_step_in_order() -> None:
    assert micro_slices(16, 16) == [(0, 16)]
    assert micro_slices(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert micro_slices(10, 4) == [(0, 4), (4, 8), (8, 10)]  # a remainder step: last slice shorter
    assert micro_slices(3, 8) == [(0, 3)]
    assert micro_slices(0, 4) == []


def test_slice_batch_returns_views() -> None:
    b = {"x": torch.arange(10.0), "meta": "kept"}
    s = slice_batch(b, 2, 5)
    assert torch.equal(s["x"], torch.tensor([2.0, 3.0, 4.0]))
    assert s["meta"] == "kept"
    assert s["x"].untyped_storage().data_ptr() == b["x"].untyped_storage().data_ptr()


def test_concat_batches_copies_only_when_needed() -> None:
    one = (torch.arange(4), torch.arange(4) * 2)
    assert concat_batches([one]) is one  # identity for one piece

    two = [(torch.arange(0, 3), torch.arange(0, 3) * 2), (torch.arange(3, 5), torch.arange(3, 5) * 2)]
    joined = concat_batches(two)
    assert torch.equal(joined[0], torch.arange(5))
    assert torch.equal(joined[1], torch.arange(5) * 2)


def test_regroup_does_not_copy_a_step_inside_one_user_batch() -> None:
    whole = torch.arange(8)
    # The user batch is exactly one step: the very same object comes back.
    (only,) = regroup([whole], 8)
    assert only is whole
    # A user batch larger than the step: each step is a view into it, not a copy.
    big = torch.arange(12)
    steps = list(regroup([big], 4))
    assert [s.tolist() for s in steps] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for s in steps:
        assert s.untyped_storage().data_ptr() == big.untyped_storage().data_ptr()


def test_batch_size_names_what_it_cannot_split() -> None:
    assert batch_size({"a": "text", "b": (torch.zeros(7, 2),)}) == 7
    with pytest.raises(TypeError, match="cannot find a tensor in a batch of type list"):
        batch_size(["no", "tensors"])
