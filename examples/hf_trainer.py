"""Train a transformers GPT-2 with the HF Trainer on this machine's own Python.

The model is built from a `GPT2Config` (no download); the data are the demo's two domains
(examples/corpus.py, bytes as tokens). trainwarden is attached in one line: the callback.

    python examples/hf_trainer.py --steps 100
    trainwarden run --policy P.yaml -- python examples/hf_trainer.py
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import Trainer, TrainingArguments

from trainwarden.adapters.hf import TrainwardenCallback
from trainwarden.examples.accelerate_train import CorpusWindows, gpt2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="max_steps (the budget may stop it first)")
    p.add_argument("--batch-size", type=int, default=16, help="per_device_train_batch_size")
    p.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--output-dir", default=None, help="checkpoints (default: a temporary directory)")
    p.add_argument("--policy", default=None, help="policy for an embedded controller (no sidecar)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hf-trainer-")
    n = min(4096, args.batch_size * args.accumulation * args.steps)  # epochs repeat it
    data = CorpusWindows(n, args.block_size, args.seed)
    training = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",  # trainwarden's stop asks for the one checkpoint that matters
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    model = gpt2(args.block_size, args.n_layer, args.n_embd, seed=args.seed)
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        data_collator=lambda rows: {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
        },
        # --- trainwarden: the one line.
        callbacks=[TrainwardenCallback(policy=args.policy)],
    )
    t0 = time.time()
    result = trainer.train()
    print(
        f"done: {trainer.state.global_step} steps in {time.time() - t0:.1f}s, "
        f"train loss {result.training_loss:.4f}, checkpoints in {output_dir}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
