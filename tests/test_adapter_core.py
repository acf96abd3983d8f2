"""One step-boundary protocol (adapters/core/boundary.py): the same cooldown ramp and the same stop,
handed to each of the four adapters as its agent hands them (the actions `agent.on_step` returns
at a step boundary), give the same recorded `lr_multiplier` sequence and the same stop step.

The agent is the real one (no controller: TRAINWARDEN_DISABLE); its `on_step` is wrapped to read
each step record the adapter hands it and to return the scripted actions, as the controller's
would come back through it. The adapters, their models and their loops are real.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate_helpers import fresh_accelerate_state
from ds_helpers import deepspeed_env, ds_config, tiny_gpt, token_batches  # noqa: F401 - a fixture

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action

pytestmark = pytest.mark.slow

#: At the end of step 2 the cooldown starts (1.0 -> 0.0 over 4 steps, the compute policy's
#: action); at the end of step 5 the stop applies.
RAMP_AT, STOP_AT = 2, 5
#: The record of step N carries the multiplier step N ran at: the ramp starts at its value (1.0)
#: at step 3 and moves after each record.
EXPECTED = [1.0, 1.0, 1.0, 0.75, 0.5]
MAX_STEPS = 12

_ids = itertools.count()


def _script(step: int) -> list[Action]:
    if step == RAMP_AT:
        params = {"value": 1.0, "to": 0.0, "over_steps": 4}
        return [Action(KNOB_LR_MULTIPLIER, params, "cooldown", step, id=f"ramp-{next(_ids)}")]
    if step == STOP_AT:
        return [Action(KNOB_STOP, {"cause": "budget"}, "the budget is spent", step, id=f"stop-{next(_ids)}")]
    return []


class Recorder:
    """Wraps an agent's `on_step`: keeps (step, lr_multiplier) of each record, returns the script."""

    def __init__(self) -> None:
        self.records: list[tuple[int, float]] = []

    def wrap(self, agent: Any) -> None:
        original = agent.on_step

        def on_step(**record: Any) -> list[Action]:
            due = list(original(**record))  # the real agent still records the step
            self.records.append((record["step"], record["config"][KNOB_LR_MULTIPLIER]))
            return due + _script(record["step"])

        agent.on_step = on_step


@pytest.fixture(autouse=True)
def no_controller(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("TRAINWARDEN_ENDPOINT", "TRAINWARDEN_TOKEN", "TRAINWARDEN_POLICY", "TRAINWARDEN_SYNC_EVERY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    with fresh_accelerate_state():
        yield


def _assert_same(rec: Recorder, stopped_after: int) -> None:
    assert [m for _, m in rec.records] == pytest.approx(EXPECTED)
    assert [s for s, _ in rec.records] == list(range(1, STOP_AT + 1))
    assert stopped_after == STOP_AT


def test_plain_pytorch() -> None:
    from trainwarden.adapters import pytorch as tw

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    h = tw.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), global_batch_size=8, micro_batch_size=4)
    rec = Recorder()
    rec.wrap(h.agent)
    data = [(torch.randn(8, 4), torch.randn(8, 1)) for _ in range(MAX_STEPS)]
    for step_batch in h.steps(data):
        for x, y in step_batch:
            h.backward(torch.nn.functional.mse_loss(model(x), y))
        h.step()
        if h.should_stop:
            break
    h.close()
    _assert_same(rec, h.step_count)


def test_deepspeed_on_one_cpu_rank(deepspeed_env: Any) -> None:  # noqa: F811 - the fixture
    from trainwarden.adapters import deepspeed as twds

    model = tiny_gpt()
    engine, _, _, _ = twds.initialize(model=model, model_parameters=model.parameters(), config=ds_config())
    rec = Recorder()
    rec.wrap(engine.agent)
    batches = iter(token_batches(MAX_STEPS * engine.gradient_accumulation_steps()))
    try:
        while not engine.should_stop:
            b = next(batches)
            _, loss = engine(b[:, :-1], b[:, 1:])
            engine.backward(loss)
            engine.step()
        _assert_same(rec, int(engine.global_steps))
    finally:
        engine.destroy()


def test_accelerate_on_the_cpu() -> None:
    from trainwarden.adapters.accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Linear(4, 1)
    data = torch.utils.data.TensorDataset(torch.randn(4 * MAX_STEPS, 4), torch.randn(4 * MAX_STEPS, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model, opt, loader = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    rec = Recorder()
    assert acc.agent is not None
    rec.wrap(acc.agent)
    for x, y in loader:
        with acc.accumulate(model):
            acc.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        if acc.should_stop:
            break
    acc.close()
    _assert_same(rec, acc.step_count)


def test_the_hf_trainer(tmp_path: Path) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainwarden.adapters.hf import TrainwardenCallback

    rec = Recorder()
    tw = TrainwardenCallback(save_on_stop=False)

    class WrapAgent(TrainerCallback):  # runs after trainwarden's on_train_begin, which starts the agent
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            rec.wrap(tw.agent)

    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": torch.nn.functional.mse_loss(self.lin(x), y)}

    torch.manual_seed(0)
    rows = [{"x": torch.randn(4), "y": torch.randn(1)} for _ in range(4 * MAX_STEPS)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=Regression(), args=args, train_dataset=rows, callbacks=[tw, WrapAgent()])
    trainer.train()
    _assert_same(rec, trainer.state.global_step)
