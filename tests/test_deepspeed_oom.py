"""Out of memory inside a step: the DeepSpeed handle drops the step, moves one rung down the OOM
ladder and trains the same samples again, so no step and no sample is lost. The OOM is the real
torch.cuda.OutOfMemoryError class (constructible on a CPU build), injected in forward, in
backward (from inside autograd) and in the optimizer's step; the retried run is checked bitwise
against a run switched by hand at the same boundary, and sample by sample."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ds_helpers import (  # noqa: F401 - deepspeed_env is a fixture
    GLOBAL,
    MICRO,
    assert_engine,
    assert_same_state,
    deepspeed_env,
    ds_config,
    tiny_gpt,
    token_batches,
)

from trainwarden.adapters import deepspeed as twds
from trainwarden.adapters.core.batching import batch_size, recut
from trainwarden.adapters.deepspeed import oom as ds_oom
from trainwarden.adapters.deepspeed import state as ds_state
from trainwarden.adapters.deepspeed.config import Setting
from trainwarden.controller.runlog import DECISIONS_FILE, read_jsonl

OOM = torch.cuda.OutOfMemoryError
STEPS = 4
OOM_STEP = 3  # the optimizer step the OOM interrupts (its second micro-batch)


# ---- the ladder and the cutting, without DeepSpeed --------------------------------------------------


def test_the_oom_ladder_goes_from_fastest_to_leanest() -> None:
    s = Setting(
        0, "fp32", False, False, micro_batch_size=4, gradient_accumulation_steps=2, train_batch_size=8
    )
    seen = []
    rung = ds_oom.next_rung(s, False, world_size=1, can_recut=True)
    while rung is not None:
        seen.append(rung.why)
        rung = ds_oom.next_rung(rung.setting, rung.activation_checkpointing, world_size=1, can_recut=True)
    assert seen == [
        "micro-batch 4 -> 2 (accumulation 2 -> 4)",
        "micro-batch 2 -> 1 (accumulation 4 -> 8)",
        "activation checkpointing on",
        "optimizer offload to the CPU (ZeRO stage 0 -> 2)",
        "parameter offload to the CPU (ZeRO stage 2 -> 3)",
    ]
    # Several ranks: the stage goes up before anything is offloaded; no recut, no checkpointing.
    s2 = Setting(
        1, "bf16", False, False, micro_batch_size=4, gradient_accumulation_steps=1, train_batch_size=8
    )
    seen = []
    rung = ds_oom.next_rung(s2, None, world_size=2, can_recut=False)
    while rung is not None:
        seen.append(rung.why)
        assert rung.setting.micro_batch_size == 4 and rung.setting.precision == "bf16"
        rung = ds_oom.next_rung(rung.setting, None, world_size=2, can_recut=False)
    assert seen == [
        "ZeRO stage 1 -> 2",
        "ZeRO stage 2 -> 3",
        "optimizer offload to the CPU",
        "parameter offload to the CPU",
    ]


def test_batches_are_cut_again_whatever_their_structure() -> None:
    x = torch.arange(12).view(6, 2)
    batches = [{"x": x[:4], "y": (x[:4] + 1, "tag")}, {"x": x[4:], "y": (x[4:] + 1, "tag")}]
    assert batch_size(batches[0]) == 4
    cut = recut(batches, 3)
    assert [batch_size(b) for b in cut] == [3, 3]
    assert torch.equal(torch.cat([b["x"] for b in cut]), x)
    assert all(b["y"][1] == "tag" and torch.equal(b["y"][0], b["x"] + 1) for b in cut)
    same = [x[:2], x[2:4]]
    assert recut(same, 2) == same  # already that size: the same objects, no copy
    with pytest.raises(TypeError, match="how many samples"):
        batch_size("text")


# ---- on real DeepSpeed ---------------------------------------------------------------------------------


class _RaiseInBackward(torch.autograd.Function):
    """Identity forward; its backward raises an OOM (from inside autograd, as a real one would)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected in backward)")


