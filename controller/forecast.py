"""The live forecast of a budget: throughput since the last change, and the marginal gain.

Throughput is measured over the steps since the last change of it, not over a fixed window:
right after a ZeRO switch or a micro-batch change a fixed window mixes two rates and the
forecast end drifts for as many steps as the window holds. A change is either one the job
reports (its configuration changed: anything but the LR multiplier and the stop flag) or one
it does not (contention, a slower data source): `SHIFT_STEPS` step intervals in a row all off
the segment's rate by more than `SHIFT_RATIO`, in the same direction. Until a new segment has
`MIN_STEPS` intervals, the previous segment's rate stands (a guess better than none).

The marginal gain is the loss improvement per unit of budget: minus the least-squares slope
of the loss against the fraction of the budget spent, over the last `window` of it. Both are
pure arithmetic over what the job reported; the controller folds them in `JobState`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP

#: Intervals a new segment needs before its own rate replaces the previous one.
MIN_STEPS = 3
#: Most intervals a segment's rate averages over: long enough to smooth step-time noise
#: (sync steps, evaluations), bounded so one pathological stretch ages out.
MAX_STEPS = 256
#: An unreported change: this many intervals in a row, each off the rate by this ratio.
SHIFT_STEPS = 8
SHIFT_RATIO = 0.25
#: Configuration entries that do not change throughput (set by the compute policy itself).
_NOT_THROUGHPUT = frozenset({KNOB_LR_MULTIPLIER, KNOB_STOP})


@dataclass(frozen=True)
class Rate:
    """Measured throughput of the current segment (or the previous one while it settles)."""

    tokens_per_s: float
    seconds_per_step: float
    since_step: int
    """First step of the segment the rate is measured over."""
    intervals: int
    """Step intervals it is measured over."""
    settling: bool = False
    """True while a new segment is too short and this is the previous segment's rate."""


def throughput_key(config: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """What identifies a throughput regime: the configuration less the LR multiplier and stop."""
    return tuple(sorted((k, repr(v)) for k, v in config.items() if k not in _NOT_THROUGHPUT))


class ThroughputForecast:
    """Folds (step, time, tokens, config) per record; `rate` is the current estimate."""

    def __init__(self) -> None:
        # (step, time, tokens) of the segment's points; the first is its anchor.
        self._points: deque[tuple[int, float, int]] = deque(maxlen=MAX_STEPS + 1)
        self._key: tuple[tuple[str, str], ...] | None = None
        self._previous: Rate | None = None
        self.changes: list[int] = []
        """Steps at which a new segment began (reported or detected), oldest first."""

    def add(self, step: int, time: float, tokens: int, config: Mapping[str, Any]) -> None:
        key = throughput_key(config)
        if self._key is not None and key != self._key:
            # The record carrying the new configuration is the anchor: the switch itself ran
            # inside that step, and is left out of the new rate.
            self._new_segment(step)
        self._key = key
        if self._points and time <= self._points[-1][1]:
            return  # a held clock: no interval to measure
        self._points.append((step, time, tokens))
        self._detect_shift()

    def _new_segment(self, step: int, keep: int = 0) -> None:
        rate = self._own_rate()
        if rate is not None:
            self._previous = rate
        kept = list(self._points)[-keep - 1 :] if keep else []
        self._points.clear()
        self._points.extend(kept)
        self.changes.append(kept[0][0] if kept else step)
        self.changes = self.changes[-64:]

    def _detect_shift(self) -> None:
        pts = self._points
        if len(pts) < SHIFT_STEPS + MIN_STEPS + 1:
            return
        head = list(pts)[:-SHIFT_STEPS]
        base = _rate(head)
        if base is None:
            return
        tail = list(pts)[-SHIFT_STEPS - 1 :]
        per = [(b[1] - a[1]) / max(1, b[0] - a[0]) for a, b in itertools.pairwise(tail)]
        slow = all(s > base.seconds_per_step * (1 + SHIFT_RATIO) for s in per)
        fast = all(s < base.seconds_per_step / (1 + SHIFT_RATIO) for s in per)
        if slow or fast:
            self._new_segment(tail[0][0], keep=SHIFT_STEPS)

    def _own_rate(self) -> Rate | None:
        return _rate(list(self._points))

    def rate(self) -> Rate | None:
        own = self._own_rate()
        if own is not None and own.intervals >= MIN_STEPS:
            return own
        if self._previous is not None:
            return Rate(
                self._previous.tokens_per_s,
                self._previous.seconds_per_step,
                self._previous.since_step,
                self._previous.intervals,
                settling=True,
            )
        return own


def _rate(points: Sequence[tuple[int, float, int]]) -> Rate | None:
    if len(points) < 2:
        return None
    (s0, t0, k0), (s1, t1, k1) = points[0], points[-1]
    if t1 <= t0 or s1 <= s0:
        return None
    return Rate(max(0.0, (k1 - k0) / (t1 - t0)), (t1 - t0) / (s1 - s0), s0, s1 - s0)


#: Fraction of the budget the marginal gain is fitted over when no compute policy says.
DEFAULT_GAIN_WINDOW = 0.1
#: The gain is quoted per this fraction of the budget (10%): "the loss would improve by 0.004
#: over the next tenth of the budget" reads better than a slope per whole budget.
GAIN_UNIT = 0.1


#: Validation losses needed before the gain is read from them rather than the training loss.
MIN_EVAL_POINTS = 4


def loss_curve(snapshot: Any) -> Sequence[tuple[float, float]]:
    """The curve the marginal gain is read from: validation losses once the job has reported
    `MIN_EVAL_POINTS` of them, else the smoothed training loss."""
    if len(snapshot.eval_curve) >= MIN_EVAL_POINTS:
        return snapshot.eval_curve
    return snapshot.train_curve


def current_gain(snapshot: Any, window: float = DEFAULT_GAIN_WINDOW) -> float | None:
    """Loss improvement per 10% of the budget now: on the validation curve when the job reports
    one, else on the smoothed training loss (what the compute policy's stopping rule reads)."""
    g = marginal_gain(loss_curve(snapshot), window)
    return None if g is None else g * GAIN_UNIT


def marginal_gain(
    curve: Sequence[tuple[float, float]], window: float, end: int | None = None, min_points: int = 4
) -> float | None:
    """Loss decrease per unit of budget fraction over the last `window` of it.

    `curve`: (fraction spent, loss) points in order; only `curve[:end]` is read (the gain as
    it was measured then). Minus the least-squares slope over the points within `window` of
    the last one, or over the last `min_points` when the window holds fewer (a validation loss
    reported rarely); None with fewer points than that, or no spread in fraction.
    """
    end = len(curve) if end is None else end
    if end < min_points:
        return None
    x_last = curve[end - 1][0]
    start = end - 1
    while start > 0 and curve[start - 1][0] >= x_last - window:
        start -= 1
    start = min(start, end - min_points)
    n = end - start
    xs = [curve[i][0] for i in range(start, end)]
    ys = [curve[i][1] for i in range(start, end)]
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return -slope
