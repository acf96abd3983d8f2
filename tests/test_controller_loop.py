"""The control loop, driven directly: observe -> decide -> act, level-based and idempotent."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from trainwarden.controller.loop import BACKOFF_BASE_S, Controller
from trainwarden.controller.protocol import (
    KNOB_MICRO_BATCH,
    Action,
    JobShape,
    KnobSpec,
    Outcome,
    RankMemory,
    StepRecord,
)
from trainwarden.controller.runlog import DECISIONS_FILE, TELEMETRY_FILE, read_jsonl
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies import base
from trainwarden.policies.base import PolicyKind
from trainwarden.policies.loader import load_policy_text
from trainwarden.policies.schema import Budget

GiB = 2**30

#: Cap 10 GiB: high water 9 GiB, low water 5 GiB.
POLICY = """\
version: 1
budget:
  device_memory: 10GiB
controller:
  decide_interval_s: 1
policies:
  - kind: memory
    high_water: 0.9
    low_water: 0.5
    cooldown_steps: 3
"""


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def job_shape(mb: int = 8, extra: tuple[KnobSpec, ...] = ()) -> JobShape:
    return JobShape(
        run_id="loop-run",
        adapter="plain",
        world_size=1,
        param_count=125_000_000,
        global_batch_size=64,
        tokens_per_sample=1024,
        knobs=(KnobSpec(KNOB_MICRO_BATCH, mb, choices=(1, 2, 4, 8)), *extra),
        pids=(4242,),
        device="cuda:0",
        device_total_bytes=80 * GiB,
        sync_every=1,
    )


def rec(step: int, mb: int, peak_gib: float, t: float | None = None) -> StepRecord:
    peak = int(peak_gib * GiB)
    return StepRecord(
        step=step,
        time=100.0 + step if t is None else t,
        loss=4.0 - 0.01 * step,
        samples=64 * step,
        tokens=64 * 1024 * step,
        step_time_s=1.0,
        lr=3e-4,
        config={KNOB_MICRO_BATCH: mb},
        memory=(RankMemory(0, peak - GiB, peak, 80 * GiB, "cuda:0", 4242),),
    )


def make(tmp_path: Path, text: str = POLICY, **kw: Any) -> tuple[Controller, Clock]:
    clock = Clock(0.0)
    ctl = Controller(tmp_path / "run", "loop-run", load_policy_text(text), clock=clock, **kw)
    return ctl, clock


def decisions(ctl: Controller) -> list[dict[str, Any]]:
    return list(read_jsonl(ctl.run_dir / DECISIONS_FILE))


def telemetry(ctl: Controller) -> list[dict[str, Any]]:
    return list(read_jsonl(ctl.run_dir / TELEMETRY_FILE))


# --- throwaway policy kinds, registered for the tests that load them ---------------------------


@dataclass(frozen=True)
class NoParams:
    pass


class AsksForMissingKnobs(PolicyKind):
    """Asks for a knob no adapter here reports, and for a value the adapter refuses."""

    kind = "test_loop_asks_for_missing_knobs"
    Params = NoParams
    knobs = frozenset({"zero_stage", KNOB_MICRO_BATCH})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        return [
            Action(kind="zero_stage", params={"value": 3}, reason="test: shard more", step=snapshot.step + 1),
            Action(
                kind=KNOB_MICRO_BATCH, params={"value": 3}, reason="test: odd size", step=snapshot.step + 1
            ),
        ]


class Explodes(PolicyKind):
    kind = "test_loop_explodes"
    Params = NoParams
    knobs = frozenset({"test_only_explodes"})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        raise RuntimeError("policy bug under test")


@pytest.fixture
def test_kinds() -> Iterator[None]:
    added = []
    for cls in (AsksForMissingKnobs, Explodes):
        if cls.kind not in base.KINDS:
            base.register(cls)
            added.append(cls.kind)
    yield
    for kind in added:
        base.KINDS.pop(kind, None)


# --- the memory policy through the loop -----------------------------------------------------------


def test_step_down_is_issued_resent_until_answered_then_logged(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 1.0
    [action] = ctl.exchange([rec(1, 8, 9.5)], [])
    assert action.kind == KNOB_MICRO_BATCH
    assert action.params == {"value": 4}
    assert action.step == 2
    assert action.policy == "memory"
    assert "above the high-water mark" in action.reason and "0.9 of the" in action.reason
    assert "micro-batch 8 -> 4" in action.reason and "gradient accumulation 8 -> 16" in action.reason

    # Re-sent on every exchange, same id, and no second action on the knob while it is pending
    # (the peak is still above high water).
    for t, records in ((2.0, [rec(2, 8, 9.6)]), (3.0, [rec(2, 8, 9.6)]), (4.0, []), (4.5, [])):
        clock.t = t
        assert ctl.exchange(records, []) == [action]
    assert decisions(ctl) == []

    clock.t = 5.0
    applied = Outcome(action.id, "applied", 3, 0.25, detail="micro-batch switched")
    assert ctl.exchange([rec(3, 4, 5.2)], [applied]) == []
    [line] = decisions(ctl)
    assert line["id"] == action.id
    assert line["step"] == 3 and line["decided_step"] == 1
    assert line["kind"] == KNOB_MICRO_BATCH and line["params"] == {"value": 4}
    assert line["reason"] == action.reason and line["policy"] == "memory"
    assert line["outcome"] == "applied" and line["duration_s"] == 0.25
    assert line["detail"] == "micro-batch switched" and line["v"] == 1 and line["time"] == 1.0

    # The agent re-sends an outcome until it is acknowledged: recorded once.
    clock.t = 6.0
    assert ctl.exchange([rec(4, 4, 5.2)], [applied]) == []
    assert len(decisions(ctl)) == 1
    assert ctl.actions_total == {(KNOB_MICRO_BATCH, "applied"): 1}
    assert ctl.state.last_action_step == {KNOB_MICRO_BATCH: 3}
    assert ctl.status()["last_decision"]["id"] == action.id
    ctl.close()


def test_cooldown_after_an_applied_change_then_the_next_step_down(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 1.0
    [first] = ctl.exchange([rec(1, 8, 9.5)], [])
    clock.t = 2.0
    ctl.exchange([rec(2, 4, 9.4)], [Outcome(first.id, "applied", 2, 0.1)])
    # Still above high water at micro-batch 4, but inside the 3-step cooldown.
    for step in (3, 4):
        clock.t += 1.0
        assert ctl.exchange([rec(step, 4, 9.4)], []) == []
    clock.t += 1.0
    [second] = ctl.exchange([rec(5, 4, 9.4)], [])
    assert second.id != first.id
    # Two sizes observed (8 -> 9.5, 4 -> 9.4 GiB): the line forecasts every rung above 9 GiB, so
    # the policy halves again and measures (an extrapolation never sends it to the bottom rung).
    assert second.params == {"value": 2}
    ctl.close()


def test_rejected_outcome_is_logged_and_frees_the_knob(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 1.0
    [action] = ctl.exchange([rec(1, 8, 9.5)], [])
    clock.t = 2.0
    nothing = ctl.exchange(
        [rec(2, 8, 9.5)], [Outcome(action.id, "rolled_back", 2, 1.5, "OOM while switching")]
    )
    [line] = decisions(ctl)
    assert line["outcome"] == "rolled_back" and line["detail"] == "OOM while switching"
    assert ctl.state.last_action_step == {}, "a change that did not happen starts no cooldown"
    # The knob is free again, after a back-off (no retry storm): nothing at once...
    assert nothing == []
    clock.t = 2.0 + BACKOFF_BASE_S
    # ...then decided anew.
    [again] = ctl.exchange([rec(3, 8, 9.5)], [])
    assert again.id != action.id and again.params == {"value": 4}
    ctl.close()


def test_decide_interval_is_honoured(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 10.0
    assert ctl.exchange([rec(1, 8, 7.0)], []) == []  # decided: between the marks, nothing to do
    clock.t = 10.5
    assert ctl.exchange([rec(2, 8, 9.5)], []) == []  # above high water, but decided 0.5 s ago
    clock.t = 10.999
    assert ctl.exchange([rec(3, 8, 9.5)], []) == []
    clock.t = 11.0
    [action] = ctl.exchange([rec(4, 8, 9.5)], [])
    assert action.params == {"value": 4} and action.step == 5
    ctl.close()


def test_a_finished_job_gets_no_new_decision(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 1.0
    assert ctl.exchange([rec(1, 8, 9.5)], [], finished=True) == []
    assert ctl.state.finished and ctl.status()["finished"]
    ctl.close()


def test_no_decision_before_hello_or_before_the_first_step(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    clock.t = 1.0
    assert ctl.exchange([], []) == []
    ctl.hello(job_shape())
    clock.t = 3.0
    assert ctl.exchange([], []) == []
    assert decisions(ctl) == []
    ctl.close()


def test_action_for_a_knob_the_adapter_lacks_is_rejected_and_never_sent(
    tmp_path: Path, test_kinds: None
) -> None:
    text = "version: 1\nbudget: {}\npolicies:\n  - kind: test_loop_asks_for_missing_knobs\n    name: greedy\n"
    ctl, clock = make(tmp_path, text)
    ctl.hello(job_shape())
    for step in (1, 2):
        clock.t = float(step)
        assert ctl.exchange([rec(step, 8, 5.0)], []) == []
    lines = decisions(ctl)
    assert {(line["kind"], line["outcome"]) for line in lines} == {
        ("zero_stage", "rejected"),
        (KNOB_MICRO_BATCH, "rejected"),
    }
    missing = next(line for line in lines if line["kind"] == "zero_stage")
    assert "no knob 'zero_stage'" in missing["detail"] and KNOB_MICRO_BATCH in missing["detail"]
    assert missing["policy"] == "greedy" and missing["reason"] == "test: shard more"
    refused = next(line for line in lines if line["kind"] == KNOB_MICRO_BATCH)
    assert "does not accept micro_batch_size=3" in refused["detail"]
    assert ctl.actions_total[("zero_stage", "rejected")] >= 1
    assert ctl.close()["actions"]["zero_stage:rejected"] >= 1
    assert not any(line["outcome"] == "unanswered" for line in decisions(ctl)), "nothing was ever pending"


def test_a_policy_that_raises_does_not_break_the_controller(
    tmp_path: Path, test_kinds: None, caplog: pytest.LogCaptureFixture
) -> None:
    text = POLICY + "  - kind: test_loop_explodes\n    name: broken\n"
    ctl, clock = make(tmp_path, text)
    assert [p.name for p in ctl.policies] == ["memory", "broken"]
    ctl.hello(job_shape())
    with caplog.at_level(logging.ERROR, logger="trainwarden.controller.loop"):
        clock.t = 1.0
        [action] = ctl.exchange([rec(1, 8, 9.5)], [])
        clock.t = 2.0
        assert ctl.exchange([rec(2, 8, 9.5)], []) == [action]
    failures = [r for r in caplog.records if "policy broken failed to decide" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)
    assert action.policy == "memory"
    ctl.close()


# --- telemetry and close ---------------------------------------------------------------------------


def test_telemetry_has_the_hello_and_each_new_step_once(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    shape = job_shape()
    ctl.hello(shape)
    clock.t = 1.0
    ctl.exchange([rec(1, 8, 5.0), rec(2, 8, 5.0)], [])
    clock.t = 2.0
    ctl.exchange([rec(2, 8, 5.0), rec(3, 8, 5.0)], [])  # step 2 re-sent (a lost response)
    ctl.exchange([rec(1, 8, 5.0)], [])  # very late duplicate
    lines = telemetry(ctl)
    assert [line["event"] for line in lines] == ["hello", "step", "step", "step"]
    assert lines[0]["shape"] == shape.to_json() and lines[0]["time"] == 0.0
    assert [line["step"] for line in lines[1:]] == [1, 2, 3]
    assert lines[3] == {"v": 1, "event": "step", **rec(3, 8, 5.0).to_json()}
    assert ctl.state.step == 3
    ctl.close()


def test_reconnect_keeps_the_state(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctl, clock = make(tmp_path)
    ack = ctl.hello(job_shape())
    assert (ack["run_id"], ack["policies"], ack["sync_every"]) == ("loop-run", ["memory"], 8)
    clock.t = 1.0
    ctl.exchange([rec(1, 8, 5.0), rec(2, 8, 5.0)], [])
    with caplog.at_level(logging.INFO, logger="trainwarden.controller.loop"):
        ctl.hello(job_shape())
    assert any("reconnected" in r.getMessage() for r in caplog.records)
    assert ctl.state.step == 2
    ctl.close()


def test_close_marks_unanswered_actions_and_writes_the_summary(tmp_path: Path) -> None:
    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 1.0
    [action] = ctl.exchange([rec(1, 8, 9.5)], [])
    clock.t = 2.0
    ctl.exchange([rec(2, 8, 9.5)], [])
    ctl.exit_code = 3
    clock.t = 7.5
    summary = ctl.close()
    [line] = decisions(ctl)
    assert line["id"] == action.id and line["outcome"] == "unanswered"
    assert line["step"] == 2 and line["detail"] == "the job ended before applying it"
    on_disk = json.loads((ctl.run_dir / "summary.json").read_text())
    assert on_disk["run_id"] == summary["run_id"] == "loop-run"
    assert on_disk["step"] == 2 and on_disk["exit_code"] == 3
    assert on_disk["wall_time_s"] == 7.5
    assert on_disk["actions"] == {"micro_batch_size:unanswered": 1}
    assert on_disk["peak_by_micro_batch"] == {"8": int(9.5 * GiB)}
    assert on_disk["memory_cap_bytes"] == 10 * GiB and on_disk["memory_peak_bytes"] == int(9.5 * GiB)
    assert on_disk["config"] == {KNOB_MICRO_BATCH: 8}
    assert on_disk["last_decision"]["outcome"] == "unanswered"


def test_the_summary_reports_the_configuration_that_ran_not_one_applied_after_the_last_step(
    tmp_path: Path,
) -> None:
    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 1.0
    [action] = ctl.exchange([rec(1, 8, 9.5)], [])
    # The job applies micro-batch 4 and ends before any step ran with it.
    ctl.exchange([], [Outcome(action.id, "applied", 1, 0.01)], finished=True)
    assert ctl.close()["config"] == {KNOB_MICRO_BATCH: 8}


def test_a_run_no_job_connected_to_says_so_never_step_minus_one(tmp_path: Path) -> None:
    ctl, _ = make(tmp_path)
    summary = ctl.close()
    assert (
        summary["step"] is None and summary["job"].startswith("no job connected") and summary["config"] == {}
    )


def test_without_a_policy_file_nothing_is_decided(tmp_path: Path) -> None:
    clock = Clock()
    ctl = Controller(tmp_path / "bare", "bare", clock=clock)
    ctl.hello(job_shape())
    clock.t = 5.0
    assert ctl.exchange([rec(1, 8, 79.0)], []) == []
    snap = ctl.observe()
    assert snap.memory_cap_bytes is None and snap.budgets == ()
    summary = ctl.close()
    assert summary["actions"] == {} and summary["budget"] is None


def test_a_failing_kind_backs_off_then_is_disabled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No retry storm: each failure doubles the wait; MAX_FAILURES in a row disable the kind."""
    from trainwarden.controller.loop import MAX_FAILURES

    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    t, step, tries = 1.0, 1, []
    while t < 1000.0:
        clock.t = t
        for a in ctl.exchange([rec(step, 8, 9.5)], []):
            tries.append(t)
            step += 1
            clock.t = t + 0.1
            ctl.exchange([rec(step, 8, 9.5)], [Outcome(a.id, "rolled_back", step, 0.2, "build failed")])
        step += 1
        t += 0.5
    assert len(tries) == MAX_FAILURES, tries
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert gaps[0] >= BACKOFF_BASE_S and gaps[1] >= 2 * BACKOFF_BASE_S, gaps
    assert "no more micro_batch_size actions this run" in caplog.text
    assert [d["outcome"] for d in decisions(ctl)] == ["rolled_back"] * MAX_FAILURES
    ctl.close()


