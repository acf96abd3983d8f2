"""The memory policy's engine ladder (ZeRO stage, offload, precision) as a pure function of
hand-built snapshots: default ladders, step down (on the peak and on its trend), no flapping,
step up after room, multi-knob moves, the `ladder:` parameter in a policy file."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from trainwarden.controller.protocol import (
    KNOB_MICRO_BATCH,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_ZERO_STAGE,
    Action,
    KnobSpec,
    RankMemory,
)
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies.base import tunable_ranges
from trainwarden.policies.loader import PolicyFileError, load_policy_text
from trainwarden.policies.memory import (
    CPU_ZERO12_FIXED_BYTES,
    MemoryParams,
    MemoryPolicy,
    config_key,
    cpu_rss_delta,
    default_ladder,
    describe_rung,
    model_state_bytes,
    parse_ladder,
    peak_trend,
)
from trainwarden.policies.schema import Budget

MiB, GiB = 2**20, 2**30
NO_BUDGET = Budget()
DEMO_PARAMS = 28_600_000  # the DeepSpeed demo's GPT

# The ladder reads two fields the controller's Snapshot is to carry (`peak_by_config`,
# `recent_peaks`); until it does, the tests add them in a subclass, as the controller will.
_FIELDS = {f.name for f in dataclasses.fields(Snapshot)}
if {"peak_by_config", "recent_peaks"} <= _FIELDS:
    LadderSnapshot: type[Snapshot] = Snapshot
else:

    @dataclass(frozen=True)
    class LadderSnapshot(Snapshot):  # type: ignore[no-redef]
        peak_by_config: Mapping[str, int] = field(default_factory=dict)
        recent_peaks: tuple[tuple[int, int], ...] = ()


def engine_knobs(
    *,
    stages: tuple[int, ...] = (0, 1, 2, 3),
    offload: bool = True,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
    micro_batches: tuple[int, ...] = (),
) -> dict[str, KnobSpec]:
    knobs = {
        KNOB_ZERO_STAGE: KnobSpec(KNOB_ZERO_STAGE, 0, choices=stages),
        KNOB_PRECISION: KnobSpec(KNOB_PRECISION, "fp32", choices=precisions),
    }
    if offload:
        knobs[KNOB_OFFLOAD_OPTIMIZER] = KnobSpec(KNOB_OFFLOAD_OPTIMIZER, False, choices=(False, True))
        knobs[KNOB_OFFLOAD_PARAM] = KnobSpec(KNOB_OFFLOAD_PARAM, False, choices=(False, True))
    if micro_batches:
        knobs[KNOB_MICRO_BATCH] = KnobSpec(KNOB_MICRO_BATCH, micro_batches[-1], choices=micro_batches)
    return knobs


def cfg(
    stage: int, oo: bool = False, op: bool = False, precision: str = "fp32", mb: int = 1
) -> dict[str, Any]:
    return {
        KNOB_ZERO_STAGE: stage,
        KNOB_OFFLOAD_OPTIMIZER: oo,
        KNOB_OFFLOAD_PARAM: op,
        KNOB_PRECISION: precision,
        KNOB_MICRO_BATCH: mb,
        "gradient_accumulation_steps": 1,
    }


def snap(
    *,
    config: dict[str, Any] | None = None,
    peak: float = 800 * MiB,
    cap: int | None = 960 * MiB,
    device: str = "cpu",
    ranks: int = 2,
    params: int = DEMO_PARAMS,
    step: int = 100,
    knobs: dict[str, KnobSpec] | None = None,
    last_change: int | None = None,
    pending: frozenset[str] = frozenset(),
    peak_by_config: dict[str, int] | None = None,
    recent: tuple[tuple[int, int], ...] = (),
    peak_by_micro_batch: dict[int, int] | None = None,
    plain: bool = False,
) -> Snapshot:
    """A snapshot of a two-rank DeepSpeed job; `plain` builds the controller's Snapshot as it is
    today (no per-configuration peaks, no peak history)."""
    config = config if config is not None else cfg(0)
    memory = tuple(
        RankMemory(
            r, int(peak) - 10 * MiB, int(peak), 24 * GiB, device if device == "cpu" else f"cuda:{r}", 10 + r
        )
        for r in range(ranks)
    )
    kw: dict[str, Any] = dict(
        step=step,
        elapsed_s=60.0,
        loss=3.0,
        tokens=step * 128,
        samples=step * 2,
        tokens_per_second=100.0,
        step_time_s=0.9,
        memory=memory,
        memory_cap_bytes=cap,
        config=config,
        knobs=knobs if knobs is not None else engine_knobs(),
        world_size=ranks,
        global_batch_size=2,
        param_count=params,
        last_action_step={KNOB_ZERO_STAGE: last_change} if last_change is not None else {},
        pending=pending,
        peak_by_micro_batch=peak_by_micro_batch or {},
    )
    if plain:
        return Snapshot(**kw)
    return LadderSnapshot(**kw, peak_by_config=peak_by_config or {}, recent_peaks=recent)


def policy(**params: Any) -> MemoryPolicy:
    params.setdefault("high_water", 0.92)
    params.setdefault("low_water", 0.5)
    params.setdefault("cooldown_steps", 2)
    return MemoryPolicy("memory", MemoryParams(**params))


def moves(actions: list[Action]) -> list[tuple[str, Any]]:
    return [(a.kind, a.params["value"]) for a in actions]


def flat(n: int, start: int = 80, value: float = 800 * MiB) -> tuple[tuple[int, int], ...]:
    return tuple((s, int(value)) for s in range(start, start + n))


# --- default ladders -------------------------------------------------------------------------------


def rungs_of(s: Snapshot) -> list[str]:
    return [describe_rung(r) for r in default_ladder(s)]


def test_cpu_ladder_is_zero0_then_zero1_above_the_measured_break_even() -> None:
    assert rungs_of(snap()) == ["ZeRO 0", "ZeRO 1"]
    # A 7M-parameter model: ZeRO 1 was measured *above* ZeRO 0 on a CPU; no engine rung helps.
    assert rungs_of(snap(params=7_000_000)) == ["ZeRO 0"]
    # One rank: nothing is partitioned.
    assert rungs_of(snap(ranks=1)) == ["ZeRO 0"]


def test_cpu_estimate_follows_the_measurements() -> None:
    # The demo model, 2 ranks: measured 913.3 -> 847.9 MiB (fresh engines).
    delta = cpu_rss_delta(cfg(1), DEMO_PARAMS, 2)
    assert delta is not None and -70 * MiB < delta < -60 * MiB
    assert cpu_rss_delta(cfg(1), 0, 2) == CPU_ZERO12_FIXED_BYTES
    assert cpu_rss_delta(cfg(0), DEMO_PARAMS, 2) == 0.0
    for other in (cfg(3), cfg(2, oo=True), cfg(1, precision="bf16")):
        assert cpu_rss_delta(other, DEMO_PARAMS, 2) is None


def test_gpu_ladder_follows_deepspeeds_order_and_drops_rungs_that_save_nothing() -> None:
    two = snap(device="cuda", ranks=2)
    # ZeRO 3 alone (10 B/param at 2 ranks) is not leaner than ZeRO 2 + offload (6): dropped.
    assert rungs_of(two) == [
        "ZeRO 0",
        "ZeRO 1",
        "ZeRO 2",
        "ZeRO 2 + optimizer offload",
        "ZeRO 3 + optimizer offload",
        "ZeRO 3 + optimizer and parameter offload",
    ]
    one = snap(device="cuda", ranks=1)
    assert rungs_of(one) == [
        "ZeRO 0",
        "ZeRO 2 + optimizer offload",
        "ZeRO 3 + optimizer and parameter offload",
    ]
    eight = snap(device="cuda", ranks=8)
    assert "ZeRO 3" in rungs_of(eight)


def test_default_ladder_keeps_to_what_the_adapter_carries() -> None:
    no_offload = snap(device="cuda", knobs=engine_knobs(offload=False))
    assert rungs_of(no_offload) == ["ZeRO 0", "ZeRO 1", "ZeRO 2", "ZeRO 3"]
    few = snap(device="cuda", knobs=engine_knobs(stages=(0, 2), offload=False))
    assert rungs_of(few) == ["ZeRO 0", "ZeRO 2"]
    assert default_ladder(snap(knobs={KNOB_MICRO_BATCH: KnobSpec(KNOB_MICRO_BATCH, 1, choices=(1,))})) == ()


def test_model_state_bytes_is_zeros_arithmetic() -> None:
    p = 1_000_000
    assert model_state_bytes(cfg(0), p, 4) == 16 * p
    assert model_state_bytes(cfg(0, precision="bf16"), p, 4) == 16 * p
    assert model_state_bytes(cfg(1, precision="bf16"), p, 4) == (2 + 2 + 12 / 4) * p
    assert model_state_bytes(cfg(2, precision="bf16"), p, 4) == (2 + (2 + 12) / 4) * p
    assert model_state_bytes(cfg(3, precision="bf16"), p, 4) == (16 / 4) * p
    assert model_state_bytes(cfg(3, oo=True, op=True, precision="bf16"), p, 4) == (2 / 4) * p


def test_config_key_is_canonical() -> None:
    assert config_key(cfg(1, mb=4)) == (
        "micro_batch_size=4,offload_optimizer=false,offload_param=false,precision=fp32,zero_stage=1"
    )
    assert config_key({KNOB_ZERO_STAGE: 2, "lr_multiplier": 0.5}) == "zero_stage=2"


# --- stepping down -------------------------------------------------------------------------------


def test_step_down_when_the_peak_is_above_high_water() -> None:
    s = snap(peak=913 * MiB)  # high water 0.92 x 960 = 883.2 MiB
    [action] = policy().decide(s, NO_BUDGET)
    assert (action.kind, action.params) == (KNOB_ZERO_STAGE, {"value": 1})
    assert action.step == 101
    r = action.reason
    assert "memory peak 913 MiB is above the high-water mark 883 MiB (0.92 of the 960 MiB cap)" in r
    assert "rung 1 (ZeRO 0) -> rung 2 of 2 (ZeRO 1)" in r
    assert "estimated from the CPU measurements" in r and "forecast at 8" in r


def test_no_action_between_the_marks_or_without_a_cap() -> None:
    assert policy().decide(snap(peak=700 * MiB, recent=flat(10)), NO_BUDGET) == []
    assert policy().decide(snap(peak=913 * MiB, cap=None), NO_BUDGET) == []


def test_forecast_step_down_on_a_rising_peak() -> None:
    # 820 MiB now, rising 4 MiB per step: 884 MiB (over the 883 MiB mark) 16 steps ahead.
    recent = tuple((s, int((820 - 4 * (100 - s)) * MiB)) for s in range(92, 101))
    s = snap(peak=820 * MiB, recent=recent)
    [action] = policy(forecast_steps=16).decide(s, NO_BUDGET)
    assert action.params == {"value": 1}
    assert "rising 4.0 MiB per step" in action.reason and "stepping down before it does" in action.reason
    assert "crossing the high-water mark 883 MiB" in action.reason
    # Not within 8 steps; not when forecasting is off; not on a flat or falling line.
    assert policy(forecast_steps=8).decide(s, NO_BUDGET) == []
    assert policy(forecast_steps=0).decide(s, NO_BUDGET) == []
    assert policy().decide(snap(peak=820 * MiB, recent=flat(12, value=820 * MiB)), NO_BUDGET) == []
    falling = tuple((s, int((820 + 4 * (100 - s)) * MiB)) for s in range(92, 101))
    assert policy().decide(snap(peak=820 * MiB, recent=falling), NO_BUDGET) == []


def test_the_trend_uses_only_samples_since_the_last_change() -> None:
    # The jump from 600 to 820 MiB was the switch (step 95); after it the peak is flat.
    recent = tuple((s, int((600 if s <= 95 else 820) * MiB)) for s in range(85, 101))
    s = snap(peak=820 * MiB, recent=recent, last_change=95)
    assert policy().decide(s, NO_BUDGET) == []
    assert policy().decide(snap(peak=820 * MiB, recent=recent), NO_BUDGET) != [], (
        "without the change: a trend"
    )


def test_peak_trend() -> None:
    assert peak_trend([(1, 10), (2, 20), (3, 30)]) is None, "too few samples"
    slope, fitted = peak_trend([(1, 10), (2, 20), (3, 30), (4, 40)])  # type: ignore[misc]
    assert slope == pytest.approx(10.0) and fitted == pytest.approx(40.0)
    assert peak_trend([(5, 1), (5, 2), (5, 3), (5, 4)]) is None


def test_step_down_skips_rungs_seen_over_the_mark_and_those_forecast_over() -> None:
    ladder = [
        {"zero_stage": 0},
        {"zero_stage": 1},
        {"zero_stage": 2},
        {"zero_stage": 2, "offload_optimizer": True},
    ]
    # GPU, 2 ranks, 1B params: the peak is 2 GiB over the 18 GiB mark (cap 20 GiB, high water 0.9).
    # ZeRO 1 saves 2 B/param (1.86 GiB): not enough; ZeRO 2 saves 4 (3.7 GiB): fits.
    s = snap(device="cuda", params=10**9, peak=20 * GiB, cap=20 * GiB, config=cfg(0))
    [action] = policy(ladder=ladder, high_water=0.9).decide(s, NO_BUDGET)
    assert action.params == {"value": 2}
    assert "ZeRO 2 forecast at 16.3 GiB (estimated from ZeRO's model-state bytes)" in action.reason
    # ZeRO 2 was seen over the mark at this micro-batch: skipped, to ZeRO 2 + offload.
    seen = {config_key(cfg(2)): int(19 * GiB)}
    s = snap(device="cuda", params=10**9, peak=20 * GiB, cap=20 * GiB, config=cfg(0), peak_by_config=seen)
    actions = policy(ladder=ladder, high_water=0.9).decide(s, NO_BUDGET)
    assert moves(actions) == [(KNOB_ZERO_STAGE, 2), (KNOB_OFFLOAD_OPTIMIZER, True)]
    assert "ZeRO 2 skipped (seen over the mark in this run)" in actions[0].reason
    assert actions[0].reason == actions[1].reason and {a.step for a in actions} == {101}


def test_step_down_to_the_leanest_rung_when_nothing_is_forecast_to_fit() -> None:
    ladder = [{"zero_stage": 0}, {"zero_stage": 1}, {"zero_stage": 2}]
    s = snap(device="cuda", params=10**9, peak=40 * GiB, cap=20 * GiB, config=cfg(0))
    [action] = policy(ladder=ladder, high_water=0.9).decide(s, NO_BUDGET)
    assert action.params == {"value": 2}
    assert "no leaner rung is forecast under the mark: the leanest, ZeRO 2" in action.reason


def test_unmeasured_rung_without_an_estimate_is_one_step_down() -> None:
    # On a CPU nothing was measured for ZeRO 3: the next rung, and learn its footprint.
    ladder = [{"zero_stage": 1}, {"zero_stage": 3}, {"zero_stage": 3, "offload_optimizer": True}]
    [action] = policy(ladder=ladder).decide(snap(peak=913 * MiB, config=cfg(1)), NO_BUDGET)
    assert action.params == {"value": 3} and "ZeRO 3 not measured yet" in action.reason


def test_below_the_leanest_engine_rung_the_micro_batch_steps_down() -> None:
    knobs = engine_knobs(micro_batches=(1, 2, 4))
    s = snap(peak=913 * MiB, config=cfg(1, mb=4), knobs=knobs)
    [action] = policy().decide(s, NO_BUDGET)
    assert (action.kind, action.params) == (KNOB_MICRO_BATCH, {"value": 2})
    # On ZeRO 0 the engine rung goes first.
    [action] = policy().decide(snap(peak=913 * MiB, config=cfg(0, mb=4), knobs=knobs), NO_BUDGET)
    assert action.kind == KNOB_ZERO_STAGE


def test_a_small_model_on_a_cpu_has_only_the_micro_batch_ladder() -> None:
    knobs = engine_knobs(micro_batches=(1, 2, 4))
    s = snap(peak=913 * MiB, config=cfg(0, mb=4), knobs=knobs, params=3_000_000)
    [action] = policy().decide(s, NO_BUDGET)
    assert (action.kind, action.params) == (KNOB_MICRO_BATCH, {"value": 2})
    assert policy().decide(snap(peak=913 * MiB, params=3_000_000), NO_BUDGET) == []


def test_off_the_ladder_it_goes_to_the_leanest_rung() -> None:
    # The job started on ZeRO 3 on a CPU (above ZeRO 1 there): not on the CPU ladder.
    [action] = policy().decide(snap(peak=913 * MiB, config=cfg(3)), NO_BUDGET)
    assert action.params == {"value": 1}
    assert "the job's own configuration (ZeRO 3, fp32, not on the ladder) -> rung 2 of 2" in action.reason
    # With room it stays where the user put it.
    assert (
        policy().decide(snap(peak=300 * MiB, config=cfg(3), recent=flat(40, 60, 300 * MiB)), NO_BUDGET) == []
    )


# --- the moves: one action per knob, a valid order -----------------------------------------------

GPU_LADDER = [
    {"zero_stage": 1},
    {"zero_stage": 2},
    {"zero_stage": 2, "offload_optimizer": True},
    {"zero_stage": 3, "offload_optimizer": True, "offload_param": True},
]


@pytest.mark.parametrize(
    ("now", "peak_gib", "want"),
    [
        (cfg(2, oo=True), 30, [(KNOB_ZERO_STAGE, 3), (KNOB_OFFLOAD_PARAM, True)]),
        # From ZeRO 1 at 24 GiB: ZeRO 2 was seen over; ZeRO 2 + offload is forecast at 16.5 GiB.
        (cfg(1), 24, [(KNOB_ZERO_STAGE, 2), (KNOB_OFFLOAD_OPTIMIZER, True)]),
    ],
)
def test_moves_down_set_the_stage_before_the_offloads(now: dict[str, Any], peak_gib: int, want: list) -> None:
    s = snap(device="cuda", params=10**9, peak=peak_gib * GiB, cap=20 * GiB, config=now)
    seen = {config_key(cfg(2)): int(25 * GiB)}
    s = dataclasses.replace(s, peak_by_config=seen)  # type: ignore[call-arg]
    assert moves(policy(ladder=GPU_LADDER, high_water=0.9).decide(s, NO_BUDGET)) == want


def test_moves_up_turn_offloads_off_first_and_leave_implied_ones_to_the_adapter() -> None:
    room = flat(40, 60, 1 * GiB)
    up = policy(ladder=GPU_LADDER, high_water=0.9, room_steps=20)
    # ZeRO 3 + both offloads -> ZeRO 2 + optimizer offload: the stage alone (parameter offload goes
    # with it: the adapter drops it below ZeRO 3).
    s = snap(
        device="cuda", params=10**6, peak=1 * GiB, cap=20 * GiB, config=cfg(3, oo=True, op=True), recent=room
    )
    assert moves(up.decide(s, NO_BUDGET)) == [(KNOB_ZERO_STAGE, 2)]
    # ZeRO 2 + optimizer offload -> ZeRO 2: one knob.
    s = snap(device="cuda", params=10**6, peak=1 * GiB, cap=20 * GiB, config=cfg(2, oo=True), recent=room)
    assert moves(up.decide(s, NO_BUDGET)) == [(KNOB_OFFLOAD_OPTIMIZER, False)]
    # Two rungs apart in a user's ladder: offload off first (valid at the current stage), then the stage.
    ladder = [{"zero_stage": 1}, {"zero_stage": 3, "offload_optimizer": True}]
    s = snap(device="cuda", params=10**6, peak=1 * GiB, cap=20 * GiB, config=cfg(3, oo=True), recent=room)
    got = moves(policy(ladder=ladder, high_water=0.9).decide(s, NO_BUDGET))
    assert got == [(KNOB_OFFLOAD_OPTIMIZER, False), (KNOB_ZERO_STAGE, 1)]


# --- stepping up, and never flapping -------------------------------------------------------------


def test_step_up_after_room_steps_with_room() -> None:
    s = snap(peak=400 * MiB, config=cfg(1), last_change=50, recent=flat(50, 51, 400 * MiB))
    [action] = policy(room_steps=20).decide(s, NO_BUDGET)
    assert (action.kind, action.params) == (KNOB_ZERO_STAGE, {"value": 0})
    r = action.reason
    assert "every sample of the last 20 steps was below the low-water mark 480 MiB" in r
    assert "rung 2 (ZeRO 1) -> rung 1 of 2 (ZeRO 0)" in r
    assert "ZeRO 0 forecast at" in r and "estimated from the CPU measurements" in r


def test_no_step_up_before_room_steps_or_with_a_sample_above_low_water() -> None:
    s = snap(peak=400 * MiB, config=cfg(1), step=100, last_change=90, recent=flat(10, 91, 400 * MiB))
    assert policy(room_steps=20).decide(s, NO_BUDGET) == [], "10 steps since the change"
    bumpy = (*flat(30, 60, 400 * MiB), (95, 500 * MiB), *flat(5, 96, 400 * MiB))
    s = snap(peak=400 * MiB, config=cfg(1), last_change=50, recent=bumpy)
    assert policy(room_steps=20).decide(s, NO_BUDGET) == [], "one sample above the low-water mark"
    assert policy(step_up=False).decide(snap(peak=400 * MiB, config=cfg(1), recent=flat(50)), NO_BUDGET) == []


def test_never_step_up_to_a_rung_seen_over_the_mark() -> None:
    over = {config_key(cfg(0)): 913 * MiB}
    s = snap(
        peak=400 * MiB, config=cfg(1), last_change=20, recent=flat(60, 40, 400 * MiB), peak_by_config=over
    )
    assert policy(room_steps=20).decide(s, NO_BUDGET) == []
    # ... unless its forecast changed: at another micro-batch it is another footprint.
    knobs = engine_knobs(micro_batches=(1, 2))
    s = snap(
        peak=400 * MiB,
        config=cfg(1, mb=1),
        knobs=knobs,
        last_change=20,
        recent=flat(60, 40, 400 * MiB),
        peak_by_config={config_key(cfg(0, mb=2)): 913 * MiB},
        peak_by_micro_batch={1: 400 * MiB, 2: 913 * MiB},
    )
    acts = policy(room_steps=20).decide(s, NO_BUDGET)
    # The micro-batch rung is first back up, but 2 is forecast over (seen at 913): the engine rung.
    assert moves(acts) == [(KNOB_ZERO_STAGE, 0)]


def test_no_step_up_when_the_rung_above_is_forecast_over() -> None:
    # ZeRO 0 would add ~64 MiB on the CPU: 830 + 64 > 883.
    s = snap(peak=470 * MiB, config=cfg(1), last_change=20, recent=flat(60, 40, 470 * MiB), cap=560 * MiB)
    assert policy(room_steps=20, low_water=0.85, high_water=0.9).decide(s, NO_BUDGET) == []


def test_a_whole_run_does_not_flap() -> None:
    """Replay: ZeRO 0 over the mark -> ZeRO 1 fits with room; the policy never goes back."""
    p = policy(room_steps=10, low_water=0.9, high_water=0.92)  # low water close: room is easy
    config, last, seen, history = cfg(0), None, {}, []
    decisions = []
    for step in range(1, 200):
        peak = (913 if config[KNOB_ZERO_STAGE] == 0 else 830) * MiB
        seen[config_key(config)] = max(seen.get(config_key(config), 0), peak)
        history.append((step, peak))
        s = snap(
            peak=peak,
            config=dict(config),
            step=step,
            last_change=last,
            peak_by_config=dict(seen),
            recent=tuple(history),
        )
        for a in p.decide(s, NO_BUDGET):
            decisions.append((step, a.kind, a.params["value"]))
            config[a.kind] = a.params["value"]
            last = step
    assert decisions == [(1, KNOB_ZERO_STAGE, 1)]


def test_without_per_configuration_peaks_it_still_never_flaps() -> None:
    """An older controller's Snapshot: step down on the peak; step up refused once anything at this
    micro-batch was over the mark (the run-wide record)."""
    s = snap(peak=913 * MiB, plain=True)
    assert moves(policy().decide(s, NO_BUDGET)) == [(KNOB_ZERO_STAGE, 1)]
    was_over = snap(
        peak=400 * MiB, config=cfg(1), last_change=20, plain=True, peak_by_micro_batch={1: 913 * MiB}
    )
    assert policy(room_steps=20).decide(was_over, NO_BUDGET) == []
    never = snap(
        peak=400 * MiB, config=cfg(1), last_change=20, plain=True, peak_by_micro_batch={1: 400 * MiB}
    )
    assert moves(policy(room_steps=20).decide(never, NO_BUDGET)) == [(KNOB_ZERO_STAGE, 0)]


# --- when it does nothing -------------------------------------------------------------------------


def test_waits_for_pending_actions_cooldown_and_a_sample_after_the_change() -> None:
    over = dict(peak=913 * MiB)
    assert policy().decide(snap(**over, pending=frozenset({KNOB_OFFLOAD_OPTIMIZER})), NO_BUDGET) == []
    assert policy(cooldown_steps=5).decide(snap(**over, step=100, last_change=97), NO_BUDGET) == []
    assert policy(cooldown_steps=0).decide(snap(**over, step=100, last_change=100), NO_BUDGET) == []
    assert policy(cooldown_steps=0).decide(snap(**over, step=101, last_change=100), NO_BUDGET) != []


def test_the_ladder_policy_is_pure() -> None:
    s = snap(peak=913 * MiB, recent=flat(10))
    a, b = policy().decide(s, NO_BUDGET), policy().decide(s, NO_BUDGET)
    assert [(x.kind, x.params, x.reason, x.step) for x in a] == [
        (x.kind, x.params, x.reason, x.step) for x in b
    ]


# --- the `ladder:` parameter ---------------------------------------------------------------------

HEAD = "version: 1\nbudget:\n  device_memory: 1GiB\npolicies:\n  - kind: memory\n"


def load(ladder_yaml: str) -> Any:
    return load_policy_text(HEAD + ladder_yaml, "p.yaml").policies[0].params


def test_a_ladder_in_the_policy_file() -> None:
    params = load(
        "    ladder:\n"
        "      - {zero_stage: 0}\n"
        "      - {zero_stage: 2}\n"
        "      - {zero_stage: 2, offload_optimizer: true}\n"
        "      - zero_stage: 3\n"
        "        offload_optimizer: true\n"
        "        offload_param: true\n"
    )
    assert params.rungs() == (
        ((KNOB_OFFLOAD_OPTIMIZER, False), (KNOB_OFFLOAD_PARAM, False), (KNOB_ZERO_STAGE, 0)),
        ((KNOB_OFFLOAD_OPTIMIZER, False), (KNOB_OFFLOAD_PARAM, False), (KNOB_ZERO_STAGE, 2)),
        ((KNOB_OFFLOAD_OPTIMIZER, True), (KNOB_OFFLOAD_PARAM, False), (KNOB_ZERO_STAGE, 2)),
        ((KNOB_OFFLOAD_OPTIMIZER, True), (KNOB_OFFLOAD_PARAM, True), (KNOB_ZERO_STAGE, 3)),
    )
    assert load("    ladder: []\n").rungs() == ()
    prec = load(
        "    ladder:\n      - {zero_stage: 1, precision: fp32}\n      - {zero_stage: 1, precision: bf16}\n"
    )
    assert [describe_rung(r) for r in prec.rungs()] == ["ZeRO 1, fp32", "ZeRO 1, bf16"]


@pytest.mark.parametrize(
    ("ladder_yaml", "message"),
    [
        (
            "[{zero_stage: 0}, {zero_stag: 1}]",
            "ladder[1]: unknown knob 'zero_stag'; did you mean 'zero_stage'?",
        ),
        ("[{zero_stage: 0}, {zero_stage: 4}]", "ladder[1]: zero_stage must be one of 0, 1, 2, 3, got 4"),
        (
            "[{zero_stage: 0}, {zero_stage: true}]",
            "ladder[1]: zero_stage must be one of 0, 1, 2, 3, got True",
        ),
        ("[{zero_stage: 0}, {zero_stage: '1'}]", "zero_stage must be one of 0, 1, 2, 3, got '1'"),
        ("[{zero_stage: 0}, {zero_stage: 2, offload_param: true}]", "offload_param needs zero_stage 3"),
        (
            "[{zero_stage: 0, offload_optimizer: true}, {zero_stage: 1}]",
            "offload_optimizer needs zero_stage 1, 2 or 3",
        ),
        (
            "[{zero_stage: 0}, {zero_stage: 1, offload_optimizer: yes}]",
            "offload_optimizer must be true or false",
        ),
        (
            "[{zero_stage: 0}, {offload_optimizer: true}]",
            "ladder[1] does not say zero_stage; every rung must",
        ),
        ("[{zero_stage: 1, precision: fp8}, {zero_stage: 1}]", "precision must be one of fp32, bf16, fp16"),
        (
            "[{zero_stage: 0}, {zero_stage: 0, offload_optimizer: false}]",
            "ladder[1] repeats ladder[0] (ZeRO 0)",
        ),
        ("[{zero_stage: 0}]", "ladder needs at least two rungs"),
        ("[{zero_stage: 0}, 2]", "ladder[1] must be a mapping of `key: value` lines, got the whole number 2"),
        ("[{zero_stage: 0}, {}]", "ladder[1] is empty"),
    ],
)
def test_ladder_errors_name_the_file_line_and_fix(ladder_yaml: str, message: str) -> None:
    with pytest.raises(PolicyFileError) as e:
        load(f"    ladder: {ladder_yaml}\n")
    text = str(e.value)
    assert "p.yaml:5: policies[0]" in text or "p.yaml:6: policies[0]" in text, text
    assert message in text, text


def test_parse_ladder_never_raises_on_junk() -> None:
    for junk in ("zero_stage=1", 3, {"zero_stage": 1}, [None, [1]], [{"zero_stage": float("nan")}, {1: 2}]):
        rungs, problems = parse_ladder(junk)
        assert rungs == () and problems


def test_a_ladder_rung_the_adapter_cannot_carry_is_left_out() -> None:
    ladder = [
        {"zero_stage": 0, "precision": "fp32"},
        {"zero_stage": 0, "precision": "fp16"},
        {"zero_stage": 1, "precision": "fp32"},
    ]
    # This adapter has no fp16: the ladder is ZeRO 0 -> ZeRO 1.
    [action] = policy(ladder=ladder).decide(snap(peak=913 * MiB), NO_BUDGET)
    assert (action.kind, action.params) == (KNOB_ZERO_STAGE, {"value": 1})
    assert "-> rung 2 of 2" in action.reason


def test_tunable_ranges_are_declared_for_the_ladder_parameters() -> None:
    ranges = tunable_ranges(MemoryParams)
    fields = {f.name: f for f in dataclasses.fields(MemoryParams)}
    for name in ("forecast_steps", "room_steps"):
        assert name in ranges
        valid = fields[name].metadata["valid"]
        assert valid.contains(ranges[name].low) and valid.contains(ranges[name].high)
        assert valid.contains(fields[name].default)
    assert "ladder" not in ranges  # a structure, not a number: chosen by hand


def test_the_deepspeed_demo_policy_file_loads() -> None:
    from importlib import resources

    path = resources.files("trainwarden.policies") / "examples" / "deepspeed_demo.yaml"
    pf = load_policy_text(path.read_text(), str(path))
    [memory] = [s for s in pf.policies if s.kind == "memory"]
    assert memory.params.rungs() == ()  # the default ladder: derived from the job
    assert pf.budget.device_memory is not None and pf.budget.device_memory.bytes


def test_activation_checkpointing_as_a_rung_of_a_files_ladder() -> None:
    params = load(
        "    ladder:\n"
        "      - {zero_stage: 1}\n"
        "      - {zero_stage: 1, activation_checkpointing: true}\n"
        "      - {zero_stage: 2, activation_checkpointing: true}\n"
    )
    rungs = params.rungs()
    assert [describe_rung(r) for r in rungs] == [
        "ZeRO 1",
        "ZeRO 1 + activation checkpointing",
        "ZeRO 2 + activation checkpointing",
    ]
    knobs = engine_knobs()
    knobs["activation_checkpointing"] = KnobSpec("activation_checkpointing", False, choices=(False, True))
    config = {**cfg(1), "activation_checkpointing": False}
    s = snap(device="cuda", params=10**9, peak=20 * GiB, cap=20 * GiB, config=config, knobs=knobs)
    # Its saving is activation memory, which is not estimated: one rung down, and learn.
    [action] = MemoryPolicy("memory", params).decide(s, NO_BUDGET)
    assert (action.kind, action.params) == ("activation_checkpointing", {"value": True})
    assert "ZeRO 1 + activation checkpointing not measured yet" in action.reason
    # Without the knob (a model that cannot switch it) those rungs are left out.
    s = snap(device="cuda", params=10**9, peak=20 * GiB, cap=20 * GiB, config=cfg(1))
    assert MemoryPolicy("memory", params).decide(s, NO_BUDGET) == []


def test_the_first_step_is_not_read_as_growth() -> None:
    # Step 1 runs before Adam's state exists: its peak is lower, then the peak is flat. A line from it
    # would forecast a crossing (700 -> 820 MiB over one step, 16 steps ahead: far over 883 MiB).
    recent = ((1, 700 * MiB), *((s, 820 * MiB) for s in range(2, 9)))
    assert policy().decide(snap(peak=820 * MiB, step=8, recent=recent), NO_BUDGET) == []
    # The same rise later in the run is a trend.
    later = ((11, 700 * MiB), *((s, 820 * MiB) for s in range(12, 19)))
    assert policy().decide(snap(peak=820 * MiB, step=18, recent=later), NO_BUDGET) != []


def test_a_files_ladder_runs_without_deepspeeds_knobs() -> None:
    """An Accelerate job reports precision and the micro-batch, no ZeRO stage: a file's precision
    ladder steps it down (the default ladder needs DeepSpeed's knobs and stays empty)."""
    knobs = {
        KNOB_PRECISION: KnobSpec(KNOB_PRECISION, "fp32", choices=("fp32", "bf16")),
        KNOB_MICRO_BATCH: KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8)),
    }
    config = {KNOB_PRECISION: "fp32", KNOB_MICRO_BATCH: 8, "gradient_accumulation_steps": 1}
    s = snap(peak=913 * MiB, config=config, knobs=knobs, ranks=1)
    assert default_ladder(s) == ()
    p = policy(ladder=({KNOB_PRECISION: "fp32"}, {KNOB_PRECISION: "bf16"}))
    assert moves(p.decide(s, NO_BUDGET)) == [(KNOB_PRECISION, "bf16")]
    # Without a file's ladder the micro-batch is the whole ladder, as before.
    assert moves(policy().decide(s, NO_BUDGET)) == [(KNOB_MICRO_BATCH, 4)]


def test_down_never_moves_to_a_rung_forecast_no_leaner_than_now() -> None:
    # A 62k-parameter model on two CPU ranks with a hand-written ladder: ZeRO 1 is forecast above
    # the peak now (its fixed cost on a CPU outweighs what it partitions): the micro-batch steps
    # down instead, and with no micro-batch knob nothing moves.
    knobs = engine_knobs(micro_batches=(1, 2, 4))
    ladder = [{"zero_stage": 0}, {"zero_stage": 1}]
    s = snap(peak=913 * MiB, config=cfg(0, mb=4), knobs=knobs, params=62_000)
    [action] = policy(ladder=ladder).decide(s, NO_BUDGET)
    assert (action.kind, action.params) == (KNOB_MICRO_BATCH, {"value": 2})
    assert policy(ladder=ladder).decide(snap(peak=913 * MiB, params=62_000), NO_BUDGET) == []


def test_a_small_model_on_a_gpu_still_gets_zero_rungs() -> None:
    s = snap(device="cuda", params=62_000, peak=20 * GiB, cap=20 * GiB)
    assert len(rungs_of(s)) > 1
