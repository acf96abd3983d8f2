"""A DeepSpeed job as a user writes it, for the two-node tests (tests/test_two_nodes.py).

Started by `torchrun --nnodes 2 --nproc-per-node 1` on each "node" (c10d rendezvous); one rank per
node. trainwarden is attached in the one line a DeepSpeed user changes (`initialize`), with
`training_data` so the handle owns the loader and offers the micro-batch knob. Each rank writes
one JSON line per optimizer step to <log-dir>/node<GROUP_RANK>.jsonl (step, ZeRO stage,
micro-batch, should_stop, pid, torchrun's restart count), so the test can compare both nodes.
The controller is whatever the environment names (TRAINWARDEN_ENDPOINT); with none, rank 0
embeds one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainwarden.adapters import deepspeed as twds
from trainwarden.examples.gpt import GPT, GPTConfig


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of 'work' added per step")
    p.add_argument("--ckpt-dir", default=None, help="resume from here at start; save every --save-every")
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="initial ZeRO stage")
    p.add_argument(
        "--restart-delay",
        type=float,
        default=0.0,
        help="seconds a restarted process waits before it starts (a lost host's replacement takes time)",
    )
    args = p.parse_args()
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        time.sleep(args.restart_delay)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    import deepspeed

    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    torch.manual_seed(0)
    seq = 16
    model = GPT(GPTConfig(block_size=seq, n_layer=1, n_head=2, n_embd=32))
    data = torch.utils.data.TensorDataset(torch.randint(0, 256, (4096, seq + 1)))
    config = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": args.micro_batch * world,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": args.zero_stage},
        "steps_per_print": 10**9,
    }
    engine, _, loader, _ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        training_data=data,
        config=config,
        tokens_per_sample=seq,
    )
    if args.ckpt_dir and (Path(args.ckpt_dir) / "latest").exists():
        # torchrun's elastic restart starts the script again: resume, as its docs ask of a script.
        engine.load_checkpoint(args.ckpt_dir)
    node = int(os.environ.get("GROUP_RANK", rank))
    log = open(Path(args.log_dir) / f"node{node}.jsonl", "a", buffering=1)  # noqa: SIM115
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    it = iter(loader)
    while engine.global_steps < args.steps:  # a resumed job runs to the same last step
        for _ in range(engine.gradient_accumulation_steps()):
            try:
                (batch,) = next(it)
            except StopIteration:
                it = iter(loader)
                (batch,) = next(it)
            _, loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            engine.step()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        s = engine.setting
        row = {
            "event": "step",
            "node": node,
            "rank": rank,
            "step": int(engine.global_steps),
            "zero_stage": s.zero_stage,
            "micro_batch": s.micro_batch_size,
            "stop": engine.should_stop,
            "pid": os.getpid(),
            "restart": restart,
            "time": time.time(),
        }
        log.write(json.dumps(row) + "\n")
        if args.ckpt_dir and row["step"] % args.save_every == 0:
            engine.save_checkpoint(args.ckpt_dir)
        if engine.should_stop:
            break
    log.write(
        json.dumps({"event": "done", "node": node, "step": int(engine.global_steps), "restart": restart})
        + "\n"
    )
    engine.destroy()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
