"""Throughput of the memory ladder under a cap vs the best static configuration that fits under it.

The run's memory need grows mid-way: a curriculum doubles the sequence length half-way through
(`--seq` tokens for the first half of the steps, twice that for the second), so the largest
micro-batch that fits under the cap in the first half does not fit in the second, and no single
static configuration is best throughout.

Two ladders, each against the static configurations it could stand on:

- `micro_batch`: the rungs are micro-batch sizes (G, G/2, G/4 of a global batch G, gradient
  accumulation making up the rest): the memory policy's default on one CPU rank, where no ZeRO
  stage is leaner than ZeRO 0 (the measured CPU order), so the micro-batch is its ladder.
- `checkpointing`: the rungs are activation checkpointing off and on at micro-batch G (the policy
  file's `ladder:`), the micro-batch left to the job.

- Static side: one trial run per configuration, the whole curriculum each, with the same per-step
  peak RSS probe the controller reads (VmHWM, reset after every step). The best static configuration
  is the fastest whose peak stayed under the cap at every step. Trial runs it needed: one per
  configuration (it cannot know which fits without running the long sequences).
- Ladder side: one run, starting at the first rung, with trainwarden's memory policy under the same
  cap (`budget.device_memory`, `controller.sync_every: 1`), which steps down when a step's peak
  crosses the high-water mark. Trial runs: none.
- The cap: given by `--cap-mib`, or else placed from the static trials between what the first rung
  needs in the first half and in the second (so the premise holds; the JSON says where it came
  from).

Each run is its own process (a fresh heap, so one run's RSS does not carry into the next): single
rank DeepSpeed (ZeRO 0, fp32, AdamW with `torch_adam`) through `trainwarden.adapters.deepspeed`,
`engine.train_batch` on the same seeded batches, one torch thread, glibc's mmap threshold at 64 KiB
as `trainwarden run` sets it. One rank, not the issue's two: the two-rank CPU ladder (ZeRO 0 -> 1)
saves ~4 bytes a parameter, too little to matter next to activations at a size that runs in minutes
here, and two ranks on two shared cores would double every run's time.

Throughput is tokens per second over every step but the first (the first builds Adam's state);
a switch the ladder makes is inside that time. Configurations are ranked, and the ratio taken, by
tokens per CPU-second of the run's process (one torch thread: its own work, the switch included):
on these shared machines the other jobs' load moves between runs and wall time counts it; the wall
figures are reported beside them.

    .venv/bin/python bench/ladder_throughput.py           # 12 steps, 6 runs: ~4 min idle, ~8 at load 6
    .venv/bin/python bench/ladder_throughput.py --quick   # 8 steps, a smoke run

Prints one JSON object and writes it to bench/results/ladder_throughput.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results" / "ladder_throughput.json"
RUN_TAG = "LADDER_THROUGHPUT_RUN "
MIB = 1 << 20
HIGH_WATER = 0.9
LADDERS = ("micro_batch", "checkpointing")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ds_config(micro: int, global_batch: int) -> dict[str, Any]:
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "torch_adam": True},
        },
    }


def policy_text(cap_bytes: int | None, rungs: str) -> str:
    """The ladder's policy file; without a cap, a controller that only records (the static runs)."""
    text = "version: 1\ncontroller:\n  sync_every: 1\n  decide_interval_s: 0.05\n"
    if cap_bytes is None:
        return text + "budget: {}\n"
    return (
        f"budget:\n  device_memory: {cap_bytes}B\n"
        + text
        + "policies:\n  - kind: memory\n"
        + f"    high_water: {HIGH_WATER}\n"
        + "    low_water: 0.5\n"
        + "    cooldown_steps: 2\n"
        # micro_batch: the default ladder (one engine rung on one CPU rank: the micro-batch is the
        # ladder). checkpointing: the file's own.
        + (
            "    ladder: [{zero_stage: 0, activation_checkpointing: false},"
            " {zero_stage: 0, activation_checkpointing: true}]\n"
            if rungs == "checkpointing"
            else ""
        )
    )


# ---- one run (its own process) ------------------------------------------------------------------