def test_a_clock_leaping_ahead_does_not_spend_the_wall_time_budget(tmp_path: Path) -> None:
    """An NTP correction of a day must not read as a spent budget (which would stop the job)."""
    ctl, _clock = make(tmp_path, "version: 1\nbudget:\n  wall_time: 1h\n")
    ctl.hello(job_shape())
    ctl.exchange([rec(s, 8, 1.0) for s in range(1, 11)], [])
    ctl.exchange([rec(11, 8, 1.0, t=100.0 + 11 + 86_400)], [])  # the job's clock leaps a day
    ctl.exchange([rec(12, 8, 1.0, t=100.0 + 12 + 86_400)], [])
    snap = ctl.observe()
    assert snap.elapsed_s == pytest.approx(12.0)
    [wall] = snap.budgets
    assert wall.fraction < 0.01
    assert ctl.state.clock_jumps == 1
    ctl.close()


def test_an_oom_retry_event_is_logged_counted_and_taken_as_the_configuration(tmp_path: Path) -> None:
    """The adapter moved one rung down by itself after an OOM: one decision line (policy `adapter`),
    counted once however often the agent resends it, the job's configuration is the event's, and
    the memory policy never steps back up into the micro-batch that ran out of memory."""
    from trainwarden.controller.protocol import AdapterEvent
    from trainwarden.policies.memory import config_key

    ctl, clock = make(tmp_path)
    ctl.hello(job_shape())
    clock.t = 1.0
    assert ctl.exchange([rec(1, 8, 4.0)], []) == []
    event = AdapterEvent(
        kind="oom_retry",
        step=1,
        changes=((KNOB_MICRO_BATCH, 8, 4),),
        config={KNOB_MICRO_BATCH: 4},
        reason="OutOfMemoryError in backward at step 2 (micro-step 2): CUDA out of memory; one rung down",
        duration_s=0.75,
    )
    clock.t = 2.0
    assert ctl.exchange([], [], events=[event]) == []
    [line] = decisions(ctl)
    assert line["kind"] == "oom_retry" and line["policy"] == "adapter" and line["id"] == event.id
    assert line["outcome"] == "applied" and line["step"] == line["decided_step"] == 1
    assert line["params"] == {KNOB_MICRO_BATCH: 4} and line["reason"] == event.reason
    assert line["detail"] == "micro_batch_size 8 -> 4" and line["duration_s"] == 0.75
    assert ctl.state.config == {KNOB_MICRO_BATCH: 4}
    assert ctl.state.last_action_step == {KNOB_MICRO_BATCH: 1}
    assert ctl.state.peak_by_config[config_key({KNOB_MICRO_BATCH: 8})] == 80 * GiB
    assert ctl.actions_total == {("oom_retry", "applied"): 1}
    # Resent (a lost response): logged once.
    clock.t = 3.0
    ctl.exchange([rec(2, 4, 2.0)], [], events=[event])
    assert len(decisions(ctl)) == 1 and ctl.actions_total == {("oom_retry", "applied"): 1}
    # Far below the low-water mark for many steps: without the OOM, micro-batch 8 would be
    # forecast at 4 GiB (twice 2 GiB) and the policy would step up; it ran out of memory there.
    for step in range(3, 12):
        clock.t += 1.0
        assert ctl.exchange([rec(step, 4, 2.0)], []) == []
    assert ctl.status()["actions"] == {"oom_retry:applied": 1}
    ctl.close()
    # A controller restarted on the run directory counts it, and ignores a resend.
    again, _ = make(tmp_path)
    assert again.actions_total == {("oom_retry", "applied"): 1}
    again.hello(job_shape())
    again.exchange([], [], events=[event])
    assert len(decisions(again)) == 1
    again.close()


