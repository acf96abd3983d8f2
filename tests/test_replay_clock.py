"""The replay's clock: a CPU job's steps are timed by the CPU seconds the agent records beside
wall time, so the neighbours' load in a recording does not become the job's speed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_agent import Job, _events, _point_at, _serve, clean_env, wait_for  # noqa: F401 (clean_env: autouse)

from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import StepRecord
from trainwarden.policies.loader import load_policy_file
from trainwarden.policies.tuning.replay.model import fit_model
from trainwarden.policies.tuning.replay.simulate import replay
from trainwarden.policies.tuning.replay.trace import Trace, load_trace

TRACES = Path(__file__).parent / "traces"
RECORDED_WITH = TRACES / "recorded_with.yaml"


def test_the_agent_records_cpu_time_beside_wall_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = Controller(tmp_path, "agent-test")
    server = _serve(ctl)
    _point_at(monkeypatch, server.port)
    try:
        job = Job(micro=4, sync_every=1)
        job.run(5)
        wait_for(lambda: ctl.state.step == 5, what="telemetry of step 5")
        job.handle.close()
        steps = _events(tmp_path, "step")
        assert len(steps) == 5
        for rec in steps:
            assert rec["cpu_time_s"] > 0  # every step costs the process some CPU
            assert StepRecord.from_json(rec).cpu_time_s == rec["cpu_time_s"]
    finally:
        server.stop()
        ctl.close()


def test_an_old_record_without_cpu_time_still_reads() -> None:
    rec = StepRecord(1, 1.0, 2.0, 8, 64, 0.5, 0.1, {}, ())
    assert "cpu_time_s" not in rec.to_json()
    assert StepRecord.from_json(rec.to_json()).cpu_time_s is None


def _with_load(trace: Trace, load: float) -> Trace:
    """The recorded run as if its second half had shared the cores with neighbours: each step's
    wall time `load` times its CPU time there, while the CPU time (what the job did) is unchanged."""
    half = len(trace.steps) // 2
    steps = tuple(
        dataclasses.replace(
            s, cpu_time_s=s.step_time_s, step_time_s=s.step_time_s * (load if i >= half else 1.0)
        )
        for i, s in enumerate(trace.steps)
    )
    return dataclasses.replace(trace, steps=steps)


def _wall_only(trace: Trace) -> Trace:
    return dataclasses.replace(
        trace, steps=tuple(dataclasses.replace(s, cpu_time_s=None) for s in trace.steps)
    )


def test_a_recording_under_load_replays_at_the_jobs_own_speed() -> None:
    """Half a recording at 2x wall time: timed in CPU seconds the replay's tokens/s is the quiet
    recording's; timed in wall seconds (no CPU times, as before) it is the load's."""
    pf = load_policy_file(RECORDED_WITH)
    trace = load_trace(sorted(TRACES.glob("demo-*"))[0])
    quiet, loaded = _with_load(trace, 1.0), _with_load(trace, 2.0)
    quiet_tps = replay(pf, quiet, fit_model([quiet])).tokens_per_second
    model = fit_model([loaded])
    assert model.cpu_to_wall == pytest.approx(1.0)
    assert any("CPU seconds" in note for note in model.notes)
    cpu_tps = replay(pf, loaded, model).tokens_per_second
    assert cpu_tps == pytest.approx(quiet_tps, rel=0.05)
    wall = _wall_only(loaded)
    wall_model = fit_model([wall])
    assert wall_model.cpu_to_wall is None
    assert replay(pf, wall, wall_model).tokens_per_second < 0.85 * quiet_tps
