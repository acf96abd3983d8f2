"""Switch latency: trainwarden's in-place switch vs the user's path today, on the same model, in one run.

A DeepSpeed user who needs another ZeRO stage or precision today saves a checkpoint, starts a
new process, calls `deepspeed.initialize` with the new config and `load_checkpoint`. This
benchmark times that path and trainwarden's `handle.reconfigure(...)` for the same switch,
from the same training state, one after the other:

- one process holds a trainwarden handle over a GPT of ~25M parameters (examples/gpt.py,
  8 layers, 512 wide, context 64), single rank, AdamW (`torch_adam`: no op build);
- for each leg A -> B of a chain that covers every ZeRO stage pair (2-3-0-2-0-3-1-3-2-1-0-1-2,
  fp32), the precision pairs at ZeRO 2 (fp32 <-> bf16, and fp16 <-> fp32 / bf16 where
  DeepSpeed supports fp16 on this CPU) and offload (ZeRO 2 -> + optimizer offload -> ZeRO 3 with
  both offloads -> ZeRO 2; torch's AdamW under offload, as `torch_adam` gives it): one optimizer
  step at A (the state moves on), a host copy of the state as the reference (not timed), then
  - the checkpoint path: `save_checkpoint` (timed), then a new Python process (timed from its
    spawn) that imports torch and DeepSpeed, builds the model, `deepspeed.initialize`s it at B and
    `load_checkpoint`s; once it has loaded (its clock stops there) it compares the fp32 masters,
    both Adam moments and the step count with the reference: a pair where the load raises or
    returns nothing is `failed`, one where the moments or the step are not what was saved is
    `optimizer_state_lost` / `optimizer_state_changed`, and only the others get a ratio;
  - the in-place path: `handle.reconfigure(zero_stage=B, precision=B)`, its duration, the state
    after it compared with the same reference, and the process RSS before, after and at its peak
    (VmHWM reset at the switch's start) against the bound the issue sets: the old engine (what RSS
    was before) plus one host-side fp32 copy of the state.
- the physical floor: the time `dst.copy_(src)` and `src.clone()` take for a buffer of the bytes
  moved (fp32 masters and both moments, 12 bytes a parameter); a switch moves them twice
  (engine -> host, host -> new engine), so `floor_s` is two copies.

Both sides run with the same torch thread count (`--threads`, 1 by default: the machine is
shared), glibc's mmap threshold at 64 KiB (as `trainwarden demo` sets it), so freed engines really
leave RSS; the in-place side's torch CPU allocator asks for transparent huge pages
(`THP_MEM_ALLOC_ENABLE=1`; `--no-thp` to leave it off), the checkpoint path's runs as torch comes
(it was the slower with them); the script re-executes itself with both. Each in-place leg records
`breakdown_s`: the switch's own parts (ReconfigureResult.phases) and what is left (`other`).

    .venv/bin/python bench/switch_latency.py                 # 21 legs, ~4-6 min on 2 loaded cores
    .venv/bin/python bench/switch_latency.py --quick         # 3 legs, a smoke run (~1 min)
    .venv/bin/python bench/switch_latency.py --legs 2:fp32-3:fp32 3:fp32-0:fp32

Prints one JSON object and writes it to bench/results/switch_latency.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results" / "switch_latency.json"
CHILD_TAG = "SWITCH_LATENCY_CHILD "
#: The stage chain: every ordered pair of ZeRO stages 0-3 exactly once (12 legs), starting at 2
#: so that the precision legs (at ZeRO 2) come first from the same start.
STAGE_CHAIN = (2, 3, 0, 2, 0, 3, 1, 3, 2, 1, 0, 1, 2)
PRECISION_CHAIN = ("fp32", "bf16", "fp32")
PRECISION_CHAIN_FP16 = ("fp32", "bf16", "fp32", "fp16", "bf16", "fp16", "fp32")
MIB = 1 << 20


class Cfg(NamedTuple):
    """One end of a leg: what the engine runs with."""

    stage: int
    precision: str
    offload_optimizer: bool = False
    offload_param: bool = False

    @staticmethod
    def parse(spec: str) -> Cfg:
        """`STAGE:PRECISION[:FLAGS]`, FLAGS `o` (optimizer offload) and/or `p` (parameter offload)."""
        parts = spec.split(":")
        flags = parts[2] if len(parts) > 2 else ""
        return Cfg(int(parts[0]), parts[1], "o" in flags, "p" in flags)

    def describe(self) -> str:
        extra = [
            w
            for w, on in (
                ("optimizer offload", self.offload_optimizer),
                ("param offload", self.offload_param),
            )
            if on
        ]
        return f"ZeRO {self.stage} {self.precision}" + (f" + {' + '.join(extra)}" if extra else "")

    def knobs(self) -> dict[str, Any]:
        return {
            "zero_stage": self.stage,
            "precision": self.precision,
            "offload_optimizer": self.offload_optimizer,
            "offload_param": self.offload_param,
        }


#: Offload legs after the chain (which ends at ZeRO 2 fp32): on, both (ZeRO 3), off.
OFFLOAD_LEGS = (Cfg(2, "fp32", True), Cfg(3, "fp32", True, True), Cfg(2, "fp32"))


# ---- what both processes share --------------------------------------------------------------------


def model_config(args: argparse.Namespace) -> Any:
    from trainwarden.examples.gpt import GPTConfig

    return GPTConfig(block_size=args.seq, n_layer=args.layers, n_head=8, n_embd=args.width)


def ds_config(cfg: Cfg, micro: int) -> dict[str, Any]:
    stage, precision = cfg.stage, cfg.precision
    zero: dict[str, Any] = {"stage": stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": micro,
        "train_micro_batch_size_per_gpu": micro,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 8},
        "bf16": {"enabled": precision == "bf16"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "torch_adam": True},
        },
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_rank_env(port: int) -> dict[str, str]:
    """What single-process DeepSpeed needs (without it, it looks for MPI)."""
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "DS_ACCELERATOR": "cpu",
    }


def quiet_deepspeed() -> None:
    import logging

    import deepspeed

    deepspeed.utils.logging.logger.setLevel(logging.ERROR)


def compare(state: Any, ref: dict[str, Any]) -> dict[str, Any]:
    """How a loaded or switched state compares with the reference (fp32 masters, moments, step)."""
    import torch

    def max_diff(a: list[Any], b: list[Any]) -> float | None:
        if len(a) != len(b) or any((x is None) != (y is None) for x, y in zip(a, b)):
            return None
        worst = 0.0
        for x, y in zip(a, b):
            if x is None:
                continue
            if x.shape != y.shape:
                return None
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
        return worst

    weights = max_diff(state.values, ref["values"])
    moments: dict[str, float | None] = {}
    for k, ts in ref["moments"].items():
        moments[k] = max_diff(state.moments[k], ts) if k in state.moments else None
    nonzero = any(t is not None and bool(torch.any(t != 0)) for ts in state.moments.values() for t in ts)
    lost = state.step is None or not nonzero or any(v is None for v in moments.values())
    if weights is None:
        status = "weights_not_loaded"
    elif lost:
        status = "optimizer_state_lost"
    elif state.step != ref["step"] or any(v for v in moments.values()):
        status = "optimizer_state_changed"
    elif weights:
        status = "weights_changed"
    else:
        status = "exact"
    return {
        "status": status,
        "weights_max_abs_diff": weights,
        "moments_max_abs_diff": moments,
        "step": state.step,
        "step_expected": ref["step"],
    }


# ---- the child: the user's path after save_checkpoint ---------------------------------------------


def child(args: argparse.Namespace) -> None:
    """A new process: import, build, initialize at the target, load the checkpoint; then compare."""
    t_start = time.time()
    import deepspeed
    import torch

    from trainwarden.adapters.deepspeed import state as ds_state
    from trainwarden.examples.gpt import GPT

    torch.set_num_threads(args.threads)
    quiet_deepspeed()
    t_imported = time.time()
    out: dict[str, Any] = {"t_start": t_start, "t_imported": t_imported}
    try:
        model = GPT(model_config(args))
        t_built = time.time()
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config=ds_config(
                Cfg(args.stage, args.precision, args.offload_optimizer, args.offload_param), args.micro
            ),
        )
        t_init = time.time()
        path, _ = engine.load_checkpoint(args.ckpt_dir, tag="switch")
        t_loaded = time.time()
        out.update(t_built=t_built, t_initialized=t_init, t_loaded=t_loaded)
        if path is None:
            out["error"] = "load_checkpoint returned None (it found no checkpoint it could load)"
        else:
            ref = torch.load(Path(args.ckpt_dir) / "reference.pt", weights_only=True)
            opt = engine.optimizer
            if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
                # ZeRO 1/2 and BF16 link each parameter to its optimizer state at the first step
                # after a load; reading it (safe_get_full_optimizer_state) before that needs the
                # link. It changes no value.
                opt._hp_optimizer_states_linked = False
                opt._lazy_init_hp_params_optimizer_state()
            try:
                state = ds_state.capture(engine, ds_state.module_params(engine.module))
                out["check"] = compare(state, ref)
            except Exception as exc:  # the loaded state cannot even be read back as one
                out["check"] = {"status": "optimizer_state_lost", "error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:
        if os.environ.get("SWITCH_LATENCY_DEBUG"):
            import traceback

            traceback.print_exc()
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        out["t_failed"] = time.time()
    print(CHILD_TAG + json.dumps(out), flush=True)


def run_child(args: argparse.Namespace, ckpt_dir: str, cfg: Cfg) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(single_rank_env(free_port()))
    env["OMP_NUM_THREADS"] = str(args.threads)
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--ckpt-dir",
        ckpt_dir,
        "--stage",
        str(cfg.stage),
        "--precision",
        cfg.precision,
        *(["--offload-optimizer"] if cfg.offload_optimizer else []),
        *(["--offload-param"] if cfg.offload_param else []),
        "--layers",
        str(args.layers),
        "--width",
        str(args.width),
        "--seq",
        str(args.seq),
        "--micro",
        str(args.micro),
        "--threads",
        str(args.threads),
        # The user's path as it runs today: torch's allocator as it comes (measured here, its
        # initialize was the slower with huge pages: 9.1-10.6 s in all against 7.6-9.5 s).
        "--no-thp",
    ]
    t_spawn = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"child exited {proc.returncode} without a report: {' | '.join(tail)}"[:400]}
    rep = json.loads(lines[-1][len(CHILD_TAG) :])
    if os.environ.get("SWITCH_LATENCY_DEBUG"):
        print(proc.stderr[-3000:], file=sys.stderr)
    rep["t_spawn"] = t_spawn
    return rep


# ---- the parent -------------------------------------------------------------------------------------


def legs(args: argparse.Namespace, fp16: bool) -> list[tuple[Cfg, Cfg]]:
    if args.legs:
        return [(Cfg.parse(a), Cfg.parse(b)) for a, b in (spec.split("-") for spec in args.legs)]
    if args.quick:
        return [
            (Cfg(2, "fp32"), Cfg(2, "bf16")),
            (Cfg(2, "bf16"), Cfg(3, "bf16")),
            (Cfg(3, "bf16"), Cfg(0, "fp32")),
        ]
    chain = [Cfg(2, p) for p in (PRECISION_CHAIN_FP16 if fp16 else PRECISION_CHAIN)]
    chain += [Cfg(s, "fp32") for s in STAGE_CHAIN[1:]]
    chain += list(OFFLOAD_LEGS)
    return list(itertools.pairwise(chain))


def copy_floor(nbytes: int, threads: int) -> dict[str, float]:
    """Seconds for one copy of `nbytes` into a touched buffer (copy_) and into a new one (clone)."""
    import torch

    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages, not timed
    copies, clones = [], []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t)
        t = time.perf_counter()
        c = src.clone()
        clones.append(time.perf_counter() - t)
        del c
    return {
        "copy_s": statistics.median(copies),
        "clone_s": statistics.median(clones),
        "copy_GB_per_s": nbytes / statistics.median(copies) / 1e9,
        "threads": threads,
    }


def train_step(handle: Any, batch: Any) -> None:
    _, loss = handle(batch[:, :-1], batch[:, 1:])
    handle.backward(loss)
    handle.step()


def reference(state: Any) -> dict[str, Any]:
    return {"values": state.values, "moments": state.moments, "step": state.step}


def parent(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update(single_rank_env(free_port()))
    os.environ["TRAINWARDEN_DISABLE"] = "1"
    import torch
    from deepspeed.accelerator import get_accelerator

    from trainwarden.adapters.deepspeed import initialize
    from trainwarden.examples.gpt import GPT

    torch.set_num_threads(args.threads)
    quiet_deepspeed()
    fp16 = bool(get_accelerator().is_fp16_supported())
    plan = legs(args, fp16)
    t_run = time.time()
    load_start = os.getloadavg()
    torch.manual_seed(0)
    model = GPT(model_config(args))
    n_params = model.num_params()
    handle, _, _, _ = initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_config(plan[0][0], args.micro),
        attach_agent=False,
    )
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, 256, (args.micro, args.seq + 1), generator=g)
    train_step(handle, batch)
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="tw-switch-"))
    try:
        for a, b in plan:
            st = handle.setting
            if Cfg(st.zero_stage, st.precision, st.offload_optimizer, st.offload_param) != a:
                handle.reconfigure(**a.knobs())  # a leg given by hand: get to its start
            train_step(handle, batch)
            ref = reference(handle.training_state())
            ckpt = work / "ckpt"
            shutil.rmtree(ckpt, ignore_errors=True)
            t = time.perf_counter()
            handle.save_checkpoint(str(ckpt), tag="switch")
            save_s = time.perf_counter() - t
            torch.save(ref, ckpt / "reference.pt")
            files = [f for f in ckpt.rglob("*") if f.is_file() and f.name != "reference.pt"]
            ckpt_bytes = sum(f.stat().st_size for f in files)
            print(f"leg {a.describe()} -> {b.describe()}: checkpoint path ...", file=sys.stderr, flush=True)
            rep = run_child(args, str(ckpt), b)
            shutil.rmtree(ckpt, ignore_errors=True)
            t = time.perf_counter()
            r = handle.reconfigure(**b.knobs())
            inplace_wall = time.perf_counter() - t
            after = compare(handle.training_state(), ref)
            del ref
            row = leg_row(a, b, save_s, ckpt_bytes, rep, r, inplace_wall, after)
            print(
                f"  in place {row['in_place_s']:.2f} s, checkpoint path {row['checkpoint_path']['status']}"
                f" {row['checkpoint_path'].get('total_s')}",
                file=sys.stderr,
                flush=True,
            )
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    moved = rows[0]["bytes_moved"] if rows else 12 * n_params
    floor = copy_floor(moved, args.threads)
    floor_s = 2 * floor["copy_s"]
    for row in rows:
        row["in_place_over_floor"] = row["in_place_s"] / floor_s
    ratios = [r["ratio_checkpoint_over_in_place"] for r in rows if r["ratio_checkpoint_over_in_place"]]
    statuses: dict[str, int] = {}
    for r in rows:
        s = r["checkpoint_path"]["status"]
        statuses[s] = statuses.get(s, 0) + 1
    import deepspeed

    return {
        "benchmark": "switch_latency",
        "model": {
            "params": n_params,
            "layers": args.layers,
            "n_embd": args.width,
            "seq": args.seq,
            "micro_batch": args.micro,
            "optimizer": "AdamW (torch_adam)",
        },
        "bytes_moved": moved,
        "bytes_moved_MiB": moved / MIB,
        "copy_floor": {**floor, "floor_s": floor_s, "note": "two copies (engine -> host -> engine)"},
        "legs": rows,
        "summary": {
            "legs": len(rows),
            "checkpoint_path_status": statuses,
            "ratio_median": statistics.median(ratios) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "in_place_s_median": statistics.median(r["in_place_s"] for r in rows) if rows else None,
            "in_place_s_max": max(r["in_place_s"] for r in rows) if rows else None,
            "in_place_s_min": min(r["in_place_s"] for r in rows) if rows else None,
            "in_place_over_floor_median": statistics.median(r["in_place_over_floor"] for r in rows)
            if rows
            else None,
            "breakdown": breakdown_summary(rows),
            "in_place_exact_legs": sum(r["in_place_state"]["status"] == "exact" for r in rows),
            "rss_peak_within_bound_legs": sum(r["memory"]["peak_within_bound"] for r in rows),
            "rss_peak_over_larger_engine_plus_copy_MiB_max": (
                max(r["memory"]["peak_over_larger_engine_plus_copy_MiB"] for r in rows) if rows else None
            ),
        },
        "machine": {
            "cores": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "python": platform.python_version(),
            "fp16_supported": fp16,
            "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
            "thp_mem_alloc_checkpoint_path": False,
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "wall_s": time.time() - t_run,
    }


def breakdown_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per part of the switch (ReconfigureResult.phases): median seconds over the legs, and its
    share of all legs' in-place time together."""
    total = sum(r["in_place_s"] for r in rows)
    names = list(dict.fromkeys(k for r in rows for k in r["breakdown_s"]))
    return {
        k: {
            "median_s": statistics.median(r["breakdown_s"].get(k, 0.0) for r in rows),
            "share": sum(r["breakdown_s"].get(k, 0.0) for r in rows) / total if total else None,
        }
        for k in names
    }


