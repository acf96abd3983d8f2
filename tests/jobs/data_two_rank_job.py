"""A two-rank job for tests/test_data_two_ranks.py, started by torchrun (gloo, CPU).

Each rank trains the examples' tiny GPT (DDP) on its own stream of a stdlib data mixture
(map-style sampler, seeded per rank) through the plain-PyTorch handle, with an embedded
controller and a data policy on rank 0, and writes one JSON line per optimizer step to
<log-dir>/rank<R>.jsonl: the step, the domain weights and the data policy's state after it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from trainwarden.adapters import pytorch as tw
from trainwarden.adapters.data import MixtureDataset, MixtureSampler
from trainwarden.examples.domains import Windows, stdlib_domains
from trainwarden.examples.gpt import GPT, GPTConfig

BATCH = 8


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--step-sleep", type=float, default=0.05)
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    split = stdlib_domains(40_000)
    data = MixtureDataset({d: Windows(split.train[d][:20_000], 32) for d in ("code", "text", "noise")})
    mix = MixtureSampler(data, seed=7)  # each rank its own stream (seeded by rank too)
    model = DistributedDataParallel(GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    handle = tw.attach(
        model, optimizer, global_batch_size=BATCH, policy=args.policy, run_dir=args.run_dir, mixture=mix
    )
    loader = DataLoader(data, batch_size=BATCH, sampler=mix)
    with open(Path(args.log_dir) / f"rank{rank}.jsonl", "w") as log:
        for step_batch in handle.steps(loader):
            for x, y, index in step_batch:
                _, per_sample = model(x, y, reduction="none")
                mix.observe(per_sample, index)
                handle.backward(per_sample.mean())
            handle.step()
            row = {"step": handle.step_count, "weights": mix.weights, "state": mix.data_state}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if handle.step_count >= args.steps:
                break
            time.sleep(args.step_sleep)  # room for the controller to decide between steps
    handle.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
