"""Does online data mixing pay on real data, and which reward? Same model, seeds and token budget.

    nice .venv/bin/python bench/data_mixture.py                  # 6 seeds x 4 arms, 800 steps
    nice .venv/bin/python bench/data_mixture.py --quick          # 1 seed, short: a smoke run

Domains: the Python stdlib's source, its English reference text (pydoc_data), its docstrings, a
degraded domain (those documents with the characters of each line shuffled), from
examples/domains.py, validation held out by source module (no file on both sides), and an easy
domain built here: the stdlib's own boilerplate (its licence headers, `__all__` lists and the
docstrings it repeats word for word), a small pool of snippets repeated in a seeded order, as
boilerplate and near-duplicates repeat in a real corpus (its validation is the same pool in
another order: a solved domain is solved on held-out copies too). Arms:

1. uniform: each domain a fifth of the samples;
2. online-relative: trainwarden's data policy with the reward before issue 20 (`reward:
   relative`, the relative decrease of a domain's loss per interval);
3. online-gain: the same policy with `reward: gain` (the absolute decrease per unit of sampling:
   what a sample of the domain buys, weighted by the domain's loss relative to the mean:
   `loss_weight`), the default now;
4. oracle-static: a reference, not a method: a static mixture with the degraded and the easy domain
   at the floor (0.05) from the first step and the clean domains sharing the rest equally, which a
   user could only choose knowing the answer; it says how much of the gain is reachable at all;
optional (`--arms`): natural (each domain's share of the corpus) and online-gain+curriculum+pruning.

Every arm trains the same tiny GPT from the same initial weights for the same number of tokens,
through the same MixtureSampler and plain-PyTorch handle. Printed and saved
(bench/results/data_mixture.json), per arm and seed: the final validation loss (mean over the three
clean domains, the headline: the degraded and the easy domain make a win easy), the tokens it
needed to reach the uniform arm's final clean loss of the same seed (ratio to uniform's tokens, at
the evaluation points: every 25 steps),
and the final weights. The verdict is given separately for the seeds the policy's parameters were
chosen on (`--tuned-on`) and the others: a gain counts only where the mean gain over seeds exceeds
twice the spread between seeds (max - min over seeds of the paired difference).
"""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import json
import random
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainwarden.examples.corpus import _stdlib_py_files  # noqa: E402
from trainwarden.examples.domains import CLEAN_DOMAINS, DOMAINS, stdlib_domains  # noqa: E402
from trainwarden.examples.train_mixture import Options, train  # noqa: E402

EASY = "easy"
ALL = (*DOMAINS, EASY)
#: The data policy's parameters in every online arm (besides the reward), chosen on seeds 0-1.
POLICY: dict[str, Any] = {
    "every_steps": 20,
    "warmup_steps": 20,
    "floor": 0.02,
    "temperature": 0.2,
    "loss_weight": 2.0,
}
#: The least reward scale of the policy before issue 20 (a relative decrease per interval).
RELATIVE_MIN_SCALE = 0.002


@functools.lru_cache(maxsize=1)
def boilerplate_pool(max_snippets: int = 24) -> list[str]:
    """Boilerplate of the stdlib: the distinct licence headers (a file's leading comment block
    that names a copyright or licence), the shortest `__all__` lists, and the docstrings written
    word for word in three places or more. A small pool: repeated, it is learnt early."""
    root = Path(sysconfig.get_paths()["stdlib"])
    headers: set[str] = set()
    alls: set[str] = set()
    docs: collections.Counter[str] = collections.Counter()
    for path in _stdlib_py_files(root):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        head = re.match(r"(?:#[^\n]*\n)+", src)
        if head and re.search(r"copyright|licen[cs]e", head.group(0), re.IGNORECASE):
            headers.add(head.group(0))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                seg = ast.get_source_segment(src, node)
                if seg:
                    alls.add(seg + "\n")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc and len(doc) < 200:
                    docs[f'    """{doc}"""\n'] += 1
    repeated = [d for d, n in sorted(docs.items(), key=lambda dn: (-dn[1], dn[0])) if n >= 3]
    pick = max_snippets // 3
    by_size = functools.partial(sorted, key=lambda s: (len(s), s))  # not set order: hash-seeded
    return by_size(headers)[:pick] + by_size(alls)[:pick] + repeated[:pick]


