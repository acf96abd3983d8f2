"""Switching 20 times does not leak: every old engine is freed, and RSS stays within a bound far
below what keeping the old engines would cost.

The cause of DeepSpeed's leak when engines are re-created in one process: `engine.destroy()`
leaves the engine's forward hooks on the user's module, and their closures keep the whole engine
alive (optimizer, fp32 masters, moments). The adapter removes them (adapters/deepspeed/build.py destroy,
adapters/deepspeed/module.py clean_module)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from ds_helpers import deepspeed_env, ds_config  # noqa: F401 - deepspeed_env is a fixture

from trainwarden.adapters import deepspeed as twds
from trainwarden.adapters.deepspeed import module as ds_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_env")]


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_twenty_switches_free_every_old_engine() -> None:
    from trainwarden.examples.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=4, n_embd=128))
    x = torch.randint(0, 256, (4, 33))
    h, *_ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config(stage=1, micro=4, global_batch=4),
        attach_agent=False,
    )

    def step() -> None:
        _, loss = h(x[:, :-1], x[:, 1:])
        h.backward(loss)
        h.step()

    try:
        step()
        held = h.held_bytes()
        engine_bytes = held.params + held.masters + held.optimizer_state
        chain = (2, 3, 0, 1)
        for stage in chain[:3]:  # warm-up: first imports, allocator pools, op loads
            h.reconfigure(zero_stage=stage)
            step()
        gc.collect()
        base = _rss()
        old: list[weakref.ref[Any]] = []
        for i in range(20):
            old.append(weakref.ref(h.engine))
            h.reconfigure(zero_stage=chain[(i + 3) % len(chain)])
            step()
        gc.collect()
        growth = _rss() - base
        alive = sum(r() is not None for r in old)
        assert alive == 0, f"{alive} of 20 old engines are still alive"
        # Keeping them would cost at least 20 x the engine's model state; allow 4 (allocator noise).
        assert growth < 4 * engine_bytes, f"RSS grew {growth >> 20} MiB over 20 switches"
        for m in model.modules():
            for hooks in (m._forward_pre_hooks, m._forward_hooks):
                stale = [fn for fn in hooks.values() if ds_module._is_deepspeed_hook(fn)]
                assert len(stale) <= 1  # only the live engine's own hooks
    finally:
        h.destroy()
