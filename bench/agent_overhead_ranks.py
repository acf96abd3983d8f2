"""One rank of the two-rank agent_overhead benchmark; started by bench/agent_overhead.py via torchrun.

Each rank builds the loops of agent_overhead.py's `--design` over DDP-wrapped models (one-copy:
one model whose steps alternate between the plain and the attached path; two-copies: A plain,
B attached, same initial weights), attaches trainwarden (rank 0's agent talks to the sidecar
named by TRAINWARDEN_ENDPOINT; not with `--control`, where B runs the plain loop too), runs the
interleaved A/B loop with the same pair order on every rank (both ranks take the same path at
the same step, so DDP's all-reduce and the agent's collective pair up), and writes its step
times to OUT/rank{RANK}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_overhead import BLOCK_SIZE, DESIGNS, batches_needed, build_loops, interleaved, make_batches


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--block", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--sync-every", type=int, required=True)
    p.add_argument("--design", choices=DESIGNS, default="one-copy")
    p.add_argument("--control", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        batches = make_batches(
            batches_needed(args.warmup, args.steps, args.block), args.batch, args.seed + 1000 * rank
        )
        loops = build_loops(
            args.design,
            args.control,
            args.seed,
            batches,
            DDP,
            global_batch_size=args.batch,
            micro_batch_size=args.batch,
            tokens_per_sample=BLOCK_SIZE,
            sync_every=args.sync_every,
        )
        sidecar_cpu: Callable[[], float] | None = None
        sidecar_pid: int | None = None
        if rank == 0 and os.environ.get("BENCH_SIDECAR_PID"):
            sidecar_pid = int(os.environ["BENCH_SIDECAR_PID"])
            sidecar = psutil.Process(sidecar_pid)

            def sidecar_cpu() -> float:
                t = sidecar.cpu_times()
                return float(t.user + t.system)

        # Start the measured steps together on both ranks.
        res = interleaved(
            loops,
            args.warmup,
            args.steps,
            args.seed,
            block=args.block,
            between=dist.barrier,
            sidecar_cpu=sidecar_cpu,
            sidecar_pid=sidecar_pid,
        )
        same = loops.weights_equal()
        cpu = None
        if loops.handle is not None:
            cpu = loops.handle.agent.cpu_time_s
            loops.handle.close()
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
