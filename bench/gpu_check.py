"""GPU check kit: what trainwarden does on a real CUDA device, in one command, each section's JSON
written as soon as it ends (a timeout keeps what ran). `bench/gpu_check.sh` is the entry point.

Sections, in order (each its own process on a GPU, so an OOM or a CUDA error in one leaves the
others standing; all in this process with `--in-process`, which `--dry-run` implies):

- `env`: versions (python, torch, CUDA, DeepSpeed, nvcc, driver), the device, bf16 support.
- `metrics`: a GPT-style model (examples/gpt.py; ~1B parameters, bf16) trained a few steps through
  the DeepSpeed adapter under an embedded controller with its default sources (procfs, and NVML
  where the library and a GPU exist: controller/sources.py), whose real exporter
  (controller/exporter.py) serves /metrics. Beside it: NVML's per-process memory and utilisation,
  and torch.cuda's reserved/allocated bytes. Checked: /metrics' used bytes are torch.cuda's reserved
  bytes at the last sync (what the agent's probe reports), its peak is at least NVML's per-process
  bytes (the controller folds them in) and torch.cuda's peak. /metrics has no utilisation gauge
  today: NVML's utilisation is reported beside it, not checked on it.
- `switches`: live switches through the adapter's `reconfigure`, ZeRO 1 -> 3, optimizer offload on
  and off, bf16 -> fp32; per leg the state after the switch compared with a host copy taken before
  it (fp32 masters, Adam moments, step: bench/switch_latency.py's `compare`), the switch time, the
  bytes moved, the copy floor of those bytes (device-to-host plus host-to-device on a GPU, pinned and
  pageable; a host copy on the CPU) and the training step's peak memory before and after.
- `oom`: a real CUDA OOM forced with `torch.cuda.set_per_process_memory_fraction` between the peak
  of a step at half the micro-batch and at the full one; `train_batch` catches it, moves one rung
  down (adapters/ds_oom.py) and trains the same samples again: the step count and the samples drawn
  show that no step and no sample was lost. On the CPU the OOM is simulated (the real
  `torch.cuda.OutOfMemoryError` class, raised by the model's forward above a micro-batch size).
- `policy`: the static configurations the memory ladder can stand on, a few steps each (tokens/s,
  per-step peak as the agent's probe reports it); a cap of `--cap-factor` (0.6) times the fastest
  one's peak; then a run under that cap with trainwarden's memory policy from the fastest
  configuration: steps over the cap after the first decision, and tokens/s against the best static
  configuration that fits.
- `jit` (GPU only, when time is left): DeepSpeed's CUDA ops JIT-built with nvcc into an empty
  folder, each timed (the kit itself needs none: AdamW runs as torch's, `torch_adam`).

`--dry-run`: the same sections on the CPU at a tiny size (DeepSpeed's CPU accelerator, gloo), the
NVML source with its library missing, the OOM simulated, no op built; tests/test_gpu_check.py runs
it. Output: OUT/<section>.json, OUT/summary.json, and a summary table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import ladder_throughput  # noqa: E402 - bench/ is not a package; the policy file is that bench's
import switch_latency  # noqa: E402 - its Cfg, ds_config, compare, copy floor and env helpers

Cfg = switch_latency.Cfg
MIB = 1 << 20
GIB = 1 << 30
#: The run under the cap: its most steps, and how long it waits for a first decision.
MAX_LADDER_STEPS = 400
DECISION_WAIT_S = 30.0
SECTIONS = ("env", "metrics", "switches", "oom", "policy", "jit")
#: Seconds a section is given at least on a GPU before it is skipped for lack of time (estimates
#: for the 1B model on an H200; the device tool's command limit is 600 s).
MIN_SECONDS = {"env": 10, "metrics": 40, "switches": 90, "oom": 40, "policy": 120, "jit": 120}

#: Model sizes: GPTConfig keywords, micro-batch and global batch. `1b`: 20 layers x 2048 wide, 16
#: heads, context 1024: 1.01e9 parameters (12 L d^2 plus the tables).
SIZES: dict[str, dict[str, Any]] = {
    "1b": {"model": {"block_size": 1024, "n_layer": 20, "n_head": 16, "n_embd": 2048}, "micro": 8},
    "350m": {"model": {"block_size": 1024, "n_layer": 24, "n_head": 16, "n_embd": 1024}, "micro": 8},
    "tiny": {"model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 64}, "micro": 8},
}
#: The live switches: ZeRO 1 -> 3, optimizer offload on and off, bf16 -> fp32.
SWITCH_LEGS = (
    (Cfg(1, "bf16"), Cfg(3, "bf16")),
    (Cfg(3, "bf16"), Cfg(3, "bf16", True)),
    (Cfg(3, "bf16", True), Cfg(3, "bf16")),
    (Cfg(3, "bf16"), Cfg(3, "fp32")),
)


# ---- context: device, model, engine --------------------------------------------------------------


class Ctx:
    """What every section shares: the options, the device and the output folder."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args = args
        self.out = Path(args.out)
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.size = SIZES[args.size]
        self.micro = int(args.micro or self.size["micro"])
        self.seq = int(self.size["model"]["block_size"])

    def gpt(self, seed: int = 0) -> Any:
        """The model, built on the device (a 1B model's init on the CPU takes longer than its run)."""
        import torch

        from trainwarden.examples.gpt import GPT, GPTConfig

        torch.manual_seed(seed)
        with torch.device(self.device):
            return GPT(GPTConfig(**self.size["model"]))

    def ds_config(
        self, cfg: Cfg, micro: int | None = None, global_batch: int | None = None
    ) -> dict[str, Any]:
        """switch_latency's config (AdamW as torch's: no op to build), with accumulation when the
        global batch is larger than the micro-batch."""
        micro = micro or self.micro
        conf = switch_latency.ds_config(cfg, micro)
        conf["train_batch_size"] = global_batch or micro
        if self.args.optimizer == "deepspeed":
            # DeepSpeed's own Adam: FusedAdam on the GPU, CPUAdam under offload (both JIT-built).
            conf["optimizer"]["params"]["torch_adam"] = False
        return conf

    def batches(self, global_batch: int, seed: int = 1) -> Iterator[Any]:
        """Endless random byte sequences, one optimizer step's samples at a time, on the device."""
        import torch

        g = torch.Generator().manual_seed(seed)
        while True:
            yield torch.randint(0, 256, (global_batch, self.seq + 1), generator=g).to(self.device)

    def meter(self) -> Any:
        from trainwarden.adapters.deepspeed import _MemoryMeter

        return _MemoryMeter(self.device)


