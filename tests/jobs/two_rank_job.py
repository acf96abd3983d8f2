"""A two-rank job for tests/test_two_ranks.py, started by torchrun (gloo, CPU).

Each rank trains a tiny DDP model through the plain-PyTorch adapter, with an embedded
controller on rank 0, and writes one JSON line per optimizer step to
<log-dir>/rank<R>.jsonl: the step, the micro-batch the step ran with and the one it will
run the next step with (after one first line with the rank's sync_every).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainwarden.adapters import pytorch as tw

GLOBAL = 16


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sync-every", type=int, default=0, help="0: not given to attach")
    p.add_argument("--step-sleep", type=float, default=0.03)
    p.add_argument("--timeout", type=float, default=20.0, help="collective timeout, seconds")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = tw.attach(
        model,
        optimizer,
        global_batch_size=GLOBAL,
        micro_batch_size=GLOBAL,
        policy=args.policy,
        run_dir=args.run_dir,
        sync_every=args.sync_every or None,
    )

    def batches():
        g = torch.Generator().manual_seed(100 + rank)
        while True:
            yield torch.randn(GLOBAL, 8, generator=g), torch.randn(GLOBAL, 1, generator=g)

    log_path = Path(args.log_dir) / f"rank{rank}.jsonl"
    with open(log_path, "w") as log:
        attached = {"event": "attach", "rank": rank, "sync_every": handle.agent.sync_every}
        log.write(json.dumps(attached) + "\n")
        log.flush()
        for step_batch in handle.steps(batches()):
            used = handle.micro_batch_size
            for x, y in step_batch:
                handle.backward(torch.nn.functional.mse_loss(model(x), y))
            handle.step()
            row = {
                "event": "step",
                "rank": rank,
                "step": handle.step_count,
                "micro_batch_size": used,
                "next_micro_batch_size": handle.micro_batch_size,
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            if handle.step_count >= args.steps:
                break
            time.sleep(args.step_sleep)  # room for the controller to decide between steps
    handle.close()
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} (pid {os.getpid()}) done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
