"""The map-style mixture: a dataset over named domains and the sampler that draws from it.

    data = MixtureDataset({"code": code_ds, "text": text_ds})
    mix = MixtureSampler(data, weights={"code": 0.5, "text": 0.5}, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=mix, num_workers=2)

Each sample comes back tagged with its index in the mixture (a tuple sample gets it appended, a
dict sample gets `"index"`, anything else becomes `(sample, index)`); `mix.observe(per_sample_loss,
index)` turns the losses the step already computed into per-domain losses (and per-example records
for pruning): no extra forward pass.

The sampler runs in the training process (a DataLoader's workers only load the indices it draws),
so a change of weights, curriculum level or pruned set reaches the next index drawn. A DataLoader
draws `prefetch_factor x num_workers` batches ahead, so a change shows in the batches after those.
Every draw is a pure function of the sampler's seed, rank, position and per-domain cursors: the
uniform number of draw n is a hash of (seed, rank, n), and each domain walks its own seeded
permutation per epoch. The sampler keeps the cursors of each draw not yet consumed (the handle says
how many samples each optimizer step consumed), and every change with the draw position from which
it took effect, so `state_dict()` is the state at the consumed position: a resumed run draws the
same indices, prefetched ones included, with the same weights at the same positions.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from trainwarden.adapters.data.control import DataMixtureError, MixtureControl, check_names
from trainwarden.adapters.data.prune import ExampleTracker

_MASK = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer (~1 us in Python)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def _uniform(key: int, n: int) -> float:
    """The uniform number in [0, 1) of draw `n`: a counter-based generator, so no RNG state to keep."""
    return (_mix64((key + (n + 1) * 0x9E3779B97F4A7C15) & _MASK) >> 11) / float(1 << 53)


def tag_sample(sample: Any, index: int) -> Any:
    """The sample with its mixture index: appended to a tuple, `"index"` in a dict, else a pair."""
    if isinstance(sample, tuple):
        return (*sample, index)
    if isinstance(sample, dict):
        if "index" in sample:
            raise DataMixtureError(
                "the domain's samples already have an 'index' key; the mixture tags samples with "
                "'index': rename that key in the domain's dataset"
            )
        return {**sample, "index": index}
    return (sample, index)


class MixtureDataset(Dataset):
    """The domains' datasets end to end; item i is tagged with i (see `tag_sample`). Stateless, so
    DataLoader workers can hold copies."""

    def __init__(self, domains: Mapping[str, Any]) -> None:
        self.names = check_names(list(domains))
        self.datasets = [domains[n] for n in self.names]
        self.sizes = tuple(len(d) for d in self.datasets)
        for name, size in zip(self.names, self.sizes, strict=True):
            if size < 1:
                raise DataMixtureError(
                    f"domain {name!r} is empty; give it at least one example or leave it out"
                )
        self.offsets = tuple(accumulate(self.sizes, initial=0))[:-1]
        self._ends = np.cumsum(self.sizes)

    def __len__(self) -> int:
        return int(self._ends[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(domain number, index within that domain) of mixture index `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"mixture index {index} out of range (the mixture has {len(self)} examples)")
        d = bisect.bisect_right(self.offsets, index) - 1
        return d, index - self.offsets[d]

    def domain_of(self, indices: Any) -> np.ndarray:
        """The domain number of each mixture index (array in, array out)."""
        return np.searchsorted(self._ends, np.asarray(indices), side="right")

    def __getitem__(self, index: int) -> Any:
        d, local = self.locate(int(index))
        return tag_sample(self.datasets[d][local], int(index))


class MixtureSampler(MixtureControl, Sampler[int]):
    """Draws mixture indices by the current domain weights; the live, checkpointable mixture.

    weights: initial weights by domain (default uniform). seed and rank (default: this process's
    torch.distributed rank) fix the stream; each rank draws its own. difficulty: a score per example
    of each domain (lower is easier) enables the curriculum knob, starting at `curriculum_level`
    (the easiest fraction of each domain). max_prune_fraction > 0 enables pruning, refreshed every
    `prune_refresh_steps` optimizer steps. num_samples: draws per `iter()` (default: endless).
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        *,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        rank: int | None = None,
        difficulty: Mapping[str, Sequence[float]] | None = None,
        curriculum_level: float = 1.0,
        max_prune_fraction: float = 0.0,
        prune_refresh_steps: int = 100,
        num_samples: int | None = None,
    ) -> None:
        if not isinstance(dataset, MixtureDataset):
            raise DataMixtureError(
                f"MixtureSampler draws from a MixtureDataset, got {type(dataset).__name__}: wrap the "
                "domains as MixtureDataset({name: dataset, ...})"
            )
        super().__init__(
            dataset.names,
            weights,
            curriculum=difficulty is not None,
            curriculum_level=curriculum_level,
            max_prune_fraction=max_prune_fraction,
        )
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.dataset = dataset
        self.seed, self.rank = int(seed), int(rank)
        self.num_samples = num_samples
        self.prune_refresh_steps = max(1, int(prune_refresh_steps))
        self._key = _mix64((self.seed * 0x632BE59BD9B4E019 + self.rank + 1) & _MASK)
        n = len(dataset)
        self._rank_in_domain = self._difficulty_ranks(difficulty) if difficulty is not None else None
        self.tracker = ExampleTracker(n) if max_prune_fraction > 0 else None
        self._pruned = np.zeros(0, dtype=np.int64)
        # Drawing state: position, per-domain cursors, and the values drawing uses now (`active`),
        # which after a resume may lag the reported ones until the position they took effect at.
        self._pos = 0
        self._cursors = [0] * len(self.names)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}
        self._active: dict[str, Any] = {}
        self._eligible = np.ones(n, dtype=bool)
        self._cum: list[float] = []
        # Not yet consumed: the cursors before each draw, and the changes with their positions.
        self._consumed = 0
        self._history: deque[tuple[int, tuple[int, ...]]] = deque()
        self._log: list[tuple[int, dict[str, Any]]] = []
        self._pending: deque[tuple[int, dict[str, Any]]] = deque()
        self._step_sum = np.zeros(len(self.names))
        self._step_n = np.zeros(len(self.names), dtype=np.int64)
        self._record({"weights": self._weights, "level": self._level, "pruned": self._pruned})

    def _difficulty_ranks(self, difficulty: Mapping[str, Sequence[float]]) -> np.ndarray:
        """Each example's rank by difficulty within its domain, as a fraction in (0, 1]."""
        missing = [n for n in self.names if n not in difficulty]
        unknown = [n for n in difficulty if n not in self.names]
        if missing or unknown:
            raise DataMixtureError(
                f"difficulty must give a score per example for every domain: missing {missing}, "
                f"unknown {unknown} (domains: {', '.join(self.names)})"
            )
        out = np.empty(len(self.dataset), dtype=np.float64)
        for d, name in enumerate(self.names):
            scores = np.asarray(difficulty[name], dtype=np.float64)
            if scores.shape != (self.dataset.sizes[d],) or not np.isfinite(scores).all():
                raise DataMixtureError(
                    f"difficulty[{name!r}] must be {self.dataset.sizes[d]} finite numbers (one per example), "
                    f"got shape {scores.shape}"
                )
            ranks = np.empty(len(scores))
            ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1) / len(scores)
            out[self.dataset.offsets[d] : self.dataset.offsets[d] + len(scores)] = ranks
        return out

    # ---- changes -----------------------------------------------------------------------------
    def _record(self, change: dict[str, Any]) -> None:
        """A change takes effect from the next draw; kept with its position for the checkpoint."""
        for key in change:  # a newer change of a value supersedes one a resume was replaying
            self._pending = deque((p, c) for p, c in self._pending if key not in c)
        self._log.append((self._pos, dict(change)))
        self._activate(change)

    def _activate(self, change: dict[str, Any]) -> None:
        self._active.update(change)
        w = self._active["weights"]
        self._cum = list(accumulate(w))
        eligible = np.ones(len(self.dataset), dtype=bool)
        if self._rank_in_domain is not None:
            # The easiest `level` of each domain (at least its easiest example: rank 1/size <= level).
            eligible &= self._rank_in_domain <= max(self._active["level"], 1e-12) + 1e-12
            for d, off in enumerate(self.dataset.offsets):
                size = self.dataset.sizes[d]
                if not eligible[off : off + size].any():
                    eligible[off + int(np.argmin(self._rank_in_domain[off : off + size]))] = True
        eligible[self._active["pruned"]] = False
        self._eligible = eligible

    def _control_changed(self) -> None:
        self._record({"weights": self._weights, "level": self._level})

    def _refresh_pruning(self) -> None:
        if self.tracker is None:
            return
        pruned = self.tracker.choose_pruned(self._prune_fraction, self.dataset._ends)
        if not np.array_equal(pruned, self._pruned):
            self._pruned = pruned
            self.data_version += 1
            self._record({"pruned": pruned})

    def pruned_fraction(self) -> float:
        return len(self._pruned) / len(self.dataset)

    # ---- drawing -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        self._rewind()
        n = 0
        while self.num_samples is None or n < self.num_samples:
            yield self._draw()
            n += 1

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless MixtureSampler has no length; give num_samples for one")
        return self.num_samples

    def _draw(self) -> int:
        n = self._pos
        while self._pending and self._pending[0][0] <= n:
            self._activate(self._pending.popleft()[1])
        self._history.append((n, tuple(self._cursors)))
        u = _uniform(self._key, n) * self._cum[-1]
        d = min(bisect.bisect_right(self._cum, u), len(self._cum) - 1)
        while self._active["weights"][d] <= 0:  # float edge at a zero-weight boundary
            d = (d + 1) % len(self._cum)
        self._pos = n + 1
        return self._next_in_domain(d)

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        cached = self._perms.get(d)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, self.rank, d, epoch])
            cached = (epoch, rng.permutation(self.dataset.sizes[d]))
            self._perms[d] = cached
        return cached[1]

    def _next_in_domain(self, d: int) -> int:
        """The domain's next eligible example in its per-epoch permutation (skips cost one step
        each; after a whole epoch of ineligible ones the next is taken anyway, never a hang)."""
        size, off = self.dataset.sizes[d], self.dataset.offsets[d]
        for _ in range(size):
            c = self._cursors[d]
            self._cursors[d] = c + 1
            index = off + int(self._perm(d, c // size)[c % size])
            if self._eligible[index]:
                return index
        return index

    # ---- what the training step reports ------------------------------------------------------
    def observe(self, losses: torch.Tensor, indices: torch.Tensor) -> None:
        """Per-sample losses of this micro-batch and the samples' mixture indices (their tags)."""
        loss = losses.detach().float().reshape(-1).cpu().numpy()
        idx = np.asarray(indices.detach().cpu() if isinstance(indices, torch.Tensor) else indices).reshape(-1)
        if loss.shape != idx.shape:
            raise DataMixtureError(
                f"observe needs one loss per sample: {loss.shape[0]} losses for {idx.shape[0]} indices "
                "(compute the loss with reduction='none', averaged over each sample's tokens)"
            )
        finite = np.isfinite(loss)
        dom = self.dataset.domain_of(idx)
        np.add.at(self._step_sum, dom[finite], loss[finite])
        np.add.at(self._step_n, dom[finite], 1)
        if self.tracker is not None:
            self.tracker.observe(idx[finite], loss[finite])

    def take_domain_loss(self) -> dict[str, float]:
        """Loss per domain, for the domains observed since the last call: their mean this step,
        folded into an EMA over each domain's last ~128 samples (data_control.LOSS_WINDOW_SAMPLES)."""
        out = self._smoothed(self._step_sum, self._step_n)
        self._step_sum[:] = 0
        self._step_n[:] = 0
        return out

    def on_step(self, step: int, samples: int) -> None:
        """An optimizer step consumed `samples` samples: forget what no resume needs; refresh pruning."""
        self._consumed = min(self._consumed + int(samples), self._pos)
        while self._history and self._history[0][0] < self._consumed:
            self._history.popleft()
        while len(self._log) > 1 and self._log[1][0] <= self._consumed:
            merged = {**self._log[0][1], **self._log[1][1]}
            self._log[0:2] = [(self._log[1][0], merged)]
        if self.tracker is not None and self._prune_fraction > 0 and step % self.prune_refresh_steps == 0:
            self._refresh_pruning()

    # ---- checkpoint --------------------------------------------------------------------------
    def _position(self) -> tuple[int, list[int], dict[str, Any], list[tuple[int, dict[str, Any]]]]:
        """(consumed position, cursors there, values in force there, later changes with positions)."""
        c = self._consumed
        cursors = self._history[0][1] if self._history else tuple(self._cursors)
        base: dict[str, Any] = {}
        later: list[tuple[int, dict[str, Any]]] = []
        for pos, change in self._log:
            if pos <= c:
                base.update(change)
            else:
                later.append((pos, change))
        return c, list(cursors), base, later

    def _set_position(self, c: int, cursors: list[int], base: dict[str, Any], later: list[Any]) -> None:
        self._pos = self._consumed = c
        self._cursors = [int(x) for x in cursors]
        self._history.clear()
        self._active = {}
        self._log = [(c, base)]
        self._activate(base)
        self._pending = deque(later)
        self._log += list(later)

    def _rewind(self) -> None:
        """Back to the consumed position: a new DataLoader iterator has thrown away what the old
        one had prefetched, and drawing on would skip those samples (and differ from a resume)."""
        if self._pos != self._consumed:
            self._set_position(*self._position())

    def state_dict(self) -> dict[str, Any]:
        """The state at the consumed position: a sampler loaded with it draws exactly what this one
        drew and will draw from there (prefetched draws and the changes they saw included)."""
        c, cursors, base, later = self._position()
        return {
            "version": 1,
            "seed": self.seed,
            "rank": self.rank,
            "sizes": list(self.dataset.sizes),
            "position": c,
            "cursors": cursors,
            "active": _plain_change(base),
            "changes": [(pos, _plain_change(ch)) for pos, ch in later],
            "control": self.control_state(),
            "pruned": self._pruned.tolist(),
            "tracker": self.tracker.state_dict() if self.tracker is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict()`; then (re)iterate the DataLoader."""
        if list(state["sizes"]) != list(self.dataset.sizes) or int(state["seed"]) != self.seed:
            raise DataMixtureError(
                f"the checkpoint is of a mixture with domain sizes {list(state['sizes'])} and seed "
                f"{state['seed']}, this one has {list(self.dataset.sizes)} and {self.seed}: build it "
                "over the same datasets with the same seed"
            )
        self.load_control_state(state["control"])
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
        self._pruned = np.asarray(state["pruned"], dtype=np.int64)
        later = [(int(p), _array_change(ch)) for p, ch in state["changes"]]
        self._set_position(int(state["position"]), state["cursors"], _array_change(state["active"]), later)


def _plain_change(change: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(change)
    if "pruned" in out:
        out["pruned"] = np.asarray(out["pruned"]).tolist()
    if "weights" in out:
        out["weights"] = [float(w) for w in out["weights"]]
    return out


def _array_change(change: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(change)
    if "pruned" in out:
        out["pruned"] = np.asarray(out["pruned"], dtype=np.int64)
    if "weights" in out:
        w = tuple(float(x) for x in out["weights"])
        if not all(math.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
            raise DataMixtureError(f"the checkpoint's weights are not valid: {w}")
        out["weights"] = w
    return out