def leg_row(
    a: Cfg,
    b: Cfg,
    save_s: float,
    ckpt_bytes: int,
    rep: dict[str, Any],
    r: Any,
    inplace_wall: float,
    after: dict[str, Any],
) -> dict[str, Any]:
    ck: dict[str, Any] = {"save_s": save_s, "checkpoint_bytes": ckpt_bytes}
    if "t_start" in rep:
        ck["process_start_and_imports_s"] = rep["t_imported"] - rep["t_spawn"]
    if "t_loaded" in rep:
        ck["build_model_s"] = rep["t_built"] - rep["t_imported"]
        ck["initialize_s"] = rep["t_initialized"] - rep["t_built"]
        ck["load_checkpoint_s"] = rep["t_loaded"] - rep["t_initialized"]
        ck["total_s"] = save_s + rep["t_loaded"] - rep["t_spawn"]
    if "error" in rep:
        ck["status"] = "failed"
        ck["error"] = rep["error"]
        if "t_failed" in rep:
            ck["time_to_failure_s"] = save_s + rep["t_failed"] - rep["t_spawn"]
    else:
        ck.update(rep["check"])
    ratio = ck["total_s"] / inplace_wall if ck.get("status") in ("exact", "weights_changed") else None
    # The bound: the old engine (RSS before) plus one host copy. A switch to a larger
    # engine (ZeRO 3 -> 0) ends above it by construction, so the excess is also given over the
    # larger of the two engines (RSS before or after) plus the copy: what keeping the old engine
    # beside the new one would have exceeded by about the old engine's size.
    bound = r.memory_before_bytes + r.bytes_moved
    larger = max(r.memory_before_bytes, r.memory_after_bytes)
    phases = dict(r.phases)
    phases["other"] = max(0.0, inplace_wall - sum(phases.values()))
    return {
        "from": a.knobs(),
        "to": b.knobs(),
        "in_place_s": inplace_wall,
        "in_place_reported_s": r.duration_s,
        "breakdown_s": phases,
        "in_place_state": after,
        "bytes_moved": r.bytes_moved,
        "checkpoint_path": ck,
        "ratio_checkpoint_over_in_place": ratio,
        "memory": {
            "rss_before_MiB": r.memory_before_bytes / MIB,
            "rss_peak_MiB": r.memory_peak_bytes / MIB,
            "rss_after_MiB": r.memory_after_bytes / MIB,
            "peak_minus_before_MiB": (r.memory_peak_bytes - r.memory_before_bytes) / MIB,
            "host_copy_MiB": r.bytes_moved / MIB,
            "peak_within_bound": r.memory_peak_bytes <= bound,
            "peak_over_larger_engine_plus_copy_MiB": (r.memory_peak_bytes - larger - r.bytes_moved) / MIB,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 legs: fp32->bf16 at ZeRO 2, 2->3, 3->0")
    ap.add_argument(
        "--legs",
        nargs="*",
        help="legs as STAGE:PREC[:o][p]-STAGE:PREC[:o][p], e.g. 2:fp32-3:fp32 2:fp32-3:fp32:op",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--no-thp", action="store_true", help="torch's allocator without transparent huge pages (both paths)"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt-dir", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--offload-optimizer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--offload-param", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trainwarden" / "torch_extensions")
    )
    want = {"MALLOC_MMAP_THRESHOLD_": "65536", "THP_MEM_ALLOC_ENABLE": "0" if args.no_thp else "1"}
    if any(os.environ.get(k) != v for k, v in want.items()):
        # Freed tensors must leave RSS for the memory figures to mean anything (docs/ARCHITECTURE.md).
        # torch's CPU allocator asks for transparent huge pages for tensors of 2 MiB and more: a
        # fresh 290 MiB buffer is then filled at about the speed of a copy into a touched one
        # (0.08 s against 0.26 s measured here: 4 KiB page faults), for both paths alike. Read once,
        # at torch's first allocation: hence the re-exec.
        os.environ.update(want)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.child:
        child(args)
        return
    result = parent(args)
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
