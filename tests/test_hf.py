"""The HF Trainer callback on a real transformers Trainer training a GPT-2 on the CPU: per-step
telemetry through an embedded controller, the LR multiplier at step boundaries (the scheduler
never sees it), the stop through the Trainer's own control flags, with a checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_helpers import fresh_accelerate_state
from transformers import Trainer, TrainerCallback, TrainingArguments

from trainwarden.adapters.hf import TrainwardenCallback
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action
from trainwarden.controller.runlog import read_jsonl
from trainwarden.examples.accelerate_train import CorpusWindows, gpt2

BLOCK = 32


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    with fresh_accelerate_state():
        yield


@pytest.fixture(scope="module")
def data() -> CorpusWindows:
    return CorpusWindows(8 * 2 * 12, BLOCK, seed=0, max_bytes_per_domain=300_000)


class Inject(TrainerCallback):
    """Hands the trainwarden callback an action at a step boundary, as its agent would, and
    records what the optimizer and the scheduler saw at each step (runs after trainwarden's)."""

    def __init__(self, tw: TrainwardenCallback, at: dict[int, Action]) -> None:
        self.tw, self.at = tw, at
        self.applied_lr: list[float] = []
        self.scheduled_lr: list[float] = []
        self.outcomes: list[str] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.applied_lr.append(kw["optimizer"].param_groups[0]["lr"])
        self.scheduled_lr.append(kw["lr_scheduler"].get_last_lr()[0])

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        action = self.at.get(state.global_step)
        if action is not None:
            self.outcomes.append(self.tw.apply(action, state.global_step).outcome)


def _trainer(
    data: CorpusWindows,
    out: Path,
    callbacks: list[Any],
    steps: int = 6,
    accumulation: int = 2,
    eval_steps: int | None = None,
) -> Trainer:
    args = TrainingArguments(
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        per_device_eval_batch_size=8,
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulation,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    model = gpt2(BLOCK, n_layer=1, n_embd=32, n_head=2)
    return Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=torch.utils.data.Subset(data, range(16)) if eval_steps else None,
        data_collator=lambda rows: {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
        },
        callbacks=callbacks,
    )


def test_telemetry_reaches_the_controller_with_the_trainers_own_losses(
    data: CorpusWindows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRAINWARDEN_DISABLE", raising=False)
    monkeypatch.delenv("TRAINWARDEN_ENDPOINT", raising=False)
    run_dir = tmp_path / "run"
    tw = TrainwardenCallback(run_dir=run_dir, sync_every=2)
    trainer = _trainer(data, tmp_path / "out", [tw], eval_steps=3)
    trainer.train()
    records = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert [r["step"] for r in records] == list(range(1, 7))
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    for rec, loss in zip(records, logged):  # the Trainer logs its step loss rounded to 4 digits
        assert rec["loss"] == pytest.approx(loss, abs=1e-3)
    assert records[-1]["samples"] == 6 * 16 and records[-1]["tokens"] == 6 * 16 * BLOCK
    assert all(r["memory"] for r in records if r["step"] % 2 == 0)
    # Each evaluation's loss goes out with the next step (evaluation runs after on_step_end).
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == pytest.approx(evals[:1])
    assert len(evals) == 2  # steps 3 and 6; the last one comes after the last step record
    hello = next(r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello")
    assert {k["name"] for k in hello["shape"]["knobs"]} == {KNOB_LR_MULTIPLIER, KNOB_STOP}
    assert hello["shape"]["global_batch_size"] == 16


def test_lr_multiplier_applies_to_the_optimizer_step_and_never_to_the_scheduler(
    data: CorpusWindows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    tw = TrainwardenCallback()
    probe = Inject(tw, {3: Action(KNOB_LR_MULTIPLIER, {"value": 0.0}, "test", 3)})
    trainer = _trainer(data, tmp_path / "out", [tw, probe])
    weights: list[torch.Tensor] = []

    class Snap(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            weights.append(kw["model"].transformer.wte.weight.detach().clone())

    trainer.add_callback(Snap())
    trainer.train()
    assert probe.outcomes == ["applied"]
    assert probe.applied_lr[:3] == probe.scheduled_lr[:3] and all(lr > 0 for lr in probe.applied_lr[:3])
    assert probe.applied_lr[3:] == [0.0, 0.0, 0.0]
    # The scheduler kept its own schedule (linear decay from 3e-3 over 6 steps).
    assert probe.scheduled_lr == pytest.approx([3e-3 * (6 - s) / 6 for s in range(6)])
    # LR 0 from step 4 on: AdamW without weight decay leaves every weight where it was.
    assert not torch.equal(weights[1], weights[2])
    assert all(torch.equal(weights[2], w) for w in weights[3:])


def test_the_lr_multiplier_follows_a_cooldown_ramp_step_by_step(
    data: CorpusWindows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compute policy sends a cooldown as a ramp: the multiplier moves every optimizer step."""
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    tw = TrainwardenCallback()
    ramp = Action(KNOB_LR_MULTIPLIER, {"value": 1.0, "to": 0.0, "over_steps": 2}, "test", 3)
    probe = Inject(tw, {3: ramp})
    trainer = _trainer(data, tmp_path / "out", [tw, probe])
    trainer.train()
    assert probe.outcomes == ["applied"]
    # The injector runs after trainwarden's on_step_end: step 4 runs at the action's value,
    # then the ramp moves once per step.
    multipliers = [a / s for a, s in zip(probe.applied_lr[3:], probe.scheduled_lr[3:])]
    assert multipliers == pytest.approx([1.0, 0.5, 0.0])


def test_stop_ends_training_through_the_trainers_control_and_saves(
    data: CorpusWindows, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    saved: list[Any] = []
    tw = TrainwardenCallback(on_stop=saved.append)
    # The injector runs after trainwarden's on_step_end: the stop it hands over at step 2 is
    # carried at the next boundary, as an action the agent returns at step 3 would be.
    probe = Inject(tw, {2: Action(KNOB_STOP, {}, "budget spent", 2)})
    trainer = _trainer(data, tmp_path / "out", [tw, probe], steps=10)
    trainer.train()
    assert probe.outcomes == ["applied"] and tw.should_stop
    assert [(i.step, i.reason) for i in saved] == [(2, "budget spent")]
    assert trainer.state.global_step == 3
    assert (tmp_path / "out" / "checkpoint-3").is_dir(), "no checkpoint at the stop"
