"""What every adapter shares for the compute budget (adapters/knobs.py), through the plain-PyTorch
handle: the cooldown's ramp, the stop's save hooks, validation losses; the wire field that carries
them (StepRecord.eval_loss); and the controller's side: the summary of an early stop and a hello
refused for a spent budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from trainwarden.adapters import pytorch as tw
from trainwarden.adapters.knobs import StopInfo
from trainwarden.controller.loop import BudgetSpentError, Controller
from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    KNOB_STOP,
    Action,
    JobShape,
    KnobSpec,
    Outcome,
    ProtocolError,
    StepRecord,
)
from trainwarden.policies.loader import load_policy_text


@pytest.fixture(autouse=True)
def no_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRAINWARDEN_ENDPOINT", "TRAINWARDEN_TOKEN", "TRAINWARDEN_POLICY", "TRAINWARDEN_SYNC_EVERY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")


def handle(**kw: Any) -> tuple[tw.Handle, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return tw.attach(model, opt, global_batch_size=8, **kw), opt


def train_step(h: tw.Handle) -> float:
    """One optimizer step; returns the LR it ran at."""
    for micro in next(h.steps([(torch.randn(8, 4), torch.randn(8, 1))])):
        x, y = micro
        h.backward(torch.nn.functional.mse_loss(h.model(x), y))
    h.step()
    return h.last_lr


def lr_action(value: float, **ramp: Any) -> Action:
    return Action(kind=KNOB_LR_MULTIPLIER, params={"value": value, **ramp}, reason="test", step=0)


def test_the_multiplier_follows_a_ramp_step_by_step() -> None:
    h, _ = handle()
    out = h.apply(lr_action(1.0, to=0.0, over_steps=4))
    assert out.outcome == "applied" and "ramping to 0 over 4 steps" in out.detail
    lrs = [train_step(h) for _ in range(6)]
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0, 0.0])
    # A later action without a ramp replaces it: level-based, the newest wins.
    h.apply(lr_action(0.8, to=0.0, over_steps=8))
    train_step(h)
    assert h.apply(lr_action(0.5)).outcome == "applied"
    assert [train_step(h) for _ in range(2)] == pytest.approx([0.05, 0.05])


def test_a_cooldown_segment_that_arrives_late_never_lifts_the_multiplier() -> None:
    """The policy draws each segment from where it forecasts the job to be when it applies; one
    that applies later (a loaded machine) finds the job lower on the previous segment, and goes
    on down from there instead of jumping back up."""
    h, _ = handle()
    h.apply(lr_action(1.0, to=0.0, over_steps=4))
    assert [train_step(h) for _ in range(3)] == pytest.approx([0.1, 0.075, 0.05])
    assert h.apply(lr_action(0.6, to=0.0, over_steps=2)).outcome == "applied"  # drawn for 0.6
    assert [train_step(h) for _ in range(3)] == pytest.approx([0.025, 0.0125, 0.0])
    # A plain value is a decision, not a segment: it may raise the multiplier.
    h.apply(lr_action(0.5))
    assert train_step(h) == pytest.approx(0.05)
    # A rising segment too.
    h.apply(lr_action(0.6, to=1.0, over_steps=2))
    assert [train_step(h) for _ in range(3)] == pytest.approx([0.06, 0.08, 0.1])


@pytest.mark.parametrize(
    ("ramp", "says"),
    [
        ({"to": 11.0, "over_steps": 3}, "ramp target 'to'"),
        ({"to": True, "over_steps": 3}, "ramp target 'to'"),
        ({"to": 0.0, "over_steps": 0}, "'over_steps' must be an integer"),
        ({"to": 0.0, "over_steps": 2.5}, "'over_steps' must be an integer"),
        ({"to": 0.0}, "'over_steps' must be an integer"),
    ],
)
def test_a_bad_ramp_is_rejected_and_the_multiplier_kept(ramp: dict[str, Any], says: str) -> None:
    h, _ = handle()
    out = h.apply(lr_action(0.5, **ramp))
    assert out.outcome == "rejected" and says in out.detail
    assert h.lr_multiplier == 1.0


def stop_action(cause: str = "budget") -> Action:
    return Action(kind=KNOB_STOP, params={"cause": cause}, reason="the budget is spent", step=0)


def test_save_hooks_run_once_in_order_before_should_stop() -> None:
    calls: list[Any] = []
    h, _ = handle(on_stop=lambda info: calls.append(("attach", info, h.should_stop)))

    @h.on_stop
    def second(info: StopInfo) -> None:
        calls.append(("decorated", info, h.should_stop))

    train_step(h)
    assert h.apply(stop_action("marginal_gain")).outcome == "applied"
    assert [(name, stopping) for name, _, stopping in calls] == [("attach", False), ("decorated", False)]
    assert calls[0][1] == StopInfo(step=1, reason="the budget is spent", cause="marginal_gain")
    assert h.should_stop
    assert h.apply(stop_action()).outcome == "noop" and len(calls) == 2


def test_a_failing_save_hook_is_reported_and_the_stop_still_applies() -> None:
    def broken(info: StopInfo) -> None:
        raise OSError("disk full")

    h, _ = handle(on_stop=broken)
    out = h.apply(stop_action())
    assert out.outcome == "applied" and "on_stop hook 'broken' failed: OSError: disk full" in out.detail
    assert h.should_stop
    with pytest.raises(TypeError, match="on_stop takes a function"):
        h.on_stop(42)  # type: ignore[arg-type]


def test_report_takes_a_finite_number_or_a_0d_tensor() -> None:
    h, _ = handle()
    h.report(eval_loss=torch.tensor(1.25))
    assert h.agent._eval_loss == 1.25
    train_step(h)
    assert h.agent._eval_loss is None  # sent with the step's record (none is queued: no controller)
    with pytest.raises(TypeError, match="eval_loss must be a number"):
        h.report(eval_loss="1.0")
    with pytest.raises(TypeError, match="eval_loss must be a number"):
        h.report(eval_loss=True)
    with pytest.raises(ValueError, match="must be finite"):
        h.report(eval_loss=float("nan"))


# ---- the wire field ---------------------------------------------------------------------------------


def record(step: int, **kw: Any) -> StepRecord:
    base = dict(
        step=step,
        time=1000.0 + step,
        loss=2.0,
        samples=8 * step,
        tokens=1024 * step,
        step_time_s=1.0,
        lr=0.1,
        config={},
        memory=(),
    )
    return StepRecord(**{**base, **kw})


def test_eval_loss_crosses_the_wire_and_is_decoded_strictly() -> None:
    r = record(3, eval_loss=1.5)
    assert StepRecord.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert "eval_loss" not in record(3).to_json()  # absent when there is none: older controllers read it
    assert StepRecord.from_json({**record(3).to_json(), "eval_loss": None}).eval_loss is None
    for bad in ("1.5", True, [1.5], {"v": 1}):
        with pytest.raises(ProtocolError, match=r"record\.eval_loss must be a number or null"):
            StepRecord.from_json({**record(3).to_json(), "eval_loss": bad})


# ---- the controller's side ----------------------------------------------------------------------------

SHAPE = JobShape(
    run_id="r",
    adapter="pytorch",
    world_size=1,
    param_count=1000,
    global_batch_size=8,
    tokens_per_sample=128,
    knobs=(
        KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=10.0),
        KnobSpec(KNOB_STOP, False, choices=(True,)),
    ),
    pids=(4242,),
    device="cpu",
    device_total_bytes=2**34,
    sync_every=1,
)


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_hello_for_a_new_job_on_a_spent_budget_is_refused(tmp_path: Path) -> None:
    policy = load_policy_text("version: 1\nbudget:\n  tokens: 4096\npolicies:\n  - kind: compute\n")
    ctl = Controller(tmp_path / "run", "r", policy)
    ctl.hello(SHAPE)
    ctl.exchange([record(s) for s in range(1, 5)], [], finished=True)
    ctl.close()
    again = Controller(tmp_path / "run", "r", policy)  # restarted on the same run directory
    again.hello(SHAPE)  # the same job reconnecting: it is stopped, not refused
    with pytest.raises(BudgetSpentError, match=r"tokens budget is already spent: 4096 of 4096 tokens"):
        again.hello(JobShape(**{**SHAPE.__dict__, "pids": (5151,)}))
    assert isinstance(BudgetSpentError("x"), ProtocolError), "a sidecar answers it with a 400"


def test_an_early_stop_is_in_the_summary_with_the_budget_it_saved(tmp_path: Path) -> None:
    """The stopping rule on a recorded plateau: loss flat from 30% of a 100 s budget."""
    policy = load_policy_text(
        "version: 1\nbudget:\n  wall_time: 100s\ncontroller:\n  decide_interval_s: 0.001\n"
        "policies:\n  - kind: compute\n    min_gain: 0.01\n    cooldown_fraction: 0.2\n"
    )
    clock = Clock()
    ctl = Controller(tmp_path / "run", "r", policy, clock=clock)
    ctl.hello(SHAPE)
    config = {KNOB_LR_MULTIPLIER: 1.0, KNOB_STOP: False}
    step, outcomes = 0, []
    while not config[KNOB_STOP] and step < 100:
        step += 1
        loss = 3.0 - 2.0 * min(step, 30) / 100
        clock.t = 1000.0 + step
        actions = ctl.exchange([record(step, loss=loss, config=dict(config))], outcomes)
        outcomes = []
        for a in actions:
            if a.step <= step + 1:  # the job applies what is due, as the agent does
                config[a.kind] = a.params.get("value", True)
                outcomes.append(Outcome(a.id, "applied", step, 0.0))
    ctl.exchange([], outcomes, finished=True)
    summary = ctl.close()
    stop = summary["stop"]
    assert stop["cause"] == "marginal_gain" and "stopping rule" in stop["reason"]
    # The rule fires once the smoothed loss (EMA 0.1: ~25 steps behind) has been flat over the
    # gain window, after the plateau began (30%) and well before the end; the run then cools down
    # for a fifth of its length: the point is 0.8 x the fraction spent at the end.
    fired_at = 0.8 * (1 - stop["saved"]["fraction"])
    assert 0.3 < fired_at < 0.75, stop
    assert stop["saved"]["budget"] == "wall_time" and stop["saved"]["seconds"] == pytest.approx(
        stop["saved"]["amount"]
    )
    assert summary["budgets"][0]["binding"] and summary["budgets"][0]["forecast_end_time"] is not None
