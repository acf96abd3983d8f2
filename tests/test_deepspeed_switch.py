"""The DeepSpeed adapter's switches, on real DeepSpeed (CPU): every ZeRO stage pair, precision and
offload changes carry the training state bit for bit, a switched run follows the unswitched one,
and a switch that fails after the old engine is gone is rolled back with the state intact."""

from __future__ import annotations

import itertools
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

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_env")]

#: Visits all twelve ordered pairs of ZeRO stages.
STAGE_CHAIN = (0, 1, 2, 3, 0, 2, 0, 3, 1, 3, 2, 1, 0)


def _start(cfg: dict[str, Any], **kw: Any) -> tuple[twds.DeepSpeedHandle, Any, Any, Any]:
    model = tiny_gpt()
    return twds.initialize(
        model=model, model_parameters=model.parameters(), config=cfg, attach_agent=False, **kw
    )


def _switch(h: twds.DeepSpeedHandle, **kw: Any) -> twds.ReconfigureResult:
    """One switch with its state checked bitwise on both sides."""
    before = h.training_state()
    result = h.reconfigure(**kw)
    after = h.training_state()
    assert result.applied and result.rebuilt and not result.rolled_back, result
    assert_same_state(before, after, what=result.describe())
    assert result.bytes_moved == before.nbytes > 0
    assert result.memory_kind == "rss" and result.memory_after_bytes > 0
    return result


def test_stage_chain_is_exact_and_follows_the_unswitched_run(handles: list[twds.DeepSpeedHandle]) -> None:
    steps_between = 2
    n_steps = steps_between * len(STAGE_CHAIN)
    batches = token_batches(2 * n_steps)

    ref, *_ = _start(ds_config(stage=0))
    handles.append(ref)
    reference = train_steps(ref, iter(batches), n_steps)

    h, *_ = _start(ds_config(stage=STAGE_CHAIN[0]))
    handles.append(h)
    it = iter(batches)
    losses = train_steps(h, it, steps_between)
    pairs = set()
    for old, new in itertools.pairwise(STAGE_CHAIN):
        step = h.global_steps
        result = _switch(h, zero_stage=new)
        assert result.changes == (("zero_stage", old, new),)
        assert_engine(h, new, "fp32", False, False)
        assert h.global_steps == step  # the count continues
        pairs.add((old, new))
        losses += train_steps(h, it, steps_between)
    assert len(pairs) == 12
    assert h.global_steps == ref.global_steps == n_steps
    # Bitwise: the same floats, step for step, as the run that never switched.
    assert losses == reference
    assert torch.equal(
        h.training_state().values[0], ref.training_state().values[0]
    )  # and the weights end the same


def test_precision_switches_keep_masters_and_moments(handles: list[twds.DeepSpeedHandle]) -> None:
    from deepspeed.accelerator import get_accelerator

    h, *_ = _start(ds_config(stage=0))
    handles.append(h)
    it = iter(token_batches(200))
    plan: list[tuple[int, str]] = [
        (0, "bf16"),
        (1, "bf16"),
        (1, "fp32"),
        (3, "bf16"),
        (3, "fp32"),
        (2, "bf16"),
    ]
    if get_accelerator().is_fp16_supported():
        plan += [(2, "fp16"), (3, "fp16"), (0, "fp16"), (0, "fp32")]
    for stage, precision in plan:
        train_steps(h, it, 2)
        _switch(h, zero_stage=stage, precision=precision)
        assert_engine(h, stage, precision, False, False)
        losses = train_steps(h, it, 1)
        assert all(torch.isfinite(torch.tensor(losses)))
    if not get_accelerator().is_fp16_supported():
        pytest.skip("fp16 is not supported on this device (get_accelerator().is_fp16_supported() is false)")


def test_fp16_loss_scale_is_carried(handles: list[twds.DeepSpeedHandle]) -> None:
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        pytest.skip("fp16 is not supported on this device (get_accelerator().is_fp16_supported() is false)")
    h, *_ = _start(ds_config(stage=1, precision="fp16"))
    handles.append(h)
    it = iter(token_batches(100))
    train_steps(h, it, 3)
    scaler = h.optimizer.loss_scaler
    scaler.cur_scale, scaler.cur_hysteresis = 64.0, 1  # as if it had overflowed before
    for stage in (3, 2, 0):
        before = h.training_state().loss_scale
        _switch(h, zero_stage=stage)
        after = h.training_state().loss_scale
        assert before is not None and after is not None
        assert before["cur_scale"] == 64.0 and before["cur_hysteresis"] == 1
        # Stage 0's FP16 optimizer keeps no hysteresis: the rest is carried to it too.
        assert after == {k: v for k, v in before.items() if stage > 0 or k != "cur_hysteresis"}
        train_steps(h, it, 1)


