"""A two-rank DeepSpeed job for tests/test_deepspeed_two_ranks.py, started by torchrun (gloo, CPU).

Each rank trains a tiny GPT through trainwarden's DeepSpeed adapter. Phase 1 switches the ZeRO
stage by hand at the same steps on both ranks (0 -> 1 -> 3 -> 2 -> 0) and records, around each
switch, what the rank's engine holds (bytes of parameters, fp32 masters, optimizer state) and a
digest of the full training state before and after. Phase 2 lets rank 0's embedded controller
switch the stage (a policy defined here asks for stage 2), and every rank records the step at
which its engine changed. One JSON line per event in <log-dir>/rank<R>.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainwarden.adapters import deepspeed as twds
from trainwarden.controller.protocol import KNOB_ZERO_STAGE, Action
from trainwarden.controller.snapshot import Snapshot
from trainwarden.examples.gpt import GPT, GPTConfig
from trainwarden.policies import base
from trainwarden.policies.schema import Budget

MICRO, SEQ = 2, 16


@dataclass(frozen=True)
class _NoParams:
    pass


@base.register
class AskStage2(base.PolicyKind):
    kind = "test_ds_two_ranks_stage2"
    Params = _NoParams
    knobs = frozenset({KNOB_ZERO_STAGE})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        if snapshot.step < 12 or snapshot.config.get(KNOB_ZERO_STAGE) == 2:
            return []
        return [Action(KNOB_ZERO_STAGE, {"value": 2}, "test: ZeRO 2", snapshot.step + 1)]


def digest(state: Any) -> str:
    h = hashlib.sha256()
    for t in state.values:
        h.update(t.numpy().tobytes())
    for k in sorted(state.moments):
        for t in state.moments[k]:
            h.update(t.numpy().tobytes())
    h.update(str(state.step).encode())
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    import deepspeed

    deepspeed.utils.logging.logger.setLevel(logging.WARNING)

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=SEQ, n_layer=2, n_head=2, n_embd=32))
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": 0, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    h, *_ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=config,
        policy=args.policy,
        run_dir=args.run_dir,
        sync_every=1,
    )
    g = torch.Generator().manual_seed(100 + rank)
    log = open(Path(args.log_dir) / f"rank{rank}.jsonl", "w")  # noqa: SIM115 - closed below

    def write(**row: Any) -> None:
        log.write(json.dumps({"rank": rank, "world": world, **row}) + "\n")
        log.flush()

    def steps(n: int) -> None:
        for _ in range(n):
            for _ in range(h.gradient_accumulation_steps()):
                b = torch.randint(0, 256, (MICRO, SEQ + 1), generator=g)
                _, loss = h(b[:, :-1], b[:, 1:])
                h.backward(loss)
                h.step()
            write(event="step", step=int(h.global_steps), stage=h.setting.zero_stage, loss=h.last_loss)

    # Phase 1: by hand, the same steps on every rank.
    steps(2)
    for stage in (1, 3, 2, 0):
        held = h.held_bytes()
        before = h.training_state()
        result = h.reconfigure(zero_stage=stage)
        after = h.training_state()
        new_held = h.held_bytes()
        write(
            event="switch",
            step=int(h.global_steps),
            old=result.changes[0][1],
            new=stage,
            engine_stage=h.zero_optimization_stage(),
            held_before=[held.params, held.masters, held.optimizer_state],
            held_after=[new_held.params, new_held.masters, new_held.optimizer_state],
            numel=sum(t.numel() for t in before.values),
            digest_before=digest(before),
            digest_after=digest(after),
            duration_s=result.duration_s,
        )
        steps(2)
    # Phase 2: the controller's policy switches to stage 2 (rank 0 asks, every rank applies).
    for _ in range(300):  # the same number of iterations on every rank: they stop together
        steps(1)
        time.sleep(0.05)
        flag = torch.tensor([h.setting.zero_stage == 2], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item():
            break
    steps(2)
    write(event="done", step=int(h.global_steps), stage=h.setting.zero_stage)
    log.close()
    h.destroy()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    raise SystemExit(main())
