"""Train the small GPT on the stdlib's four domains through trainwarden's live data mixture.

    python examples/train_mixture.py --steps 300 --policy policies/examples/data_mixing.yaml

The domains (examples/domains.py) are code, English reference text, docstrings and a degraded
domain (characters shuffled within lines). The mixture is a map-style MixtureDataset drawn by a
MixtureSampler through an ordinary DataLoader; the plain-PyTorch handle carries its knobs
(domain weights, curriculum level, pruned fraction) and reports the per-domain loss computed
from the step's own forward pass. `train()` is what the tests and bench/data_mixture.py call.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: make `trainwarden.examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainwarden.adapters import pytorch as trainwarden_pytorch
from trainwarden.adapters.data import MixtureDataset, MixtureSampler
from trainwarden.examples.domains import CLEAN_DOMAINS, DOMAINS, Windows, difficulty, stdlib_domains
from trainwarden.examples.gpt import GPT, GPTConfig


@dataclass
class Options:
    steps: int = 200
    seed: int = 0
    n_layer: int = 1
    n_head: int = 2
    n_embd: int = 32
    block_size: int = 32
    global_batch: int = 16
    micro_batch: int = 16
    lr: float = 3e-3
    max_bytes: int = 300_000
    weights: dict[str, float] | None = None
    curriculum: bool = False
    max_prune_fraction: float = 0.0
    policy: str | None = None
    run_dir: str | None = None
    num_workers: int = 0
    eval_every: int = 0
    eval_batches: int = 8
    threads: int = 1
    domains: tuple[str, ...] = DOMAINS
    #: More domains beside the stdlib's, by name: (training bytes, validation bytes).
    extra_domains: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def build_data(o: Options) -> tuple[MixtureDataset, MixtureSampler, dict[str, Windows]]:
    split = stdlib_domains(o.max_bytes)
    train = {d: Windows(split.train[d], o.block_size) for d in o.domains}
    # Validation of every domain, degraded one included; CLEAN_DOMAINS says which are clean.
    val = {d: Windows(split.val[d], o.block_size) for d in o.domains}
    for name, (train_bytes, val_bytes) in o.extra_domains.items():
        train[name], val[name] = Windows(train_bytes, o.block_size), Windows(val_bytes, o.block_size)
    data = MixtureDataset(train)
    diff = {d: difficulty(w) for d, w in train.items()} if o.curriculum else None
    mix = MixtureSampler(
        data,
        weights=o.weights,
        seed=o.seed,
        difficulty=diff,
        max_prune_fraction=o.max_prune_fraction,
    )
    return data, mix, val


@torch.no_grad()
def evaluate(model: GPT, val: dict[str, Windows], n_batches: int, batch: int = 32) -> dict[str, float]:
    """Mean loss per validation domain over its first n_batches x batch windows (fixed)."""
    model.eval()
    out = {}
    for name, ds in val.items():
        n = min(len(ds), n_batches * batch)
        step = max(1, len(ds) // n)  # spread over the whole split, the same windows every time
        idx = list(range(0, len(ds), step))[:n]
        xs, ys = zip(*(ds[i] for i in idx), strict=True)
        x, y = torch.stack(xs), torch.stack(ys)
        losses = [
            float(model(x[i : i + batch], y[i : i + batch])[1]) * len(x[i : i + batch])
            for i in range(0, n, batch)
        ]
        out[name] = sum(losses) / n
    model.train()
    return out


def train(o: Options) -> dict[str, Any]:
    """Run; returns the final validation loss per domain, the curve, the weights over steps."""
    torch.manual_seed(o.seed)
    if o.threads:
        torch.set_num_threads(o.threads)
    data, mix, val = build_data(o)
    model = GPT(GPTConfig(block_size=o.block_size, n_layer=o.n_layer, n_head=o.n_head, n_embd=o.n_embd))
    optimizer = model.configure_optimizer(lr=o.lr)
    loader = DataLoader(data, batch_size=o.global_batch, sampler=mix, num_workers=o.num_workers)
    tw = trainwarden_pytorch.attach(
        model,
        optimizer,
        global_batch_size=o.global_batch,
        micro_batch_size=o.micro_batch,
        tokens_per_sample=o.block_size,
        policy=o.policy,
        run_dir=o.run_dir,
        mixture=mix,
    )
    curve: list[dict[str, Any]] = []
    weights: list[tuple[int, dict[str, float]]] = [(0, mix.weights)]
    t0 = time.time()
    try:
        for step_batch in tw.steps(loader):
            for x, y, index in step_batch:
                _, per_sample = model(x, y, reduction="none")
                mix.observe(per_sample, index)  # per-domain loss from this forward pass
                tw.backward(per_sample.mean())
            tw.step()
            if mix.weights != weights[-1][1]:
                weights.append((tw.step_count, mix.weights))
            if o.eval_every and tw.step_count % o.eval_every == 0:
                losses = evaluate(model, val, o.eval_batches)
                curve.append({"step": tw.step_count, "tokens": tw.samples_seen * o.block_size, "val": losses})
                clean = [v for k, v in losses.items() if k in CLEAN_DOMAINS]
                tw.report(eval_loss=sum(clean) / len(clean))  # the compute policy's stopping rule reads it
            if tw.should_stop or tw.step_count >= o.steps:
                break
    finally:
        tw.close()
    final = evaluate(model, val, o.eval_batches)
    return {
        "steps": tw.step_count,
        "tokens": tw.samples_seen * o.block_size,
        "seconds": time.time() - t0,
        "final_val": final,
        "curve": curve,
        "weights": weights,
        "curriculum_level": mix.curriculum_level,
        "pruned_fraction": mix.pruned_fraction(),
        "model": model,
        "mixture": mix,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-layer", type=int, default=1)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--max-bytes", type=int, default=300_000)
    ap.add_argument("--curriculum", action="store_true", help="difficulty per window (zlib ratio)")
    ap.add_argument("--max-prune-fraction", type=float, default=0.0)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--policy", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    o = Options(
        steps=a.steps, seed=a.seed, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
        block_size=a.block_size, global_batch=a.global_batch, micro_batch=a.micro_batch,
        max_bytes=a.max_bytes, curriculum=a.curriculum, max_prune_fraction=a.max_prune_fraction,
        num_workers=a.num_workers, eval_every=a.eval_every, threads=a.threads, policy=a.policy,
    )  # fmt: skip
    out = train(o)
    shown = {k: v for k, v in out.items() if k not in ("model", "mixture", "curve")}
    print(json.dumps(shown, indent=1, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
