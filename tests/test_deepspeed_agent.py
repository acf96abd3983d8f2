"""The DeepSpeed handle with its agent: it reports the engine knobs at connect, records telemetry at
each optimizer-step boundary inside the forwarded `step()`, and carries the controller's actions
there: a ZeRO stage switch from a policy, a micro-batch step-down from the memory policy, the LR
multiplier on the optimizer step only, and stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from ds_helpers import (  # noqa: F401 - deepspeed_env is a fixture
    assert_engine,
    deepspeed_env,
    ds_config,
    tiny_gpt,
    token_batches,
    train_steps,
)

from trainwarden.adapters import deepspeed as twds
from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    KNOB_MICRO_BATCH,
    KNOB_STOP,
    KNOB_ZERO_STAGE,
    Action,
)
from trainwarden.controller.runlog import read_jsonl
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies import base
from trainwarden.policies.schema import Budget

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_env")]


@dataclass(frozen=True)
class _NoParams:
    pass


class ForceStage3(base.PolicyKind):
    """Asks for ZeRO stage 3 once the job has run two steps (a stand-in for a ladder policy)."""

    kind = "test_ds_force_stage3"
    Params = _NoParams
    knobs = frozenset({KNOB_ZERO_STAGE})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        if snapshot.step < 2 or snapshot.config.get(KNOB_ZERO_STAGE) == 3:
            return []
        return [Action(KNOB_ZERO_STAGE, {"value": 3}, "test: shard everything", snapshot.step + 1)]


@pytest.fixture
def force_stage3_kind() -> Iterator[None]:
    added = ForceStage3.kind not in base.KINDS
    if added:
        base.register(ForceStage3)
    yield
    if added:
        base.KINDS.pop(ForceStage3.kind, None)


@pytest.fixture
def agent_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An embedded controller on (the deepspeed_env fixture turns it off)."""
    ds = request.getfixturevalue("deepspeed_env")
    monkeypatch.delenv("TRAINWARDEN_DISABLE", raising=False)
    monkeypatch.setenv("TRAINWARDEN_RUN_ID", "ds-agent-test")
    return ds


def _policy(tmp_path: Path, policies: str, cap: str = "64GiB") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\n"
        f"budget:\n  device_memory: {cap}\n"
        "controller:\n  sync_every: 1\n  decide_interval_s: 0.01\n"
        f"policies:\n{policies}"
    )
    return path


def _train_until(h: twds.DeepSpeedHandle, it: Iterator[Any], done: Any, timeout_s: float = 30.0) -> int:
    """Optimizer steps (with a pause for the exchange thread) until `done()`; returns the step."""
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        train_steps(h, it, 1)
        time.sleep(0.05)
    assert done(), "the controller's action never reached the job"
    return int(h.global_steps)


def test_a_policy_switches_the_zero_stage_through_the_agent(
    agent_env: Any, force_stage3_kind: None, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    model = tiny_gpt()
    h, *_ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config(stage=1),
        policy=_policy(tmp_path, "  - kind: test_ds_force_stage3\n"),
        run_dir=run_dir,
        tokens_per_sample=16,
    )
    try:
        it = iter(token_batches(400))
        switched_at = _train_until(h, it, lambda: h.setting.zero_stage == 3)
        assert_engine(h, 3, "fp32", False, False)
        train_steps(h, it, 2)
    finally:
        h.destroy()
    hello = next(r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello")
    knobs = {k["name"]: k for k in hello["shape"]["knobs"]}
    assert knobs[KNOB_ZERO_STAGE]["choices"] == [0, 1, 2, 3] and knobs[KNOB_ZERO_STAGE]["value"] == 1
    assert "fp32" in knobs["precision"]["choices"] and "bf16" in knobs["precision"]["choices"]
    assert knobs["offload_optimizer"]["choices"] == [False, True]
    assert KNOB_MICRO_BATCH not in knobs  # the job brings its own loader
    assert hello["shape"]["adapter"] == "deepspeed" and hello["shape"]["global_batch_size"] == 8

    steps = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(r["loss"] is not None and r["tokens"] == r["samples"] * 16 for r in steps)
    assert steps[0]["samples"] == 8
    stages = [r["config"][KNOB_ZERO_STAGE] for r in steps]
    assert stages[: switched_at - 1] == [1] * (switched_at - 1) and stages[-1] == 3
    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    applied = [d for d in decisions if d["outcome"] == "applied"]
    assert [d["kind"] for d in applied] == [KNOB_ZERO_STAGE], decisions
    assert applied[0]["step"] == switched_at and "zero_stage 1 -> 3" in applied[0]["detail"]


def test_the_memory_policy_steps_the_micro_batch_down(agent_env: Any, tmp_path: Path) -> None:
    """A 1 MiB cap: the memory policy halves the micro-batch (global batch kept) through the knob
    the handle offers because it owns the loader."""
    run_dir = tmp_path / "run"
    model = tiny_gpt()
    dataset = torch.utils.data.TensorDataset(token_batches(1, micro=4096)[0])
    policy = _policy(tmp_path, "  - kind: memory\n    cooldown_steps: 1\n    step_up: false\n", cap="1MiB")
    h, _, loader, _ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        training_data=dataset,
        config=ds_config(stage=2, micro=8, global_batch=8),
        policy=policy,
        run_dir=run_dir,
    )
    try:
        it = iter(loader)

        def steps(n: int) -> None:
            for _ in range(n):
                for _ in range(h.gradient_accumulation_steps()):
                    (b,) = next(it)
                    assert len(b) == h.train_micro_batch_size_per_gpu()
                    _, loss = h(b[:, :-1], b[:, 1:])
                    h.backward(loss)
                    h.step()

        deadline = time.monotonic() + 30
        while h.setting.micro_batch_size > 2 and time.monotonic() < deadline:
            steps(1)
            time.sleep(0.05)
        assert h.setting.micro_batch_size <= 2
        assert (
            h.train_batch_size() == 8 and h.gradient_accumulation_steps() == 8 // h.setting.micro_batch_size
        )
        steps(1)
    finally:
        h.destroy()
    decisions = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["outcome"] == "applied"]
    assert decisions and all(d["kind"] == KNOB_MICRO_BATCH for d in decisions)
    assert decisions[0]["params"] == {"value": 4}