@functools.lru_cache(maxsize=1)
def separator_rules() -> collections.Counter[str]:
    """The stdlib's comment and heading rules (`# ------`, `######`, `=====`), with their counts."""
    rules: collections.Counter[str] = collections.Counter()
    for path in _stdlib_py_files(Path(sysconfig.get_paths()["stdlib"])):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for line in text.splitlines():
            if RULE.fullmatch(line):
                rules[line] += 1
    return rules


RULE = re.compile(r"\s*#?\s*([-=*#~_])\1{19,}\s*")


def boilerplate_domain(max_bytes: int, seed: int, rule_share: float = 0.7) -> bytes:
    """Blocks of one line repeated 3-8 times, in a seeded random order, up to `max_bytes`: a
    separator rule of the stdlib (a `rule_share` of the blocks, as often as the stdlib has it) or a
    line of its boilerplate (licence headers, `__all__` lists, repeated docstrings). Repetitive
    within the model's context and mostly runs of one character, so even the tiny model learns most
    of it in the first ~200 steps: a domain that is solved early, as boilerplate is."""
    rules = separator_rules()
    rule_lines, rule_counts = list(rules), list(rules.values())
    lines = sorted({line for s in boilerplate_pool() for line in s.splitlines() if line.strip()})
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < max_bytes:
        if rng.random() < rule_share:
            line = rng.choices(rule_lines, weights=rule_counts)[0]
        else:
            line = rng.choice(lines)
        for _ in range(rng.randint(3, 8)):
            out.append(line)
            size += len(line) + 1
    return "\n".join(out).encode("utf-8")[:max_bytes]


def natural_weights() -> dict[str, float]:
    """Each domain's share of the stdlib (code capped at 4 MB, as the corpus caps it); the easy
    domain at the pool's share, before it is repeated."""
    sizes = {d: len(v) for d, v in stdlib_domains(4_000_000).train.items()}
    sizes[EASY] = sum(len(s) for s in boilerplate_pool())
    total = sum(sizes.values())
    return {d: sizes[d] / total for d in ALL}


def policy_file(path: Path, reward: str, params: dict[str, Any], curriculum: bool = False) -> str:
    lines = [
        "version: 1",
        "budget: {}",
        "controller:",
        "  sync_every: 4",
        "  decide_interval_s: 0.05",
        "policies:",
        "  - kind: data",
        f"    domains: [{', '.join(ALL)}]",
        f"    reward: {reward}",
        *(f"    {k}: {v}" for k, v in params.items()),
    ]
    if curriculum:
        lines += ["    curriculum: true", "    pruning: true", "    max_prune_fraction: 0.2"]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def oracle_weights(floor: float = 0.05) -> dict[str, float]:
    """The static mixture a user could only choose knowing the answer: noise and the easy domain at
    the floor from the first step, the clean domains sharing the rest equally. Not a method: the
    reference the online policy is measured against (how much of the gain is reachable at all)."""
    low = {"noise", EASY}
    share = (1 - floor * len(low)) / (len(ALL) - len(low))
    return {d: floor if d in low else share for d in ALL}


