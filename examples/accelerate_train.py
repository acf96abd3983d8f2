"""Train a transformers GPT-2 with HF Accelerate on this machine's own Python: the usual loop.

The model is built from a `GPT2Config` (no download); the data are the demo's two domains (the
standard library's source and its reference text, bytes as tokens: examples/corpus.py).
trainwarden is attached in one line, the import of `Accelerator`; the loop is Accelerate's own.

    python examples/accelerate_train.py --steps 100
    trainwarden run --policy P.yaml -- python examples/accelerate_train.py
    trainwarden run --attach --policy P.yaml -- python examples/accelerate_train.py --plain
        (--plain imports accelerate's Accelerator: --attach makes it trainwarden's)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from typing import Any

import torch

from trainwarden.examples.corpus import WindowSampler, load_domains

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class CorpusWindows(torch.utils.data.Dataset):
    """`n` fixed byte windows of the demo's corpus, as HF batches: input_ids and the domain index."""

    def __init__(self, n: int, block_size: int, seed: int = 0, max_bytes_per_domain: int = 2_000_000) -> None:
        sampler = WindowSampler(load_domains(max_bytes_per_domain), block_size - 1, n, seed=seed)
        batch = sampler.next_batch()
        # x and its last target make block_size tokens; GPT-2 shifts the labels itself.
        self.input_ids = torch.cat([batch.x, batch.y[:, -1:]], dim=1)
        self.domain = batch.domain
        self.domain_names = batch.domain_names

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.input_ids[i], "domain": self.domain[i]}


class DomainWindows(torch.utils.data.Dataset):
    """The windows of one domain of `windows`, as HF batches of input_ids: one domain of a
    trainwarden data mixture (adapters/data/)."""

    def __init__(self, windows: CorpusWindows, domain: int) -> None:
        self.ids = windows.input_ids[windows.domain == domain]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


def gpt2(block_size: int = 64, n_layer: int = 2, n_embd: int = 128, n_head: int = 4, seed: int = 0) -> Any:
    """A small transformers GPT-2 over bytes, built from its config (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=256,
        n_positions=block_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def per_sample_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per sample (mean over its positions), in fp32."""
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none"
    )
    return loss.view(input_ids.shape[0], -1).mean(dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (the budget may stop it first)")
    p.add_argument("--batch-size", type=int, default=16, help="per-process batch of the DataLoader")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--policy", default=None, help="policy for an embedded controller (no sidecar)")
    p.add_argument("--plain", action="store_true", help="import accelerate's own Accelerator (for --attach)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    # --- trainwarden: the one line (or, with --plain and `trainwarden run --attach`, none).
    if args.plain:
        from accelerate import Accelerator
    else:
        from trainwarden.adapters.accelerate import Accelerator

    kwargs: dict[str, Any] = {"mixed_precision": args.mixed_precision}
    kwargs["gradient_accumulation_steps"] = args.accumulation
    if args.policy and not args.plain:
        kwargs["policy"] = args.policy
    accelerator = Accelerator(**kwargs)
    # An epoch of at most 4096 windows (shuffled each epoch): enough for a demo, little memory.
    windows = min(4096, args.batch_size * args.accumulation * args.steps)
    data = CorpusWindows(windows, args.block_size, args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = gpt2(args.block_size, args.n_layer, args.n_embd, seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, args.steps))))
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.print(
        f"accelerator {type(accelerator).__module__}.{type(accelerator).__name__}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.steps} steps",
    )
    t0 = time.time()
    steps = 0
    done = False
    while not done:  # epochs
        for batch in loader:
            with accelerator.accumulate(model):
                logits = model(input_ids=batch["input_ids"]).logits
                per_sample = per_sample_loss(logits, batch["input_ids"])
                loss = per_sample.mean()
                accelerator.backward(loss)
                if hasattr(accelerator, "log_domain_loss"):  # per-domain loss for the data policies
                    names = data.domain_names
                    d = batch["domain"]
                    accelerator.log_domain_loss(
                        {
                            names[i]: float(per_sample.detach()[d == i].mean())
                            for i in range(len(names))
                            if (d == i).any()
                        },
                        {names[i]: int((d == i).sum()) for i in range(len(names))},
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                if steps % 10 == 0 or steps == 1:
                    accelerator.print(
                        f"step {steps:4d}  loss {float(loss):.4f}  precision {accelerator.mixed_precision}  "
                        f"accumulation {accelerator.gradient_accumulation_steps}  {time.time() - t0:6.1f}s",
                    )
                if getattr(accelerator, "should_stop", False):
                    accelerator.print(f"step {steps:4d}  stopping: trainwarden says the budget is spent")
                    done = True
                    break
                if steps >= args.steps:
                    done = True
                    break
    accelerator.end_training()
    accelerator.print(f"done: {steps} steps in {time.time() - t0:.1f}s")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
