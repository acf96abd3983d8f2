"""Shared pieces of the DeepSpeed adapter tests: a single-process DeepSpeed environment, a tiny
GPT, configs, fixed batches, and the assertions that a switch really happened and was exact."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import free_port

#: JIT-built DeepSpeed ops (30-50 s each the first time) are cached here and reused by every run.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trainwarden" / "torch_extensions")
)

MICRO = 4
GLOBAL = 8
SEQ = 16


def ds_env() -> None:
    """What single-process DeepSpeed needs (without it, it looks for MPI and fails on mpi4py).
    Set once per test process: the process group it creates lives as long as the process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


@pytest.fixture
def deepspeed_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """DeepSpeed importable and ready in this process, no controller; yields the module."""
    ds = pytest.importorskip("deepspeed")
    ds_env()
    for name in ("TRAINWARDEN_ENDPOINT", "TRAINWARDEN_TOKEN", "TRAINWARDEN_POLICY", "TRAINWARDEN_SYNC_EVERY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    ds.utils.logging.logger.setLevel(logging.WARNING)
    # One thread: these models are tiny, and the machine is shared (threads that spin-wait for
    # a busy core made a step ten times slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield ds
    finally:
        torch.set_num_threads(threads)


def tiny_gpt(seed: int = 0) -> torch.nn.Module:
    from trainwarden.examples.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=SEQ, n_layer=2, n_head=2, n_embd=32))


def ds_config(
    stage: int = 0,
    precision: str = "fp32",
    *,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    torch_adam: bool = True,
    optimizer: bool = True,
    micro: int = MICRO,
    global_batch: int = GLOBAL,
    **extra: Any,
) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_param:
        zero["offload_param"] = {"device": "cpu"}
    cfg: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 8},
        "bf16": {"enabled": precision == "bf16"},
    }
    if optimizer:
        params: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]}
        if torch_adam:
            params["torch_adam"] = True
        cfg["optimizer"] = {"type": "AdamW", "params": params}
    cfg.update(extra)
    return cfg


def token_batches(n: int, micro: int = MICRO, seed: int = 1) -> list[torch.Tensor]:
    """n micro-batches of SEQ+1 tokens (inputs and shifted targets), the same on every call."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (micro, SEQ + 1), generator=g) for _ in range(n)]


def train_steps(engine: Any, batches: Iterator[torch.Tensor], steps: int) -> list[float]:
    """`steps` optimizer steps of the usual DeepSpeed loop; the loss of every micro-batch."""
    losses: list[float] = []
    for _ in range(steps):
        for _ in range(engine.gradient_accumulation_steps()):
            b = next(batches)
            _, loss = engine(b[:, :-1], b[:, 1:])
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
    return losses


def assert_same_state(before: Any, after: Any, *, what: str = "") -> None:
    """fp32 masters and every optimizer state tensor bitwise equal, and the same step count."""
    assert len(before.values) == len(after.values)
    for i, (a, b) in enumerate(zip(before.values, after.values)):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), f"{what}: master {i} differs"
    assert sorted(before.moments) == sorted(after.moments), what
    assert {"exp_avg", "exp_avg_sq"} <= set(before.moments) or before.step is None, what
    for k in before.moments:
        for i, (a, b) in enumerate(zip(before.moments[k], after.moments[k])):
            assert (a is None) == (b is None), f"{what}: {k}[{i}]"
            if a is not None:
                assert torch.equal(a, b), f"{what}: {k}[{i}] differs"
    assert before.step == after.step, f"{what}: step {before.step} -> {after.step}"
    assert before.counters == after.counters, what


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def assert_engine(
    handle: Any, stage: int, precision: str, offload_optimizer: bool, offload_param: bool
) -> None:
    """The engine the handle drives now really is that configuration: its ZeRO stage, the dtype
    its parameters compute in, its optimizer wrapper, where optimizer state and parameters live,
    and the sizes of what it holds."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from trainwarden.adapters.deepspeed import state as ds_state

    e = handle.engine
    assert e.zero_optimization_stage() == stage
    assert handle.setting.zero_stage == stage and handle.setting.precision == precision
    assert e.fp16_enabled() == (precision == "fp16") and e.bfloat16_enabled() == (precision == "bf16")
    params = ds_state.module_params(e.module)
    numel = sum(p.ds_numel if stage == 3 else p.numel() for p in params)
    lp = _DTYPES[precision]
    opt = e.optimizer
    held = ds_state.held_bytes(e)
    if stage == 3:
        assert isinstance(opt, DeepSpeedZeroOptimizer_Stage3)
        assert all(p.ds_tensor.dtype == lp for p in params)
        assert bool(opt.offload_optimizer) == offload_optimizer
        assert bool(opt.offload_param) == offload_param
        assert sum(p.ds_tensor.numel() for p in params) >= numel // e.dp_world_size
    elif stage in (1, 2):
        assert isinstance(opt, (DeepSpeedZeroOptimizer, BF16_Optimizer))
        if isinstance(opt, DeepSpeedZeroOptimizer):
            assert opt.partition_gradients == (stage == 2)
            assert bool(opt.cpu_offload) == offload_optimizer
        assert all(p.dtype == lp for p in params)
    else:
        assert all(p.dtype == lp for p in params)
        if precision == "fp32":
            assert isinstance(opt, torch.optim.Optimizer) and held.masters == 0
        else:
            assert isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer))
    if stage > 0 or precision != "fp32":
        # fp32 masters held apart from the parameters: 4 bytes each, this rank's partition.
        assert held.masters >= 4 * numel // e.dp_world_size
    if offload_optimizer:
        assert held.optimizer_state_device == "cpu"
    assert not offload_param or stage == 3
