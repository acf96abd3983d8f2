"""Train a small byte-level GPT on this machine's own Python: the script a user would write.

Two domains every Python install has: the standard library's source ("code") and its
English reference text, pydoc_data ("prose"). Plain PyTorch; trainwarden is attached in
the two marked lines, and owns the split of each optimizer step into micro-batches, so the
controller can trade micro-batch for gradient accumulation mid-run without changing what
is learned.

    python examples/train_gpt.py                       # embedded controller, observe only
    trainwarden run --policy policies/examples/demo.yaml -- python examples/train_gpt.py
"""

from __future__ import annotations

import argparse
import logging
import math
import time

import torch

from trainwarden.adapters import pytorch as trainwarden_pytorch
from trainwarden.examples.corpus import WindowSampler, eval_batches, load_domains
from trainwarden.examples.gpt import GPT, GPTConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short run: at most 400 steps (the quick policy stops it sooner)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps (default 2000, 400 with --quick; the budget policy normally stops it first)",
    )
    p.add_argument("--global-batch", type=int, default=64, help="samples per optimizer step")
    p.add_argument(
        "--micro-batch", type=int, default=64, help="initial micro-batch (the controller may change it)"
    )
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument(
        "--long-block-size",
        type=int,
        default=0,
        help="a long-context phase: train on windows of this many bytes from --long-from on "
        "(0: never); activation memory grows with it mid-run",
    )
    p.add_argument(
        "--long-from", type=int, default=0, help="first optimizer step of the long-context phase (>= 2)"
    )
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation losses (0: never)")
    p.add_argument("--policy", default=None, help="policy for an embedded controller (no sidecar)")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: GPT, batches: dict[str, list]) -> dict[str, float]:
    model.eval()
    out = {name: sum(float(model(b.x, b.y)[1]) for b in bs) / len(bs) for name, bs in batches.items()}
    model.train()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    steps = args.steps or (400 if args.quick else 2000)
    if args.long_block_size and args.long_from < 2:
        raise SystemExit("--long-block-size needs --long-from STEP: the long phase's first step, 2 or later")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    domains = load_domains()
    sampler = WindowSampler(domains, args.block_size, args.global_batch, seed=args.seed)
    val = eval_batches(domains, block_size=args.block_size, batch_size=16, n_batches=2)
    # Position embeddings for the longest windows the run will see.
    longest = max(args.block_size, args.long_block_size)
    model = GPT(GPTConfig(block_size=longest, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
    optimizer = model.configure_optimizer(lr=args.lr)

    # Linear warmup, then cosine to 10% over the planned steps: the user's own schedule.
    def schedule(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, steps - args.warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    # --- trainwarden, line 1: attach to the model, optimizer and schedule.
    tw = trainwarden_pytorch.attach(
        model,
        optimizer,
        scheduler=scheduler,
        global_batch_size=args.global_batch,
        micro_batch_size=args.micro_batch,
        tokens_per_sample=args.block_size,
        policy=args.policy,
    )
    sizes = ", ".join(f"{k} {len(v) / 1e6:.1f}MB" for k, v in domains.items())
    print(
        f"model {model.num_params() / 1e6:.2f}M params, {steps} steps of {args.global_batch} x "
        f"{args.block_size} bytes, domains {sizes}",
        flush=True,
    )
    t0 = time.time()
    # --- trainwarden, line 2: iterate optimizer steps, then the step's micro-batches.
    for step_batch in tw.steps(sampler):
        domain_sum: dict[str, float] = {}
        domain_n: dict[str, int] = {}
        for micro in step_batch:
            _, per_sample = model(micro.x, micro.y, reduction="none")
            tw.backward(per_sample.mean())
            # Per-domain loss from the same forward pass: no extra compute.
            for i, name in enumerate(micro.domain_names):
                mask = micro.domain == i
                if mask.any():
                    domain_sum[name] = domain_sum.get(name, 0.0) + float(per_sample.detach()[mask].sum())
                    domain_n[name] = domain_n.get(name, 0) + int(mask.sum())
        tw.step(domain_loss={k: domain_sum[k] / domain_n[k] for k in domain_sum})
        if tw.step_count % 10 == 0 or tw.step_count == 1:
            print(
                f"step {tw.step_count:4d}  loss {tw.last_loss:.4f}  lr {tw.last_lr:.2e}  "
                f"micro-batch {tw.micro_batch_size} x {tw.gradient_accumulation_steps}  "
                f"{time.time() - t0:6.1f}s",
                flush=True,
            )
        if args.eval_every and tw.step_count % args.eval_every == 0:
            losses = evaluate(model, val)
            # The compute policy's stopping rule reads the validation loss when the job reports it.
            tw.report(eval_loss=sum(losses.values()) / len(losses))
            print(
                f"step {tw.step_count:4d}  validation "
                + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()),
                flush=True,
            )
        if tw.should_stop:
            print(f"step {tw.step_count:4d}  stopping: trainwarden says the budget is spent", flush=True)
            break
        if tw.step_count >= steps:
            break
        if args.long_block_size and tw.step_count + 1 == args.long_from:
            # The long-context phase: longer windows from the next step on. Activations grow with
            # them, so the micro-batch that fitted may not any more; the token count follows.
            sampler.set_block_size(args.long_block_size)
            tw.tokens_per_sample = args.long_block_size
            print(f"step {tw.step_count:4d}  next: {args.long_block_size}-byte windows", flush=True)
    tw.close()
    losses = evaluate(model, val)
    print("final validation " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
