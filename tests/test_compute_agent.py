"""The agent holds an action meant for a later step and applies it at exactly that step, and places
a stop due at a time (a wall-time budget's end) at the step boundary nearest that time by the job's
own step times, whatever the sync cadence."""

from __future__ import annotations

import time
from typing import Any

import pytest

from trainwarden.adapters.core.agent import Agent
from trainwarden.adapters.core.probes import CpuProbe
from trainwarden.controller.protocol import KNOB_STOP, Action, JobShape, Outcome, StepRecord

SHAPE = JobShape("r", "pytorch", 1, 10, 8, 1, (), (1,), "cpu", 2**34, 4)


class Delivers:
    """The controller's side, reduced to what this test needs: it answers every exchange with
    the actions it was given, as a controller re-sends a pending action until it is answered."""

    def __init__(self, actions: list[Action]) -> None:
        self.actions = actions
        self.records: list[StepRecord] = []

    def hello(self, shape: JobShape) -> dict[str, Any]:
        return {}

    def exchange(self, records: list[StepRecord], outcomes: list[Outcome], finished: bool) -> list[Action]:
        self.records += records
        return list(self.actions)

    def close(self) -> None:
        pass


def agent_with(actions: list[Action]) -> Agent:
    agent = Agent(SHAPE, Delivers(actions), CpuProbe(), sync_every=4)
    deadline = time.monotonic() + 5
    while len(agent._inbox) < len(actions) and time.monotonic() < deadline:  # the first exchange
        time.sleep(0.01)
    return agent


def run_steps(agent: Agent, steps: range, step_time_s: float = 0.1) -> dict[int, list[str]]:
    """on_step for each step; what came due after which step."""
    due = {}
    for s in steps:
        got = agent.on_step(s, 1.0, s * 8, s * 8, step_time_s, 0.1, {})
        if got:
            due[s] = [a.kind for a in got]
    return due


def test_an_action_for_a_later_step_applies_at_exactly_that_step() -> None:
    agent = agent_with([Action(kind=KNOB_STOP, params={}, reason="test", step=7)])
    try:
        # Sync steps are 4 and 8: the action (apply before step 7) is taken at 4, held, and due
        # after step 6, not at the next sync.
        assert run_steps(agent, range(1, 10)) == {6: [KNOB_STOP]}
    finally:
        agent.close()


@pytest.mark.parametrize(("steps_ahead", "due_after"), [(2.8, 7), (2.2, 6), (0.3, 4)])
def test_a_stop_due_at_a_time_is_placed_by_the_jobs_step_times(steps_ahead: float, due_after: int) -> None:
    # Steps of 10 s (as the job reports them; the test does not wait, so the clock barely moves):
    # the boundary nearest a time 2.8 steps after step 4 ends is after step 7, 2.2 steps after step
    # 6, 0.3 steps after step 4 itself. Placed at sync step 4, held, applied at exactly that step.
    step_s = 10.0
    agent = agent_with([])
    try:
        run_steps(agent, range(1, 4), step_s)
        agent._inbox.clear()
        a = Action(
            kind=KNOB_STOP,
            params={"cause": "budget", "at_time": time.time() + steps_ahead * step_s},
            reason="test",
            step=10_000,
        )
        agent._inbox[a.id] = a
        assert run_steps(agent, range(4, 13), step_s) == {due_after: [KNOB_STOP]}
    finally:
        agent.close()
