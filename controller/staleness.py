"""Which ranks of the job have gone silent: a rank whose telemetry (its memory sample, carried in
rank 0's records at sync steps) is missing past the staleness limit is said lost once, and its
return is recorded as a gap. A node gone (its job killed, its host down) stops the collectives,
so every rank falls silent; the controller keeps the run for a restarted job to reconnect to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any


class RankWatch:
    """The last record that carried each rank's telemetry, the ranks silent now, and the gaps of
    the run. Not thread-safe: the controller calls it under its lock. Logs on the controller's
    logger, so the lines read as they did."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        #: rank -> (controller clock, step) of the last record carrying that rank's telemetry.
        self._seen: dict[int, tuple[float, int]] = {}
        #: Ranks now silent past the staleness limit (empty: every rank reports).
        self.stale_ranks: tuple[int, ...] = ()
        self._since: tuple[float, int] | None = None
        #: Every gap seen this run (ranks, last step before it, seconds, step telemetry resumed at).
        self.gaps: list[dict[str, Any]] = []

    def seen(self, rank: int, now: float, step: int) -> None:
        """A record carried `rank`'s telemetry at `now`; a resent or replayed one counts too (a
        job restarted from a checkpoint reports steps the controller has seen): the rank is alive."""
        self._seen[rank] = (now, step)

    def update(self, world_size: int, now: float, limit_s: Callable[[], float], step: int) -> bool:
        """Fold in the time `now` for a job of `world_size` ranks at `step`; `limit_s` gives the
        staleness limit (asked only once a rank has reported). True when ranks have just gone
        silent: the caller writes summary.json then."""
        if not self._seen:
            return False  # nothing to miss yet: no step reported (a job may take minutes to start)
        limit = limit_s()
        first = min(self._seen.values())
        stale = tuple(r for r in range(world_size) if now - self._seen.get(r, first)[0] > limit)
        if stale == self.stale_ranks:
            return False
        if stale and not self.stale_ranks:
            seen, last_step = min(self._seen.get(r, first) for r in stale)
            self._since = (seen, last_step)
            self.stale_ranks = stale
            self._log.error(
                "no telemetry from rank(s) %s of %d for %.1f s (last at step %d; limit %.1f s): a node or "
                "process of the job is lost, or the job is hung in a collective. The controller keeps "
                "the run; a restarted job (torchrun --max-restarts) reconnects here. summary.json written.",
                ", ".join(map(str, stale)),
                world_size,
                now - seen,
                last_step,
                limit,
            )
            return True
        if not stale and self._since is not None:
            seen, last_step = self._since
            self.gaps.append(
                {
                    "ranks": list(self.stale_ranks),
                    "last_step": last_step,
                    "seconds": round(now - seen, 3),
                    "resumed_at_step": step,
                }
            )
            self._log.warning(
                "telemetry from rank(s) %s again at step %d, after %.1f s without",
                ", ".join(map(str, self.stale_ranks)),
                step,
                now - seen,
            )
            self._since = None
        self.stale_ranks = stale
        return False
