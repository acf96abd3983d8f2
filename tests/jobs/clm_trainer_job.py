"""Causal-LM training with the HF Trainer in the style of HF's `run_clm.py`, as its author would
write it: a model from its config, TrainingArguments, a train and an eval dataset, `trainer.train()`,
then `trainer.save_model()`. No callback of trainwarden's; it never reads a stop flag.

Offline and tiny: a 2-layer GPT-2 built from its config, synthetic right-padded sequences with
an attention mask and -100 labels on the padding.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

VOCAB, BLOCK, PAD = 128, 16, 0


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            length = int(torch.randint(BLOCK // 2, BLOCK + 1, (1,), generator=g))
            ids = torch.full((BLOCK,), PAD)
            ids[:length] = torch.randint(1, VOCAB, (length,), generator=g)
            mask = (torch.arange(BLOCK) < length).long()
            self.rows.append(
                {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", default="out")
    p.add_argument("--max_steps", type=int, default=100000)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=2, n_head=2))
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=Sequences(512, 1), eval_dataset=Sequences(32, 2)
    )
    result = trainer.train()
    trainer.save_model()
    print(f"trained {result.global_step} steps", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
