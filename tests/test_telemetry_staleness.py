"""A node lost, seen from the controller: per-rank telemetry staleness (controller/loop.py).

Driven directly on a simulated clock; tests/test_two_nodes.py does it for real with two torchrun
nodes, one of them killed.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import helpers
import pytest

from trainwarden.adapters.core.agent import Agent
from trainwarden.adapters.core.channel import LocalChannel
from trainwarden.adapters.core.probes import CpuProbe
from trainwarden.controller.loop import SWITCH_GRACE_S, Controller
from trainwarden.controller.protocol import (
    KNOB_MICRO_BATCH,
    KNOB_ZERO_STAGE,
    Action,
    JobShape,
    KnobSpec,
    RankMemory,
    StepRecord,
)
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies import base
from trainwarden.policies.loader import load_policy_text
from trainwarden.policies.schema import Budget

MiB = 2**20
STALE_S = 5.0
POLICY = """\
version: 1
budget: {}
controller:
  sync_every: 2
  stale_after_s: 5s
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def shape(pids: tuple[int, ...] = (11, 12)) -> JobShape:
    knobs = (
        KnobSpec(KNOB_MICRO_BATCH, 4, choices=(1, 2, 4)),
        KnobSpec(KNOB_ZERO_STAGE, 0, choices=(0, 1)),
    )
    return helpers.job_shape(
        "stale", knobs=knobs, world_size=2, pids=pids, device_total_bytes=1024 * MiB, sync_every=2
    )


def record(step: int, t: float, ranks: tuple[int, ...] = (0, 1)) -> StepRecord:
    memory = tuple(RankMemory(r, 100 * MiB, 120 * MiB, 1024 * MiB, "cpu", 11 + r) for r in ranks)
    return helpers.step_record(step, memory, time=t, step_time_s=0.05, micro_batch=4)


def test_silent_ranks_are_said_once_with_a_summary_and_a_restart_clears_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    ctl = Controller(tmp_path / "run", "stale", load_policy_text(POLICY), clock=clock)
    ctl.hello(shape())
    for step in range(2, 21, 2):
        clock.t += 0.1
        ctl.exchange([record(step, clock.t)], [])
    assert ctl.stale_after_s() == STALE_S  # 20 sync intervals of 2 x 0.05 s: the file's floor binds
    # Rank 0's agent still exchanges (its thread is alive) but no step comes: the ranks hang.
    clock.t += STALE_S - 0.5
    ctl.exchange([], [])
    assert ctl.check_telemetry() == () and not (ctl.run_dir / "summary.json").exists()
    clock.t += 1.0
    with caplog.at_level(logging.ERROR, logger="trainwarden.controller.loop"):
        assert ctl.check_telemetry() == (0, 1)
        assert ctl.check_telemetry() == (0, 1)
    said = [r.getMessage() for r in caplog.records if "no telemetry from rank(s)" in r.getMessage()]
    assert len(said) == 1 and "rank(s) 0, 1 of 2" in said[0] and "last at step 20" in said[0]
    summary = json.loads((ctl.run_dir / "summary.json").read_text())
    assert summary["telemetry_stale_ranks"] == [0, 1] and summary["step"] == 20

    # torchrun restarts the job (new processes) from its checkpoint at step 16: it says hello again
    # and reports steps from 17 on: they are telemetry (the ranks are back), and a new start of
    # the job runs its own step sequence (tests/test_ingestion_hardening.py), so step 18 counts.
    clock.t += 30.0
    ctl.hello(shape(pids=(21, 22)))
    ctl.exchange([record(18, clock.t)], [])
    assert ctl.stale_ranks == () and ctl.state.step == 18
    clock.t += 0.1
    ctl.exchange([record(22, clock.t)], [])
    summary = ctl.close()
    assert summary["telemetry_stale_ranks"] == [] and summary["step"] == 22
    (gap,) = summary["telemetry_gaps"]
    assert gap["ranks"] == [0, 1] and gap["last_step"] == 20 and gap["seconds"] == pytest.approx(35.5)


def test_one_rank_missing_from_the_records_is_named(tmp_path: Path) -> None:
    """Rank 1's memory stops arriving while rank 0 still records steps: only rank 1 is stale."""
    clock = Clock()
    ctl = Controller(tmp_path / "run", "stale", load_policy_text(POLICY), clock=clock)
    ctl.hello(shape())
    ctl.exchange([record(2, clock.t)], [])
    for step in range(4, 200, 2):
        clock.t += 0.1
        ctl.exchange([record(step, clock.t, ranks=(0,))], [])
    assert ctl.stale_ranks == (1,)
    ctl.close()


@dataclass(frozen=True)
class _NoParams:
    pass


@base.register
class AskZero1(base.PolicyKind):
    """Asks for ZeRO 1 once: an engine switch the job takes seconds to carry out."""

    kind = "test_stale_zero1"
    Params = _NoParams
    knobs = frozenset({KNOB_ZERO_STAGE})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        if snapshot.config.get(KNOB_ZERO_STAGE) == 1:
            return []
        return [Action(KNOB_ZERO_STAGE, {"value": 1}, "test: ZeRO 1", snapshot.step + 1)]


def test_an_engine_switch_in_flight_is_not_a_lost_node(tmp_path: Path) -> None:
    clock = Clock()
    text = POLICY + "policies:\n  - kind: test_stale_zero1\n"
    ctl = Controller(tmp_path / "run", "stale", load_policy_text(text), clock=clock)
    ctl.hello(shape())
    ctl.exchange([record(2, clock.t)], [])
    clock.t += 1.0
    (_action,) = ctl.exchange([record(4, clock.t)], [])  # the switch is sent; the job builds
    clock.t += STALE_S + 10.0
    assert ctl.stale_after_s() == STALE_S + SWITCH_GRACE_S and ctl.check_telemetry() == ()
    clock.t += SWITCH_GRACE_S
    assert ctl.check_telemetry() == (0, 1)  # a switch that never ends: said too, later
    ctl.close()


def test_a_finished_job_or_one_not_started_is_never_stale(tmp_path: Path) -> None:
    clock = Clock()
    ctl = Controller(tmp_path / "run", "stale", clock=clock)
    ctl.hello(shape())
    clock.t += 600  # a job may take minutes to reach its first step: nothing to miss yet
    assert ctl.check_telemetry() == ()
    ctl.exchange([record(2, clock.t)], [], finished=True)
    clock.t += 600
    assert ctl.check_telemetry() == ()
    ctl.close()


def test_a_rank_dying_of_an_exception_does_not_say_the_job_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At exit after an unhandled exception (a peer's node lost: gloo raises) the agent flushes its
    telemetry but does not tell the controller the job finished: the controller goes on expecting
    it, and says when its telemetry is missing. A clean exit still says finished."""
    for crashed in (True, False):
        ctl = Controller(tmp_path / f"run-{crashed}", "stale")
        agent = Agent(shape((11,)), LocalChannel(ctl), CpuProbe(), rank=0, world_size=1)
        if crashed:
            monkeypatch.setattr(sys, "last_value", RuntimeError("Connection reset by peer"), raising=False)
        else:
            monkeypatch.delattr(sys, "last_value", raising=False)
            monkeypatch.delattr(sys, "last_exc", raising=False)
        agent.close()
        assert ctl.state.finished is (not crashed)
        ctl.close()