def test_events_cross_the_http_channel_and_a_hostile_one_gets_a_400(tmp_path: Path) -> None:
    """The agent's HttpChannel sends events to a real ChannelServer; a malformed events list is
    refused with 400 naming the field, and the controller goes on."""
    import http.client

    from trainwarden.adapters.core.channel import HttpChannel
    from trainwarden.controller.protocol import PROTOCOL_VERSION, AdapterEvent
    from trainwarden.controller.server import ChannelServer

    ctl, _clock = make(tmp_path)
    srv = ChannelServer(("127.0.0.1", 0), ctl, "tok")
    srv.start()
    try:
        channel = HttpChannel(f"http://127.0.0.1:{srv.port}", "tok")
        channel.hello(job_shape())
        ev = AdapterEvent("oom_retry", 0, ((KNOB_MICRO_BATCH, 8, 4),), {KNOB_MICRO_BATCH: 4}, "OOM", 0.5)
        assert channel.exchange([rec(1, 4, 2.0)], [], False, events=[ev]) == []
        assert [d["kind"] for d in decisions(ctl)] == ["oom_retry"]
        for events in ([{"kind": "oom_retry"}], {"x": 1}, [dict(ev.to_json(), duration_s=-1)] * 2):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            body = json.dumps({"v": PROTOCOL_VERSION, "records": [], "outcomes": [], "events": events})
            conn.request("POST", "/v1/exchange", body, {"Authorization": "Bearer tok"})
            resp = conn.getresponse()
            text = resp.read().decode()
            conn.close()
            assert resp.status == 400 and "event" in text, (resp.status, text)
        assert channel.exchange([rec(2, 4, 2.0)], [], False) == []
        assert len(decisions(ctl)) == 1 and ctl.state.step == 2
    finally:
        srv.stop()
        ctl.close()
