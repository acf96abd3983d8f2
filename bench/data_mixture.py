"""Does online data mixing pay on real data? Four arms, same model, seeds and token budget.

    .venv/bin/python bench/data_mixture.py                 # 3 seeds x 4 arms, ~10-15 min on 2 busy cores
    .venv/bin/python bench/data_mixture.py --quick         # 1 seed, short: a smoke run

Domains: the Python stdlib's source, its English reference text (pydoc_data), its docstrings,
and a degraded domain (those documents with the characters of each line shuffled), from
examples/domains.py, validation held out by source module (no file on both sides). Arms:

1. uniform: each domain a quarter of the samples;
2. natural: proportional to each domain's size in the stdlib (code, then the degraded copy,
   docstrings, text);
3. online: trainwarden's data policy (policies/examples/data_mixing.yaml): a bandit on each
   domain's learnability, from uniform;
4. online + curriculum + pruning (policies/examples/data_curriculum.yaml).

Every arm trains the same tiny GPT from the same initial weights for the same number of tokens,
through the same MixtureSampler and plain-PyTorch handle (the baselines with no policy). Printed
and saved (bench/results/data_mixture.json): each arm's final validation loss (mean over all four
domains, and over the three clean ones: the headline, since a degraded domain makes a win easy),
the tokens it needed to reach the uniform arm's final loss of the same seed (ratio to uniform's
tokens), and the verdict: a gain counts only where the mean gain over seeds exceeds twice the
spread between seeds (max - min over seeds of the paired difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainwarden.examples.domains import CLEAN_DOMAINS, DOMAINS, stdlib_domains  # noqa: E402
from trainwarden.examples.train_mixture import Options, train  # noqa: E402

POLICIES = REPO / "policies" / "examples"


def natural_weights() -> dict[str, float]:
    """Each domain's share of the stdlib (code capped at 4 MB, as the corpus caps it)."""
    sizes = {d: len(v) for d, v in stdlib_domains(4_000_000).train.items()}
    total = sum(sizes.values())
    return {d: sizes[d] / total for d in DOMAINS}


def arms(natural: dict[str, float]) -> dict[str, dict[str, Any]]:
    return {
        "uniform": {},
        "natural": {"weights": natural},
        "online": {"policy": str(POLICIES / "data_mixing.yaml")},
        "online+curriculum+pruning": {
            "policy": str(POLICIES / "data_curriculum.yaml"),
            "curriculum": True,
            "max_prune_fraction": 0.3,
        },
    }


def mean_loss(val: dict[str, float], domains: tuple[str, ...]) -> float:
    return sum(val[d] for d in domains) / len(domains)


def tokens_to_reach(curve: list[dict[str, Any]], target: float, domains: tuple[str, ...]) -> int | None:
    for point in curve:
        if mean_loss(point["val"], domains) <= target:
            return int(point["tokens"])
    return None


def verdict(gains: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(gains)
    spread = max(gains) - min(gains) if len(gains) > 1 else float("nan")
    counts = len(gains) > 1 and mean > 2 * spread
    return {"mean_gain": mean, "seed_spread": spread, "gains": gains, "counts": bool(counts)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arms", nargs="+", default=None, help="run only these arms (uniform is always run)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_mixture.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every = [0], 120, 40
    natural = natural_weights()
    model = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}
    base = dict(steps=args.steps, global_batch=16, micro_batch=16, lr=3e-3, max_bytes=300_000,
                eval_every=args.eval_every, eval_batches=4, threads=1, **model)  # fmt: skip
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    t0 = time.time()
    for seed in args.seeds:
        for arm, extra in arms(natural).items():
            if args.arms and arm != "uniform" and arm not in args.arms:
                continue
            with tempfile.TemporaryDirectory() as run_dir:
                r = train(Options(seed=seed, run_dir=run_dir, **base, **extra))
            runs.setdefault(arm, {})[seed] = {
                "final_val": r["final_val"],
                "curve": r["curve"],
                "tokens": r["tokens"],
                "weights": r["weights"],
                "final_weights": r["weights"][-1][1],
                "curriculum_level": r["curriculum_level"],
                "pruned_fraction": r["pruned_fraction"],
                "seconds": r["seconds"],
            }
            print(
                f"seed {seed} {arm:26s} val all {mean_loss(r['final_val'], DOMAINS):.4f} "
                f"clean {mean_loss(r['final_val'], CLEAN_DOMAINS):.4f}  {r['seconds']:.0f}s "
                f"(total {time.time() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
    summary: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        row: dict[str, Any] = {}
        for label, domains in (("all", DOMAINS), ("clean", CLEAN_DOMAINS)):
            finals = [mean_loss(by_seed[s]["final_val"], domains) for s in args.seeds]
            ratios = []
            for s in args.seeds:
                target = mean_loss(runs["uniform"][s]["final_val"], domains)
                reached = tokens_to_reach(by_seed[s]["curve"], target, domains)
                ratios.append(None if reached is None else reached / runs["uniform"][s]["tokens"])
            gains = [
                mean_loss(runs["uniform"][s]["final_val"], domains)
                - mean_loss(by_seed[s]["final_val"], domains)
                for s in args.seeds
            ]
            row[label] = {
                "final_val_mean": statistics.fmean(finals),
                "final_val_by_seed": finals,
                "tokens_to_uniform_final_ratio": ratios,
                "vs_uniform": verdict(gains) if arm != "uniform" else None,
            }
        row["final_weights_by_seed"] = [by_seed[s]["final_weights"] for s in args.seeds]
        summary[arm] = row
    result = {
        "bench": "data_mixture",
        "setup": {
            "model": model,
            "steps": args.steps,
            "tokens_per_run": runs["uniform"][args.seeds[0]]["tokens"],
            "global_batch": 16,
            "seeds": args.seeds,
            "domains": list(DOMAINS),
            "clean_domains": list(CLEAN_DOMAINS),
            "natural_weights": natural,
            "val": "held out by source module (crc32 of the file path or topic), every domain",
        },
        "summary": summary,
        "runs": {arm: {str(s): r for s, r in by.items()} for arm, by in runs.items()},
        "seconds": time.time() - t0,
    }
    lines = []
    for arm, row in summary.items():
        if arm == "uniform":
            continue
        v = row["clean"]["vs_uniform"]
        lines.append(
            f"{arm}: clean val {row['clean']['final_val_mean']:.4f} vs uniform "
            f"{summary['uniform']['clean']['final_val_mean']:.4f}, gain {v['mean_gain']:+.4f} "
            f"(seed spread {v['seed_spread']:.4f}): {'counts' if v['counts'] else 'does not count'}"
        )
    result["verdict"] = lines
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for line in lines:
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
