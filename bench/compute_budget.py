"""Compute budget: trainwarden's cooldown against cosine schedules sized by a guess, and the
stopping rule on a run whose loss plateaus early. Prints one JSON object; saves it under
bench/results/compute_budget.json. Progress goes to stderr.

Part 1 (cooldown). The demo's GPT (smaller: 2 layers, 64 wide, context 64) on the demo's corpus,
one wall-time budget, every seed runs four arms in turn (interleaved, so load on the machine
falls on all of them alike):
- `trainwarden`: warmup, then the constant LR; the compute policy (embedded controller) cools it
  down over the last `cooldown_fraction` of the budget and stops the job at the step boundary
  nearest its end.
- `cosine_short`, `cosine_right`, `cosine_long`: warmup, then cosine to 0 over a step count a
  user guessed: the steps that fit the budget at the rate measured in a calibration run, times
  0.7, 1.0 and 1.3. A run ends at its last planned step or at the budget, whichever comes first
  (at the step boundary nearest the budget's end, the same rule trainwarden follows).
Every arm goes through the same adapter and an embedded controller (observe only for cosine), so
the agent's cost is the same. Reported per arm: the held-out loss after the run (not counted in
the budget) and how far the run's end was from the budget (seconds, percent), per seed and as
mean and spread (sample standard deviation over seeds). A difference between two arms counts
only where it exceeds twice the larger of their spreads.

Part 2 (stopping rule). A model too small for its data (1 layer, 16 wide) on a small slice of the
corpus: its held-out loss flattens early. The job reports a validation loss every few steps
(`handle.report(eval_loss=...)`). Two arms per seed: the whole budget (cooldown at its end) and
the stopping rule (`min_gain`): the budget it saved (from summary.json) and the held-out loss it
gave up.

    .venv/bin/python bench/compute_budget.py              # 3 seeds, 30 s and 20 s budgets, ~10 min
    .venv/bin/python bench/compute_budget.py --quick      # 1 seed, 8 s budgets, ~1.5 min
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainwarden.adapters import pytorch as tw
from trainwarden.examples.corpus import WindowSampler, eval_batches, load_domains
from trainwarden.examples.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
WARMUP = 10
#: Part 2's corpus slice per domain: small enough that a 16-wide model flattens within seconds.
PLATEAU_BYTES = 20_000
GUESSES = {"cosine_short": 0.7, "cosine_right": 1.0, "cosine_long": 1.3}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 8 s budgets: a smoke run")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; 1 with --quick)")
    p.add_argument("--budget", type=float, default=None, help="part 1 wall-time budget, s (default 30)")
    p.add_argument("--plateau-budget", type=float, default=None, help="part 2 budget, s (default 20)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier under load)")
    p.add_argument(
        "--kind",
        choices=("wall_time", "tokens", "both"),
        default="wall_time",
        help="part 1's budget: wall time (what the issue asks; sensitive to other load on the machine), "
        "tokens (the same number of steps for every arm whatever the load), or both",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compute_budget.json")
    return p.parse_args()


class Task:
    """A model shape, its data and its held-out batches."""

    def __init__(
        self, *, n_layer: int, n_embd: int, block: int, batch: int, lr: float, data_bytes: int
    ) -> None:
        self.cfg = GPTConfig(block_size=block, n_layer=n_layer, n_head=2, n_embd=n_embd)
        self.batch, self.lr = batch, lr
        self.domains = load_domains(data_bytes)
        self.val = eval_batches(self.domains, block_size=block, batch_size=16, n_batches=4)
        self.quick_val = eval_batches(self.domains, block_size=block, batch_size=16, n_batches=1, seed=99)

    def build(self, seed: int) -> tuple[GPT, torch.optim.Optimizer, WindowSampler]:
        torch.manual_seed(seed)
        model = GPT(self.cfg)
        sampler = WindowSampler(self.domains, self.cfg.block_size, self.batch, seed=seed)
        return model, model.configure_optimizer(lr=self.lr), sampler

    @torch.no_grad()
    def loss(self, model: GPT, batches: dict[str, list[Any]]) -> float:
        model.eval()
        losses = [float(model(b.x, b.y)[1]) for bs in batches.values() for b in bs]
        model.train()
        return sum(losses) / len(losses)


def run(
    task: Task,
    seed: int,
    schedule: Callable[[int], float],
    run_dir: Path,
    *,
    policy: str | None,
    budget_s: float,
    max_steps: int | None = None,
    eval_every: int = 0,
    budget_steps: int | None = None,
) -> dict[str, Any]:
    """One training run; the loop cuts at the budget itself only when trainwarden does not."""
    model, opt, sampler = task.build(seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    policy_path = None
    if policy is not None:
        policy_path = run_dir / "policy.yaml"
        run_dir.mkdir(parents=True, exist_ok=True)
        policy_path.write_text(policy)
    h = tw.attach(
        model,
        opt,
        scheduler=sched,
        global_batch_size=task.batch,
        tokens_per_sample=task.cfg.block_size,
        policy=policy_path,
        run_dir=run_dir / "run",
    )
    t0 = time.perf_counter()
    last = 0.0
    for step_batch in h.steps(sampler):
        s0 = time.perf_counter()
        for micro in step_batch:
            h.backward(model(micro.x, micro.y)[1])
        h.step()
        if eval_every and h.step_count % eval_every == 0:
            h.report(eval_loss=task.loss(model, task.quick_val))
        now = time.perf_counter()
        last = now - s0
        if h.should_stop or (max_steps is not None and h.step_count >= max_steps):
            break
        if policy is None and budget_steps is None and (now - t0) + 0.5 * last >= budget_s:
            break  # the nearest boundary to the budget's end, as the compute policy stops
        if policy is None and budget_steps is not None and h.step_count >= budget_steps:
            break  # a token budget: spent by whole steps
    elapsed = time.perf_counter() - t0
    h.close()
    out: dict[str, Any] = {
        "seed": seed,
        "steps": h.step_count,
        "held_out_loss": round(task.loss(model, task.val), 5),
        "wall_s": round(elapsed, 3),
        "end_minus_budget_s": round(elapsed - budget_s, 3),
        "end_minus_budget_pct": round(100 * (elapsed - budget_s) / budget_s, 2),
        "final_lr_multiplier": h.lr_multiplier,
    }
    summary = run_dir / "run" / "summary.json"
    if policy is not None and summary.exists():
        out["stop"] = json.loads(summary.read_text()).get("stop")
    return out


def warmup_then(after: Callable[[int], float]) -> Callable[[int], float]:
    return lambda s: (s + 1) / WARMUP if s < WARMUP else after(s)


def cosine(total: int) -> Callable[[int], float]:
    span = max(1, total - WARMUP)
    return warmup_then(lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, (s - WARMUP) / span))))


def stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 5),
        "spread": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
    }


def verdict(a: str, b: str, sa: dict[str, float], sb: dict[str, float], lower_better: bool = True) -> dict:
    """Whether arm b's mean differs from arm a's by more than twice the larger spread."""
    diff = sb["mean"] - sa["mean"]
    bar = 2 * max(sa["spread"], sb["spread"])
    if abs(diff) <= bar:
        said = f"no difference that counts ({diff:+.4f} within 2 x spread {bar:.4f})"
    else:
        better = a if (diff > 0) == lower_better else b
        said = f"{better} is better ({diff:+.4f}, beyond 2 x spread {bar:.4f})"
    return {
        "minus": a,
        "diff": round(diff, 5),
        "twice_spread": round(bar, 5),
        "counts": abs(diff) > bar,
        "says": said,
    }


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "held_out_loss") -> dict[str, Any]:
    """The same question seed by seed: b - a per seed (the same seed's model, data and, run next to
    each other, much the same load on the machine), its mean against twice its spread."""
    diffs = [rb[key] - ra[key] for ra, rb in zip(a, b, strict=True)]
    s = stats(diffs)
    return {"per_seed": [round(d, 5) for d in diffs], **s, "counts": abs(s["mean"]) > 2 * s["spread"] > 0}


def calibrate(task: Task, seconds: float) -> float:
    """Seconds per step of this task on this machine now: what a user's guess is sized from."""
    model, opt, sampler = task.build(0)
    it = iter(sampler)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        b = next(it)
        s0 = time.perf_counter()
        model(b.x, b.y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - s0)
    return statistics.median(times[2:] or times)