def arms(chosen: list[str], tmp: Path, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # The arms differ only in the reward: the relative one with its own least scale from before issue 20.
    relative = {**params, "min_reward_scale": RELATIVE_MIN_SCALE}
    return {
        "uniform": {},
        "online-relative": {"policy": policy_file(tmp / "relative.yaml", "relative", relative)},
        "online-gain": {"policy": policy_file(tmp / "gain.yaml", "gain", params)},
        "natural": {"weights": natural_weights() if "natural" in chosen else None},
        "oracle-static": {"weights": oracle_weights()},
        "online-gain+curriculum+pruning": {
            "policy": policy_file(tmp / "curriculum.yaml", "gain", params, curriculum=True),
            "curriculum": True,
            "max_prune_fraction": 0.3,
        },
    }


DEFAULT_ARMS = ("uniform", "online-gain", "oracle-static", "online-relative")


def mean_loss(val: dict[str, float], domains: tuple[str, ...]) -> float:
    return sum(val[d] for d in domains) / len(domains)


def tokens_to_reach(curve: list[dict[str, Any]], target: float, domains: tuple[str, ...]) -> int | None:
    for point in curve:
        if mean_loss(point["val"], domains) <= target:
            return int(point["tokens"])
    return None


def verdict(gains: list[float]) -> dict[str, Any]:
    if not gains:
        return {}
    mean = statistics.fmean(gains)
    spread = max(gains) - min(gains) if len(gains) > 1 else float("nan")
    counts = len(gains) > 1 and mean > 2 * spread
    return {"mean_gain": mean, "seed_spread": spread, "gains": gains, "counts": bool(counts)}


def summarize(
    runs: dict[str, dict[int, dict[str, Any]]], seeds: list[int], tuned_on: list[int]
) -> dict[str, Any]:
    groups = {
        "tuned_seeds": [s for s in seeds if s in tuned_on],
        "held_out_seeds": [s for s in seeds if s not in tuned_on],
    }
    summary: dict[str, Any] = {}
    uni = runs["uniform"]
    for arm, by_seed in runs.items():
        per_seed = {}
        for s in seeds:
            final = mean_loss(by_seed[s]["final_val"], CLEAN_DOMAINS)
            target = mean_loss(uni[s]["final_val"], CLEAN_DOMAINS)
            reached = tokens_to_reach(by_seed[s]["curve"], target, CLEAN_DOMAINS)
            per_seed[str(s)] = {
                "clean_val": final,
                "gain_vs_uniform": target - final,
                "tokens_to_uniform_final_ratio": None if reached is None else reached / uni[s]["tokens"],
                "val_by_domain": by_seed[s]["final_val"],
                "final_weights": by_seed[s]["final_weights"],
                "mean_weights": by_seed[s]["mean_weights"],
            }
        row: dict[str, Any] = {"by_seed": per_seed}
        for group, group_seeds in groups.items():
            if not group_seeds:
                continue
            ratios = [per_seed[str(s)]["tokens_to_uniform_final_ratio"] for s in group_seeds]
            row[group] = {
                "seeds": group_seeds,
                "clean_val_mean": statistics.fmean(per_seed[str(s)]["clean_val"] for s in group_seeds),
                "vs_uniform": verdict([per_seed[str(s)]["gain_vs_uniform"] for s in group_seeds])
                if arm != "uniform"
                else None,
                "tokens_ratio_at_most_0_7_every_seed": arm != "uniform"
                and all(r is not None and r <= 0.7 for r in ratios),
            }
        summary[arm] = row
    return summary


def mean_weights(history: list[tuple[int, dict[str, float]]], steps: int) -> dict[str, float]:
    """Each domain's weight averaged over the run's steps (the share of samples it was given)."""
    out = dict.fromkeys(history[0][1], 0.0)
    for i, (start, w) in enumerate(history):
        end = history[i + 1][0] if i + 1 < len(history) else steps
        for k, v in w.items():
            out[k] += v * max(0, end - start) / steps
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--tuned-on", type=int, nargs="*", default=[0, 1], help="seeds the policy was tuned on")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help="uniform is always run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "data_mixture.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="policy parameters to change")
    ap.add_argument(
        "--merge", nargs="+", metavar="RESULT", help="summarise these results of this bench together"
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.tuned_on, Path(args.out))
    params = dict(POLICY)
    for item in args.set:
        key, _, value = item.partition("=")
        params[key] = value
    if args.quick:
        args.seeds, args.steps, args.eval_every = [0], 120, 40
    max_bytes = 300_000
    model = {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64}
    base = dict(steps=args.steps, global_batch=16, micro_batch=16, lr=3e-3, max_bytes=max_bytes,
                eval_every=args.eval_every, eval_batches=4, threads=1, **model)  # fmt: skip
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        chosen = ["uniform", *(a for a in args.arms if a != "uniform")]
        all_arms = arms(chosen, Path(tmp), params)
        unknown = [a for a in chosen if a not in all_arms]
        if unknown:
            ap.error(f"unknown arm(s) {unknown}; the arms are {', '.join(all_arms)}")
        for seed in args.seeds:
            easy = {
                EASY: (boilerplate_domain(max_bytes, seed), boilerplate_domain(max_bytes // 10, 1000 + seed))
            }
            for arm in chosen:
                with tempfile.TemporaryDirectory() as run_dir:
                    o = Options(seed=seed, run_dir=run_dir, extra_domains=easy, **base, **all_arms[arm])
                    r = train(o)
                runs.setdefault(arm, {})[seed] = {
                    "final_val": r["final_val"],
                    "curve": r["curve"],
                    "tokens": r["tokens"],
                    "weights": r["weights"],
                    "final_weights": r["weights"][-1][1],
                    "mean_weights": mean_weights(r["weights"], r["steps"]),
                    "curriculum_level": r["curriculum_level"],
                    "pruned_fraction": r["pruned_fraction"],
                    "seconds": r["seconds"],
                }
                w = r["weights"][-1][1]
                print(
                    f"seed {seed} {arm:31s} clean {mean_loss(r['final_val'], CLEAN_DOMAINS):.4f} "
                    f"easy {r['final_val'][EASY]:.4f} weights "
                    + " ".join(f"{k} {v:.2f}" for k, v in w.items())
                    + f"  {r['seconds']:.0f}s (total {time.time() - t0:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
    setup = {
        "model": model,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "tokens_per_run": runs["uniform"][args.seeds[0]]["tokens"],
        "global_batch": 16,
        "seeds": args.seeds,
        "tuned_on": args.tuned_on,
        "domains": list(ALL),
        "clean_domains": list(CLEAN_DOMAINS),
        "policy": params,
        "relative_arm_min_reward_scale": RELATIVE_MIN_SCALE,
        "oracle_weights": oracle_weights(),
        "easy_pool_bytes": sum(len(s) for s in boilerplate_pool()),
        "val": "held out by source module (crc32 of the file path or topic); easy: the pool reordered",
    }
    write_result(runs, setup, time.time() - t0, Path(args.out))
    return 0


def merge(paths: list[str], tuned_on: list[int], out: Path) -> int:
    """One result from several runs of this bench on other seeds (the same code and setup, run as
    separate processes to use more cores): the runs side by side, the summary and verdict redone."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("model", "steps", "eval_every", "policy", "domains", "oracle_weights")
    first = results[0]["setup"]
    for path, r in zip(paths, results, strict=True):
        differs = [k for k in keys if r["setup"].get(k) != first.get(k)]
        if differs:
            raise SystemExit(f"{path} was run with another {', '.join(differs)} than {paths[0]}; merge only "
                             "runs of the same setup")  # fmt: skip
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        for arm, by_seed in r["runs"].items():
            for seed, run in by_seed.items():
                runs.setdefault(arm, {})[int(seed)] = run
    seeds = sorted(runs["uniform"])
    missing = [(arm, s) for arm in runs for s in seeds if s not in runs[arm]]
    if missing:
        raise SystemExit(
            f"no run of {missing} in {paths}: every arm needs every seed; run them or leave the seed out"
        )
    setup = {**first, "seeds": seeds, "tuned_on": tuned_on, "merged_from": [Path(p).name for p in paths]}
    write_result(runs, setup, sum(r["seconds"] for r in results), out)
    return 0


def write_result(
    runs: dict[str, dict[int, dict[str, Any]]], setup: dict[str, Any], seconds: float, out: Path
) -> None:
    summary = summarize(runs, setup["seeds"], setup["tuned_on"])
    result = {
        "bench": "data_mixture",
        "setup": setup,
        "summary": summary,
        "runs": {arm: {str(s): r for s, r in by.items()} for arm, by in runs.items()},
        "seconds": seconds,
    }
    lines = []
    for arm, row in summary.items():
        if arm == "uniform":
            continue
        for group in ("tuned_seeds", "held_out_seeds"):
            if group not in row:
                continue
            g, v = row[group], row[group]["vs_uniform"]
            ratios = [row["by_seed"][str(s)]["tokens_to_uniform_final_ratio"] for s in g["seeds"]]
            lines.append(
                f"{arm} ({group.replace('_', ' ')} {g['seeds']}): clean val {g['clean_val_mean']:.4f} vs "
                f"uniform {summary['uniform'][group]['clean_val_mean']:.4f}, gain {v['mean_gain']:+.4f} "
                f"(seed spread {v['seed_spread']:.4f}): {'counts' if v['counts'] else 'does not count'}; "
                f"tokens to uniform's final clean loss {ratios} "
                f"({'' if g['tokens_ratio_at_most_0_7_every_seed'] else 'not '}<= 0.7 in every seed)"
            )
    result["verdict"] = lines
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for line in lines:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