def test_lr_multiplier_and_stop() -> None:
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)  # chainable: would compound
    h, opt_proxy, _, sched_proxy = twds.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(stage=1, optimizer=False)
    )
    try:
        it = iter(token_batches(40))
        train_steps(h, it, 1)
        out = h.apply(Action(KNOB_LR_MULTIPLIER, {"value": 0.0}, "test", 0))
        assert out.outcome == "applied"
        before = h.training_state()
        train_steps(h, it, 1)
        after = h.training_state()
        # lr x 0: the weights stay, the moments move, the scheduler goes on undisturbed.
        assert all(torch.equal(a, b) for a, b in zip(before.values, after.values))
        assert not torch.equal(before.moments["exp_avg"][0], after.moments["exp_avg"][0])
        assert h.last_lr == 0.0
        assert sched_proxy.get_last_lr() == [1e-2 * 0.5**2] == [opt_proxy.param_groups[0]["lr"]]
        h.apply(Action(KNOB_LR_MULTIPLIER, {"value": 1.0}, "test", 0))
        train_steps(h, it, 1)
        assert h.last_lr == 1e-2 * 0.5**2 and sched_proxy.get_last_lr() == [1e-2 * 0.5**3]
        assert h.apply(Action(KNOB_LR_MULTIPLIER, {"value": -1}, "test", 0)).outcome == "rejected"
        assert not h.should_stop
        assert h.apply(Action(KNOB_STOP, {}, "test: budget spent", 0)).outcome == "applied"
        assert h.should_stop and h.config()[KNOB_STOP]
    finally:
        h.destroy()


class StageAndPrecision(base.PolicyKind):
    """One decision, two knobs (as the memory policy sends a multi-knob move): ZeRO 2 and bf16."""

    kind = "test_ds_stage_and_precision"
    Params = _NoParams
    knobs = frozenset({KNOB_ZERO_STAGE, "precision"})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        if snapshot.step < 2 or snapshot.config.get(KNOB_ZERO_STAGE) == 2:
            return []
        step = snapshot.step + 1
        return [
            Action(KNOB_ZERO_STAGE, {"value": 2}, "test: two knobs at once", step),
            Action("precision", {"value": "bf16"}, "test: two knobs at once", step),
        ]


def test_actions_due_at_one_step_build_one_engine(agent_env: Any, tmp_path: Path) -> None:
    """Two knobs for the same step are one switch (one engine built, not two), both reported
    applied with the same switch."""
    added = StageAndPrecision.kind not in base.KINDS
    if added:
        base.register(StageAndPrecision)
    run_dir = tmp_path / "run"
    model = tiny_gpt()
    try:
        h, *_ = twds.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=ds_config(stage=1),
            policy=_policy(tmp_path, "  - kind: test_ds_stage_and_precision\n"),
            run_dir=run_dir,
        )
    finally:
        if added:
            base.KINDS.pop(StageAndPrecision.kind, None)
    builds: list[Any] = []
    real_build = h._builder.build

    def counting_build(setting: Any) -> Any:  # a spy: the real build runs
        builds.append(setting)
        return real_build(setting)

    h._builder.build = counting_build
    try:
        it = iter(token_batches(400))
        _train_until(h, it, lambda: h.setting.zero_stage == 2)
        assert_engine(h, 2, "bf16", False, False)
        assert len(builds) == 1 and (builds[0].zero_stage, builds[0].precision) == (2, "bf16")
        train_steps(h, it, 1)
    finally:
        h.destroy()
    applied = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["outcome"] == "applied"]
    assert sorted(d["kind"] for d in applied) == ["precision", KNOB_ZERO_STAGE], applied
    assert all("one switch for 2 actions" in d["detail"] for d in applied)
    assert all(
        "zero_stage 1 -> 2" in d["detail"] and "precision fp32 -> bf16" in d["detail"] for d in applied
    )
