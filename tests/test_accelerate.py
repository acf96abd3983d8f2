"""The Accelerate drop-in on real Accelerate and a real transformers GPT-2, trained on the CPU:
precision and accumulation switched at step boundaries with the state exact, the compute dtype
really in effect (a forward hook sees it), fp16 refused on the CPU, a failed switch rolled back,
and the agent's telemetry."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import accelerate
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate_helpers import fresh_accelerate_state

from trainwarden.adapters.accelerate import Accelerator, TrackedOptimizer
from trainwarden.adapters.accelerate.loader import MicroBatchLoader
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_MICRO_BATCH, KNOB_PRECISION, Action
from trainwarden.examples.accelerate_train import CorpusWindows, gpt2, per_sample_loss

BLOCK = 32
BATCH = 8


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Accelerate keeps its state per process; each test starts from none."""
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    with fresh_accelerate_state():
        yield


@pytest.fixture(scope="module")
def data() -> CorpusWindows:
    return CorpusWindows(BATCH * 12, BLOCK, seed=0, max_bytes_per_domain=300_000)


class Run:
    """One training run through the drop-in: the loop an Accelerate user writes."""

    def __init__(
        self, data: CorpusWindows, mixed_precision: str = "no", batch: int = BATCH, **kw: Any
    ) -> None:
        torch.manual_seed(0)
        self.acc = Accelerator(mixed_precision=mixed_precision, attach_agent=False, **kw)
        model = gpt2(BLOCK, n_layer=1, n_embd=32, n_head=2)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
        self.model, self.opt, self.loader = self.acc.prepare(model, opt, loader)
        self.batches = iter(self.loader)
        self.losses: list[float] = []
        self.dtypes: list[torch.dtype] = []
        # What the first attention projection really computes in (GPT-2's Conv1D: addmm).
        self.model.transformer.h[0].attn.c_attn.register_forward_hook(
            lambda _m, _i, out: self.dtypes.append(out.dtype)
        )

    def steps(self, n: int) -> None:
        for _ in range(n):
            while True:
                batch = next(self.batches)
                with self.acc.accumulate(self.model):
                    logits = self.model(input_ids=batch["input_ids"]).logits
                    loss = per_sample_loss(logits, batch["input_ids"]).mean()
                    self.acc.backward(loss)
                    self.opt.step()
                    self.opt.zero_grad()
                if self.acc.sync_gradients:
                    break
            assert self.acc.last_loss is not None
            self.losses.append(self.acc.last_loss)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def moments(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(s) for s in self.opt.optimizer.state.values()]


def _same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(torch.as_tensor(x[k]), torch.as_tensor(y[k])) for k in x)
        for x, y in zip(a, b)
    )


def test_prepare_returns_accelerates_objects_and_the_training_loader(data: CorpusWindows) -> None:
    run = Run(data)
    assert isinstance(run.acc, accelerate.Accelerator)
    assert isinstance(run.opt, TrackedOptimizer) and isinstance(
        run.opt, accelerate.optimizer.AcceleratedOptimizer
    )
    assert isinstance(run.loader, MicroBatchLoader)
    run.steps(2)
    assert run.acc.step_count == 2 and run.acc.micro_batch_size == BATCH
    assert run.acc.config()[KNOB_PRECISION] == "fp32"


def test_precision_switch_keeps_the_state_and_the_compute_dtype_follows(data: CorpusWindows) -> None:
    plain = Run(data)
    plain.steps(6)
    AcceleratorState._reset_state()

    run = Run(data)
    run.steps(3)
    assert set(run.dtypes) == {torch.float32}
    weights, moments = run.weights(), run.moments()
    run.acc.reconfigure(precision="bf16")
    assert run.acc.mixed_precision == "bf16" and run.acc.precision == "bf16"
    assert all(torch.equal(weights[k], v) for k, v in run.weights().items()), "weights changed"
    assert _same(moments, run.moments()), "Adam moments or step counts changed"
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # fp32 masters kept

    run.dtypes.clear()
    run.steps(3)
    assert set(run.dtypes) == {torch.bfloat16}, "bf16 is not in effect after the switch"
    assert int(run.opt.optimizer.state[next(iter(run.opt.optimizer.state))]["step"]) == 6
    # bf16 follows the fp32 run's curve: measured |diff| <= 2.5e-4 on a loss of ~5 here.
    for a, b in zip(run.losses[3:], plain.losses[3:]):
        assert abs(a - b) < 5e-3, (run.losses, plain.losses)

    run.acc.reconfigure(precision="fp32")
    run.dtypes.clear()
    run.steps(1)
    assert set(run.dtypes) == {torch.float32}


def test_a_switch_and_back_at_one_boundary_is_bitwise_the_unswitched_run(data: CorpusWindows) -> None:
    plain = Run(data)
    plain.steps(5)
    AcceleratorState._reset_state()
    run = Run(data)
    run.steps(2)
    run.acc.reconfigure(precision="bf16")
    run.acc.reconfigure(precision="fp32")
    run.steps(3)
    assert run.losses == plain.losses
    assert all(torch.equal(run.weights()[k], v) for k, v in plain.weights().items())


def test_bf16_from_the_start_switches_to_fp32(data: CorpusWindows) -> None:
    run = Run(data, mixed_precision="bf16")
    run.steps(1)
    assert set(run.dtypes) == {torch.bfloat16}
    run.acc.reconfigure(precision="no")  # Accelerate's name is accepted too
    run.dtypes.clear()
    run.steps(1)
    assert set(run.dtypes) == {torch.float32} and run.acc.mixed_precision == "no"


