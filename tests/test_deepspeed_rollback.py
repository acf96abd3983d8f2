"""A switch that fails once the old engine is gone rolls back: the previous configuration is
rebuilt from the host copy with the state intact, and training goes on as if nothing happened."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ds_helpers import (  # noqa: F401 - deepspeed_env is a fixture
    assert_engine,
    assert_same_state,
    deepspeed_env,
    ds_config,
    tiny_gpt,
    token_batches,
    train_steps,
)

from trainwarden.adapters import deepspeed as twds
from trainwarden.adapters.deepspeed import state as ds_state
from trainwarden.controller.protocol import KNOB_PRECISION, KNOB_ZERO_STAGE, Action

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_env")]


def _start(handles: list[twds.DeepSpeedHandle], stage: int) -> twds.DeepSpeedHandle:
    model = tiny_gpt()
    h, *_ = twds.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(stage=stage), attach_agent=False
    )
    handles.append(h)
    return h


class _FailOnce:
    """Wraps a function: the first call that `when(*args)` selects raises `exc` instead of running."""

    def __init__(self, fn: Any, exc: BaseException, when: Any = lambda *a, **k: True) -> None:
        self.fn, self.exc, self.when, self.fired = fn, exc, when, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.fired and self.when(*args, **kwargs):
            self.fired += 1
            raise self.exc
        return self.fn(*args, **kwargs)


def test_failed_build_rolls_back_with_the_state_intact(
    handles: list[twds.DeepSpeedHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    batches = token_batches(40)
    ref = _start(handles, 1)
    reference = train_steps(ref, iter(batches), 8)

    h = _start(handles, 1)
    it = iter(batches)
    losses = train_steps(h, it, 3)
    before = h.training_state()
    old_engine = h.engine
    destroyed: list[Any] = []

    failing = _FailOnce(h._builder.build, RuntimeError("injected: the new engine could not be built"))

    def build(setting: Any) -> Any:
        destroyed.append("optimizer" not in old_engine.__dict__)  # _destroy dropped it
        return failing(setting)

    monkeypatch.setattr(h._builder, "build", build)
    with pytest.raises(twds.ReconfigureError, match=r"rolled back.*injected") as info:
        h.reconfigure(zero_stage=3)
    assert failing.fired == 1 and destroyed == [True, True]  # the old engine was gone at each build
    result = info.value.result
    assert result.rolled_back and not result.applied and "injected" in (result.error or "")
    assert result.changes == (("zero_stage", 1, 3),)
    assert h.engine is not old_engine  # rebuilt, not kept
    assert_engine(h, 1, "fp32", False, False)
    assert_same_state(before, h.training_state(), what="after rollback")
    losses += train_steps(h, it, 5)
    assert losses == reference  # training went on as if nothing had happened


def test_failure_after_the_new_engine_exists_rolls_back_too(
    handles: list[twds.DeepSpeedHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state write into the new engine fails (an OOM there, say): that engine is destroyed
    and the previous one rebuilt; called from the controller path nothing is raised."""
    h = _start(handles, 2)
    it = iter(token_batches(40))
    train_steps(h, it, 2)
    before = h.training_state()
    oom = getattr(torch.cuda, "OutOfMemoryError", MemoryError)("injected OOM while moving the state")
    failing = _FailOnce(
        ds_state.restore, oom, when=lambda engine, *a, **k: engine.zero_optimization_stage() == 0
    )
    monkeypatch.setattr(ds_state, "restore", failing)
    outcome = h.apply(Action(kind=KNOB_ZERO_STAGE, params={"value": 0}, reason="test", step=0))
    assert failing.fired == 1
    assert outcome.outcome == "rolled_back" and "injected OOM" in outcome.detail
    assert_engine(h, 2, "fp32", False, False)
    assert_same_state(before, h.training_state(), what="after rollback")
    train_steps(h, it, 1)
    # The next request goes through.
    outcome = h.apply(Action(kind=KNOB_ZERO_STAGE, params={"value": 0}, reason="test", step=0))
    assert outcome.outcome == "applied", outcome.detail
    assert_engine(h, 0, "fp32", False, False)


def test_bad_requests_are_rejected_and_a_failed_rollback_is_fatal(
    handles: list[twds.DeepSpeedHandle], monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _start(handles, 1)
    train_steps(h, iter(token_batches(10)), 1)
    engine = h.engine
    out = h.apply(Action(kind=KNOB_PRECISION, params={"value": "fp8"}, reason="test", step=0))
    assert out.outcome == "rejected" and "precision" in out.detail
    out = h.apply(Action(kind="activation_checkpointing", params={"value": "yes"}, reason="test", step=0))
    assert out.outcome == "rejected"
    assert h.engine is engine

    def broken(setting: Any) -> Any:
        raise RuntimeError("no engine can be built")

    monkeypatch.setattr(h._builder, "build", broken)
    with pytest.raises(twds.SwitchFailed, match="no engine to train with"):
        h.apply(Action(kind=KNOB_ZERO_STAGE, params={"value": 2}, reason="test", step=0))
