"""One rank of the two-rank agent_overhead benchmark; started by bench/agent_overhead.py via torchrun.

Each rank builds two DDP-wrapped copies of the demo GPT (same initial weights), attaches
trainwarden to copy B (rank 0's agent talks to the sidecar named by TRAINWARDEN_ENDPOINT), runs
the interleaved A/B loop of agent_overhead.py with the same pair order on every rank, and
writes its step times to OUT/rank{RANK}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_overhead import BLOCK_SIZE, batches_needed, interleaved, make_batches, make_models

from trainwarden.adapters import pytorch as tw_pytorch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--block", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--sync-every", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        raw_a, raw_b = make_models(args.seed)
        model_a, model_b = DDP(raw_a), DDP(raw_b)
        opt_a = raw_a.configure_optimizer(lr=1e-3)
        opt_b = raw_b.configure_optimizer(lr=1e-3)
        batches = make_batches(
            batches_needed(args.warmup, args.steps, args.block), args.batch, args.seed + 1000 * rank
        )
        handle = tw_pytorch.attach(
            model_b,
            opt_b,
            global_batch_size=args.batch,
            micro_batch_size=args.batch,
            tokens_per_sample=BLOCK_SIZE,
            sync_every=args.sync_every,
        )
        sidecar_cpu = None
        if rank == 0 and os.environ.get("BENCH_SIDECAR_PID"):
            sidecar = psutil.Process(int(os.environ["BENCH_SIDECAR_PID"]))

            def sidecar_cpu() -> float:
                t = sidecar.cpu_times()
                return float(t.user + t.system)

        # Start the measured steps together on both ranks.
        res = interleaved(
            model_a,
            opt_a,
            model_b,
            handle,
            batches,
            args.warmup,
            args.steps,
            args.seed,
            block=args.block,
            between=dist.barrier,
            sidecar_cpu=sidecar_cpu,
        )
        same = all(torch.equal(x, y) for x, y in zip(raw_a.parameters(), raw_b.parameters()))
        cpu = handle.agent.cpu_time_s
        handle.close()
        record = {
            **res,
            "rank": rank,
            "torch_threads": torch.get_num_threads(),
            "agent_cpu_s_whole_run": cpu,
            "weights_equal": same,
        }
        Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