def test_offload_switches(handles: list[twds.DeepSpeedHandle]) -> None:
    """torch's AdamW under offload (config torch_adam): exact across offload on and off, and the
    trajectory bitwise equal to a run that never offloaded."""
    batches = token_batches(40)
    ref, *_ = _start(ds_config(stage=2))
    handles.append(ref)
    reference = train_steps(ref, iter(batches), 10)

    h, *_ = _start(ds_config(stage=2))
    handles.append(h)
    it = iter(batches)
    losses = train_steps(h, it, 2)
    _switch(h, offload_optimizer=True)
    assert_engine(h, 2, "fp32", True, False)
    losses += train_steps(h, it, 2)
    _switch(h, zero_stage=3, offload_param=True)
    assert_engine(h, 3, "fp32", True, True)
    losses += train_steps(h, it, 2)
    r = _switch(h, zero_stage=1)  # parameter offload cannot stay: it is dropped, and said so
    assert ("offload_param", True, False) in r.changes and r.implied
    assert_engine(h, 1, "fp32", True, False)
    losses += train_steps(h, it, 2)
    _switch(h, offload_optimizer=False)
    assert_engine(h, 1, "fp32", False, False)
    losses += train_steps(h, it, 2)
    assert losses == reference


def test_deepspeed_adam_offload_uses_cpu_adam_and_stays_close(handles: list[twds.DeepSpeedHandle]) -> None:
    """DeepSpeed's own Adam (FusedAdam on the device, DeepSpeedCPUAdam under offload): the state
    is carried exactly, the trajectory stays within 1e-5 of the run that never offloaded."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    from trainwarden.adapters.deepspeed import state as ds_state

    batches = token_batches(40)
    ref, *_ = _start(ds_config(stage=1, torch_adam=False))
    handles.append(ref)
    reference = train_steps(ref, iter(batches), 8)
    assert isinstance(ds_state.inner_optimizer(ref.engine), FusedAdam)

    h, *_ = _start(ds_config(stage=1, torch_adam=False))
    handles.append(h)
    it = iter(batches)
    losses = train_steps(h, it, 2)
    _switch(h, offload_optimizer=True)
    assert_engine(h, 1, "fp32", True, False)
    assert isinstance(ds_state.inner_optimizer(h.engine), DeepSpeedCPUAdam)
    losses += train_steps(h, it, 3)
    _switch(h, offload_optimizer=False)
    assert isinstance(ds_state.inner_optimizer(h.engine), FusedAdam)
    losses += train_steps(h, it, 3)
    assert len(losses) == len(reference)
    assert max(abs(a - b) for a, b in zip(losses, reference)) < 1e-5


def test_client_optimizer_and_scheduler_objects_follow_the_switch(
    handles: list[twds.DeepSpeedHandle],
) -> None:
    """A torch optimizer and LR scheduler built by the user: the optimizer is re-created for each
    engine, the scheduler object re-bound; the returned proxies stay valid; the run is exact."""

    def start() -> tuple[twds.DeepSpeedHandle, Any, Any]:
        model = tiny_gpt()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        h, o, _, s = twds.initialize(
            model=model,
            optimizer=opt,
            lr_scheduler=sched,
            config=ds_config(optimizer=False),
            attach_agent=False,
        )
        handles.append(h)
        assert s is not None and o is not None
        return h, o, s

    batches = token_batches(40)
    ref, ref_opt, ref_sched = start()
    reference = train_steps(ref, iter(batches), 10)
    h, opt, sched = start()
    it = iter(batches)
    losses = train_steps(h, it, 2)
    _switch(h, zero_stage=3)
    losses += train_steps(h, it, 2)
    _switch(h, zero_stage=1, offload_optimizer=True)  # the user's class is kept under offload
    assert type(h.engine.basic_optimizer) is torch.optim.AdamW
    losses += train_steps(h, it, 2)
    _switch(h, zero_stage=2, offload_optimizer=False)
    losses += train_steps(h, it, 2)
    _switch(h, zero_stage=0)
    losses += train_steps(h, it, 2)
    assert losses == reference
    # The proxies the user holds read the current engine's optimizer and scheduler.
    assert sched.get_last_lr() == ref_sched.get_last_lr() == [1e-2 * 0.5**3]
    assert sched.last_epoch == ref_sched.last_epoch == 10
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert opt.param_groups is h.engine.optimizer.param_groups


def test_loader_and_checkpoint_after_a_switch(handles: list[twds.DeepSpeedHandle], tmp_path: Any) -> None:
    """training_data: the loader keeps its position across engine switches and cuts micro-batches at
    the size now applied (global batch kept); save_checkpoint works on the new engine."""
    data = token_batches(1, micro=64)[0]
    dataset = torch.utils.data.TensorDataset(data)
    sampler = torch.utils.data.SequentialSampler(dataset)

    model = tiny_gpt()
    h, opt, loader, _ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        training_data=dataset,
        config=ds_config(stage=1, dataloader_drop_last=True),
        attach_agent=False,
    )
    handles.append(h)
    h.engine.training_dataloader.data_sampler = sampler
    loader.data_sampler = sampler
    assert loader is h.training_dataloader
    seen: list[torch.Tensor] = []

    def steps(n: int) -> None:
        for _ in range(n):
            for _ in range(h.gradient_accumulation_steps()):
                (b,) = next(it)
                assert len(b) == h.train_micro_batch_size_per_gpu()
                seen.append(b)
                _, loss = h(b[:, :-1], b[:, 1:])
                h.backward(loss)
                h.step()

    it = iter(loader)
    steps(1)
    r = h.reconfigure(micro_batch_size=2)
    assert not r.rebuilt and r.changes == (("micro_batch_size", 4, 2),)
    assert h.gradient_accumulation_steps() == 4 and h.train_batch_size() == 8
    steps(1)
    _switch(h, zero_stage=3)
    assert h.engine.training_dataloader is loader
    steps(1)
    h.reconfigure(micro_batch_size=8)
    assert h.gradient_accumulation_steps() == 1
    steps(2)
    assert torch.equal(torch.cat(seen), data[: 8 * 5])  # every sample once, in order
    assert h.global_steps == 5 and h.global_samples == 40
    h.save_checkpoint(str(tmp_path), tag="after-switch")
    assert (tmp_path / "after-switch").is_dir()
    assert opt.param_groups[0]["lr"] == 1e-2


def test_reconfigure_refuses_off_a_step_boundary_and_impossible_requests(
    handles: list[twds.DeepSpeedHandle],
) -> None:
    h, *_ = _start(ds_config(stage=1))
    handles.append(h)
    engine = h.engine
    it = iter(token_batches(10))
    train_steps(h, it, 1)
    b = next(it)
    _, loss = h(b[:, :-1], b[:, 1:])
    h.backward(loss)
    with pytest.raises(twds.ConfigError, match="step boundary"):
        h.reconfigure(zero_stage=2)
    h.step()  # first micro-step of two: still inside the optimizer step
    with pytest.raises(twds.ConfigError, match="step boundary"):
        h.reconfigure(zero_stage=2)
    b = next(it)
    _, loss = h(b[:, :-1], b[:, 1:])
    h.backward(loss)
    h.step()
    with pytest.raises(twds.ConfigError, match="needs ZeRO stage 3"):
        h.reconfigure(offload_param=True)
    with pytest.raises(twds.ConfigError, match="micro_batch_size must divide"):
        h.reconfigure(micro_batch_size=3)
    with pytest.raises(twds.ConfigError, match="zero_stage"):
        h.reconfigure(zero_stage=4)
    assert h.engine is engine  # nothing was rebuilt
    assert h.reconfigure(zero_stage=1).changes == ()


def test_frozen_parameters_and_buffers_survive_every_stage(handles: list[twds.DeepSpeedHandle]) -> None:
    """A frozen parameter (not given to the optimizer) and a buffer come back as they were, and the
    run stays bitwise on the unswitched one."""

    def start() -> twds.DeepSpeedHandle:
        model = tiny_gpt()
        model.wpe.weight.requires_grad_(False)
        model.register_buffer("scale", torch.tensor([1.5, 2.5]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        h, *_ = twds.initialize(
            model=model, model_parameters=trainable, config=ds_config(), attach_agent=False
        )
        handles.append(h)
        return h

    batches = token_batches(40)
    ref = start()
    reference = train_steps(ref, iter(batches), 8)
    h = start()
    it = iter(batches)
    losses = train_steps(h, it, 1)
    for stage in (1, 3, 2, 0, 3, 1, 0):
        state = h.training_state()
        _switch(h, zero_stage=stage)
        assert h.training_state().trained == state.trained and state.trained.count(False) == 1
        losses += train_steps(h, it, 1)
    assert losses == reference
    assert torch.equal(h.module.scale, torch.tensor([1.5, 2.5])) and not h.module.wpe.weight.requires_grad


def test_bf16_optimizer_with_fp32_gradient_accumulation(handles: list[twds.DeepSpeedHandle]) -> None:
    """bf16 at stage 1 with fp32 gradient accumulation runs DeepSpeed's BF16_Optimizer: its state is
    carried to and from ZeRO-3 and fp32 exactly too."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    h, *_ = _start(ds_config(stage=1, precision="bf16", data_types={"grad_accum_dtype": "fp32"}))
    handles.append(h)
    assert isinstance(h.optimizer, BF16_Optimizer)
    it = iter(token_batches(40))
    train_steps(h, it, 2)
    _switch(h, zero_stage=3)
    assert_engine(h, 3, "bf16", False, False)
    train_steps(h, it, 1)
    _switch(h, zero_stage=1)
    assert isinstance(h.optimizer, BF16_Optimizer)
    train_steps(h, it, 1)
    _switch(h, precision="fp32")
    assert_engine(h, 1, "fp32", False, False)
    train_steps(h, it, 1)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_switch_on_one_cpu_process_carries_the_engines_own_tensors(
    handles: list[twds.DeepSpeedHandle], stage: int
) -> None:
    """On one CPU process a switch's capture holds the old engine's own fp32 masters and moments
    (no copy: the engine is destroyed next), while `training_state()` stays a copy that later
    training does not change; the chain of switches from there is exact (the other tests)."""
    h, *_ = _start(ds_config(stage=stage))
    handles.append(h)
    it = iter(token_batches(8))
    train_steps(h, it, 2)
    storages = {
        t.untyped_storage().data_ptr()
        for f in ds_state.flat_partitions(h.engine)
        for t in (f, *(v for v in ds_state.inner_optimizer(h.engine).state[f].values() if torch.is_tensor(v)))
    }
    kept = ds_state.capture(h.engine, h.switch.params, own=True)
    copied = h.training_state()
    first = next(i for i, ok in enumerate(kept.trained) if ok)
    tensors = [kept.values[first], *(m[first] for m in kept.moments.values())]
    assert len(tensors) == 3  # the master and Adam's two moments
    assert all(t.untyped_storage().data_ptr() in storages for t in tensors)
    assert all(
        t.untyped_storage().data_ptr() not in storages
        for t in [copied.values[first], *(m[first] for m in copied.moments.values())]
    )
    before = copied.values[first].clone()
    train_steps(h, it, 1)
    assert torch.equal(copied.values[first], before)  # the copy did not follow the training
    assert not torch.equal(kept.values[first], before)  # the engine's own tensor did


