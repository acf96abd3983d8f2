"""The compute budget's shared pieces on the DeepSpeed handle: the stop runs the user's save hook at
the step boundary (DeepSpeed's own `save_checkpoint`), and a new engine resumed from it trains on
exactly as the stopped one would; the cooldown's ramp moves the multiplier step by step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ds_helpers import (  # noqa: F401 - deepspeed_env is a fixture
    deepspeed_env,
    ds_config,
    tiny_gpt,
    token_batches,
    train_steps,
)

from trainwarden.adapters import deepspeed as twds
from trainwarden.adapters.knobs import StopInfo
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_env")]


def test_the_stop_saves_a_deepspeed_checkpoint_a_new_engine_resumes_from(
    handles: list[twds.DeepSpeedHandle], tmp_path: Path
) -> None:
    saved: list[tuple[StopInfo, bool]] = []

    def save(info: StopInfo) -> None:
        saved.append((info, h.should_stop))
        h.save_checkpoint(str(tmp_path / "ckpt"), tag="final")

    model = tiny_gpt(0)
    h, *_ = twds.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(stage=0), on_stop=save
    )
    handles.append(h)
    batches = token_batches(40)
    it = iter(batches)
    train_steps(h, it, 3)
    stop = Action(KNOB_STOP, {"cause": "budget"}, "the tokens budget is spent", 4)
    out = h.apply(stop)
    assert out.outcome == "applied", out.detail
    [(info, stopping)] = saved
    assert not stopping and h.should_stop
    assert info == StopInfo(step=3, reason="the tokens budget is spent", cause="budget")

    other = tiny_gpt(7)  # different weights: the load must overwrite them
    r, *_ = twds.initialize(model=other, model_parameters=other.parameters(), config=ds_config(stage=0))
    handles.append(r)
    r.load_checkpoint(str(tmp_path / "ckpt"), tag="final")
    rest = batches[3 * h.gradient_accumulation_steps() :]
    assert train_steps(r, iter(rest), 2) == train_steps(h, iter(rest), 2)
    for (name, a), b in zip(r.module.named_parameters(), h.module.parameters()):
        assert torch.equal(a, b), name


def test_the_cooldown_ramp_moves_the_deepspeed_multiplier_each_step(
    handles: list[twds.DeepSpeedHandle],
) -> None:
    model = tiny_gpt(0)
    h, *_ = twds.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage=0))
    handles.append(h)
    ramp = Action(KNOB_LR_MULTIPLIER, {"value": 0.8, "to": 0.2, "over_steps": 3}, "cooldown", 1)
    assert h.apply(ramp).outcome == "applied"
    it = iter(token_batches(40))
    seen = []
    for _ in range(4):
        train_steps(h, it, 1)
        seen.append(h.lr_multiplier)
    assert seen == pytest.approx([0.6, 0.4, 0.2, 0.2])
