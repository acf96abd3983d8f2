"""Where an in-place DeepSpeed switch spends its time: a cProfile breakdown by part.

Builds the model of bench/switch_latency.py (25M-parameter GPT, single rank, AdamW torch_adam),
trains a step, then runs a chain of switches (default ZeRO 2 fp32 -> bf16 -> ZeRO 3 bf16 ->
ZeRO 0 fp32 -> ZeRO 1 -> ZeRO 2, one optimizer step between them) under cProfile, and prints one
JSON object: per part, seconds summed over the switches and its share of their total. Parts
(cumulative time of the named functions; they nest, so shares do not add up to one):
`deepspeed_initialize`, inside it `zero_optimizer_init` (flat buffers, fp32 partitions, state),
`capture` / `restore` / `clean_module` (ds_state), `destroy` (old engine), `gc` (every
collection, automatic or not, timed with gc.callbacks), `collectives` (DeepSpeed's comm
wrappers), `tensor_repr` (formatting parameters), and the copy floor of bench/switch_latency.py
for scale.

    .venv/bin/python bench/switch_profile.py [--chain 2:fp32,2:bf16,3:bf16,0:fp32,1:fp32,2:fp32]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import itertools
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import switch_latency as sl

PARTS = {
    "deepspeed_initialize": ("deepspeed/__init__.py", "initialize"),
    "zero_optimizer_init": ("deepspeed/runtime/engine.py", "_configure_optimizer"),
    "capture": ("adapters/ds_state.py", "capture"),
    "restore": ("adapters/ds_state.py", "restore"),
    "clean_module": ("adapters/ds_state.py", "clean_module"),
    "destroy": ("adapters/deepspeed.py", "_destroy_engine"),
    "collectives": ("deepspeed/comm/comm.py", "log_wrapper"),
    "tensor_repr": ("torch/_tensor.py", "__repr__"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", default="2:fp32,2:bf16,3:bf16,0:fp32,1:fp32,2:fp32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # as bench/switch_latency.py
        os.execv(sys.executable, [sys.executable, *sys.argv])
    os.environ.update(sl.single_rank_env(sl.free_port()))
    os.environ["TRAINWARDEN_DISABLE"] = "1"
    import torch

    from trainwarden.adapters.deepspeed import initialize
    from trainwarden.examples.gpt import GPT

    torch.set_num_threads(args.threads)
    sl.quiet_deepspeed()
    margs = argparse.Namespace(seq=64, layers=8, width=512, micro=4)
    torch.manual_seed(0)
    model = GPT(sl.model_config(margs))
    chain = [sl.Cfg.parse(s) for s in args.chain.split(",")]
    handle, _, _, _ = initialize(
        model=model,
        model_parameters=model.parameters(),
        config=sl.ds_config(chain[0], margs.micro),
        attach_agent=False,
    )
    batch = torch.randint(0, 256, (margs.micro, margs.seq + 1), generator=torch.Generator().manual_seed(1))
    sl.train_step(handle, batch)
    gc_s = [0.0, 0.0]

    def on_gc(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    load_start = os.getloadavg()
    prof = cProfile.Profile()
    legs = []
    for a, b in itertools.pairwise(chain):
        sl.train_step(handle, batch)
        gc_before = gc_s[0]
        gc.callbacks.append(on_gc)
        prof.enable()
        t = time.perf_counter()
        r = handle.reconfigure(**b.knobs())
        wall = time.perf_counter() - t
        prof.disable()
        gc.callbacks.remove(on_gc)
        legs.append({"from": a.describe(), "to": b.describe(), "s": wall, "gc_s": gc_s[0] - gc_before})
        assert not r.rolled_back
    total = sum(leg["s"] for leg in legs)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts: dict[str, float] = dict.fromkeys(PARTS, 0.0)
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.items():
        for part, (suffix, name) in PARTS.items():
            if func == name and file.endswith(suffix):
                parts[part] += ct
    parts["gc"] = gc_s[0]
    floor = sl.copy_floor(12 * model.num_params(), args.threads)
    out = {
        "benchmark": "switch_profile",
        "switches": len(legs),
        "total_s": total,
        "median_s": sorted(leg["s"] for leg in legs)[len(legs) // 2],
        "parts_s": parts,
        "parts_share": {k: v / total for k, v in parts.items()},
        "legs": legs,
        "copy_floor": {**floor, "floor_s": 2 * floor["copy_s"]},
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "note": "cProfile overhead included; shares are of the profiled switches' total",
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
