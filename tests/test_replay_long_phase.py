"""A job whose memory grows mid-run: a long-context phase, counted by the job and replayed.

The demo's script (examples/train_gpt.py) trains on short windows, then on longer ones from
`--long-from` on; the job counts each step's tokens at the length it ran, and the replay charges
each replayed step the memory and time of the recording's length at that step. The traces under
tests/traces/long-phase-* are two real `trainwarden run`s of that job (64-byte windows, then
256-byte windows from step 12; one torch thread) recorded by bench/tune_replay.py --long-phase
under tests/traces/recorded_with_long_phase.yaml's policy at 600 and 440 MiB caps.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest
from helpers import TRAINWARDEN, job_env, tiny_job

from trainwarden.controller.protocol import KNOB_MICRO_BATCH
from trainwarden.policies.loader import load_policy_file
from trainwarden.policies.schema import MemoryCap
from trainwarden.policies.tuning.replay.model import fit_model
from trainwarden.policies.tuning.replay.simulate import replay
from trainwarden.policies.tuning.replay.trace import load_trace
from trainwarden.policies.tuning.space import with_params

TRACES = Path(__file__).parent / "traces"
RECORDED_WITH = TRACES / "recorded_with_long_phase.yaml"
TRACE_DIRS = sorted(TRACES.glob("long-phase-*"))
LONG_FROM = 12


@pytest.fixture(scope="module")
def traces():  # type: ignore[no-untyped-def]
    return [load_trace(p) for p in TRACE_DIRS]


@pytest.fixture(scope="module")
def model(traces):  # type: ignore[no-untyped-def]
    return fit_model(traces)


def with_cap(pf, mib: int):  # type: ignore[no-untyped-def]
    return dataclasses.replace(
        pf, budget=dataclasses.replace(pf.budget, device_memory=MemoryCap(bytes=mib << 20))
    )


def test_the_job_counts_each_step_at_its_own_length(tmp_path: Path) -> None:
    """32-byte windows for three steps, then 64-byte ones: the running token count follows, and
    the trace reads each step's length back from it."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nbudget:\n  device_memory: 64GiB\n  tokens: 1M\ncontroller:\n  sync_every: 1\n"
        "policies:\n  - kind: memory\n"
    )
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            *TRAINWARDEN,
            *("run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet", "--"),
            *tiny_job(6),
            *("--long-block-size", "64", "--long-from", "4"),
        ],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    trace = load_trace(run_dir)
    assert [s.step for s in trace.steps] == [1, 2, 3, 4, 5, 6]
    assert trace.sequence_lengths() == (32, 32, 32, 64, 64, 64)
    assert trace.steps[-1].tokens == 16 * 32 * 3 + 16 * 64 * 3


def test_the_recordings_hold_a_long_phase(traces) -> None:  # type: ignore[no-untyped-def]
    assert len(traces) == 2
    for t in traces:
        lengths = t.sequence_lengths()
        assert set(lengths[: LONG_FROM - 1]) == {64} and set(lengths[LONG_FROM - 1 :]) == {256}


def test_a_micro_batch_costs_more_memory_in_the_long_phase(model) -> None:  # type: ignore[no-untyped-def]
    """The memory curve is in tokens per micro-batch: the same micro-batch is charged 4x the
    tokens after the phase change, at least what as many tokens of short windows cost."""
    short, known_short = model.peak_bytes({KNOB_MICRO_BATCH: 8}, 64)
    long, known_long = model.peak_bytes({KNOB_MICRO_BATCH: 8}, 256)
    assert known_short and known_long
    assert long - short > 50 << 20, (short / 2**20, long / 2**20)
    # 8 windows of 256 bytes hold the tokens of 32 of 64; attention's scores grow with the
    # square of the length, so the long windows cost at least as much (their own curve).
    assert long >= model.peak_bytes({KNOB_MICRO_BATCH: 32}, 64)[0]


def test_replay_of_the_recording_policy_decides_as_the_live_runs_did(traces, model) -> None:  # type: ignore[no-untyped-def]
    """The step-downs the live controller made, the one the longer windows forced included: the
    same values, at the same steps or one later, never sooner. Live, the controller also reads the
    job's memory itself between records (procfs, controller/sources.py), so a step of 2-3 s shows
    it the peak while it runs, and a decision can land a step sooner than the replay, which
    samples at step ends, places it."""
    pf = load_policy_file(RECORDED_WITH)
    forced = []
    for t, mib in zip(traces, (600, 440)):
        result = replay(with_cap(pf, mib), t, model)
        live = [
            (d["step"], d["params"].get("value"))
            for d in t.decisions
            if d["outcome"] == "applied" and d["kind"] == KNOB_MICRO_BATCH
        ]
        replayed = [(step, value) for step, kind, value in result.actions if kind == KNOB_MICRO_BATCH]
        assert [v for _, v in replayed] == [v for _, v in live]
        assert all(0 <= r[0] - lv[0] <= 1 for r, lv in zip(replayed, live)), (replayed, live)
        assert result.steps == t.last_step  # the job's own count ends it where it ended live
        forced += [step for step, _ in live if step >= LONG_FROM]
    assert forced, "the long phase forced no step-down in the recordings"


def test_the_phase_breaks_a_cap_the_defaults_settled_under_and_lower_thresholds_hold_it(
    traces, model
) -> None:  # type: ignore[no-untyped-def]
    """At 500 MiB the file's high-water mark (0.9) settles on a micro-batch that the longer
    windows push over the cap, in the replay as in the real runs (bench/README.md); a lower mark
    leaves the room the phase needs. Counted from the phase change on."""
    pf = with_cap(load_policy_file(RECORDED_WITH), 500)
    grace = LONG_FROM - 1  # violations counted from the phase change on
    low = with_params(pf, {"memory.high_water": 0.75, "memory.low_water": 0.3})
    for t in traces:
        default = replay(pf, t, model, grace)
        tuned = replay(low, t, model, grace)
        assert default.cap_violations > 0
        assert tuned.cap_violations == 0


def test_noise_shifts_fail_a_file_that_holds_the_cap_only_where_the_spikes_landed(traces, model) -> None:  # type: ignore[no-untyped-def]
    """At 500 MiB a high-water mark of 0.85 with a 3-step cooldown holds the cap in both traces
    as recorded, and breaks it in every other alignment of their noise: one draw of the noise
    says it is safe, three others say it is not. `--noise-shifts 4` fails it; a lower mark
    holds in all four."""
    from trainwarden.policies.tuning.trial_replay import noise_shifts, score

    pf = with_cap(load_policy_file(RECORDED_WITH), 500)
    assert pf.objective is not None
    for t in traces:
        shifts = noise_shifts(t, 4)
        assert shifts[0] == 0 and len(shifts) == 4
        assert replay(pf, t, model, 0, 0) == replay(pf, t, model)  # shift 0: as recorded
    edge = with_params(pf, {"memory.high_water": 0.85, "memory.low_water": 0.3, "memory.cooldown_steps": 3})
    as_recorded = score(edge, traces, model, pf.objective)
    assert as_recorded.value is not None, as_recorded.failure
    shifted = score(edge, traces, model, pf.objective, shifts=4)
    assert shifted.value is None and "memory cap broken" in (shifted.failure or "")
    assert "with its noise shifted" in (shifted.failure or "")  # which replay broke it
    safe = with_params(edge, {"memory.high_water": 0.72, "memory.cooldown_steps": 1})
    assert score(safe, traces, model, pf.objective, shifts=4).value is not None
