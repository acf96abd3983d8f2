"""The throughput forecast and the marginal gain (controller/forecast.py), fed step by step."""

from __future__ import annotations

import pytest

from trainwarden.controller.forecast import (
    MIN_STEPS,
    SHIFT_STEPS,
    ThroughputForecast,
    marginal_gain,
    throughput_key,
)
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP

TOKENS_PER_STEP = 4096


def feed(f: ThroughputForecast, steps: range, seconds: float, t0: float, config: dict) -> float:
    """Steps of `seconds` each from time t0; returns the time after the last."""
    t = t0
    for s in steps:
        t += seconds
        f.add(s, t, s * TOKENS_PER_STEP, config)
    return t


def test_the_rate_is_the_segments_own() -> None:
    f = ThroughputForecast()
    feed(f, range(1, 41), 0.1, 0.0, {"zero_stage": 0})
    r = f.rate()
    assert r is not None and not r.settling
    assert r.seconds_per_step == pytest.approx(0.1)
    assert r.tokens_per_s == pytest.approx(TOKENS_PER_STEP / 0.1)
    assert r.since_step == 1


def test_a_reported_switch_starts_a_new_segment_and_the_switch_step_is_left_out() -> None:
    f = ThroughputForecast()
    t = feed(f, range(1, 101), 0.1, 0.0, {"zero_stage": 0})
    # Step 101 carries the switch itself (3 s of engine rebuild), then 0.3 s per step.
    t += 3.0 + 0.3
    f.add(101, t, 101 * TOKENS_PER_STEP, {"zero_stage": 1})
    r = f.rate()
    assert r is not None and r.settling and r.seconds_per_step == pytest.approx(0.1)  # the old one stands
    feed(f, range(102, 102 + MIN_STEPS), 0.3, t, {"zero_stage": 1})
    r = f.rate()
    assert r is not None and not r.settling
    # Exactly the new rate after MIN_STEPS steps: a 20-step window would still mix in 0.1 s steps
    # and the rebuild.
    assert r.seconds_per_step == pytest.approx(0.3)
    assert r.since_step == 101 and f.changes == [101]


def test_the_lr_multiplier_and_stop_are_not_a_throughput_change() -> None:
    a = {"micro_batch_size": 8, KNOB_LR_MULTIPLIER: 1.0, KNOB_STOP: False}
    b = {"micro_batch_size": 8, KNOB_LR_MULTIPLIER: 0.3, KNOB_STOP: True}
    assert throughput_key(a) == throughput_key(b)
    assert throughput_key(a) != throughput_key({**a, "micro_batch_size": 4})


def test_an_unreported_shift_is_detected_after_a_run_of_slow_steps() -> None:
    f = ThroughputForecast()
    t = feed(f, range(1, 61), 0.1, 0.0, {})
    # Another job starts on the machine: every step now takes twice as long.
    t = feed(f, range(61, 61 + SHIFT_STEPS), 0.2, t, {})
    r = f.rate()
    assert r is not None and r.seconds_per_step == pytest.approx(0.2)
    assert f.changes == [60]
    feed(f, range(61 + SHIFT_STEPS, 100), 0.2, t, {})
    assert f.rate().seconds_per_step == pytest.approx(0.2)  # type: ignore[union-attr]


def test_single_slow_steps_are_not_a_shift() -> None:
    f = ThroughputForecast()
    t = 0.0
    for s in range(1, 201):
        t += 1.0 if s % 50 == 0 else 0.1  # an evaluation every 50 steps
        f.add(s, t, s * TOKENS_PER_STEP, {})
    assert f.changes == []
    assert f.rate().seconds_per_step == pytest.approx((t - 0.1) / 199)  # type: ignore[union-attr]


def test_a_held_clock_adds_no_interval() -> None:
    f = ThroughputForecast()
    f.add(1, 1.0, 10, {})
    f.add(2, 1.0, 20, {})
    assert f.rate() is None


def test_marginal_gain_is_minus_the_slope_over_the_window() -> None:
    # loss = 3 - 2x: a gain of 2 per whole budget, wherever the window sits.
    curve = [(x / 100, 3 - 2 * x / 100) for x in range(50)]
    assert marginal_gain(curve, 0.1) == pytest.approx(2.0)
    assert marginal_gain(curve, 0.1, end=20) == pytest.approx(2.0)
    flat = [(x / 100, 1.0) for x in range(50)]
    assert marginal_gain(flat, 0.1) == pytest.approx(0.0)


def test_marginal_gain_reads_only_the_window() -> None:
    # Steep early, flat from x = 0.3: over the last 0.1 the gain is zero.
    curve = [(x / 100, max(1.0, 4 - 10 * x / 100)) for x in range(60)]
    assert marginal_gain(curve, 0.1) == pytest.approx(0.0)
    assert marginal_gain(curve, 0.5) > 0


def test_marginal_gain_takes_the_last_points_when_the_window_holds_too_few() -> None:
    # Validation every 0.2 of the budget: the 0.1 window holds one point, the last 4 are used.
    curve = [(0.2, 2.0), (0.4, 1.8), (0.6, 1.6), (0.8, 1.4)]
    assert marginal_gain(curve, 0.1) == pytest.approx(1.0)
    assert marginal_gain(curve[:3], 0.1) is None
    assert marginal_gain([(0.5, 1.0)] * 4, 0.1) is None  # no spread in fraction
