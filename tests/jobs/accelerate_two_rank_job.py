"""A two-rank Accelerate job for tests/test_accelerate_two_ranks.py, started by torchrun (gloo, CPU).

Each rank trains a small transformers GPT-2 through trainwarden's Accelerator (DDP underneath),
with an embedded controller on rank 0 whose memory policy steps the micro-batch down. At
`--precision-at`, rank 0 puts a precision action in its agent's inbox, as the controller's answer
would arrive there; the agent hands it to both ranks at the next sync step. Each rank writes one
JSON line per optimizer step to <log-dir>/rank<R>.jsonl: the step, the micro-batch and
accumulation it ran with, the dtype its attention projection computed in, and the loss.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from trainwarden.adapters.accelerate import Accelerator
from trainwarden.adapters.data import MixtureDataset, MixtureSampler
from trainwarden.controller.protocol import KNOB_DOMAIN_WEIGHTS, KNOB_PRECISION, Action
from trainwarden.examples.accelerate_train import CorpusWindows, DomainWindows, gpt2, per_sample_loss

BLOCK = 32


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--log-dir", required=True)
    p.add_argument("--policy", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--sync-every", type=int, default=3)
    p.add_argument("--precision-at", type=int, default=4)
    p.add_argument("--mixture", action="store_true", help="draw from trainwarden's data mixture")
    args = p.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    # cpu=True: Accelerate runs several processes on the CPU only when told (MULTI_CPU, gloo).
    acc = Accelerator(cpu=True, policy=args.policy, run_dir=args.run_dir, sync_every=args.sync_every)
    rank = acc.process_index
    data = CorpusWindows(16 * 8 * args.steps, BLOCK, seed=0, max_bytes_per_domain=300_000)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    mix = None
    if args.mixture:  # the same windows as two domains, drawn by the mixture (a stream per rank)
        mixed = MixtureDataset({name: DomainWindows(data, d) for d, name in enumerate(data.domain_names)})
        mix = MixtureSampler(mixed, seed=0)
        # This rank's stream before any change, from a twin sampler: what its steps must train on.
        stream = list(itertools.islice(iter(MixtureSampler(mixed, seed=0)), 8 * args.precision_at))
        loader = torch.utils.data.DataLoader(mixed, batch_size=8, sampler=mix)
        acc.mixture = mix
    torch.manual_seed(0)
    model = gpt2(BLOCK, n_layer=1, n_embd=32, n_head=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt, loader = acc.prepare(model, opt, loader)
    drawn: list[int] = []
    dtypes: list[str] = []
    acc.unwrap_model(model).transformer.h[0].attn.c_attn.register_forward_hook(
        lambda _m, _i, out: dtypes.append(str(out.dtype).removeprefix("torch."))
    )

    log_path = Path(args.log_dir) / f"rank{rank}.jsonl"
    with open(log_path, "w") as log:
        if mix is not None:
            log.write(json.dumps({"rank": rank, "stream": stream}) + "\n")
        used = acc.micro_batch_size
        for batch in loader:
            with acc.accumulate(model):
                per_sample = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["input_ids"])
                if mix is not None:
                    mix.observe(per_sample, batch["index"])
                    drawn.extend(int(i) for i in batch["index"])
                loss = per_sample.mean()
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
            if not acc.sync_gradients:
                continue
            row = {
                "rank": rank,
                "step": acc.step_count,
                "micro_batch_size": used,
                "next_micro_batch_size": acc.micro_batch_size,
                "accumulation": acc.gradient_accumulation_steps,  # for the next step
                "dtypes": sorted(set(dtypes)),
                "next_precision": acc.precision,
                "loss": acc.last_loss,
                "drawn": drawn,
                "domains": sorted(acc.last_domain_loss),
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            dtypes.clear()
            drawn = []
            used = acc.micro_batch_size
            if rank == 0 and acc.step_count == args.precision_at and acc.agent is not None:
                if mix is not None:
                    action = Action(
                        KNOB_DOMAIN_WEIGHTS, {"value": {"code": 1.0, "prose": 0.0}}, "test", acc.step_count
                    )
                else:
                    action = Action(KNOB_PRECISION, {"value": "bf16"}, "test", acc.step_count)
                with acc.agent._lock:
                    acc.agent._inbox[action.id] = action
            if acc.step_count >= args.steps:
                break
    acc.wait_for_everyone()
    acc.end_training()  # Accelerate 1.x destroys the process group here
    print(f"rank {rank} (pid {os.getpid()}) done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
