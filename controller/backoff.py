"""Per-kind failure back-off: a kind of action the job fails to apply (rolled back, rejected) is
tried again only after a wait that doubles per failure, and after MAX_FAILURES in a row not for
DISABLED_FOR_S (or until the job starts again). No retry storm, and no switch a job cannot make
asked for forever.
"""

from __future__ import annotations

import logging

#: A kind of action that fails (rolled back or rejected by the job) this many times in a row
#: is disabled for the run; between failures the controller waits BACKOFF_BASE_S, doubling.
MAX_FAILURES = 3
BACKOFF_BASE_S = 5.0
BACKOFF_MAX_S = 300.0
#: How long a disabled kind stays off (or until the job starts again): bounded, so that outcomes a
#: token holder forges cannot switch a policy's actions off for a whole run.
DISABLED_FOR_S = 1800.0


class KindBackoff:
    """The failures, waits and disabled kinds of one job start. Not thread-safe: the controller
    calls it under its lock. Logs on the controller's logger, so the lines read as they did."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._failures: dict[str, int] = {}
        self._retry_after: dict[str, float] = {}
        self._disabled: dict[str, float] = {}
        """Kinds disabled after MAX_FAILURES in a row, with the time they may be tried again."""

    def waiting(self, kind: str, now: float) -> bool:
        """Whether `kind` is disabled or backing off at `now`."""
        return now < self._disabled.get(kind, float("-inf")) or now < self._retry_after.get(kind, 0.0)

    def reset(self) -> None:
        """A new start of the job: every kind may be tried again."""
        self._failures.clear()
        self._retry_after.clear()
        self._disabled.clear()

    def record(self, kind: str, outcome: str, now: float) -> None:
        """After a failed switch wait before the next try (doubling), and after
        `MAX_FAILURES` failures in a row stop trying that kind of action for this run."""
        if outcome in ("applied", "noop"):
            self._failures.pop(kind, None)
            self._retry_after.pop(kind, None)
            return
        n = self._failures[kind] = self._failures.get(kind, 0) + 1
        if n >= MAX_FAILURES:
            self._disabled[kind] = now + DISABLED_FOR_S
            self._failures.pop(kind, None)
            self._log.error(
                "%s failed %d times in a row; no more %s actions this run for %.0f min, or until the job "
                "starts again (the job keeps its configuration). Check the decision log for the errors.",
                kind,
                n,
                kind,
                DISABLED_FOR_S / 60,
            )
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (n - 1))
        self._retry_after[kind] = now + delay
        self._log.warning(
            "%s %s (failure %d of %d); next try in %.0f s", kind, outcome, n, MAX_FAILURES, delay
        )