def loss_fn(handle: Any) -> Callable[[Any], Any]:
    return lambda b: handle(b[:, :-1], b[:, 1:])[1]


def sync(ctx: Ctx) -> None:
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()


def timed_step(ctx: Ctx, handle: Any, it: Iterator[Any], peaks: bool = True) -> dict[str, Any]:
    """One optimizer step through `train_batch`: its wall time, loss and (`peaks`) peak memory.

    With an agent attached, `peaks=False`: its probe resets the same peak counters (torch.cuda's,
    or VmHWM) at the step boundary, inside `train_batch`, so a peak read here after it would be of
    the moments since; the agent's own per-step peaks are read from telemetry.jsonl instead."""
    import torch

    meter = ctx.meter()
    meter.start()
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(ctx)
    t = time.perf_counter()
    loss = handle.train_batch(it, loss_fn(handle))
    sync(ctx)
    row: dict[str, Any] = {
        "step": int(handle.global_steps),
        "s": time.perf_counter() - t,
        "loss": loss,
        "micro_batch": handle.setting.micro_batch_size,
    }
    if peaks:
        row["peak_bytes"] = meter.peak()
        if ctx.cuda:
            row["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return row


def agent_peaks(run_dir: Path) -> dict[int, int]:
    """Per-step peak memory the agent reported (its probe: torch.cuda's reserved bytes, or RSS)."""
    from trainwarden.controller.runlog import read_jsonl

    return {
        r["step"]: max(m["peak_bytes"] for m in r["memory"])
        for r in read_jsonl(run_dir / "telemetry.jsonl")
        if r.get("event") == "step" and r.get("memory")
    }


# ---- env -------------------------------------------------------------------------------------------


def section_env(ctx: Ctx) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(ctx.device),
        "dry_run": ctx.args.dry_run,
        "cores": os.cpu_count(),
        "size": ctx.args.size,
    }
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        out["deepspeed"] = deepspeed.__version__
        out["deepspeed_accelerator"] = get_accelerator()._name
    except Exception as exc:  # reported, not raised: the other sections say what it breaks
        out["deepspeed"] = f"not importable: {type(exc).__name__}: {exc}"
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(
            gpu=props.name,
            gpu_memory_bytes=int(props.total_memory),
            capability=f"{props.major}.{props.minor}",
            bf16_supported=bool(torch.cuda.is_bf16_supported()),
        )
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=30)
        out["nvcc"] = (nvcc.stdout.strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["nvcc"] = f"not found ({type(exc).__name__})"
    import trainwarden.adapters

    out["trainwarden_from"] = str(Path(trainwarden.adapters.__file__).parent)
    out["nvml"] = nvml_report()
    out["optuna_imported"] = "optuna" in sys.modules
    return out


def nvml_report() -> dict[str, Any]:
    """NVML as the controller's source opens it, and why not where it does not."""
    from trainwarden.controller.sources import NvmlSource

    try:
        import pynvml
    except ImportError as exc:
        return {"available": False, "why": f"nvidia-ml-py not installed ({exc})"}
    try:
        src = NvmlSource(pynvml)  # the constructor NvmlSource.open() calls, to keep the error
    except Exception as exc:
        return {"available": False, "why": f"{type(exc).__name__}: {exc}", "open()": NvmlSource.open()}
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        return {
            "available": True,
            "driver": driver.decode() if isinstance(driver, bytes) else driver,
            "devices": [{"index": i, "used": u, "total": t} for i, u, t in src.device_used_bytes()],
        }
    finally:
        src.close()


# ---- metrics: NVML and torch.cuda beside /metrics ---------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    for (n, lab), v in samples.items():
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items()):
            return v
    return None