def test_micro_batch_switch_keeps_the_global_batch(data: CorpusWindows) -> None:
    plain = Run(data)
    plain.steps(6)
    AcceleratorState._reset_state()
    GradientState._reset_state()

    run = Run(data)
    run.steps(3)
    weights, moments = run.weights(), run.moments()
    run.acc.reconfigure(micro_batch_size=2)
    assert run.acc.gradient_accumulation_steps == 4 and run.acc.micro_batch_size == 2
    assert len(run.loader) == 4 * len(run.loader.loader)  # micro-batches an epoch gives now
    assert all(torch.equal(weights[k], v) for k, v in run.weights().items())
    assert _same(moments, run.moments())
    samples_before = run.acc._tw_samples_seen
    run.steps(3)
    assert run.acc._tw_samples_seen - samples_before == 3 * BATCH, "the global batch changed"
    assert int(run.opt.optimizer.state[next(iter(run.opt.optimizer.state))]["step"]) == 6
    # Four micro-batches of 2 sum to the gradient of one of 8, up to rounding: measured <= 5e-7.
    for a, b in zip(run.losses, plain.losses):
        assert abs(a - b) < 1e-5, (run.losses, plain.losses)
    for k, v in plain.weights().items():
        torch.testing.assert_close(run.weights()[k], v, rtol=0, atol=1e-5)


def test_fp16_is_refused_on_the_cpu_with_the_reason(data: CorpusWindows) -> None:
    run = Run(data)
    run.steps(1)
    outcome = run.acc.apply(Action(KNOB_PRECISION, {"value": "fp16"}, "test", 1))
    assert outcome.outcome == "rejected" and "no-op" in outcome.detail
    spec = {k.name: k for k in run.acc._knob_specs()}
    assert spec[KNOB_PRECISION].choices == ("fp32", "bf16")
    assert not spec[KNOB_PRECISION].accepts("fp16")
    assert spec[KNOB_MICRO_BATCH].choices == (1, 2, 4, 8)
    assert run.acc.mixed_precision == "no"


def test_a_failed_switch_rolls_back_and_training_goes_on(
    data: CorpusWindows, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = Run(data)
    plain.steps(4)
    AcceleratorState._reset_state()
    run = Run(data)
    run.steps(2)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("injected: no accelerator can be built")

    monkeypatch.setattr(accelerate, "Accelerator", broken)  # the fresh one a switch builds
    outcome = run.acc.apply(Action(KNOB_PRECISION, {"value": "bf16"}, "test", 2))
    monkeypatch.undo()
    assert outcome.outcome == "rolled_back" and "injected" in outcome.detail
    assert run.acc.mixed_precision == "no" and AcceleratorState().mixed_precision == "no"
    run.dtypes.clear()
    run.steps(2)
    assert set(run.dtypes) == {torch.float32}
    assert run.losses == plain.losses  # bitwise: the rollback left nothing behind


def test_bad_values_are_rejected_not_raised(data: CorpusWindows) -> None:
    run = Run(data)
    run.steps(1)
    for kind, value in (
        (KNOB_MICRO_BATCH, 3),
        (KNOB_MICRO_BATCH, "8"),
        (KNOB_PRECISION, "fp8"),
        ("zero_stage", 2),
    ):
        assert run.acc.apply(Action(kind, {"value": value}, "test", 1)).outcome == "rejected"
    run.steps(1)
    assert run.acc.step_count == 2


def test_skip_first_batches_keeps_trainwardens_cut(data: CorpusWindows) -> None:
    run = Run(data)
    run.steps(1)
    run.acc.reconfigure(micro_batch_size=4)
    skipped = run.acc.skip_first_batches(run.loader, 2)
    assert isinstance(skipped, MicroBatchLoader)
    first = next(iter(skipped))
    assert torch.equal(first["input_ids"], data.input_ids[2 * BATCH : 2 * BATCH + 4])


def test_save_state_and_load_state_work_through_the_dropin(data: CorpusWindows, tmp_path: Any) -> None:
    first = Run(data)
    first.steps(2)
    first.acc.save_state(str(tmp_path / "ckpt"))
    first.steps(2)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    resumed = Run(data)
    resumed.acc.load_state(str(tmp_path / "ckpt"))
    resumed.batches = iter(resumed.acc.skip_first_batches(resumed.loader, 2))
    resumed.steps(2)
    assert resumed.losses == first.losses[2:]
    assert all(torch.equal(resumed.weights()[k], v) for k, v in first.weights().items())


def test_accumulation_from_the_constructor_is_the_steps_size_and_can_go_to_one(data: CorpusWindows) -> None:
    plain = Run(data)
    plain.steps(4)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    run = Run(data, batch=BATCH // 2, gradient_accumulation_steps=2)
    assert run.acc.micro_batch_size == BATCH // 2 and run.loader.step_samples == BATCH
    run.steps(2)
    run.acc.reconfigure(micro_batch_size=BATCH)  # one micro-batch of 8 per step from here
    assert run.acc.gradient_accumulation_steps == 1
    run.steps(2)
    for a, b in zip(run.losses, plain.losses):
        assert abs(a - b) < 1e-5, (run.losses, plain.losses)


def test_the_lr_multiplier_follows_a_cooldown_ramp_step_by_step(data: CorpusWindows) -> None:
    """The compute policy sends a cooldown as a ramp (value, to, over_steps): the multiplier moves
    every optimizer step, not once per exchange."""
    run = Run(data)
    run.steps(1)
    ramp = Action(KNOB_LR_MULTIPLIER, {"value": 1.0, "to": 0.0, "over_steps": 4}, "test", 1)
    assert run.acc.apply(ramp).outcome == "applied"
    lrs = []
    for _ in range(6):
        run.steps(1)
        lrs.append(run.acc.last_lr)
    assert lrs == pytest.approx([3e-3, 2.25e-3, 1.5e-3, 0.75e-3, 0.0, 0.0])