def one_run(args: argparse.Namespace) -> None:
    import logging

    import deepspeed
    import torch

    from trainwarden.adapters.deepspeed import initialize
    from trainwarden.controller.runlog import read_jsonl
    from trainwarden.examples.gpt import GPT, GPTConfig

    torch.set_num_threads(1)
    deepspeed.utils.logging.logger.setLevel(logging.ERROR)
    run_dir = Path(args.run_dir)
    policy = run_dir / "policy.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    policy.write_text(policy_text(args.cap_bytes, args.rungs))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=2 * args.seq, n_layer=args.layers, n_head=4, n_embd=args.width))
    model.set_activation_checkpointing(bool(args.ckpt))
    h, *_ = initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config(args.micro, args.global_batch),
        micro_batch_knob=args.rungs == "micro_batch",
        policy=policy,
        run_dir=run_dir,
        sync_every=1,
    )
    half = args.steps // 2
    g = torch.Generator().manual_seed(1)

    def batches() -> Any:
        while True:
            seq = args.seq if h.global_steps < half else 2 * args.seq  # the curriculum
            yield torch.randint(0, 256, (args.global_batch, seq + 1), generator=g)

    def loss_fn(b: torch.Tensor) -> torch.Tensor:
        return h(b[:, :-1], b[:, 1:])[1]

    it = batches()
    steps: list[dict[str, Any]] = []
    for step in range(1, args.steps + 1):
        seq = args.seq if step <= half else 2 * args.seq
        t, c = time.perf_counter(), time.process_time()
        h.train_batch(it, loss_fn)
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        ckpt = bool(h.config().get("activation_checkpointing"))
        steps.append(
            {
                "step": step,
                "seq": seq,
                "s": dt,
                "cpu_s": cpu,
                "micro": h.setting.micro_batch_size,
                "ckpt": ckpt,
            }
        )
    h.close()
    peaks = {
        r["step"]: max(m["peak_bytes"] for m in r["memory"])
        for r in read_jsonl(run_dir / "telemetry.jsonl")
        if r.get("event") == "step" and r.get("memory")
    }
    for s in steps:
        s["peak_bytes"] = peaks.get(s["step"])
    decisions = [
        {k: d.get(k) for k in ("step", "kind", "params", "outcome", "reason")}
        for d in read_jsonl(run_dir / "decisions.jsonl")
    ]
    h.destroy()
    print(RUN_TAG + json.dumps({"steps": steps, "decisions": decisions}), flush=True)


def spawn(
    args: argparse.Namespace,
    rungs: str,
    config: tuple[int, bool],
    cap_bytes: int | None,
    work: Path,
    name: str,
) -> dict[str, Any]:
    micro, ckpt = config
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        TRAINWARDEN_RUN_ID=name,
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run",
        "--micro",
        str(micro),
        "--ckpt",
        str(int(ckpt)),
        "--rungs",
        rungs,
        "--run-dir",
        str(work / name),
        *(["--cap-bytes", str(cap_bytes)] if cap_bytes is not None else []),
        *("--steps", str(args.steps), "--seq", str(args.seq), "--global-batch", str(args.global_batch)),
        *("--layers", str(args.layers), "--width", str(args.width)),
    ]
    print(f"run {name} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RUN_TAG)]
    if not lines:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"run {name} exited {proc.returncode} without a report: {tail}")
    return json.loads(lines[-1][len(RUN_TAG) :])


# ---- the comparison -------------------------------------------------------------------------------


def summarize(run: dict[str, Any], cap: int, global_batch: int) -> dict[str, Any]:
    steps = run["steps"][1:]  # the first step builds Adam's state: not counted
    tokens = sum(global_batch * s["seq"] for s in steps)
    wall = sum(s["s"] for s in steps)
    cpu = sum(s["cpu_s"] for s in steps)
    peaks = [s["peak_bytes"] for s in run["steps"] if s["peak_bytes"] is not None]
    over = [s["step"] for s in run["steps"] if s["peak_bytes"] is not None and s["peak_bytes"] > cap]
    first_decision = min((d["step"] for d in run["decisions"]), default=None)
    short_seq = min(s["seq"] for s in run["steps"])
    phases = {}
    for name, part in (
        ("short", [s for s in steps if s["seq"] == short_seq]),
        ("long", [s for s in steps if s["seq"] != short_seq]),
    ):
        n = sum(global_batch * s["seq"] for s in part)
        phases[name] = {
            "tokens_per_cpu_s": n / sum(s["cpu_s"] for s in part),
            "tokens_per_s": n / sum(s["s"] for s in part),
        }
    return {
        "tokens_per_s": tokens / wall,
        "tokens_per_cpu_s": tokens / cpu,
        "wall_s_measured": wall,
        "cpu_s_measured": cpu,
        "by_phase": phases,
        "peak_MiB_max": max(peaks) / MIB if peaks else None,
        "fits": not over,
        "steps_over_cap": over,
        "steps_over_cap_after_first_decision": [
            s for s in over if first_decision is not None and s > first_decision
        ],
        "peak_MiB_by_step": [
            None if s["peak_bytes"] is None else round(s["peak_bytes"] / MIB, 1) for s in run["steps"]
        ],
        "micro_batch_by_step": [s["micro"] for s in run["steps"]],
        "checkpointing_by_step": [s["ckpt"] for s in run["steps"]],
        "decisions": run["decisions"],
    }


def phase_peaks(run: dict[str, Any], seq: int) -> tuple[int, int]:
    """Largest per-step peak in the first half (short sequences) and in the second (long)."""
    short = [s["peak_bytes"] for s in run["steps"] if s["seq"] == seq and s["peak_bytes"]]
    long = [s["peak_bytes"] for s in run["steps"] if s["seq"] != seq and s["peak_bytes"]]
    return max(short), max(long)


