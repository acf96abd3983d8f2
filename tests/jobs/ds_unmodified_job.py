"""A plain DeepSpeed training script, as its author wrote it: a tiny language model, DeepSpeed's
usual loop over the loader `deepspeed.initialize` returns. It imports nothing but torch and
DeepSpeed. tests/test_deepspeed_attach.py runs it under `trainwarden run` with and without
`--attach` and reads what it prints: one JSON line per optimizer step with the ZeRO stage and
micro-batch its engine reports.

Single process: the test sets MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import deepspeed
import torch


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU())
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.mlp(self.emb(idx)))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to wait after each step")
    p.add_argument("--stage", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    deepspeed.utils.logging.logger.setLevel(logging.WARNING)
    torch.manual_seed(0)
    model = TinyLM()
    data = torch.utils.data.TensorDataset(torch.randint(0, 64, (8 * args.steps, 9)))
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": args.stage},
        "steps_per_print": 10**9,
    }
    engine, _, loader, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), training_data=data, config=config
    )
    print(json.dumps({"event": "start", "pid": os.getpid(), "engine": type(engine).__name__}), flush=True)
    it = iter(loader)
    for _ in range(args.steps):
        for _ in range(engine.gradient_accumulation_steps()):
            (batch,) = next(it)
            loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            engine.step()
        row = {
            "event": "step",
            "step": engine.global_steps,
            "zero_stage": engine.zero_optimization_stage(),
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "loss": loss.item(),
        }
        print(json.dumps(row), flush=True)
        time.sleep(args.step_sleep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