def test_a_cpu_switch_without_huge_pages_says_once_what_they_would_buy(
    handles: list[twds.DeepSpeedHandle],
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The kernel would give transparent huge pages (mode madvise) and torch was not told to ask
    for them: the first switch of the process says so, with what it moved; later ones do not."""
    from trainwarden.adapters.deepspeed import memory as ds_memory
    from trainwarden.adapters.deepspeed import switch as ds_switch

    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(ds_memory, "THP_MODE_FILE", str(mode))
    monkeypatch.setattr(ds_switch, "_huge_pages_checked", False)
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    h, *_ = _start(ds_config(stage=0))
    handles.append(h)
    train_steps(h, iter(token_batches(2)), 1)
    with caplog.at_level("INFO", logger="trainwarden"):
        _switch(h, zero_stage=1)
        _switch(h, zero_stage=2)
    hints = [r.getMessage() for r in caplog.records if "THP_MEM_ALLOC_ENABLE=1" in r.getMessage()]
    assert len(hints) == 1 and "MiB of state" in hints[0], hints


def test_the_huge_pages_hint_is_silent_where_nothing_is_to_gain(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is said when the job has them on, the kernel's mode is never, or there is no such file."""
    from trainwarden.adapters.deepspeed import memory as ds_memory

    on, never = tmp_path / "on", tmp_path / "never"
    on.write_text("[always] madvise never\n")
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(ds_memory, "THP_MODE_FILE", str(on))
    assert ds_memory.huge_pages_hint(0.5, 2**28, {}) is not None
    assert ds_memory.huge_pages_hint(0.5, 2**28, {"THP_MEM_ALLOC_ENABLE": "1"}) is None
    monkeypatch.setattr(ds_memory, "THP_MODE_FILE", str(never))
    assert ds_memory.huge_pages_hint(0.5, 2**28, {}) is None
    monkeypatch.setattr(ds_memory, "THP_MODE_FILE", str(tmp_path / "missing"))
    assert ds_memory.huge_pages_hint(0.5, 2**28, {}) is None
