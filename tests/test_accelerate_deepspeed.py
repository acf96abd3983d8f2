"""Accelerate with a DeepSpeed plugin, through trainwarden's Accelerator: the engine Accelerate
builds is the DeepSpeed adapter's live handle, so the ZeRO stage and precision switch in memory
with the state exact (the DeepSpeed adapter's transfer, reused), Accelerate's own objects keep
working across the switch, and its plugin config follows. Real DeepSpeed on the CPU, one rank."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DeepSpeedPlugin
from accelerate_helpers import fresh_accelerate_state
from ds_helpers import ds_env

from trainwarden.adapters.accelerate import Accelerator
from trainwarden.adapters.deepspeed import DeepSpeedHandle
from trainwarden.controller.protocol import KNOB_PRECISION, KNOB_ZERO_STAGE, Action
from trainwarden.examples.accelerate_train import CorpusWindows, gpt2, per_sample_loss

pytestmark = pytest.mark.slow
BLOCK = 32


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """DeepSpeed's single-process variables and process group, as the DeepSpeed tests set them
    (once per test process); Accelerate's state fresh for each test."""
    ds_env()
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # Accelerate sets it process-wide
    with fresh_accelerate_state():
        yield


@pytest.fixture(scope="module")
def data() -> CorpusWindows:
    return CorpusWindows(8 * 10, BLOCK, seed=0, max_bytes_per_domain=300_000)


def _run(data: CorpusWindows, switch: dict[int, tuple[str, Any]], steps: int = 4) -> dict[str, Any]:
    plugin = DeepSpeedPlugin(zero_stage=1, gradient_accumulation_steps=1)
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 8
    acc = Accelerator(deepspeed_plugin=plugin, attach_agent=False)
    torch.manual_seed(0)
    model = gpt2(BLOCK, n_layer=1, n_embd=32, n_head=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    assert isinstance(model, DeepSpeedHandle)
    out: dict[str, Any] = {"losses": [], "lrs": [], "outcomes": [], "exact": [], "handle": model, "acc": acc}
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        loss = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["input_ids"]).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        out["losses"].append(acc.last_loss)
        out["lrs"].append(acc.last_lr)
        if acc.step_count in switch:
            kind, value = switch[acc.step_count]
            state = model.training_state()
            out["outcomes"].append(acc.apply(Action(kind, {"value": value}, "test", acc.step_count)).outcome)
            after = model.training_state()
            # fp32 masters, Adam moments and the step count exactly as before the switch.
            out["exact"].append(
                state.step == after.step
                and all(torch.equal(a, b) for a, b in zip(state.values, after.values))
                and all(
                    torch.equal(a, b)
                    for k in state.moments
                    for a, b in zip(state.moments[k], after.moments[k])
                    if a is not None
                )
            )
    out["weights"] = [t.clone() for t in model.training_state().values]
    return out


def test_zero_stage_switch_through_accelerate_is_exact(data: CorpusWindows) -> None:
    plain = _run(data, {})
    plain["handle"].destroy()
    AcceleratorState._reset_state()
    run = _run(data, {2: (KNOB_ZERO_STAGE, 2)})
    assert run["outcomes"] == ["applied"] and run["exact"] == [True]
    acc = run["acc"]
    assert acc.config()[KNOB_ZERO_STAGE] == 2
    assert acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    # The user's torch scheduler, kept by Accelerate outside DeepSpeed, steps the new optimizer.
    assert run["lrs"] == pytest.approx(plain["lrs"])
    assert run["losses"] == plain["losses"], (run["losses"], plain["losses"])
    assert all(torch.equal(a, b) for a, b in zip(run["weights"], plain["weights"]))
    specs = {k.name: k for k in acc._knob_specs()}
    assert specs[KNOB_ZERO_STAGE].choices == (0, 1, 2, 3) and KNOB_PRECISION in specs
    assert "micro_batch_size" not in specs  # DeepSpeed's config owns it
    assert acc._tw_samples_seen == 4 * 8  # the loader counts what each step trained on
    run["handle"].destroy()


def test_precision_switch_and_a_refused_request_through_accelerate(data: CorpusWindows) -> None:
    run = _run(data, {1: (KNOB_PRECISION, "bf16"), 2: (KNOB_ZERO_STAGE, 7)}, steps=3)
    assert run["outcomes"] == ["applied", "rejected"] and run["exact"] == [True, True]
    acc = run["acc"]
    assert acc.config()[KNOB_PRECISION] == "bf16"
    assert acc.state.deepspeed_plugin.deepspeed_config["bf16"]["enabled"] is True
    assert all(loss is not None and loss < 10 for loss in run["losses"])
    run["handle"].destroy()