def nvml_sample(pid: int) -> dict[str, Any]:
    """NVML's view now: this process's memory (the controller's source), every compute process it
    lists (in a container its pids may be the host's), device utilisation and this process's."""
    from trainwarden.controller.sources import NvmlSource

    src = NvmlSource.open()
    if src is None:
        return {"available": False}
    import pynvml

    out: dict[str, Any] = {"available": True, "pid": pid, "process_used_bytes": src.used_bytes(pid)}

    def ask(key: str, fn: Callable[[], Any]) -> None:
        try:
            out[key] = fn()
        except Exception as exc:  # a query NVML refuses (in a container, on a driver) is a finding
            out[key] = f"{type(exc).__name__}: {exc}"

    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        ask(
            "processes",
            lambda: [
                {"pid": p.pid, "used_bytes": p.usedGpuMemory}
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            ],
        )
        ask("device_util_percent", lambda: vars_of(pynvml.nvmlDeviceGetUtilizationRates(h), "gpu", "memory"))
        ask(
            "device_memory",
            lambda: [{"index": i, "used": u, "total": t} for i, u, t in src.device_used_bytes()],
        )
        ask(
            "process_util",
            lambda: [
                vars_of(x, "pid", "smUtil", "memUtil") for x in pynvml.nvmlDeviceGetProcessUtilization(h, 0)
            ],
        )
    finally:
        src.close()
    util = out.get("process_util")
    mine = [u for u in util if u["pid"] == pid] if isinstance(util, list) else []
    out["process_sm_util_percent"] = max(u["smUtil"] for u in mine) if mine else None
    return out


def vars_of(obj: Any, *names: str) -> dict[str, Any]:
    return {n: getattr(obj, n) for n in names}


def section_metrics(ctx: Ctx) -> dict[str, Any]:
    import torch

    from trainwarden.adapters.deepspeed import initialize
    from trainwarden.controller.exporter import serve_metrics

    steps = ctx.args.steps
    work = Path(tempfile.mkdtemp(prefix="tw-gpu-metrics-"))
    policy = work / "policy.yaml"
    policy.write_text(ladder_throughput.policy_text(None, "engine"))  # a controller that records
    model = ctx.gpt()
    n_params = model.num_params()
    h, *_ = initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ctx.ds_config(Cfg(1, "bf16")),
        policy=policy,
        run_dir=work / "run",
        sync_every=1,
        tokens_per_sample=ctx.seq,
    )
    server, port = serve_metrics(h.controller, "127.0.0.1", 0)
    sources = [type(s).__name__ for s in h.controller.sources]
    it = ctx.batches(ctx.micro)
    rows = []
    try:
        for _ in range(steps):
            row = timed_step(ctx, h, it, peaks=False)
            row["nvml"] = nvml_sample(os.getpid())
            rows.append(row)
        # The agent sends from a thread: wait until /metrics shows the last step.
        deadline = time.time() + 20
        samples = scrape(port)
        while metric(samples, "trainwarden_step") != h.global_steps and time.time() < deadline:
            time.sleep(0.2)
            samples = scrape(port)
        fw: dict[str, Any]
        if ctx.cuda:
            fw = {
                "kind": "torch.cuda",
                "reserved_bytes": int(torch.cuda.memory_reserved()),
                "allocated_bytes": int(torch.cuda.memory_allocated()),
            }
            used_now = fw["reserved_bytes"]
        else:
            used_now = ctx.meter().now()
            fw = {"kind": "rss", "rss_bytes": used_now}
        nv = nvml_sample(os.getpid())
        last_step = int(h.global_steps)
    finally:
        h.close()
        server.shutdown()
        h.destroy()
    reported = agent_peaks(work / "run")
    for r in rows:
        r["peak_reported_by_agent_bytes"] = reported.get(r["step"])
    peak_last = reported.get(last_step) or 0
    dev = str(ctx.device) if ctx.cuda else "cpu"
    on_metrics = {
        "step": metric(samples, "trainwarden_step"),
        "device": dev,
        "used_bytes": metric(samples, "trainwarden_device_memory_used_bytes", rank="0", device=dev),
        "peak_bytes": metric(samples, "trainwarden_device_memory_peak_bytes", rank="0", device=dev),
        "total_bytes": metric(samples, "trainwarden_device_memory_total_bytes", rank="0", device=dev),
        "tokens_per_second": metric(samples, "trainwarden_tokens_per_second"),
        "utilisation_metric": None,  # the exporter has none (see the module docstring)
    }
    # On a GPU nothing allocates between the last sync and now: the bytes are the same. RSS moves
    # with every Python object, so the CPU gets a looser bound.
    tol = 0.02 if ctx.cuda else 0.25
    used = on_metrics["used_bytes"]
    checks: dict[str, bool] = {
        "metrics_show_last_step": on_metrics["step"] == last_step,
        "used_matches_framework": used is not None and abs(used - used_now) <= tol * used_now,
        # The step's peak as the agent's probe read it from the framework (torch.cuda's reserved
        # peak, or VmHWM): the controller keeps it, or NVML's larger reading.
        "peak_at_least_agent_peak": peak_last > 0 and (on_metrics["peak_bytes"] or 0) >= peak_last,
    }
    if nv.get("available") and nv.get("process_used_bytes") is not None:
        checks["nvml_process_bytes_at_least_torch_reserved"] = nv["process_used_bytes"] >= used_now
        checks["metrics_peak_at_least_nvml_process_bytes"] = (on_metrics["peak_bytes"] or 0) >= min(
            r["nvml"]["process_used_bytes"] or 0 for r in rows
        )
    return {
        "params": n_params,
        "controller_sources": sources,
        "nvml_in_sources": "NvmlSource" in sources,
        # In a container NVML may list the job under the host's pid, or not at all.
        "nvml_sees_this_process": nv.get("process_used_bytes") is not None,
        "steps": rows,
        "framework_now": fw,
        "nvml_now": nv,
        "on_metrics": on_metrics,
        "tokens_per_s": tokens_per_s(rows, ctx.micro * ctx.seq),
        "checks": checks,
    }