class Injector:
    """One OOM, in forward, backward or the optimizer's step, at the second micro-batch of the next
    optimizer step after `arm()` (so the first micro-batch's gradients must be thrown away)."""

    def __init__(self, where: str, model: torch.nn.Module) -> None:
        self.where, self.model, self.armed, self.calls, self.fired = where, model, False, 0, 0
        self.handle: twds.DeepSpeedHandle | None = None
        forward = model.forward
        head = model.lm_head.forward

        def model_forward(*a: Any, **k: Any) -> Any:
            if self._due("forward"):
                raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected in forward)")
            return forward(*a, **k)

        def head_forward(x: torch.Tensor) -> torch.Tensor:
            out = head(x)
            return _RaiseInBackward.apply(out) if self._due("backward") else out

        model.forward = model_forward
        model.lm_head.forward = head_forward

    def _due(self, where: str) -> bool:
        if not self.armed or where != self.where:
            return False
        self.calls += 1
        if self.calls == 2:
            self.armed, self.fired = False, self.fired + 1
            return True
        return False

    def arm(self, handle: twds.DeepSpeedHandle) -> None:
        self.armed, self.calls = True, 0
        if self.where == "step":
            inner = ds_state.inner_optimizer(handle.engine)
            real = inner.step

            def step(*a: Any, **k: Any) -> Any:
                if self.armed:
                    self.armed, self.fired = False, self.fired + 1
                    raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected in step)")
                return real(*a, **k)

            inner.step = step


def _with_loader(handles: list[twds.DeepSpeedHandle], **kw: Any) -> tuple[twds.DeepSpeedHandle, Any, Any]:
    """A handle over a fresh tiny GPT with trainwarden's loader over 64 fixed samples, in order."""
    model = tiny_gpt()
    data = token_batches(1, micro=64)[0]
    dataset = torch.utils.data.TensorDataset(data)
    h, _, loader, _ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        training_data=dataset,
        **{"attach_agent": False, **kw},
    )
    handles.append(h)
    sampler = torch.utils.data.SequentialSampler(dataset)
    h.engine.training_dataloader.data_sampler = sampler
    loader.data_sampler = sampler
    return h, loader, data


class SampleLog:
    """Every micro-batch each step trained on, by step; the last attempt of a step is the one kept."""

    def __init__(self, h: twds.DeepSpeedHandle) -> None:
        self.h, self.rows = h, []

    def loss_fn(self, batch: Any) -> torch.Tensor:
        (x,) = batch
        self.rows.append((int(self.h.global_steps) + 1, x))
        _, loss = self.h(x[:, :-1], x[:, 1:])
        return loss

    def trained(self, step: int, per_step: int) -> torch.Tensor:
        rows = torch.cat([x for s, x in self.rows if s == step])
        return rows[-per_step:]  # the attempt that completed the step is the last one


