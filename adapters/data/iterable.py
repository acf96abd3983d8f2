"""The iterable mixture: interleave endless domain streams by the current weights.

    mix = MixtureIterableDataset({"code": code_stream, "text": text_stream}, seed=0)
    loader = DataLoader(mix, batch_size=16, num_workers=2)

Each domain is an iterable (re-iterated from its start when it runs out; with several DataLoader
workers, worker w of W takes every W-th item of it, so no item is loaded twice). Samples are
tagged with their domain number (appended to a tuple, `"domain"` in a dict, else a pair), and
`mix.observe(per_sample_loss, domain)` gives per-domain losses without another forward pass.

Workers are other processes: the weights live in a shared-memory tensor that the training
process writes at a step boundary and each worker reads before every sample, so a change reaches
the workers' next samples (after the batches they have already prefetched). Each worker's
position (samples drawn per domain) is in shared memory too. The domain of draw n of a worker is
a hash of (seed, rank, worker, n): no generator state to carry. `state_dict()` saves the weights and
positions; with `num_workers=0` a resumed run continues the same stream exactly (the domain
iterators are fast-forwarded, so they must be deterministic); with workers it continues from what
the workers had drawn, which skips the batches they had prefetched. Curriculum and pruning need
examples with an index: use the map-style MixtureSampler for those.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from trainwarden.adapters.data.control import DataMixtureError, MixtureControl
from trainwarden.adapters.data.sampler import _mix64, _uniform

#: Most DataLoader workers whose positions are kept in shared memory.
MAX_WORKERS = 64


def tag_domain(sample: Any, domain: int) -> Any:
    if isinstance(sample, tuple):
        return (*sample, domain)
    if isinstance(sample, dict):
        return {**sample, "domain": domain}
    return (sample, domain)


class MixtureIterableDataset(MixtureControl, IterableDataset):
    def __init__(
        self,
        domains: Mapping[str, Iterable[Any]],
        *,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        rank: int | None = None,
    ) -> None:
        super().__init__(
            list(domains), weights, curriculum=False, curriculum_level=1.0, max_prune_fraction=0.0
        )
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.domains = [domains[n] for n in self.names]
        self.seed, self.rank = int(seed), int(rank)
        # Shared with the workers (fork or spawn: shared-memory tensors survive pickling).
        self._shared_weights = torch.tensor(self._weights, dtype=torch.float64).share_memory_()
        self._drawn = torch.zeros((MAX_WORKERS, len(self.names)), dtype=torch.int64).share_memory_()
        self._step_sum = np.zeros(len(self.names))
        self._step_n = np.zeros(len(self.names), dtype=np.int64)

    def _control_changed(self) -> None:
        self._shared_weights.copy_(torch.tensor(self._weights, dtype=torch.float64))

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw > MAX_WORKERS:
            raise DataMixtureError(
                f"{nw} DataLoader workers; the iterable mixture supports up to {MAX_WORKERS}"
            )
        key = _mix64((self.seed * 0x632BE59BD9B4E019 + self.rank * 0x1000 + wid + 1) & (2**64 - 1))
        drawn = self._drawn[wid]
        streams = [self._stream(d, wid, nw, int(drawn[d])) for d in range(len(self.names))]
        n = int(drawn.sum())
        while True:
            w = self._shared_weights.tolist()
            u = _uniform(key, n) * sum(w)
            d, acc = 0, w[0]
            while acc <= u and d < len(w) - 1:
                d += 1
                acc += w[d]
            sample = next(streams[d])
            drawn[d] += 1
            n += 1
            yield tag_domain(sample, d)

    def _stream(self, d: int, wid: int, nw: int, skip: int) -> Iterator[Any]:
        """Domain d's items for this worker, endlessly, after skipping the `skip` already drawn."""

        def endless() -> Iterator[Any]:
            while True:
                empty = True
                for item in itertools.islice(iter(self.domains[d]), wid, None, nw):
                    empty = False
                    yield item
                if empty:
                    raise DataMixtureError(
                        f"domain {self.names[d]!r} yields nothing for worker {wid} of {nw}"
                    )

        it = endless()
        for _ in range(skip):
            next(it)
        return it

    def observe(self, losses: torch.Tensor, domains: torch.Tensor) -> None:
        loss = losses.detach().float().reshape(-1).cpu().numpy()
        dom = np.asarray(domains.detach().cpu() if isinstance(domains, torch.Tensor) else domains).reshape(-1)
        finite = np.isfinite(loss)
        np.add.at(self._step_sum, dom[finite], loss[finite])
        np.add.at(self._step_n, dom[finite], 1)

    def take_domain_loss(self) -> dict[str, float]:
        out = self._smoothed(self._step_sum, self._step_n)
        self._step_sum[:] = 0
        self._step_n[:] = 0
        return out

    def on_step(self, step: int, samples: int) -> None:
        """Nothing to forget: positions are per worker, in shared memory."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seed": self.seed,
            "rank": self.rank,
            "control": self.control_state(),
            "drawn": self._drawn.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise DataMixtureError(f"the checkpoint's seed is {state['seed']}, this mixture's {self.seed}")
        self.load_control_state(state["control"])
        self._shared_weights.copy_(torch.tensor(self._weights, dtype=torch.float64))
        self._drawn.copy_(torch.as_tensor(state["drawn"]))
