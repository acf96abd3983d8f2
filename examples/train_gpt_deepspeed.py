"""Train the demo's GPT with DeepSpeed on CPU ranks: the script a DeepSpeed user would write.

The same byte-level GPT and two-domain corpus as examples/train_gpt.py (the standard library's
source and its reference text), trained data-parallel under DeepSpeed. trainwarden is attached
in one line: `trainwarden.adapters.deepspeed.initialize` instead of `deepspeed.initialize`
(same arguments, same return tuple). The engine it returns is a live handle, so the controller
can switch the ZeRO stage, offload or precision between two optimizer steps and the loop below
never notices.

    python -m torch.distributed.run --nproc_per_node=2 -m trainwarden.examples.train_gpt_deepspeed
    trainwarden demo --deepspeed                     # the same, under the demo's budget policy

Each rank draws its own micro-batches (seed + rank), as a DistributedSampler would. Gloo on the
CPU; one torch thread per rank (two ranks on a two-core machine).

What it costs on the CPU, measured (2 ranks on a shared 2-core machine, 28.6M parameters, fp32, 64
tokens per rank and step, glibc's mmap threshold at 64 KiB): 0.9-1.6 s per optimizer step; a ZeRO 0
-> 1 switch moves 327 MiB of state and takes 4-5 s, during which a rank's RSS peaks at the step-
boundary RSS plus that host copy (~1000 MiB here, above a step's 914 MiB). The model is this size on
purpose: below ~12M parameters a ZeRO 1/2 engine holds *more* resident memory than ZeRO 0 on a CPU
(DeepSpeed's fixed ~47 MiB of buffers outweigh the ~4 bytes per parameter partitioning saves), so no
stage switch could bring a smaller model under a cap (the measurements are in policies/memory.py).
Without the mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`, which `trainwarden demo --deepspeed`
sets, and this script with mallopt where the environment does not), glibc keeps freed tensors
resident and a switched-into engine measured 100-200 MiB above a fresh one: more than the switch
saves. The optimizer is torch's AdamW on its fused CPU kernel (`"fused": true`): the default,
unfused one updates ZeRO's flat fp32 partition through partition-sized temporaries, and ZeRO 1 then
peaked at 849 MiB instead of 811 (ZeRO 0 914 either way), too close to any cap between the two.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from trainwarden.adapters import deepspeed as trainwarden_deepspeed
from trainwarden.examples.corpus import WindowSampler, eval_batches, load_domains
from trainwarden.examples.gpt import GPT, GPTConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run: 16 optimizer steps")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400, 16 with --quick)")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per rank per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="initial ZeRO stage")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--offload-optimizer", action="store_true", help="start with optimizer offload")
    p.add_argument("--offload-param", action="store_true", help="start with parameter offload (ZeRO 3)")
    p.add_argument(
        "--bucket-size",
        type=float,
        default=2e6,
        help="DeepSpeed's reduce/allgather bucket sizes in elements (DeepSpeed's default, 5e8, "
        "costs ~40 MiB of resident memory per rank on a CPU for nothing on a model this small)",
    )
    p.add_argument(
        "--print-every", type=int, default=0, help="steps between log lines (0: 5, 20 w/o --quick)"
    )
    p.add_argument("--policy", default=None, help="policy for an embedded controller (no sidecar)")
    return p.parse_args(argv)


def deepspeed_config(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The user's DeepSpeed config: AdamW (torch's, so a switched run follows the unswitched one
    exactly; its fused CPU kernel, which makes no partition-sized temporaries per step), warmup
    then a flat LR, and the initial ZeRO stage, precision and offload."""
    bucket = int(args.bucket_size)
    zero: dict[str, Any] = {
        "stage": args.zero_stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": bucket,
        "stage3_param_persistence_threshold": 0,
    }
    if args.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if args.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "train_batch_size": args.micro_batch * args.grad_accum * world_size,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": args.lr,
                "betas": [0.9, 0.95],
                "weight_decay": 0.1,
                "torch_adam": True,
                "fused": True,
            },
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr, "warmup_num_steps": args.warmup},
        },
        "zero_optimization": zero,
        "fp16": {"enabled": args.precision == "fp16"},
        "bf16": {"enabled": args.precision == "bf16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }


@torch.no_grad()
def evaluate(engine: Any, batches: dict[str, list]) -> dict[str, float]:
    """Validation loss per domain, through the engine (every rank takes part: under ZeRO 3 the
    forward gathers parameters)."""
    engine.eval()
    out = {name: sum(float(engine(b.x, b.y)[1]) for b in bs) / len(bs) for name, bs in batches.items()}
    engine.train()
    return out


#: glibc's mallopt parameter for the mmap threshold (malloc.h's M_MMAP_THRESHOLD).
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(nbytes: int = 65536) -> bool:
    """Hold glibc's mmap threshold at `nbytes`, as `MALLOC_MMAP_THRESHOLD_` does, unless the
    environment already sets it (the user's setting wins); whether it is now fixed.

    Launched without it (plain torchrun or `trainwarden run`, not `trainwarden demo`), the job
    would otherwise run with glibc's sliding threshold, and freed tensors stay resident: measured
    on the demo with unfused Adam, ZeRO 1 peaked at 919-964 MiB fresh and 995-1069 MiB switched
    into instead of 849-851, ZeRO 0 at 931-936 instead of 914. With this call and no variable the
    demo measured what it does with the variable (ZeRO 0 914, ZeRO 1 803-810 switched into)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return True
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False  # not glibc: its allocator has no such threshold


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fix_mmap_threshold()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would guess it, with a warning
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    steps = args.steps or (16 if args.quick else 400)
    every = args.print_every or (4 if args.quick else 20)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    import deepspeed

    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    torch.manual_seed(args.seed)  # the same initial weights on every rank

    domains = load_domains()
    sampler = WindowSampler(domains, args.block_size, args.micro_batch, seed=args.seed + 1000 * rank)
    val = eval_batches(domains, block_size=args.block_size, batch_size=4, n_batches=1)
    model = GPT(
        GPTConfig(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    )
    n_params = model.num_params()

    # --- trainwarden: the one changed line (was deepspeed.initialize).
    engine, _, _, _ = trainwarden_deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(args, world),
        tokens_per_sample=args.block_size,
        policy=args.policy,
    )
    if rank == 0:
        print(
            f"model {n_params / 1e6:.1f}M params, {world} ranks, {steps} steps of {world} x "
            f"{args.micro_batch} x {args.grad_accum} x {args.block_size} bytes; {engine.setting.describe()}",
            flush=True,
        )
    t0 = time.time()
    last = engine.setting
    for _ in range(steps):
        t_step = time.perf_counter()
        for _ in range(engine.gradient_accumulation_steps()):
            batch = sampler.next_batch()
            _, loss = engine(batch.x, batch.y)
            engine.backward(loss)
            engine.step()  # at the optimizer-step boundary: telemetry, and any switch now due
        step = int(engine.global_steps)
        if rank == 0 and engine.setting != last:
            r = engine.last_reconfigure
            print(f"step {step:4d}  switched: {r.describe() if r else engine.setting.describe()}", flush=True)
        last = engine.setting
        if rank == 0 and (step % every == 0 or step == 1):
            print(
                f"step {step:4d}  loss {engine.last_loss:.4f}  ZeRO {last.zero_stage}"
                f"{' +offload' if last.offload_optimizer else ''}  "
                f"{time.perf_counter() - t_step:.2f}s/step  {time.time() - t0:6.1f}s",
                flush=True,
            )
        if engine.should_stop:
            if rank == 0:
                print(f"step {step:4d}  stopping: trainwarden says the budget is spent", flush=True)
            break
    losses = evaluate(engine, val)
    if rank == 0:
        print("final validation " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    engine.destroy()  # flushes telemetry; an explicit destroy avoids an abort at interpreter exit
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