def tokens_per_s(rows: list[dict[str, Any]], tokens_per_step: int) -> float | None:
    timed = rows[1:] or rows  # the first step builds Adam's state
    wall = sum(r["s"] for r in timed)
    return tokens_per_step * len(timed) / wall if wall else None


# ---- switches ---------------------------------------------------------------------------------------


def copy_rates(ctx: Ctx, nbytes: int) -> dict[str, Any]:
    """The copy floor of `nbytes`: on a GPU from the bandwidth of each direction measured on a buffer
    of min(nbytes, 1 GiB) (past it the rate is flat), on the CPU switch_latency's host copy."""
    if not ctx.cuda:
        floor = switch_latency.copy_floor(nbytes, 1)
        return {
            **floor,
            "floor_s": 2 * floor["copy_s"],
            "note": "CPU: two host copies (engine -> host -> engine)",
        }
    import torch

    n = max(1, min(nbytes, GIB) // 4)
    buf = {
        "dev": torch.randn(n, device=ctx.device),
        "dev2": torch.empty(n, device=ctx.device),
        "pinned": torch.empty(n, pin_memory=True),
        "pageable": torch.ones(n),  # its pages touched before timing
    }

    def rate(dst: str, src: str) -> float:
        buf[dst].copy_(buf[src])
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            buf[dst].copy_(buf[src])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return n * 4 / statistics.median(times)

    rates = {
        "d2h_pinned": rate("pinned", "dev"),
        "h2d_pinned": rate("dev2", "pinned"),
        "d2h_pageable": rate("pageable", "dev"),
        "h2d_pageable": rate("dev2", "pageable"),
        "d2d": rate("dev2", "dev"),
    }
    buf.clear()
    torch.cuda.empty_cache()
    return {
        "buffer_bytes": n * 4,
        "GB_per_s": {k: v / 1e9 for k, v in rates.items()},
        # A switch carries the state device -> host -> device: one copy each way.
        "floor_s": nbytes / rates["d2h_pinned"] + nbytes / rates["h2d_pinned"],
        "floor_pageable_s": nbytes / rates["d2h_pageable"] + nbytes / rates["h2d_pageable"],
        "d2d_s": nbytes / rates["d2d"],
        "note": "floor_s: d2h + h2d of bytes_moved at the pinned rates; the host copy is pageable "
        "(ds_state._host), floor_pageable_s at those rates",
    }


def section_switches(ctx: Ctx) -> dict[str, Any]:
    from trainwarden.adapters.deepspeed import ReconfigureError, initialize

    model = ctx.gpt()
    n_params = model.num_params()
    first = SWITCH_LEGS[0][0]
    h, *_ = initialize(
        model=model, model_parameters=model.parameters(), config=ctx.ds_config(first), attach_agent=False
    )
    it = ctx.batches(ctx.micro)
    rows = []
    try:
        timed_step(ctx, h, it)  # Adam's state exists from here on
        for _, b in SWITCH_LEGS:
            st = h.setting
            a = Cfg(st.zero_stage, st.precision, st.offload_optimizer, st.offload_param)
            before = timed_step(ctx, h, it)
            ref = switch_latency.reference(h.training_state())
            sync(ctx)
            t = time.perf_counter()
            try:
                r = h.reconfigure(**b.knobs())
            except ReconfigureError as exc:  # rolled back: the engine is the old one, go on
                rows.append({"from": a.describe(), "to": b.describe(), "error": str(exc)[:1000]})
                continue
            sync(ctx)
            wall = time.perf_counter() - t
            state = switch_latency.compare(h.training_state(), ref)
            del ref
            after = timed_step(ctx, h, it)
            rows.append(
                {
                    "from": a.describe(),
                    "to": b.describe(),
                    "switch_s": wall,
                    "reported_s": r.duration_s,
                    "bytes_moved": r.bytes_moved,
                    "state": state,
                    "memory_kind": r.memory_kind,
                    "switch_memory": {
                        "before_bytes": r.memory_before_bytes,
                        "peak_bytes": r.memory_peak_bytes,
                        "after_bytes": r.memory_after_bytes,
                    },
                    "step_before": before,
                    "step_after": after,
                }
            )
            print(
                f"  switch {a.describe()} -> {b.describe()}: {wall:.2f} s, {state['status']}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        h.destroy()
        del h, model
        release(ctx)
    done = [r for r in rows if "error" not in r]
    moved = max((r["bytes_moved"] for r in done), default=12 * n_params)
    floor = copy_rates(ctx, moved)
    for r in done:
        # The floor of this leg's own bytes (the copy rate is flat past the buffer measured).
        r["floor_s"] = floor["floor_s"] * r["bytes_moved"] / moved
        r["over_floor"] = r["switch_s"] / r["floor_s"] if r["floor_s"] else None
    return {
        "params": n_params,
        "legs": rows,
        "copy_floor": floor,
        "checks": {
            "all_exact": len(done) == len(rows) > 0 and all(r["state"]["status"] == "exact" for r in done),
            "all_legs_ran": len(done) == len(SWITCH_LEGS),
        },
    }


def release(ctx: Ctx) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


# ---- oom ----------------------------------------------------------------------------------------------


class CountingIter:
    """An iterator of step batches that counts the samples it gave."""

    def __init__(self, it: Iterator[Any]) -> None:
        self.it, self.samples = it, 0

    def __iter__(self) -> CountingIter:
        return self

    def __next__(self) -> Any:
        b = next(self.it)
        self.samples += int(b.shape[0])
        return b


def simulate_oom_above(model: Any, limit: int) -> None:
    """CPU: the model's forward raises torch.cuda.OutOfMemoryError (the class a real one has) for a
    micro-batch of more than `limit` samples, as a device too small for its activations would."""
    import torch

    forward = model.forward

    def guarded(idx: Any, *a: Any, **k: Any) -> Any:
        if idx.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (simulated: micro-batch {idx.shape[0]} over {limit} samples)"
            )
        return forward(idx, *a, **k)

    model.forward = guarded


def section_oom(ctx: Ctx) -> dict[str, Any]:
    import torch

    from trainwarden.adapters.deepspeed import initialize

    micro, half = ctx.micro, ctx.micro // 2
    model = ctx.gpt()
    h, *_ = initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ctx.ds_config(Cfg(1, "bf16"), micro=micro, global_batch=micro),
        attach_agent=False,
    )
    it = CountingIter(ctx.batches(micro))
    out: dict[str, Any] = {"micro_batch": micro}
    try:
        # Adam's moments are made at the first step, after its backward: until they exist a step's
        # peak is lower by their size (8 bytes a parameter), so the peaks are measured after it.
        timed_step(ctx, h, it)
        release(ctx)
        full = timed_step(ctx, h, it)
        h.reconfigure(micro_batch_size=half)  # no new engine: accumulation doubles
        release(ctx)  # else the cached blocks of the full micro-batch count in the half's peak
        halved = timed_step(ctx, h, it)
        h.reconfigure(micro_batch_size=micro)
        release(ctx)
        if ctx.cuda:
            total = torch.cuda.get_device_properties(ctx.device).total_memory
            # Between the allocated peaks: the full micro-batch cannot fit under it whatever the
            # allocator does (it frees its cache and retries before raising), the half one can,
            # with the cache's slack. The limit counts reserved bytes.
            lo, hi = halved["peak_bytes"], full["peak_bytes"]
            limit = (lo + hi) // 2
            torch.cuda.set_per_process_memory_fraction(limit / total, ctx.device)
            out["forced"] = {
                "how": "torch.cuda.set_per_process_memory_fraction",
                "fraction": limit / total,
                "limit_bytes": limit,
                "peak_allocated_full_micro_batch": hi,
                "peak_allocated_half_micro_batch": lo,
                "peak_reserved_full_micro_batch": full["peak_reserved_bytes"],
                "peak_reserved_half_micro_batch": halved["peak_reserved_bytes"],
            }
        else:
            simulate_oom_above(h.module, half)
            out["forced"] = {"how": "simulated: OutOfMemoryError raised by forward", "limit_samples": half}
        steps_before, samples_before = int(h.global_steps), it.samples
        try:
            step = timed_step(ctx, h, it)
            after = timed_step(ctx, h, it)  # and it goes on under the same limit
            error = None
        except Exception as exc:
            step = after = None
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        retries = [
            {
                "step": r.step,
                "where": r.where,
                "micro_step": r.micro_step,
                "error": r.error,
                "rung": r.rung,
                "replayed": r.replayed,
                "rebuild_s": r.result.duration_s,
                "bytes_moved": r.result.bytes_moved,
                "peak_bytes": r.result.memory_peak_bytes,
            }
            for r in h.oom_retries
        ]
        steps_taken = int(h.global_steps) - steps_before
        samples_drawn = it.samples - samples_before
        out.update(
            steps=[full, halved, step, after],
            error=error,
            retries=retries,
            steps_taken=steps_taken,
            samples_drawn=samples_drawn,
            micro_batch_after=h.setting.micro_batch_size,
        )
        real = ctx.cuda and any("simulated" not in r["error"] for r in retries)
        out["checks"] = {
            "oom_caught_and_retried": bool(retries) and error is None,
            "real_cuda_oom" if ctx.cuda else "simulated_oom": bool(retries) and (real or not ctx.cuda),
            "one_rung_down": len(retries) == 1 and h.setting.micro_batch_size == half,
            "same_samples_replayed": all(r["replayed"] for r in retries) and bool(retries),
            # Two train_batch calls: two optimizer steps, and exactly two steps' samples drawn.
            "no_step_lost": steps_taken == 2 and samples_drawn == 2 * micro,
        }
    finally:
        if ctx.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
        h.destroy()
        del h, model
        release(ctx)
    return out