def part_cooldown(args: argparse.Namespace, tmp: Path, seeds: list[int], kind: str) -> dict[str, Any]:
    task = Task(n_layer=2, n_embd=64, block=64, batch=16, lr=3e-3, data_bytes=1_000_000)
    budget = args.budget
    spf = calibrate(task, 3.0)
    right = max(WARMUP + 5, int(budget / spf))
    log(f"part 1 ({kind}): {spf * 1000:.1f} ms/step measured: a right guess is {right} steps in {budget:g} s")
    tokens = right * task.batch * task.cfg.block_size
    limit = f"wall_time: {budget:g}s" if kind == "wall_time" else f"tokens: {tokens}"
    policy = (
        f"version: 1\nbudget:\n  {limit}\ncontroller:\n  sync_every: 1\n"
        "policies:\n  - kind: compute\n    cooldown_fraction: 0.2\n    cooldown_shape: 1-sqrt\n"
    )
    cap = right if kind == "tokens" else None
    arms: dict[str, list[dict[str, Any]]] = {"trainwarden": [], **{k: [] for k in GUESSES}}
    for seed in seeds:
        for arm in arms:
            d = tmp / f"p1-{kind}-{arm}-{seed}"
            if arm == "trainwarden":
                r = run(task, seed, warmup_then(lambda s: 1.0), d, policy=policy, budget_s=budget)
            else:
                total = max(WARMUP + 1, round(right * GUESSES[arm]))
                r = run(
                    task,
                    seed,
                    cosine(total),
                    d,
                    policy=None,
                    budget_s=budget,
                    max_steps=total,
                    budget_steps=cap,
                )
                r["planned_steps"] = total
            if cap is not None:
                r["end_minus_budget_steps"] = r["steps"] - cap
            log(
                f"  seed {seed} {arm:13s} {r['steps']:4d} steps, held-out {r['held_out_loss']:.4f}, "
                f"end {r['end_minus_budget_s']:+.2f} s"
            )
            arms[arm].append(r)
    summary = {
        arm: {
            "held_out_loss": stats([r["held_out_loss"] for r in rs]),
            "end_minus_budget_s": stats([r["end_minus_budget_s"] for r in rs]),
            "end_minus_budget_pct": stats([r["end_minus_budget_pct"] for r in rs]),
            "steps": stats([r["steps"] for r in rs]),
            **(
                {"end_minus_budget_steps": stats([r["end_minus_budget_steps"] for r in rs])}
                if cap is not None
                else {}
            ),
        }
        for arm, rs in arms.items()
    }
    tw_loss = summary["trainwarden"]["held_out_loss"]
    verdicts = {
        arm: {
            **verdict("trainwarden", arm, tw_loss, summary[arm]["held_out_loss"]),
            "paired": paired(arms["trainwarden"], arms[arm]),
        }
        for arm in GUESSES
    }
    return {
        "task": {
            "model": "GPT 2 layers x 64, context 64",
            "global_batch": task.batch,
            "peak_lr": task.lr,
            "warmup_steps": WARMUP,
            "corpus_bytes_per_domain": 1_000_000,
        },
        "budget": {"kind": "wall_time", "seconds": budget}
        if kind == "wall_time"
        else {"kind": "tokens", "tokens": tokens, "steps": right, "seconds_it_was_sized_for": budget},
        "calibrated_seconds_per_step": round(spf, 5),
        "right_guess_steps": right,
        "trainwarden_policy": policy,
        "runs": arms,
        "summary": summary,
        "held_out_loss_verdicts": verdicts,
    }


