"""Which examples still teach: a per-example record of the loss at its last two visits.

An example teaches while its loss still falls between visits. One whose loss has stopped falling
is either learned (low and flat: a near-duplicate, boilerplate) or unlearnable (high and flat:
noise); both cost a step's compute and give nothing back, so the mixture may leave them out.
The record is three small arrays over all examples (10 bytes each: 1M examples cost 10 MB),
updated from the per-sample losses the training step already computed, never an extra forward.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Most of one domain that pruning may leave out.
MAX_DOMAIN_PRUNED = 0.5
#: An example whose loss fell by at least this fraction since its previous visit still teaches:
#: never pruned, whatever fraction the policy allows (the fraction is a bound, not a quota).
STILL_TEACHING = 0.01


class ExampleTracker:
    def __init__(self, n: int) -> None:
        self.prev = np.full(n, np.nan, dtype=np.float32)
        self.last = np.full(n, np.nan, dtype=np.float32)
        self.visits = np.zeros(n, dtype=np.int32)

    def observe(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Record each example's loss at this visit (the same example twice in a batch: last wins)."""
        self.prev[indices] = self.last[indices]
        self.last[indices] = losses
        self.visits[indices] += 1

    def learnability(self) -> np.ndarray:
        """Relative loss decrease between the last two visits; NaN for examples seen fewer than twice."""
        with np.errstate(invalid="ignore", divide="ignore"):
            out = (self.prev - self.last) / np.maximum(np.abs(self.prev), 1e-6)
        out[self.visits < 2] = np.nan
        return out

    def choose_pruned(self, fraction: float, domain_ends: np.ndarray | None = None) -> np.ndarray:
        """Indices of the examples to leave out: those whose loss fell least since their previous
        visit (by less than STILL_TEACHING), at most `fraction` of all examples, and at
        most MAX_DOMAIN_PRUNED of any one domain (`domain_ends`: each domain's end index), so a
        domain keeps examples to draw and a draw never walks a long run of pruned ones (the
        domain's weight, not pruning, is what turns a whole domain down). Sorted."""
        k = int(fraction * len(self.visits))
        if k <= 0:
            return np.zeros(0, dtype=np.int64)
        score = self.learnability()
        seen = np.flatnonzero(~np.isnan(score) & (score < STILL_TEACHING))
        if len(seen) == 0:
            return np.zeros(0, dtype=np.int64)
        # Stable order: ties (and equal scores) resolve by index, so a resumed run prunes the same set.
        order = seen[np.argsort(score[seen], kind="stable")]
        if domain_ends is not None:
            ends = np.asarray(domain_ends)
            dom = np.searchsorted(ends, order, side="right")
            sizes = np.diff(np.concatenate(([0], ends)))
            # Rank of each candidate within its own domain, in score order.
            rank = np.empty(len(order), dtype=np.int64)
            for d in np.unique(dom):
                at = np.flatnonzero(dom == d)
                rank[at] = np.arange(len(at))
            order = order[rank < (MAX_DOMAIN_PRUNED * sizes[dom]).astype(np.int64)]
        return np.sort(order[:k]).astype(np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self.prev.copy(), "last": self.last.copy(), "visits": self.visits.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("prev", "last", "visits"):
            value = np.asarray(state[name])
            if value.shape != getattr(self, name).shape:
                raise ValueError(
                    f"the checkpoint tracks {value.shape[0]} examples, this mixture has "
                    f"{getattr(self, name).shape[0]}: build it over the same datasets"
                )
            setattr(self, name, value.astype(getattr(self, name).dtype, copy=True))
