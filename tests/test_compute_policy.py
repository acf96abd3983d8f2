"""The compute policy's timing (lead, stop scheduled ahead) and its stopping rule, on snapshots."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, KnobSpec
from trainwarden.controller.snapshot import BudgetUse, Snapshot
from trainwarden.policies.compute import (
    CAUSE_BUDGET,
    CAUSE_GAIN,
    ComputeParams,
    ComputePolicy,
    cooldown_multiplier,
    plan,
    stopping_point,
)
from trainwarden.policies.schema import Budget

KNOBS = {
    KNOB_LR_MULTIPLIER: KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=10.0),
    KNOB_STOP: KnobSpec(KNOB_STOP, False, choices=(True,)),
}


def snap(spent: float, limit: float = 100.0, **kw: Any) -> Snapshot:
    """Step 50 of a job with a wall-time budget, steps of 1 s, LR multiplier 1."""
    base = Snapshot(
        step=50,
        elapsed_s=spent,
        loss=2.0,
        tokens=0,
        samples=0,
        tokens_per_second=None,
        step_time_s=1.0,
        memory=(),
        memory_cap_bytes=None,
        config={KNOB_LR_MULTIPLIER: 1.0, KNOB_STOP: False},
        knobs=KNOBS,
        budgets=(BudgetUse("wall_time", "seconds", spent, limit, 1.0),),
        seconds_per_step=1.0,
        sync_every=1,
    )
    return dataclasses.replace(base, **kw)


def decide(s: Snapshot, **params: Any) -> dict[str, Any]:
    actions = ComputePolicy("compute", ComputeParams(**params)).decide(s, Budget())
    return {a.kind: a for a in actions}


def test_the_multiplier_is_the_one_for_where_the_run_will_be_when_it_applies() -> None:
    # 90 s of 100 spent, steps of 1 s, actions apply 4 steps after the decision: the multiplier
    # is the one for 94%.
    a = decide(snap(90.0, action_lag_steps=4))[KNOB_LR_MULTIPLIER]
    assert a.params["value"] == pytest.approx(0.3)
    assert "in 4 step(s)" in a.reason
    # Without a measured lag, the sync cadence is the lead.
    a = decide(snap(90.0, sync_every=2))[KNOB_LR_MULTIPLIER]
    assert a.params["value"] == pytest.approx(0.4)


def test_the_multiplier_ramps_to_where_the_next_action_will_find_the_schedule() -> None:
    # 85% spent, lead 4: value for 89%; the next action is ~6 steps (lead + 1 s) later, at 95%.
    a = decide(snap(85.0, action_lag_steps=4))[KNOB_LR_MULTIPLIER]
    assert a.params == {"value": pytest.approx(0.55), "to": pytest.approx(0.25), "over_steps": 6}
    # The floor ends the ramp: no ramp to hold it there.
    a = decide(snap(99.0, action_lag_steps=4, config={KNOB_LR_MULTIPLIER: 0.1, KNOB_STOP: False}))
    assert a[KNOB_LR_MULTIPLIER].params == {"value": 0.0}


def test_the_stop_is_sent_ahead_for_the_step_nearest_the_end() -> None:
    # Lead 4 steps + 1 s of decisions: the stop goes out when the end is within 6 steps.
    assert KNOB_STOP not in decide(snap(93.0, action_lag_steps=4))
    stop = decide(snap(94.6, action_lag_steps=4))[KNOB_STOP]
    # 5.4 steps left: step 55 ends 0.4 s before the end, step 56 0.6 s after: stop after 55.
    assert stop.step == 56 and stop.params == {"cause": CAUSE_BUDGET}
    assert "stopping after step 55" in stop.reason


def test_a_wall_time_stop_carries_the_time_the_job_places_it_by() -> None:
    # The job's clock read 5000.0 at the end of step 50, 94.6 s of 100 spent: the end is at 5005.4.
    stop = decide(snap(94.6, action_lag_steps=4, time=5000.0))[KNOB_STOP]
    assert stop.params == {"cause": CAUSE_BUDGET, "at_time": pytest.approx(5005.4)}
    assert "the job places it" in stop.reason
    # A token budget has no time: it is spent by whole steps.
    tokens = BudgetUse("tokens", "tokens", 99_000.0, 100_000.0, 1000.0)
    stop = decide(snap(0.0, budgets=(tokens,), time=5000.0, action_lag_steps=4))[KNOB_STOP]
    assert "at_time" not in stop.params


def test_a_token_budget_stops_after_the_step_that_spends_it() -> None:
    # 1000 tokens a step, 10 steps left: the stop is for after step 60, however fast the steps.
    tokens = BudgetUse("tokens", "tokens", 90_000.0, 100_000.0, 50_000.0)
    s = snap(0.0, budgets=(tokens,), seconds_per_step=0.02, action_lag_steps=20)
    stop = decide(s)[KNOB_STOP]
    assert stop.step == 61


def test_a_token_budget_whose_steps_all_spend_alike_is_stopped_at_once_for_its_last_step() -> None:
    # Step 10 of 1000 steps of 1000 tokens, measured at the same rate: the stop goes out now, for
    # after step 1000, so a job faster than the controller's exchanges cannot overshoot it.
    tokens = BudgetUse("tokens", "tokens", 10_000.0, 1_000_000.0, 50_000.0)
    s = snap(0.0, step=10, budgets=(tokens,), seconds_per_step=0.02, action_lag_steps=2)
    assert decide(s)[KNOB_STOP].step == 1001
    # Steps that spent unlike shares so far (a measured rate 10% off): a forecast, sent only when near.
    s = snap(0.0, step=10, budgets=(tokens,), seconds_per_step=0.022, action_lag_steps=2)
    assert KNOB_STOP not in decide(s)
    # A clock budget is always a forecast.
    assert KNOB_STOP not in decide(snap(10.0, step=10))


def test_the_ramp_ends_at_the_budgets_end_when_that_comes_first() -> None:
    # 1000 tokens a step, 97 steps of 100 spent, steps of 20 ms: a second of decisions is 50 steps
    # ahead, but the cooldown ends in 3: the ramp reaches the floor in 3 steps, not 50.
    tokens = BudgetUse("tokens", "tokens", 97_000.0, 100_000.0, 50_000.0)
    s = snap(0.0, budgets=(tokens,), seconds_per_step=0.02, action_lag_steps=1)
    a = decide(s, cooldown_fraction=0.5)[KNOB_LR_MULTIPLIER]
    assert a.params["to"] == 0.0 and a.params["over_steps"] == 2


def plateau_curve(flat_from: float, until: float, drop: float = 2.0) -> tuple[tuple[float, float], ...]:
    """A loss falling linearly by `drop` per whole budget, flat from `flat_from` on."""
    xs = [i * 0.002 for i in range(int(until / 0.002) + 1)]
    return tuple((x, 3.0 - drop * min(x, flat_from)) for x in xs)


def test_the_stopping_rule_fires_where_the_gain_falls_below_the_threshold() -> None:
    p = ComputeParams(min_gain=0.01, gain_window=0.1, gain_after=0.25, cooldown_fraction=0.2)
    s = snap(50.0, train_curve=plateau_curve(0.3, 0.5))
    at, gain = stopping_point(s, p)  # type: ignore[misc]
    # The window (0.1) is all flat once it starts past 0.3: the gain is under 0.01 a little before.
    assert 0.35 < at <= 0.4 and gain < 0.01
    pl = plan(s, p)
    assert pl.cause == CAUSE_GAIN and pl.start == at and pl.end == pytest.approx(at / 0.8)
    assert "training loss improved" in pl.why


def test_no_stopping_rule_while_the_loss_still_pays_or_when_it_is_off() -> None:
    p = ComputeParams(min_gain=0.01)
    assert stopping_point(snap(50.0, train_curve=plateau_curve(0.9, 0.5)), p) is None
    assert stopping_point(snap(50.0, train_curve=plateau_curve(0.3, 0.5)), ComputeParams()) is None
    # Flat only in warmup (before gain_after): not judged there.
    early = tuple((x, 2.0) for x, _ in plateau_curve(0.0, 0.2))
    assert stopping_point(snap(20.0, train_curve=early), p) is None


def test_the_validation_curve_is_preferred_once_there_are_four_points() -> None:
    p = ComputeParams(min_gain=0.01)
    falling = plateau_curve(0.9, 0.5)  # training loss still falls
    flat_eval = tuple((x, 1.5) for x in (0.1, 0.2, 0.3, 0.4, 0.5))
    assert stopping_point(snap(50.0, train_curve=falling, eval_curve=flat_eval[:3]), p) is None
    at, _ = stopping_point(snap(50.0, train_curve=falling, eval_curve=flat_eval), p)  # type: ignore[misc]
    assert at == 0.4  # the first point with 4 in its window
    assert "validation loss" in plan(snap(50.0, eval_curve=flat_eval), p).why


def test_the_early_end_cools_down_then_stops_with_its_cause() -> None:
    p = dict(min_gain=0.01, cooldown_fraction=0.2, cooldown_shape="linear")
    curve = plateau_curve(0.3, 0.45)
    pl = plan(snap(45.0, train_curve=curve), ComputeParams(**p))
    mid = (pl.start + pl.end) / 2
    # Halfway through the early cooldown (no lead: no step time), the multiplier is 0.5.
    s = snap(mid * 100, train_curve=curve, step_time_s=None, seconds_per_step=None)
    a = decide(s, **p)[KNOB_LR_MULTIPLIER]
    assert a.params["value"] == pytest.approx(0.5, abs=0.01)
    assert "stopping rule" in a.reason
    s = snap(pl.end * 100 + 0.01, train_curve=curve, step_time_s=None, seconds_per_step=None)
    stop = decide(s, **p)[KNOB_STOP]
    assert stop.params == {"cause": CAUSE_GAIN} and "stopping rule" in stop.reason


def test_cooldown_between_explicit_ends() -> None:
    p = ComputeParams(cooldown_shape="1-sqrt")
    assert cooldown_multiplier(0.3, p, start=0.4, end=0.5) == 1.0
    assert cooldown_multiplier(0.45, p, start=0.4, end=0.5) == pytest.approx(1 - math.sqrt(0.5))
    assert cooldown_multiplier(0.5, p, start=0.4, end=0.5) == 0.0