# ---- policy -------------------------------------------------------------------------------------------


def static_configs(ctx: Ctx) -> list[tuple[Cfg, int]]:
    """What the memory ladder can stand on, fastest first (policies/memory.py's default ladder):
    on one GPU ZeRO 0, then optimizer offload (ZeRO 1 and 2 save nothing on one rank, nor ZeRO 3
    over 2 + offload), then parameter offload; on a CPU rank the micro-batch is the ladder."""
    m = ctx.micro
    if ctx.cuda:
        return [(Cfg(0, "bf16"), m), (Cfg(2, "bf16", True), m), (Cfg(3, "bf16", True, True), m)]
    return [(Cfg(0, "bf16"), m), (Cfg(0, "bf16"), m // 2), (Cfg(0, "bf16"), m // 4)]


def name_of(cfg: Cfg, micro: int) -> str:
    return f"{cfg.describe()}, micro-batch {micro}"


def section_policy(ctx: Ctx) -> dict[str, Any]:
    from trainwarden.adapters.deepspeed import ReconfigureError, initialize
    from trainwarden.controller.runlog import read_jsonl

    g = ctx.micro
    tokens_per_step = g * ctx.seq
    statics = static_configs(ctx)
    n_static = ctx.args.static_steps
    # The static configurations, one after the other in one engine handle (each switch releases
    # the last one's memory), `n_static` steps each after a first one that settles the switch.
    model = ctx.gpt()
    h, *_ = initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ctx.ds_config(statics[0][0], micro=statics[0][1], global_batch=g),
        attach_agent=False,
    )
    it = ctx.batches(g)
    static: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    try:
        for cfg, micro in statics:
            try:
                h.reconfigure(**cfg.knobs(), micro_batch_size=micro)
            except ReconfigureError as exc:  # rolled back: this one is left out, the next tried
                failed[name_of(cfg, micro)] = str(exc)[:1000]
                continue
            release(ctx)
            rows = [timed_step(ctx, h, it) for _ in range(n_static + 1)][1:]
            peak_key = "peak_reserved_bytes" if ctx.cuda else "peak_bytes"
            static[name_of(cfg, micro)] = {
                "knobs": {**cfg.knobs(), "micro_batch_size": micro},
                "tokens_per_s": tokens_per_step * len(rows) / sum(r["s"] for r in rows),
                "peak_bytes": max(r[peak_key] for r in rows),
                "steps": rows,
            }
            print(f"  static {name_of(cfg, micro)}: done", file=sys.stderr, flush=True)
    finally:
        h.destroy()
        del h, model
        release(ctx)
    fastest = max(static, key=lambda n: static[n]["tokens_per_s"])
    cap = int(ctx.args.cap_factor * static[fastest]["peak_bytes"])
    fitting = {n: s for n, s in static.items() if s["peak_bytes"] <= cap}
    best = max(fitting, key=lambda n: fitting[n]["tokens_per_s"]) if fitting else None

    # The ladder: the fastest configuration under the cap, trainwarden's memory policy deciding.
    work = Path(tempfile.mkdtemp(prefix="tw-gpu-policy-"))
    policy = work / "policy.yaml"
    policy.write_text(ladder_throughput.policy_text(cap, "engine"))
    start = static[fastest]["knobs"]
    model = ctx.gpt()
    h, *_ = initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ctx.ds_config(
            Cfg(start["zero_stage"], start["precision"], start["offload_optimizer"], start["offload_param"]),
            micro=start["micro_batch_size"],
            global_batch=g,
        ),
        policy=policy,
        run_dir=work / "run",
        sync_every=1,
        micro_batch_knob=True,
        tokens_per_sample=ctx.seq,
    )
    it = ctx.batches(g, seed=2)
    rows = []
    run_dir = work / "run"
    decided_at: int | None = None
    try:
        # At least `ladder_steps` steps, and `after_steps` more once the first decision has been
        # applied (the agent exchanges in a thread: how many steps that takes depends on step time).
        # The agent exchanges every 0.5 s: tiny CPU steps need many steps to see one decision.
        t_start = time.perf_counter()
        for n in range(1, MAX_LADDER_STEPS + 1):
            row = timed_step(ctx, h, it, peaks=False)
            row["config"] = h.config()
            rows.append(row)
            if decided_at is None:
                # A decision's step is the one it applies at, which may be ahead of this one.
                due = [
                    d["step"] for d in read_jsonl(run_dir / "decisions.jsonl") if d.get("step") is not None
                ]
                decided_at = min(due) if due else None
            if n < ctx.args.ladder_steps:
                continue
            if decided_at is None and time.perf_counter() - t_start > DECISION_WAIT_S:
                break
            if decided_at is not None and n >= decided_at + ctx.args.after_steps:
                break
        h.close()
    finally:
        h.destroy()
        del h, model
        release(ctx)
    peaks = agent_peaks(run_dir)
    decisions = [
        {k: d.get(k) for k in ("step", "kind", "params", "outcome", "reason")}
        for d in read_jsonl(run_dir / "decisions.jsonl")
    ]
    first = min((d["step"] for d in decisions if d.get("step") is not None), default=None)
    for r in rows:
        r["peak_reported_by_agent_bytes"] = peaks.get(r["step"])
    after = [r for r in rows if first is not None and r["step"] > first]
    over_after = [r["step"] for r in after if (r["peak_reported_by_agent_bytes"] or 0) > cap]
    ladder_tps = tokens_per_s(rows, tokens_per_step)
    under_cap = bool(after) and not over_after
    checks = {"decided": first is not None, "steps_after_first_decision": bool(after)}
    observations = {}
    if ctx.cuda:
        checks["under_cap_after_first_decision"] = under_cap
    else:
        # A CPU process's RSS is mostly the runtime's (~400 MiB for torch and DeepSpeed): no rung
        # of a tiny model gets it under 0.6 of itself. The GPU run checks it.
        observations["under_cap_after_first_decision"] = under_cap
    return {
        "static": {n: {k: v for k, v in s.items()} for n, s in static.items()},
        "static_failed": failed,
        "fastest_static": fastest,
        "cap_factor": ctx.args.cap_factor,
        "cap_bytes": cap,
        "best_static_that_fits": best,
        "ladder": {
            "start": fastest,
            "steps": rows,
            "decisions": decisions,
            "first_decision_step": first,
            "steps_over_cap_after_first_decision": over_after,
            "tokens_per_s": ladder_tps,
            # Once it stands where the cap has put it (the switch's step left out).
            "tokens_per_s_after_first_decision": tokens_per_s(after, tokens_per_step) if after else None,
            "ended_on": rows[-1]["config"] if rows else None,
        },
        "ratio_ladder_over_best_static": (
            ladder_tps / fitting[best]["tokens_per_s"] if best is not None and ladder_tps else None
        ),
        "checks": checks,
        "observations_not_checked_on_cpu": observations,
    }