def place_cap(static: dict[str, dict[str, Any]], seq: int) -> tuple[int, str]:
    """A cap the first rung fits in the first half only, with the next one fitting the second half
    under the high-water mark: the curriculum's premise. `static` in ladder order."""
    for top, nxt in itertools.pairwise(list(static)):
        top_short, top_long = phase_peaks(static[top], seq)
        _, nxt_long = phase_peaks(static[nxt], seq)
        # Room for the first rung on the short sequences (halfway between its high-water need and
        # its long-sequence peak), and the next rung under the high-water mark on the long ones.
        cap = int(max(nxt_long / HIGH_WATER * 1.02, (top_short / HIGH_WATER + top_long) / 2))
        if cap < top_long:
            return cap, (
                f"placed from the static trials: {top} peaks at {top_short / MIB:.0f} MiB on "
                f"the short sequences and {top_long / MIB:.0f} MiB on the long ones, {nxt} at "
                f"{nxt_long / MIB:.0f} MiB on the long ones; cap = the larger of {nxt}'s long peak / "
                f"high-water {HIGH_WATER} x 1.02 and the midpoint of {top}'s short peak / high-water and "
                "its long peak"
            )
    raise RuntimeError("no cap separates the configurations: the sequence length moves memory too little")


def config_name(config: tuple[int, bool]) -> str:
    micro, ckpt = config
    return f"micro-batch {micro}" + (", checkpointing" if ckpt else "")


def compare(
    args: argparse.Namespace,
    rungs: str,
    configs: list[tuple[int, bool]],
    runs: dict[tuple[int, bool], dict[str, Any]],
    work: Path,
) -> dict[str, Any]:
    """One ladder against the static configurations it could stand on (`configs`, ladder order)."""
    g = args.global_batch
    for c in configs:
        if c not in runs:  # a static run is the same whichever ladder it is compared with
            runs[c] = spawn(args, rungs, c, None, work, f"static-mb{c[0]}-ckpt{int(c[1])}")
    static_runs = {config_name(c): runs[c] for c in configs}
    if args.cap_mib is not None:
        cap, cap_source = int(args.cap_mib * MIB), "given (--cap-mib)"
    else:
        cap, cap_source = place_cap(static_runs, args.seq)
    ladder = summarize(spawn(args, rungs, configs[0], cap, work, f"ladder-{rungs}"), cap, g)
    static = {name: summarize(r, cap, g) for name, r in static_runs.items()}
    fitting = {n: s for n, s in static.items() if s["fits"]}
    # Ranked by tokens per CPU-second: on a shared machine wall time also counts the other jobs'
    # load, which moves between runs; one thread each, so CPU time is the run's own work.
    best = max(fitting, key=lambda n: fitting[n]["tokens_per_cpu_s"]) if fitting else None
    return {
        "rungs": [config_name(c) for c in configs],
        "cap_MiB": cap / MIB,
        "cap_source": cap_source,
        "static": {
            n: {
                **{k: v for k, v in s.items() if k != "decisions"},
                "phase_peaks_MiB": [p / MIB for p in phase_peaks(static_runs[n], args.seq)],
            }
            for n, s in static.items()
        },
        "best_static": best,
        "ladder": ladder,
        "ratio_ladder_over_best_static": (
            ladder["tokens_per_cpu_s"] / fitting[best]["tokens_per_cpu_s"] if best is not None else None
        ),
        "ratio_ladder_over_best_static_wall": (
            ladder["tokens_per_s"] / fitting[best]["tokens_per_s"] if best is not None else None
        ),
        "trial_runs": {"static": len(configs), "ladder": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128, help="first half's sequence length (doubled after)")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--cap-mib", type=float, help="the cap (default: placed from the static trials)")
    ap.add_argument(
        "--ladders", nargs="+", choices=LADDERS, default=list(LADDERS), help="which ladders to compare"
    )
    ap.add_argument("--quick", action="store_true", help="8 steps (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--micro", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rungs", default="micro_batch", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--cap-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trainwarden" / "torch_extensions")
    )
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if args.run:
        one_run(args)
        return
    if args.quick:
        args.steps = 8
    t0 = time.time()
    load_start = os.getloadavg()
    g = args.global_batch
    ladders = {
        "micro_batch": [(g, False), (g // 2, False), (g // 4, False)],
        "checkpointing": [(g, False), (g, True)],
    }
    runs: dict[tuple[int, bool], dict[str, Any]] = {}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tw-ladder-") as tmp:
        for name in args.ladders:
            out[name] = compare(args, name, ladders[name], runs, Path(tmp))
    import torch

    result = {
        "benchmark": "ladder_throughput",
        "setup": {
            "model": f"GPT {args.layers} layers x {args.width}, vocab 256",
            "ranks": 1,
            "engine": "ZeRO 0, fp32, AdamW (torch_adam)",
            "global_batch": g,
            "steps": args.steps,
            "curriculum": f"seq {args.seq} for steps 1-{args.steps // 2}, {2 * args.seq} after",
            "high_water": HIGH_WATER,
            "static_trial_runs_total": len(runs),
        },
        **out,
        "machine": {
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "wall_s": time.time() - t0,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
