"""The compute budget on real runs: the demo's GPT and corpus, the plain-PyTorch adapter and an
embedded controller. The cooldown ends with the budget, the forecast follows a throughput change,
the stop saves a checkpoint through the user's hook that a new job resumes from, and a budget
spent before the first step is refused with the cause and the fix."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from compute_job import (
    TOKENS_PER_STEP,
    Run,
    act,
    model_and_optimizer,
    run_job,
    sampler,
)

from trainwarden.adapters.core.connect import AttachError
from trainwarden.adapters.knobs import StopInfo
from trainwarden.controller.protocol import KNOB_MICRO_BATCH

pytestmark = pytest.mark.slow

#: Controller settings for runs of a few seconds: decisions as often as the loop allows.
FAST = "controller:\n  sync_every: 1\n  decide_interval_s: 0.1\n"

#: Least seconds a step of these jobs takes. The demo's model steps in ~5 ms on a quiet machine:
#: a 40-step run would be over before the agent's first exchange (every 0.5 s), which no job a
#: budget is worth steering looks like; paced, the runs last a few seconds, as a loaded machine
#: made them anyway.
PACE_S = 0.02


def paced(then: Callable[[Run], None] | None = None) -> Callable[[Run], None]:
    """An `each_step` that makes every step last at least PACE_S longer, then calls `then`."""

    def each_step(run: Run) -> None:
        time.sleep(PACE_S)
        if then is not None:
            then(run)

    return each_step


def token_policy(steps: int, cooldown: float = 0.5) -> str:
    return (
        f"version: 1\nbudget:\n  tokens: {steps * TOKENS_PER_STEP}\n{FAST}"
        f"policies:\n  - kind: compute\n    cooldown_fraction: {cooldown}\n"
    )


def test_a_token_budget_ends_at_its_step_annealed(tmp_path: Path) -> None:
    """Tolerance: none in steps (a token budget is spent by whole steps); the LR multiplier of the
    last step at most 0.25 (it is updated about every 0.5 s, the agent's exchange)."""
    steps = 100
    run = run_job(tmp_path, token_policy(steps), max_steps=2 * steps, each_step=paced())
    assert run.handle.step_count == steps, "the stop applies after the step that spends the budget"
    m = run.lr_multipliers
    assert m[0] == 1.0 and m[steps // 2 - 5] == 1.0, "held at 1 through the stable phase"
    assert all(a >= b for a, b in itertools.pairwise(m)), "the cooldown only goes down"
    assert m[-1] <= 0.25, m[-10:]
    s = run.summary
    [tokens] = s["budgets"]
    assert tokens["spent"] == tokens["limit"] and tokens["binding"]
    assert s["stop"]["cause"] == "budget" and s["stop"]["saved"]["amount"] == 0


def test_a_token_budget_is_kept_by_the_job_when_the_controller_is_slower_than_it(tmp_path: Path) -> None:
    """A job far faster than the exchange (unpaced steps: a 41-step run may be over before the
    controller's first decision, here made slower still): the agent counts the tokens itself and
    places the stop at the budget's last step, between two sync steps, and the controller logs it."""
    steps = 41
    policy = (
        f"version: 1\nbudget:\n  tokens: {steps * TOKENS_PER_STEP}\n"
        "controller:\n  sync_every: 2\n  decide_interval_s: 30\npolicies:\n  - kind: compute\n"
    )
    run = run_job(tmp_path, policy, max_steps=3 * steps)
    assert run.handle.step_count == steps
    [stop] = [d for d in run.decisions() if d["kind"] == "stop"]
    assert stop["policy"] == "agent" and stop["outcome"] == "applied" and stop["step"] == steps, stop
    assert "the last inside it" in stop["reason"]
    s = run.summary
    [tokens] = s["budgets"]
    assert tokens["spent"] == tokens["limit"]
    assert s["stop"]["outcome"] == "applied" and s["stop"]["step"] == steps


def test_a_wall_time_budget_ends_within_tolerance(tmp_path: Path) -> None:
    """Tolerance: the job's last step ends within 10% of the budget or 3 steps of it, whichever is
    more (the job places the stop by its own clock and its last 4 step times; a step slower than
    those moves the end by its difference). The LR multiplier of the last step is at most 0.35:
    it is updated about every 0.5 s (the agent's exchange), over a 3 s cooldown."""
    budget_s = 6.0
    policy = (
        f"version: 1\nbudget:\n  wall_time: {budget_s}s\n{FAST}"
        "policies:\n  - kind: compute\n    cooldown_fraction: 0.5\n"
    )
    run = run_job(tmp_path, policy)
    s = run.summary
    [wall] = s["budgets"]
    step_s = s["forecast"]["seconds_per_step"]
    assert abs(wall["spent"] - budget_s) <= max(0.1 * budget_s, 3 * step_s), (wall, step_s)
    assert s["stop"]["cause"] == "budget"
    assert run.lr_multipliers[-1] <= 0.35, run.lr_multipliers


def test_the_forecast_follows_a_throughput_change(tmp_path: Path) -> None:
    """Micro-batch 16 -> 1 at step 40, the new configuration slower by 16 forward/backward passes a
    step and 40 ms more pacing (a tiny model's passes alone are too cheap to change the rate
    reliably on a quiet machine): 8 steps later the forecast's wall time per step is the new one
    (within 30% of what the steps since took), where the 20-step window the status line shows
    still mixes the two."""
    seen: dict[str, Any] = {}
    policy = f"version: 1\nbudget:\n  tokens: {10_000 * TOKENS_PER_STEP}\n{FAST}policies: []\n"

    def each_step(run: Run) -> None:
        n = run.handle.step_count
        if n == 40:
            act(run, KNOB_MICRO_BATCH, 1)
        time.sleep(0.005 if n < 40 else 0.045)
        if n in (48, 60):
            seen[n] = _forecast_when_caught_up(run, n)

    run = run_job(tmp_path, policy, max_steps=60, each_step=each_step)
    t = _record_times(run)
    before = (t[40] - t[10]) / 30
    for n in (48, 60):
        spf, since, window_spf = seen[n]
        # The new segment starts at the first step under the new configuration; by step 60 another
        # may have started, if the load on the machine changed (8 steps in a row 25% off).
        assert since == 41 if n == 48 else since >= 41, (n, since)
        after = (t[n] - t[since]) / (n - since)
        assert after > 2 * before, "the switch must change throughput for this test to mean anything"
        assert spf == pytest.approx(after, rel=0.3), (n, spf, before, after)
        if n == 48:
            assert abs(window_spf - after) > 0.3 * after, "a fixed window would not have followed yet"


def _forecast_when_caught_up(run: Run, step: int) -> tuple[float, int, float]:
    """(forecast seconds per step, first step it is measured from, the 20-step window's seconds
    per step) as the controller sees them once it has the records up to `step`."""
    ctl = run.handle.controller
    deadline = time.monotonic() + 5
    while ctl.state.step < step and time.monotonic() < deadline:
        time.sleep(0.02)
    snap = ctl.observe()
    return snap.seconds_per_step, snap.throughput_since_step, TOKENS_PER_STEP / snap.tokens_per_second


def _record_times(run: Run) -> dict[int, float]:
    recs = [json.loads(x) for x in (run.run_dir / "telemetry.jsonl").read_text().splitlines()]
    return {r["step"]: r["time"] for r in recs if r.get("event") == "step"}


def test_the_stop_saves_a_checkpoint_the_user_resumes_from(tmp_path: Path) -> None:
    calls: list[tuple[StopInfo, bool]] = []
    ckpt = tmp_path / "final.pt"
    holder: dict[str, Run] = {}

    def save(info: StopInfo) -> None:
        run = holder["run"]
        calls.append((info, run.handle.should_stop))
        torch.save(
            {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "data": run.data.state_dict(),
                "step": run.handle.step_count,
            },
            ckpt,
        )

    steps = 100
    keep = paced(lambda r: holder.setdefault("run", r))  # the hook reads the live handle
    run = run_job(tmp_path, token_policy(steps), on_stop=save, each_step=keep)
    [(info, stopping)] = calls
    assert not stopping, "the hook runs before should_stop turns true"
    assert info.step == steps and info.cause == "budget" and "tokens budget" in info.reason

    # Resume in a new job (a new model, optimizer and data position from the checkpoint) and train
    # 10 more steps; the original, carried on in place, must match it exactly.
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == steps
    resumed, resumed_opt = model_and_optimizer(seed=123)  # different init: the load must overwrite it
    resumed.load_state_dict(state["model"])
    resumed_opt.load_state_dict(state["optimizer"])
    resumed_data = sampler(0)
    resumed_data.load_state_dict(state["data"])
    more = token_policy(1000)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run_job(tmp_path / "a", more, max_steps=10, model=resumed, optimizer=resumed_opt, data=resumed_data)
    b = run_job(tmp_path / "b", more, max_steps=10, model=run.model, optimizer=run.optimizer, data=run.data)
    assert a.handle.step_count == b.handle.step_count == 10
    for (name, pa), pb in zip(resumed.named_parameters(), run.model.parameters()):
        assert torch.equal(pa, pb), name


def test_a_budget_spent_in_an_earlier_job_is_refused_with_the_fix(tmp_path: Path) -> None:
    run_job(tmp_path, token_policy(10))
    with pytest.raises(AttachError, match=r"tokens budget is already spent.*new run directory"):
        run_job(tmp_path, token_policy(10))


def test_a_token_budget_smaller_than_one_step_is_refused(tmp_path: Path) -> None:
    policy = f"version: 1\nbudget:\n  tokens: {TOKENS_PER_STEP - 1}\npolicies:\n  - kind: compute\n"
    with pytest.raises(AttachError, match=r"smaller than one optimizer step.*raise budget.tokens"):
        run_job(tmp_path, policy)
