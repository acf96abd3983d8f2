"""The replay: recorded runs of the demo job driven through the real controller and policies.

The traces under tests/traces/ are two real `trainwarden run`s of examples/train_gpt.py (seeds 0
and 1, one torch thread, under tests/traces/recorded_with.yaml: a 600 MiB cap and a 25 s budget).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from trainwarden.controller.protocol import KNOB_MICRO_BATCH
from trainwarden.policies.loader import load_policy_file
from trainwarden.policies.tuning.replay.model import LossCurve, fit_model
from trainwarden.policies.tuning.replay.simulate import replay
from trainwarden.policies.tuning.replay.trace import TraceError, load_trace
from trainwarden.policies.tuning.space import with_params

TRACES = Path(__file__).parent / "traces"
RECORDED_WITH = TRACES / "recorded_with.yaml"
TRACE_DIRS = sorted(TRACES.glob("demo-*"))


@pytest.fixture(scope="module")
def traces():  # type: ignore[no-untyped-def]
    return [load_trace(p) for p in TRACE_DIRS]


@pytest.fixture(scope="module")
def model(traces):  # type: ignore[no-untyped-def]
    return fit_model(traces)


def test_there_are_real_traces_to_replay(traces) -> None:  # type: ignore[no-untyped-def]
    assert len(traces) >= 2
    for t in traces:
        assert t.shape.adapter == "pytorch" and t.stopped_by_policy
        assert len({s.config[KNOB_MICRO_BATCH] for s in t.steps}) >= 2, "the memory fit needs switches"


def test_replay_is_deterministic_for_a_trace_and_parameters(traces, model) -> None:  # type: ignore[no-untyped-def]
    pf = load_policy_file(RECORDED_WITH)
    for t in traces:
        first = replay(pf, t, model)
        again = replay(pf, t, fit_model([load_trace(p) for p in TRACE_DIRS]))
        assert first == again
    # ... and the parameters matter: a lower high-water mark steps further down.
    low = with_params(pf, {"memory.high_water": 0.7, "memory.low_water": 0.3})
    assert replay(low, traces[0], model).actions != replay(pf, traces[0], model).actions


def test_replay_of_the_recording_policy_decides_as_the_live_run_did(traces, model) -> None:  # type: ignore[no-untyped-def]
    """The same policy on the replayed job makes the same micro-batch switches at the same steps
    and cools down and stops within a step of where the live controller did."""
    pf = load_policy_file(RECORDED_WITH)
    for t in traces:
        result = replay(pf, t, model)
        live = [
            (d["step"], d["kind"], d["params"].get("value")) for d in t.decisions if d["outcome"] == "applied"
        ]
        mb = [a for a in live if a[1] == KNOB_MICRO_BATCH]
        assert [a for a in result.actions if a[1] == KNOB_MICRO_BATCH] == mb
        # The compute policy reads step times, which the replay reproduces to within noise: its
        # cooldown starts and its stop land within a step of the live ones.
        assert result.stopped and abs(result.steps - t.last_step) <= 1
        live_lr = [s for s, k, _ in live if k == "lr_multiplier"]
        replay_lr = [s for s, k, _ in result.actions if k == "lr_multiplier"]
        assert replay_lr and abs(replay_lr[0] - live_lr[0]) <= 1


def test_the_model_fits_what_was_recorded(traces, model) -> None:  # type: ignore[no-untyped-def]
    """Memory and step time at each recorded micro-batch within 15% of the recorded medians; the
    replayed run's smoothed loss within 10% of the live summary's."""
    by_mb: dict[int, list[int]] = {}
    for t in traces:
        for s in t.steps[1:]:
            if s.memory:
                by_mb.setdefault(s.config[KNOB_MICRO_BATCH], []).append(s.memory[0].peak_bytes)
    for mb, peaks in by_mb.items():
        fit, known = model.peak_bytes({KNOB_MICRO_BATCH: mb}, 128)
        assert known and abs(fit / statistics.median(peaks) - 1) < 0.15, (mb, fit, peaks)
    pf = load_policy_file(RECORDED_WITH)
    for t in traces:
        live = json.loads((Path(t.path) / "summary.json").read_text())
        result = replay(pf, t, model)
        assert abs(result.final_loss / live["loss"] - 1) < 0.10
        # The law's value at the end (no EMA lag) against the last recorded steps' losses.
        last = statistics.mean(s.loss for s in t.steps[-3:])
        assert abs(result.eval_loss / last - 1) < 0.10


def test_a_cooldown_lowers_the_predicted_loss(model) -> None:  # type: ignore[no-untyped-def]
    """The fitted law gives annealing its due (C > 0 on traces with a cooldown): the same LR area
    spent with a decay at the end ends lower than with the LR held."""
    assert model.loss.c > 0
    held, annealed = LossCurve(model.loss), LossCurve(model.loss)
    lr = model.loss.lr_ref
    for i in range(20):
        a = held.next(lr)
        b = annealed.next(lr if i < 15 else lr * (19 - i) / 4)
    assert b < a


def test_a_run_without_telemetry_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"no telemetry\.jsonl; give the run directory"):
        load_trace(tmp_path)
    short = tmp_path / "short"
    short.mkdir()
    lines = (TRACE_DIRS[0] / "telemetry.jsonl").read_text().splitlines()[:3]
    (short / "telemetry.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match="record a longer run"):
        load_trace(short)


def test_a_smaller_cap_is_replayed_against_the_new_cap(traces, model) -> None:  # type: ignore[no-untyped-def]
    pf = load_policy_file(RECORDED_WITH)
    from trainwarden.policies.schema import MemoryCap

    tight = dataclasses.replace(
        pf, budget=dataclasses.replace(pf.budget, device_memory=MemoryCap(bytes=450 << 20))
    )
    loose, small = replay(pf, traces[0], model), replay(tight, traces[0], model)
    assert small.cap_bytes == 450 << 20
    assert min(a[2] for a in small.actions if a[1] == KNOB_MICRO_BATCH) <= min(
        a[2] for a in loose.actions if a[1] == KNOB_MICRO_BATCH
    )
    assert small.cap_violations > loose.cap_violations