def _reference(handles: list[twds.DeepSpeedHandle], stage: int = 0) -> tuple[list[float | None], Any]:
    """The run switched by hand to micro-batch 2 at the boundary before OOM_STEP."""
    h, _, _ = _with_loader(handles, config=ds_config(stage=stage))
    log = SampleLog(h)
    losses = []
    for step in range(1, STEPS + 1):
        if step == OOM_STEP:
            h.reconfigure(micro_batch_size=MICRO // 2)
        losses.append(h.train_batch(loss_fn=log.loss_fn))
    return losses, h.training_state()


@pytest.mark.parametrize(
    ("where", "stage"), [("forward", 0), ("backward", 0), ("step", 0), ("backward", 3), ("step", 3)]
)
@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_env")
def test_train_batch_retries_the_step_one_rung_down(
    handles: list[twds.DeepSpeedHandle], where: str, stage: int
) -> None:
    ref_losses, ref_state = _reference(handles, stage)

    h, _, data = _with_loader(handles, config=ds_config(stage=stage))
    inject = Injector(where, h.module)
    log = SampleLog(h)
    losses = []
    for step in range(1, STEPS + 1):
        if step == OOM_STEP:
            inject.arm(h)
        losses.append(h.train_batch(loss_fn=log.loss_fn))
    assert inject.fired == 1
    (retry,) = h.oom_retries
    assert retry.where == where and retry.step == OOM_STEP and retry.micro_step == 2
    assert retry.rung == "micro-batch 4 -> 2 (accumulation 2 -> 4)" and retry.replayed
    assert retry.result.changes == (("micro_batch_size", 4, 2),) and retry.result.rebuilt
    assert h.setting.micro_batch_size == 2 and h.gradient_accumulation_steps() == 4
    assert_engine(h, stage, "fp32", False, False)
    assert h.train_batch_size() == GLOBAL  # the global batch kept
    # No step lost, none doubled: the counts have no gap, and Adam took exactly STEPS steps.
    assert h.global_steps == STEPS and h.global_samples == STEPS * GLOBAL
    state = h.training_state()
    assert state.step == STEPS
    # Every sample trained exactly once, in order (the interrupted attempt left nothing behind).
    for step in range(1, STEPS + 1):
        assert torch.equal(log.trained(step, GLOBAL), data[(step - 1) * GLOBAL : step * GLOBAL]), step
    # The interrupted attempt got as far as its second micro-batch; then the whole step again.
    assert sum(len(x) for s, x in log.rows if s == OOM_STEP) == 2 * GLOBAL
    # Bitwise the run switched by hand at that boundary: losses, weights, moments, counters.
    assert losses == ref_losses
    assert_same_state(ref_state, state, what=f"OOM in {where}")


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_env")
def test_the_ladder_goes_on_to_checkpointing_and_offload(handles: list[twds.DeepSpeedHandle]) -> None:
    """Micro-batch 1 cannot be halved: a first OOM turns activation checkpointing on, a second moves
    to ZeRO 2 with optimizer offload. Any iterator of micro-batches works (here the user's own);
    the run is bitwise the one switched by hand at the same boundaries."""
    cfg = ds_config(stage=0, micro=1, global_batch=4)
    batches = token_batches(4 * 5, micro=1)

    def start() -> twds.DeepSpeedHandle:
        model = tiny_gpt()
        h, *_ = twds.initialize(
            model=model, model_parameters=model.parameters(), config=cfg, attach_agent=False
        )
        handles.append(h)
        return h

    def loss_fn(h: twds.DeepSpeedHandle) -> Any:
        return lambda x: h(x[:, :-1], x[:, 1:])[1]

    ref = start()
    it = iter(batches)
    ref_losses = []
    for step in range(1, 6):
        if step == 2:
            ref.reconfigure(activation_checkpointing=True)
        if step == 4:
            ref.reconfigure(zero_stage=2, offload_optimizer=True)
        ref_losses.append(ref.train_batch(it, loss_fn(ref)))

    h = start()
    inject = Injector("backward", h.module)
    it = iter(batches)
    losses = []
    for step in range(1, 6):
        if step in (2, 4):
            inject.arm(h)
        losses.append(h.train_batch(it, loss_fn(h)))
    assert [r.rung for r in h.oom_retries] == [
        "activation checkpointing on",
        "optimizer offload to the CPU (ZeRO stage 0 -> 2)",
    ]
    assert h.module.activation_checkpointing and h.config()["activation_checkpointing"] is True
    assert_engine(h, 2, "fp32", True, False)
    assert h.global_samples == 5 * 4
    assert losses == ref_losses
    assert_same_state(ref.training_state(), h.training_state(), what="checkpointing, then offload")


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_env")
def test_the_usual_loop_catches_step_retry_and_the_loader_replays(
    handles: list[twds.DeepSpeedHandle],
) -> None:
    """DeepSpeed's own loop over trainwarden's loader, with `except StepRetry: continue`."""
    _, ref_state = _reference(handles)
    h, loader, data = _with_loader(handles, config=ds_config(stage=0))
    inject = Injector("forward", h.module)
    seen: list[tuple[int, torch.Tensor]] = []
    retries = 0
    for (batch,) in loader:
        if h.global_steps == OOM_STEP - 1 and not inject.fired and not inject.armed:
            inject.arm(h)
        try:
            seen.append((int(h.global_steps) + 1, batch))
            _, loss = h(batch[:, :-1], batch[:, 1:])
            h.backward(loss)
            h.step()
        except twds.StepRetry as exc:
            retries += 1
            assert exc.retry.replayed and "given again" in str(exc)
            continue
        if h.global_steps == STEPS:
            break
    assert retries == 1 and h.setting.micro_batch_size == 2
    for step in range(1, STEPS + 1):
        rows = torch.cat([b for s, b in seen if s == step])[-GLOBAL:]
        assert torch.equal(rows, data[(step - 1) * GLOBAL : step * GLOBAL]), step
    assert_same_state(ref_state, h.training_state(), what="the usual loop")


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_env")
def test_what_is_not_retried(handles: list[twds.DeepSpeedHandle]) -> None:
    """An OOM once the optimizer has changed weights, with oom_retry off, or of a type not listed,
    is raised as it was; a listed custom type is retried."""
    h, _, _ = _with_loader(handles, config=ds_config(stage=1))
    log = SampleLog(h)
    h.train_batch(loss_fn=log.loss_fn)
    inner = ds_state.inner_optimizer(h.engine)
    real = inner.step

    def step_then_oom(*a: Any, **k: Any) -> Any:
        inner.step = real
        real(*a, **k)
        raise OOM("CUDA out of memory (injected after the update)")

    inner.step = step_then_oom
    with pytest.raises(OOM, match="after the update"):
        h.train_batch(loss_fn=log.loss_fn)
    assert h.oom_retries == []

    h2, _, _ = _with_loader(handles, config=ds_config(stage=0), oom_errors=(MemoryError,))
    calls = {"n": 0}

    def loss_fn(batch: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("host allocation failed (injected in loss_fn)")
        (x,) = batch
        return h2(x[:, :-1], x[:, 1:])[1]

    h2.train_batch(loss_fn=loss_fn)
    assert [(r.where, r.rung) for r in h2.oom_retries] == [
        ("loss_fn", "micro-batch 4 -> 2 (accumulation 2 -> 4)")
    ]
    assert h2.global_steps == 1 and calls["n"] == 2 + 4
    with pytest.raises(ValueError, match="exceeds block_size"):  # not a memory error: untouched
        h2(torch.zeros((2, 99), dtype=torch.long))
    h2.oom_retry = False
    calls["n"] = 1  # the next loss_fn call raises, before the step has begun
    with pytest.raises(MemoryError, match="injected in loss_fn"):
        h2.train_batch(loss_fn=loss_fn)
    h2.oom_retry = True
    inject = Injector("forward", h2.module)  # torch's OOM is not in this handle's list
    inject.arm(h2)
    with pytest.raises(OOM, match="injected in forward"):
        h2.train_batch(loss_fn=loss_fn)
    assert len(h2.oom_retries) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_env")
def test_with_a_loader_of_your_own_the_step_goes_on_without_what_it_gave(
    handles: list[twds.DeepSpeedHandle],
) -> None:
    """Your own loader keeps its micro-batch size, so the micro-batch rung is skipped (here:
    activation checkpointing instead), and what it gave for the interrupted step is not replayed:
    StepRetry says so, and the counts go on from the step's start."""
    model = tiny_gpt()
    h, *_ = twds.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(stage=1), attach_agent=False
    )
    handles.append(h)
    inject = Injector("backward", h.module)
    batches = iter(token_batches(40))
    retries: list[twds.StepRetry] = []
    while h.global_steps < 3:
        if h.global_steps == 1 and not inject.fired and not inject.armed:
            inject.arm(h)
        batch = next(batches)
        try:
            _, loss = h(batch[:, :-1], batch[:, 1:])
            h.backward(loss)
            h.step()
        except twds.StepRetry as exc:
            retries.append(exc)
    (retry,) = retries
    assert retry.retry.rung == "activation checkpointing on" and not retry.retry.replayed
    assert "are lost" in str(retry) and h.module.activation_checkpointing
    assert h.setting.micro_batch_size == MICRO  # the loader's size is kept
    assert h.global_samples == 3 * GLOBAL and h.training_state().step == 3


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_env")
def test_an_oom_retry_reaches_the_decision_log(
    handles: list[twds.DeepSpeedHandle], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The step down the handle took by itself is one line of decisions.jsonl (kind oom_retry,
    policy adapter, the rung and the error), counted in the controller's actions, whose picture of
    the job takes the new configuration."""
    monkeypatch.delenv("TRAINWARDEN_DISABLE", raising=False)
    monkeypatch.setenv("TRAINWARDEN_RUN_ID", "ds-oom-event")
    run_dir = tmp_path / "run"
    h, _, _ = _with_loader(
        handles, config=ds_config(stage=0), attach_agent=True, run_dir=run_dir, sync_every=1
    )
    inject = Injector("forward", h.module)
    log = SampleLog(h)
    for step in range(1, STEPS + 1):
        if step == OOM_STEP:
            inject.arm(h)
        h.train_batch(loss_fn=log.loss_fn)
    assert inject.fired == 1 and len(h.oom_retries) == 1
    ctl = h.controller
    h.close()  # flushes the agent: the event and every step record reach the controller
    [line] = [d for d in read_jsonl(run_dir / DECISIONS_FILE) if d["kind"] == "oom_retry"]
    assert line["policy"] == "adapter" and line["outcome"] == "applied"
    assert line["step"] == OOM_STEP - 1 and line["params"] == {"micro_batch_size": 2}
    assert "injected in forward" in line["reason"] and "micro-batch 4 -> 2" in line["reason"]
    assert line["detail"] == "micro_batch_size 4 -> 2" and line["duration_s"] > 0
    assert ctl.actions_total[("oom_retry", "applied")] == 1
    assert ctl.state.config["micro_batch_size"] == 2 and ctl.state.config["gradient_accumulation_steps"] == 4
    assert ctl.state.last_action_step["micro_batch_size"] == OOM_STEP - 1