# ---- jit ----------------------------------------------------------------------------------------------


def section_jit(ctx: Ctx) -> dict[str, Any]:
    """DeepSpeed's ops built from source into an empty folder, each timed (GPU only: on the CPU the
    dry run only asks which builders exist, since the CPU ops are another build)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    names = ("FusedAdamBuilder", "CPUAdamBuilder")
    out: dict[str, Any] = {"accelerator": acc._name, "ops": {}}
    if not ctx.cuda:
        for name in names:
            b = acc.create_op_builder(name)
            out["ops"][name] = {"builder": b is not None, "built": False, "why": "dry run: nothing built"}
        return out
    os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="tw-jit-")
    out["max_jobs"] = os.environ.get("MAX_JOBS")
    for name in names:
        b = acc.create_op_builder(name)
        row: dict[str, Any] = {"builder": b is not None}
        if b is not None:
            t = time.perf_counter()
            try:
                b.load(verbose=False)
                row.update(built=True, build_s=time.perf_counter() - t)
            except Exception as exc:
                row.update(built=False, s=time.perf_counter() - t, error=f"{type(exc).__name__}: {exc}"[:400])
        out["ops"][name] = row
        print(f"  jit {name}: {row}", file=sys.stderr, flush=True)
    return out


RUNNERS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "env": section_env,
    "metrics": section_metrics,
    "switches": section_switches,
    "oom": section_oom,
    "policy": section_policy,
    "jit": section_jit,
}


# ---- the JSON writer and the driver --------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Written whole or not at all (a timeout mid-write leaves the last complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_section(ctx: Ctx, name: str) -> dict[str, Any]:
    """One section here, its JSON written when it ends, whatever the outcome."""
    t = time.perf_counter()
    print(f"section {name} ...", file=sys.stderr, flush=True)
    try:
        data = {"section": name, "status": "ok", **RUNNERS[name](ctx)}
        if not all(data.get("checks", {}).values()):
            data["status"] = "checks_failed"
    except Exception as exc:
        data = {
            "section": name,
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    data["wall_s"] = time.perf_counter() - t
    write_json(ctx.out / f"{name}.json", data)
    return data


def spawn_section(args: argparse.Namespace, name: str, timeout: float) -> dict[str, Any]:
    """One section in its own process; its JSON, or a record of why there is none."""
    out = Path(args.out)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, *passthrough(args)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    data = {
        "section": name,
        "status": "failed",
        "error": f"the section's process ended ({rc}) without writing its JSON",
        "wall_s": time.perf_counter() - t,
    }
    write_json(path, data)
    return data


def passthrough(args: argparse.Namespace) -> list[str]:
    flags = ["--out", str(args.out), "--size", args.size, "--steps", str(args.steps)]
    flags += ["--static-steps", str(args.static_steps), "--ladder-steps", str(args.ladder_steps)]
    flags += ["--after-steps", str(args.after_steps)]
    flags += ["--cap-factor", str(args.cap_factor), "--optimizer", args.optimizer]
    if args.micro:
        flags += ["--micro", str(args.micro)]
    if args.dry_run:
        flags.append("--dry-run")
    return flags


def summary_line(d: dict[str, Any]) -> str:
    """The figures that matter from one section, in a line."""
    name, st = d["section"], d["status"]
    if st not in ("ok", "checks_failed"):
        return d.get("error", st)[:150]
    if name == "env":
        where = d.get("gpu", d["device"])
        return f"torch {d['torch']} (CUDA {d['torch_cuda']}), deepspeed {d['deepspeed']}, {where}"
    failed = [k for k, v in d.get("checks", {}).items() if not v]
    tail = f"; failed: {', '.join(failed)}" if failed else ""
    if name == "metrics":
        m, nv = d["on_metrics"], d["nvml_now"]
        return (
            f"/metrics used {mib(m['used_bytes'])}, peak {mib(m['peak_bytes'])}; NVML process "
            f"{mib(nv.get('process_used_bytes')) if nv.get('available') else 'n/a'}{tail}"
        )
    if name == "switches":
        legs = ", ".join(
            "rolled back" if "error" in r else f"{r['switch_s']:.1f}s/{r['state']['status']}"
            for r in d["legs"]
        )
        return f"{legs}; copy floor {d['copy_floor']['floor_s']:.3g} s{tail}"
    if name == "oom":
        r = d["retries"][0] if d["retries"] else {}
        return f"{r.get('rung', 'no retry')}; steps {d['steps_taken']}, samples {d['samples_drawn']}{tail}"
    if name == "policy":
        ratio = d["ratio_ladder_over_best_static"]
        return (
            f"cap {mib(d['cap_bytes'])}, best static {d['best_static_that_fits']}, ladder/best "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'}, over cap after 1st decision "
            f"{d['ladder']['steps_over_cap_after_first_decision']}{tail}"
        )
    if name == "jit":
        return ", ".join(
            f"{k}: {v.get('build_s', v.get('why', v.get('error')))}" for k, v in d["ops"].items()
        )
    return st


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:.0f} MiB"


def drive(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    ctx = Ctx(args) if args.in_process else None
    for name in args.sections:
        left = args.budget_s - (time.perf_counter() - t0)
        if not args.dry_run and left < MIN_SECONDS[name]:
            data = {"section": name, "status": "skipped", "error": f"{left:.0f} s of the budget left"}
            write_json(out / f"{name}.json", data)
        elif ctx is not None:
            data = run_section(ctx, name)
        else:
            data = spawn_section(args, name, left)
        results.append(data)
    summary = {
        "sections": {d["section"]: {"status": d["status"], "wall_s": d.get("wall_s")} for d in results},
        "lines": {d["section"]: summary_line(d) for d in results},
        "dry_run": args.dry_run,
        "wall_s": time.perf_counter() - t0,
    }
    write_json(out / "summary.json", summary)
    print(f"\ngpu_check {'(dry run) ' if args.dry_run else ''}in {summary['wall_s']:.0f} s -> {out}")
    for d in results:
        print(f"  {d['section']:<9} {d['status']:<14} {summary['lines'][d['section']]}")
    bad = [d for d in results if d["status"] in ("failed", "checks_failed")]
    return 1 if bad else 0


def single_rank_env(cuda: bool) -> None:
    """What single-process DeepSpeed needs (switch_latency's), on the accelerator at hand."""
    env = switch_latency.single_rank_env(switch_latency.free_port())  # a port of its own per process
    if cuda:
        env["DS_ACCELERATOR"] = "cuda"
    os.environ.update(env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the JSON files")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny, in this process")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--in-process", action="store_true", help="every section in this process")
    ap.add_argument("--isolate", action="store_true", help="a process per section in a dry run too")
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="model size (default 1b; tiny dry)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch (default: the size's)")
    ap.add_argument("--steps", type=int, default=4, help="steps of the metrics section")
    ap.add_argument("--static-steps", type=int, default=3, help="timed steps per static configuration")
    ap.add_argument("--ladder-steps", type=int, default=10, help="least steps of the run under the cap")
    ap.add_argument("--after-steps", type=int, default=5, help="least steps after its first decision")
    ap.add_argument("--cap-factor", type=float, default=0.6, help="cap = this x the fastest's peak")
    ap.add_argument(
        "--optimizer",
        choices=("torch", "deepspeed"),
        default="torch",
        help="AdamW as torch's (no op build) or DeepSpeed's FusedAdam/CPUAdam (JIT-built ops)",
    )
    ap.add_argument("--budget-s", type=float, default=480, help="sections that no longer fit are skipped")
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = "tiny" if args.dry_run else "1b"
    if args.dry_run:
        args.in_process = not args.isolate
        os.environ["DS_ACCELERATOR"] = "cpu"
    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device here: run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    single_rank_env(cuda)
    for k in [k for k in os.environ if k.startswith("TRAINWARDEN_")]:
        del os.environ[k]  # a controller of an enclosing run, or a disabled agent, is not this check's
    os.environ["TRAINWARDEN_RUN_ID"] = "gpu-check"
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    if args.section:
        run_section(Ctx(args), args.section)
        return 0
    if args.in_process:
        torch.set_num_threads(min(4, os.cpu_count() or 1) if cuda else 1)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
