"""A causal-LM fine-tuning loop in the style of HF's `run_clm_no_trainer.py`, as its author would
write it: Accelerate, gradient accumulation, a linear schedule, an evaluation pass every few steps,
its own `max_train_steps`. It knows nothing of trainwarden and never reads a stop flag.

Offline and tiny: a 2-layer GPT-2 built from its config, synthetic token sequences of varying
length, right-padded, with an attention mask and labels of -100 on the padding (as a data
collator makes them). One JSON line per optimizer step on stdout: {"step", "rank"}.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

VOCAB, BLOCK, PAD = 128, 16, 0


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(BLOCK // 2, BLOCK + 1, (1,), generator=g))
        ids = torch.full((BLOCK,), PAD)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=g)
        mask = (torch.arange(BLOCK) < length).long()
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--max_train_steps", type=int, default=100000)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=2)
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--output_dir", default="out")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps)
    config = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    train = DataLoader(make_data(512, 1), batch_size=args.per_device_train_batch_size, shuffle=True)
    evaluation = DataLoader(make_data(64, 2), batch_size=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, args.max_train_steps)
    model, optimizer, train, evaluation, scheduler = accelerator.prepare(
        model, optimizer, train, evaluation, scheduler
    )
    completed = 0
    epochs = math.ceil(args.max_train_steps * args.gradient_accumulation_steps / len(train)) + 1
    for _epoch in range(epochs):
        model.train()
        for batch in train:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed += 1
                print(json.dumps({"step": completed, "rank": accelerator.process_index}), flush=True)
                if completed % args.eval_every == 0:
                    model.eval()
                    losses = []
                    for eval_batch in evaluation:
                        with torch.no_grad():
                            losses.append(model(**eval_batch).loss)
                    accelerator.print(f"eval loss {torch.stack(losses).mean().item():.4f}")
                    model.train()
            if completed >= args.max_train_steps:
                break
        if completed >= args.max_train_steps:
            break
    accelerator.wait_for_everyone()
    accelerator.print("finished all steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
