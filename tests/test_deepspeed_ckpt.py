"""Activation checkpointing as a knob of the DeepSpeed handle: offered only for a model that can
switch it, switched at a step boundary on the module with no new engine, and exact (the run that
switched it on and off follows the one that never did, bitwise, in fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ds_helpers import (  # noqa: F401 - deepspeed_env is a fixture
    assert_same_state,
    deepspeed_env,
    ds_config,
    tiny_gpt,
    token_batches,
    train_steps,
)
from torch.utils.checkpoint import checkpoint

from trainwarden.adapters import deepspeed as twds
from trainwarden.controller.protocol import KNOB_ACTIVATION_CHECKPOINTING, Action

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_env")]


def _start(
    handles: list[twds.DeepSpeedHandle], model: torch.nn.Module, stage: int = 0
) -> twds.DeepSpeedHandle:
    # attach_agent on (TRAINWARDEN_DISABLE=1: no controller) so the shape the agent reports exists.
    h, *_ = twds.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage=stage))
    handles.append(h)
    return h


def _knobs(h: twds.DeepSpeedHandle) -> dict[str, Any]:
    assert h.agent is not None
    return {k.name: k for k in h.agent.shape.knobs}


@pytest.mark.parametrize("stage", [0, 3])
def test_switching_checkpointing_is_exact_and_needs_no_new_engine(
    handles: list[twds.DeepSpeedHandle], stage: int
) -> None:
    batches = token_batches(40)
    ref = _start(handles, tiny_gpt(), stage)
    reference = train_steps(ref, iter(batches), 6)

    h = _start(handles, tiny_gpt(), stage)
    knob = _knobs(h)[KNOB_ACTIVATION_CHECKPOINTING]
    assert knob.value is False and knob.choices == (False, True)
    assert h.config()[KNOB_ACTIVATION_CHECKPOINTING] is False
    it = iter(batches)
    losses = train_steps(h, it, 2)
    engine = h.engine
    out = h.apply(Action(KNOB_ACTIVATION_CHECKPOINTING, {"value": True}, "test: save activations", 0))
    assert out.outcome == "applied", out.detail
    assert h.module.activation_checkpointing and h.config()[KNOB_ACTIVATION_CHECKPOINTING] is True
    assert h.engine is engine and not h.last_reconfigure.rebuilt
    assert h.last_reconfigure.changes == ((KNOB_ACTIVATION_CHECKPOINTING, False, True),)
    assert h.apply(Action(KNOB_ACTIVATION_CHECKPOINTING, {"value": True}, "again", 0)).outcome == "noop"
    losses += train_steps(h, it, 2)
    h.reconfigure(activation_checkpointing=False)
    assert not h.module.activation_checkpointing
    losses += train_steps(h, it, 2)
    assert losses == reference
    assert_same_state(ref.training_state(), h.training_state(), what="checkpointing on and off")


class _Plain(torch.nn.Module):
    """A model with no way to switch activation checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_gpt()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> Any:
        return self.inner(idx, targets)


class _HFStyle(torch.nn.Module):
    """HF transformers' interface: gradient_checkpointing_enable(gradient_checkpointing_kwargs=...),
    gradient_checkpointing_disable(), is_gradient_checkpointing."""

    supports_gradient_checkpointing = True

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(256, 16)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        self.head = torch.nn.Linear(16, 256)
        self.is_gradient_checkpointing = False
        self.kwargs_seen: list[Any] = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None) -> None:
        self.kwargs_seen.append(gradient_checkpointing_kwargs)
        self.is_gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.is_gradient_checkpointing = False

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> Any:
        x = self.emb(idx)
        for layer in self.layers:
            if self.is_gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        logits = self.head(x)
        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_the_knob_is_offered_only_where_the_model_supports_it(handles: list[twds.DeepSpeedHandle]) -> None:
    plain = _start(handles, _Plain())
    assert KNOB_ACTIVATION_CHECKPOINTING not in _knobs(plain)
    assert KNOB_ACTIVATION_CHECKPOINTING not in plain.config()
    out = plain.apply(Action(KNOB_ACTIVATION_CHECKPOINTING, {"value": True}, "test", 0))
    assert out.outcome == "rejected" and "cannot switch activation checkpointing" in out.detail
    with pytest.raises(twds.ConfigError, match="cannot switch"):
        plain.reconfigure(activation_checkpointing=True)

    batches = token_batches(20)
    ref = _start(handles, _HFStyle())
    reference = train_steps(ref, iter(batches), 4)
    hf = _start(handles, _HFStyle())
    assert _knobs(hf)[KNOB_ACTIVATION_CHECKPOINTING].value is False
    it = iter(batches)
    losses = train_steps(hf, it, 1)
    assert hf.apply(Action(KNOB_ACTIVATION_CHECKPOINTING, {"value": True}, "test", 0)).outcome == "applied"
    assert hf.module.is_gradient_checkpointing and hf.module.kwargs_seen == [{"use_reentrant": False}]
    losses += train_steps(hf, it, 2)
    assert hf.apply(Action(KNOB_ACTIVATION_CHECKPOINTING, {"value": False}, "test", 0)).outcome == "applied"
    assert not hf.module.is_gradient_checkpointing and hf.config()[KNOB_ACTIVATION_CHECKPOINTING] is False
    losses += train_steps(hf, it, 1)
    assert losses == reference