def part_plateau(args: argparse.Namespace, tmp: Path, seeds: list[int]) -> dict[str, Any]:
    task = Task(n_layer=1, n_embd=16, block=32, batch=16, lr=1e-2, data_bytes=PLATEAU_BYTES)
    budget = args.plateau_budget
    base = (
        f"version: 1\nbudget:\n  wall_time: {budget:g}s\ncontroller:\n  sync_every: 1\n"
        "policies:\n  - kind: compute\n    cooldown_fraction: 0.2\n"
    )
    rule = base + "    min_gain: 0.03\n    gain_window: 0.2\n    gain_after: 0.3\n"
    arms: dict[str, list[dict[str, Any]]] = {"whole_budget": [], "stopping_rule": []}
    for seed in seeds:
        for arm, policy in (("whole_budget", base), ("stopping_rule", rule)):
            r = run(
                task,
                seed,
                warmup_then(lambda s: 1.0),
                tmp / f"p2-{arm}-{seed}",
                policy=policy,
                budget_s=budget,
                eval_every=10,
            )
            saved = (r.get("stop") or {}).get("saved") or {}
            r["budget_saved_fraction"] = round(saved.get("fraction", 0.0), 4)
            r["budget_saved_s"] = round(saved.get("seconds") or 0.0, 3)
            log(
                f"  seed {seed} {arm:13s} {r['steps']:4d} steps, held-out {r['held_out_loss']:.4f}, "
                f"saved {r['budget_saved_fraction']:.0%} ({(r.get('stop') or {}).get('cause')})"
            )
            arms[arm].append(r)
    summary = {
        arm: {
            "held_out_loss": stats([r["held_out_loss"] for r in rs]),
            "budget_saved_fraction": stats([r["budget_saved_fraction"] for r in rs]),
            "budget_saved_s": stats([r["budget_saved_s"] for r in rs]),
            "steps": stats([r["steps"] for r in rs]),
        }
        for arm, rs in arms.items()
    }
    given_up = verdict(
        "whole_budget",
        "stopping_rule",
        summary["whole_budget"]["held_out_loss"],
        summary["stopping_rule"]["held_out_loss"],
    )
    given_up["paired"] = paired(arms["whole_budget"], arms["stopping_rule"])
    return {
        "task": {
            "model": "GPT 1 layer x 16, context 32",
            "corpus_bytes_per_domain": PLATEAU_BYTES,
            "peak_lr": task.lr,
            "eval_every_steps": 10,
        },
        "budget": {"kind": "wall_time", "seconds": budget},
        "policies": {"whole_budget": base, "stopping_rule": rule},
        "runs": arms,
        "summary": summary,
        "loss_given_up": given_up,
    }


def main() -> int:
    args = parse_args()
    n_seeds = args.seeds or (1 if args.quick else 3)
    args.budget = args.budget or (8.0 if args.quick else 30.0)
    args.plateau_budget = args.plateau_budget or (8.0 if args.quick else 20.0)
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("trainwarden").setLevel(logging.ERROR)
    seeds = list(range(n_seeds))
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="tw-bench-compute-") as tmp:
        log("part 1: trainwarden's cooldown vs cosine schedules sized by a guess")
        kinds = ("wall_time", "tokens") if args.kind == "both" else (args.kind,)
        cooldown = {k: part_cooldown(args, Path(tmp), seeds, k) for k in kinds}
        log("part 2: the stopping rule on a run that plateaus early")
        plateau = part_plateau(args, Path(tmp), seeds)
    result = {
        "bench": "compute_budget",
        "seeds": seeds,
        "threads": args.threads,
        "note": "wall-time budgets on a shared 2-core machine: other jobs' load moves step times; arms "
        "are interleaved per seed so it falls on all of them",
        "cooldown_vs_cosine": cooldown,
        "stopping_rule": plateau,
        "bench_wall_s": round(time.time() - t0, 1),
    }
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
