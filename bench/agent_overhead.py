"""The agent's cost per training step, measured against the same loop without it.

One copy of the demo model (examples/gpt.py, default shape) with one AdamW, attached through
`trainwarden.adapters.pytorch.attach`, whose steps alternate between two paths on the same
model and optimizer: A, the plain loop (forward, `loss.backward()`, `optimizer.step()`,
`zero_grad()`), and B, the attached loop (`handle.steps` / `handle.backward` / `handle.step`,
which runs the agent's `on_step`), with the agent exchanging telemetry with a real sidecar
controller process (`trainwarden controller`) over HTTP on loopback. The handle wraps nothing:
it patches neither the model nor the optimizer (no hooks, no replaced methods), so an A step
runs none of trainwarden's code; what B adds is exactly the handle's work. The j-th A step and
the j-th B step take the same batch. The two paths alternate in blocks of two steps (A A B B or
B B A A, the order drawn at random for each block pair, seeded: the same on every rank), so
drift in the machine's speed lands on both alike. Only the second step of each block is
recorded: what a B step sets off beside the next step (the agent's thread woken by a memory surge
or a backlog of records) lands on a recorded B step, and what the last B step of a block sets off
lands on a step that is not recorded. (Alternating step by step, `--block 1`, would charge part
of that work to the plain loop.) The agent's periodic exchanges (every 0.5-5 s, as the
controller's replies ask) and the sidecar's ticks run on their own clocks, beside plain and
attached steps alike; the CPU each takes beside each recorded step is read (BesideClocks), so
what the attached path adds is measured apart from what slows both. Each step is timed whole
with time.perf_counter (for B: from taking the step's batch to `step()` returning, which
includes the agent's `on_step`). The statistic is the median of the per-pair ratios B/A with
a bootstrap 95% confidence interval (resampling block pairs).

`--design two-copies` is the method before issue 18 part 3: two copies with the same initial
weights, A plain and B attached; the copies differ in memory placement (and on two ranks in DDP's
buckets and reducer), which the ratio reads as overhead. `--control` is the A/A control: B runs
the plain loop too and trainwarden is not attached, so the ratio is the method's own bias.

The same is run on two ranks (torchrun, gloo, DDP, one thread per rank; both ranks take the
same path at the same step), with the agent's collective every step (sync_every=1, its worst
case) and every 8 steps.

    .venv/bin/python bench/agent_overhead.py                 # 200 recorded steps each, ~7 min
    .venv/bin/python bench/agent_overhead.py --quick         # 50 steps, a smoke run
    .venv/bin/python bench/agent_overhead.py --skip-two-ranks
    .venv/bin/python bench/agent_overhead.py --control --steps 300 --sync-every 8 --skip-single-rank

Prints one JSON object and writes it to bench/results/agent_overhead.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results" / "agent_overhead.json"
RANKS_SCRIPT = BENCH / "agent_overhead_ranks.py"
GOAL_OVERHEAD_PCT = 0.5
BLOCK_SIZE = 128
BOOTSTRAP_RESAMPLES = 2000
#: A memory policy whose cap is never approached: the controller decides at every exchange and
#: never acts, so the cost measured is the agent's and the channel's, not an action's.
POLICY_YAML = """\
# agent_overhead benchmark: the memory policy runs, but its cap is never near.
version: 1
budget:
  device_memory: 1000GiB
policies:
  - kind: memory
    step_up: false
"""


# ---- the interleaved loop (shared with agent_overhead_ranks.py) --------------------------------
#: One model copy whose steps alternate between the plain and the attached path (the default), or
#: two copies with identical weights, A plain and B attached (the method before issue 18 part 3).
DESIGNS = ("one-copy", "two-copies")


def make_models(seed: int) -> tuple[Any, Any]:
    """Two copies of the demo GPT with identical initial weights."""
    import torch

    from trainwarden.examples.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    a = GPT(GPTConfig(block_size=BLOCK_SIZE))
    return a, copy.deepcopy(a)


def make_batches(n: int, batch: int, seed: int) -> list[Any]:
    from trainwarden.examples.corpus import WindowSampler, load_domains

    sampler = WindowSampler(load_domains(), BLOCK_SIZE, batch, seed=seed)
    return [sampler.next_batch() for _ in range(n)]


def plain_step(model: Any, optimizer: Any, batches: Iterator[Any]) -> Callable[[], float]:
    """One plain training step per call (forward, backward, optimizer step, zero_grad); its seconds."""

    def step() -> float:
        t = time.perf_counter()
        b = next(batches)
        _, loss = model(b.x, b.y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def attached_step(model: Any, handle: Any, batches: Iterator[Any]) -> Callable[[], float]:
    """One training step through the handle per call (`steps` / `backward` / `step`, which runs
    the agent's `on_step`); its seconds, from taking the step's batch to `step()` returning."""
    it = handle.steps(batches)

    def step() -> float:
        t = time.perf_counter()
        for micro in next(it):
            _, loss = model(micro.x, micro.y)
            handle.backward(loss)
        handle.step()
        return time.perf_counter() - t

    return step


@dataclasses.dataclass
class Loops:
    """The two loops of a run: A (plain) and B (attached, or plain too in the A/A control)."""

    step_a: Callable[[], float]
    step_b: Callable[[], float]
    handle: Any  # None in the A/A control: nothing of trainwarden's runs
    copies: tuple[Any, ...]  # the raw models: one, or A's and B's

    def weights_equal(self) -> bool | None:
        """Two copies: A's and B's weights are bit-identical (both loops did the same work).
        None with one copy: both loops train the same weights."""
        import torch

        if len(self.copies) < 2:
            return None
        a, b = self.copies
        return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def build_loops(
    design: str,
    control: bool,
    seed: int,
    batches: list[Any],
    wrap: Callable[[Any], Any],
    **attach_kwargs: Any,
) -> Loops:
    """The loops of `design` (DESIGNS) on `batches`: the j-th A step and the j-th B step take the
    same batch. `wrap` wraps a raw model (DDP on two ranks). `control`: B runs the plain loop too
    and trainwarden is not attached (the A/A control: what the method reads with no agent)."""
    from trainwarden.adapters import pytorch as tw_pytorch

    raw_a, raw_b = make_models(seed)
    copies = (raw_a,) if design == "one-copy" else (raw_a, raw_b)
    model_a = wrap(raw_a)
    opt_a = raw_a.configure_optimizer(lr=1e-3)
    if design == "one-copy":
        model_b, opt_b = model_a, opt_a
    else:
        model_b, opt_b = wrap(raw_b), raw_b.configure_optimizer(lr=1e-3)
    step_a = plain_step(model_a, opt_a, iter(batches))
    if control:
        return Loops(step_a, plain_step(model_b, opt_b, iter(batches)), None, copies)
    handle = tw_pytorch.attach(model_b, opt_b, **attach_kwargs)
    return Loops(step_a, attached_step(model_b, handle, iter(batches)), handle, copies)


class Instrument:
    """Times `agent.on_step` and counts the exchange thread's HTTP exchanges (bench-only)."""

    def __init__(self, handle: Any) -> None:
        self.on_step_s: list[float] = []
        self.exchanges = 0
        if handle is None:  # the A/A control
            return
        agent = handle.agent
        on_step = agent.on_step

        def timed_on_step(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return on_step(*args, **kwargs)
            finally:
                self.on_step_s.append(time.perf_counter() - t)

        agent.on_step = timed_on_step
        channel = agent.channel
        if channel is not None:
            exchange = channel.exchange

            def counted_exchange(*args: Any, **kwargs: Any) -> Any:
                self.exchanges += 1
                return exchange(*args, **kwargs)

            channel.exchange = counted_exchange


def batches_needed(warmup: int, steps: int, block: int) -> int:
    return warmup + blocks_for(steps, block) * block


def blocks_for(steps: int, block: int) -> int:
    """Block pairs needed for at least `steps` recorded steps per loop."""
    recorded = block - 1 if block > 1 else 1
    return -(-steps // recorded)


class BesideClocks:
    """CPU clocks of what runs beside the training step: the agent's exchange thread (this
    process) and the sidecar (another process), read in nanoseconds (clock_gettime on their CPU
    clocks, ~1 us a read) around each recorded step, so that their CPU is attributed to plain
    and attached steps separately. What an attached step's asynchronous work costs the steps is
    the difference; CPU both kinds of step see alike (the sidecar's idle ticks) is not the agent's."""

    def __init__(self, handle: Any, sidecar_pid: int | None) -> None:
        self.clocks: dict[str, int] = {}
        thread = getattr(getattr(handle, "agent", None), "_thread", None)
        if thread is not None and thread.ident is not None:
            with contextlib.suppress(OSError, AttributeError):
                self.clocks["agent_thread"] = time.pthread_getcpuclockid(thread.ident)
        if sidecar_pid is not None:
            # Linux's CPU clock of another process: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED).
            clock = (~sidecar_pid << 3) | 2
            with contextlib.suppress(OSError):
                time.clock_gettime(clock)
                self.clocks["sidecar"] = clock
        self.spent: dict[str, dict[str, float]] = {"a": {}, "b": {}}

    def read(self) -> dict[str, float]:
        out = {}
        for name, clock in self.clocks.items():
            try:
                out[name] = time.clock_gettime(clock)
            except OSError:  # the thread or the process ended
                out[name] = float("nan")
        return out

    def add(self, loop: str, before: dict[str, float], after: dict[str, float]) -> None:
        for name, t in after.items():
            self.spent[loop][name] = self.spent[loop].get(name, 0.0) + (t - before[name])

    def per_step_ms(self, n_a: int, n_b: int) -> dict[str, Any]:
        """Mean CPU ms per recorded step beside plain (A) and attached (B) steps, and B - A."""
        out: dict[str, Any] = {}
        for name in self.clocks:
            a = self.spent["a"].get(name, 0.0) / max(n_a, 1) * 1e3
            b = self.spent["b"].get(name, 0.0) / max(n_b, 1) * 1e3
            out[name] = {
                "plain_ms": round(a, 4),
                "attached_ms": round(b, 4),
                "attached_minus_plain_ms": round(b - a, 4),
            }
        return out


def interleaved(
    loops: Loops,
    warmup: int,
    steps: int,
    order_seed: int,
    block: int = 2,
    between: Callable[[], None] | None = None,
    sidecar_cpu: Callable[[], float] | None = None,
    sidecar_pid: int | None = None,
) -> dict[str, Any]:
    """Run plain steps (A) and attached steps (B) interleaved; time each step.

    First `warmup` A/B pairs, not recorded. Then blocks: `block` A steps and `block` B steps (on
    the same `block` batches), the order of the two blocks drawn at random. The first step of each
    block is not recorded: what a B step sets off beside the next step (the agent's thread woken
    at once) lands on a recorded B step, and the B block's last such work beside the next A
    block's first step, which is not recorded. With
    `block=1` the loops alternate step by step and every step is recorded (then part of the
    agent's asynchronous cost lands on A steps). Pairs are (A's j-th step, B's j-th step) of a
    block pair. `between` runs after warm-up (not timed); `sidecar_cpu` reads the sidecar's CPU
    seconds at the start and the end of the blocks; with `sidecar_pid`, its CPU and the agent
    thread's are also read around each recorded step (BesideClocks)."""
    n_blocks = blocks_for(steps, block)
    rng = random.Random(order_seed)  # the same order on every rank: DDP's collectives must pair up
    handle = loops.handle
    inst = Instrument(handle)
    step_a, step_b = loops.step_a, loops.step_b

    def agent_cpu() -> float:
        return float(handle.agent.cpu_time_s) if handle is not None else 0.0

    for _ in range(warmup):
        if rng.random() < 0.5:
            step_b()
            step_a()
        else:
            step_a()
            step_b()
    if between is not None:
        between()
    cpu0, exchanges0 = agent_cpu(), inst.exchanges
    sidecar0 = sidecar_cpu() if sidecar_cpu is not None else 0.0
    on_step0 = len(inst.on_step_s)
    beside = BesideClocks(handle, sidecar_pid)
    skip = 1 if block > 1 else 0
    times_a: list[float] = []
    times_b: list[float] = []
    cluster: list[int] = []
    b_first: list[bool] = []
    on_step_idx: list[int] = []
    for k in range(n_blocks):
        first_b = rng.random() < 0.5
        b_first.append(first_b)
        for loop in ("b", "a") if first_b else ("a", "b"):
            for j in range(block):
                before = beside.read() if j >= skip else None  # None: not a recorded step
                t = step_a() if loop == "a" else step_b()
                if before is None:
                    continue
                beside.add(loop, before, beside.read())
                if loop == "a":
                    times_a.append(t)
                else:
                    times_b.append(t)
                    on_step_idx.append(on_step0 + k * block + j)
        cluster.extend([k] * (block - skip))
    # The exchange thread updates cpu_time_s after each exchange; let it finish the last one.
    time.sleep(0.3)
    sidecar_s = sidecar_cpu() - sidecar0 if sidecar_cpu is not None else None
    return {
        "times_a": times_a,
        "times_b": times_b,
        "cluster": cluster,
        "b_first": b_first,
        "block": block,
        "blocks": n_blocks,
        "attached_steps_in_window": n_blocks * block,
        "on_step_s": [inst.on_step_s[i] for i in on_step_idx] if inst.on_step_s else [],
        "agent_cpu_s_measured": agent_cpu() - cpu0,
        "exchanges_measured": inst.exchanges - exchanges0,
        "sidecar_cpu_s_measured": sidecar_s,
        "cpu_beside_recorded_steps": beside.per_step_ms(len(times_a), len(times_b)),
    }


# ---- statistics ----------------------------------------------------------------------------------
def summarize(
    times_a: list[float], times_b: list[float], cluster: list[int] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Median per-pair ratio B/A, its bootstrap 95% CI, and the overhead in percent.

    The bootstrap resamples block pairs (`cluster`: the block of each pair), keeping the pairs of
    a block together: pairs of one block share its moment on the machine, so they are not
    independent. Without clusters each pair is its own."""
    a = np.asarray(times_a, dtype=np.float64)
    b = np.asarray(times_b, dtype=np.float64)
    ratios = b / a
    n = len(ratios)
    ids = np.asarray(cluster if cluster is not None else range(n))
    groups = [np.flatnonzero(ids == u) for u in np.unique(ids)]
    rng = np.random.default_rng(seed)
    boot = np.empty(BOOTSTRAP_RESAMPLES)
    for i in range(BOOTSTRAP_RESAMPLES):
        pick = rng.integers(0, len(groups), len(groups))
        boot[i] = np.median(ratios[np.concatenate([groups[g] for g in pick])])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    med = float(np.median(ratios))
    lo_pct, hi_pct = (float(lo) - 1) * 100, (float(hi) - 1) * 100
    if hi_pct < GOAL_OVERHEAD_PCT:
        verdict = "meets the goal (the whole 95% CI is under it)"
    elif lo_pct > GOAL_OVERHEAD_PCT:
        verdict = "misses the goal (the whole 95% CI is over it)"
    else:
        verdict = "inconclusive (the 95% CI straddles the goal)"
    return {
        "pairs": n,
        "median_ratio": round(med, 5),
        "ratio_ci95": [round(float(lo), 5), round(float(hi), 5)],
        "overhead_pct": round((med - 1) * 100, 3),
        "overhead_pct_ci95": [round(lo_pct, 3), round(hi_pct, 3)],
        "ratio_of_medians": round(float(np.median(b) / np.median(a)), 5),
        "median_step_ms_baseline": round(float(np.median(a)) * 1e3, 3),
        "median_step_ms_attached": round(float(np.median(b)) * 1e3, 3),
        "goal": verdict,
    }


def on_step_stats(costs: list[float]) -> dict[str, Any]:
    c = np.asarray(costs, dtype=np.float64) * 1e6
    return {
        "calls": len(c),
        "median_us": round(float(np.median(c)), 1),
        "p90_us": round(float(np.percentile(c, 90)), 1),
        "max_us": round(float(c.max()), 1),
        "mean_us": round(float(c.mean()), 1),
    }


# ---- the sidecar ------------------------------------------------------------------------------------
class Sidecar:
    """A real `trainwarden controller` process on loopback, stopped on exit whatever happens."""

    def __init__(self, root: Path, name: str) -> None:
        self.run_dir = root / name
        self.run_dir.mkdir(parents=True)
        self.token = secrets.token_urlsafe(32)
        token_file = root / f"{name}.token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.token)
        policy = root / "policy.yaml"
        if not policy.exists():
            policy.write_text(POLICY_YAML)
        cmd = [
            sys.executable,
            "-m",
            "trainwarden.controller.cli",
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
            "--policy",
            str(policy),
            "--run-dir",
            str(self.run_dir),
            "--token-file",
            str(token_file),
        ]
        self._log = open(root / f"{name}.stderr", "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=clean_env())
        self.endpoint = self._wait_ready(root / f"{name}.stderr")
        import psutil

        self._ps = psutil.Process(self.proc.pid)
        self._cpu_start = self.cpu_s()

    def _wait_ready(self, stderr: Path) -> str:
        ready = self.run_dir / "controller.json"
        deadline = time.monotonic() + 60
        while True:
            if ready.exists():
                try:
                    return str(json.loads(ready.read_text())["endpoint"])
                except (ValueError, KeyError):
                    pass  # being written
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the controller did not start:\n{stderr.read_text()[-2000:]}")
            time.sleep(0.05)

    def env(self) -> dict[str, str]:
        return {"TRAINWARDEN_ENDPOINT": self.endpoint, "TRAINWARDEN_TOKEN": self.token}

    def cpu_s(self) -> float:
        t = self._ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> dict[str, Any]:
        """Stop the controller (it flushes its logs); return its CPU time and telemetry count."""
        cpu = None
        with contextlib.suppress(Exception):
            cpu = self.cpu_s() - self._cpu_start
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return {
            "sidecar_cpu_s_whole_run": None if cpu is None else round(cpu, 3),
            "telemetry_step_records": count_events(self.run_dir / "telemetry.jsonl", "step"),
            "decisions_logged": count_lines(self.run_dir / "decisions.jsonl"),
        }


def count_lines(path: Path) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


def count_events(path: Path, event: str) -> int:
    n = 0
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip() and json.loads(line).get("event") == event:
                    n += 1
    except OSError:
        return 0
    return n


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- single rank ------------------------------------------------------------------------------------
def single_rank(
    root: Path,
    steps: int,
    warmup: int,
    batch: int,
    block: int,
    seed: int,
    design: str = "one-copy",
    control: bool = False,
) -> dict[str, Any]:
    import torch

    sidecar = Sidecar(root, "single")
    outcome: dict[str, Any] = {}
    loops: Loops | None = None
    saved = {k: os.environ.get(k) for k in ("TRAINWARDEN_ENDPOINT", "TRAINWARDEN_TOKEN")}
    try:
        os.environ.update(sidecar.env())
        batches = make_batches(batches_needed(warmup, steps, block), batch, seed)
        loops = build_loops(
            design,
            control,
            seed,
            batches,
            lambda m: m,
            global_batch_size=batch,
            micro_batch_size=batch,
            tokens_per_sample=BLOCK_SIZE,
            sync_every=1,
        )
        t0 = time.perf_counter()
        res = interleaved(
            loops,
            warmup,
            steps,
            order_seed=seed,
            block=block,
            sidecar_cpu=sidecar.cpu_s,
            sidecar_pid=sidecar.proc.pid,
        )
        loop_s = time.perf_counter() - t0
        handle = loops.handle
        outcome = {
            **describe(res, warmup, seed, design, control),
            "batch": f"{batch} x {BLOCK_SIZE} (one micro-batch per step)",
            "torch_threads": torch.get_num_threads(),
            "loop_wall_s": round(loop_s, 2),
            "attached_and_plain_weights_equal": loops.weights_equal(),
        }
        if handle is not None:
            outcome["agent_thread_cpu_s_whole_run"] = round(handle.agent.cpu_time_s, 4)
            outcome["on_step"] = on_step_stats(res["on_step_s"])
            outcome["connected"] = handle.agent.connected
            handle.close()
    finally:
        if loops is not None and loops.handle is not None:
            loops.handle.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stopped = sidecar.stop()
    outcome.update(stopped)
    if control:
        return outcome
    outcome["telemetry_records_expected"] = warmup + res["attached_steps_in_window"]
    return add_costs(outcome, res["on_step_s"], res["attached_steps_in_window"])


def describe(res: dict[str, Any], warmup: int, seed: int, design: str, control: bool) -> dict[str, Any]:
    """The figures every run reports, from one rank's record of `interleaved`."""
    window = res["attached_steps_in_window"]
    cpu = res["agent_cpu_s_measured"]
    med_a = float(np.median(res["times_a"]))
    head = {
        **summarize(res["times_a"], res["times_b"], res["cluster"], seed),
        "design": design,
        "control": "A/A: B runs the plain loop, trainwarden not attached" if control else None,
    }
    if control:
        return {**head, "block": res["block"], "block_pairs": res["blocks"], "warmup_pairs": warmup}
    return {
        **head,
        "block": res["block"],
        "block_pairs": res["blocks"],
        "b_block_first": sum(res["b_first"]),
        "warmup_pairs": warmup,
        "attached_steps_in_window": window,
        "agent_thread_cpu_s": round(cpu, 4),
        "agent_thread_cpu_ms_per_step": round(cpu / window * 1e3, 3),
        "agent_thread_cpu_pct_of_baseline_step": round(cpu / window / med_a * 100, 3),
        "http_exchanges_measured": res["exchanges_measured"],
        "sidecar_cpu_s": None
        if res["sidecar_cpu_s_measured"] is None
        else round(res["sidecar_cpu_s_measured"], 4),
        "cpu_beside_recorded_steps": res["cpu_beside_recorded_steps"],
    }


def add_costs(out: dict[str, Any], on_step_s: list[float], steps: int) -> dict[str, Any]:
    """The direct costs, as shares of the plain step: what the ratio cannot resolve on a noisy machine.

    on_step runs inside the step (the critical path). The agent thread and the sidecar run beside
    it: they cost the step only when they take a core or the GIL the step needs.
    `all_cpu_on_critical_path_pct` is the bound: every CPU-second of theirs in the window charged
    to the attached steps. `attributed_pct` is what the attached path adds: on_step, plus the
    agent thread's and the sidecar's CPU beside attached steps less beside plain steps (BesideClocks;
    what runs beside both alike, such as the sidecar's idle ticks, slows both)."""
    base_ms = out["median_step_ms_baseline"]
    on_step_ms = float(np.mean(on_step_s)) * 1e3
    sidecar = out.get("sidecar_cpu_s")  # over the measured steps
    sidecar_ms = None if sidecar is None else sidecar / steps * 1e3
    out["sidecar_cpu_ms_per_step"] = None if sidecar_ms is None else round(sidecar_ms, 3)
    out["on_step_pct_of_baseline_step"] = round(on_step_ms / base_ms * 100, 3)
    total_ms = on_step_ms + out["agent_thread_cpu_ms_per_step"] + (sidecar_ms or 0.0)
    out["all_cpu_on_critical_path_pct"] = round(total_ms / base_ms * 100, 3)
    beside = out.get("cpu_beside_recorded_steps") or {}
    if beside:
        extra_ms = sum(v["attached_minus_plain_ms"] for v in beside.values())
        out["attributed_pct"] = round((on_step_ms + extra_ms) / base_ms * 100, 3)
    return out


# ---- two ranks ------------------------------------------------------------------------------------
def two_ranks(
    root: Path,
    steps: int,
    warmup: int,
    batch: int,
    block: int,
    seed: int,
    sync_every: int,
    timeout_s: float,
    nodes: int = 1,
    design: str = "one-copy",
    control: bool = False,
) -> dict[str, Any]:
    """Two ranks: one torchrun with two processes (nodes=1), or two torchrun node agents with one
    process each and a c10d rendezvous (nodes=2: a two-node job on one machine)."""
    name = f"{'nodes' if nodes == 2 else 'ranks'}_sync{sync_every}"
    out_dir = root / f"{name}_out"
    out_dir.mkdir()
    sidecar = Sidecar(root, name)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        script = [
            str(RANKS_SCRIPT),
            f"--steps={steps}",
            f"--warmup={warmup}",
            f"--batch={batch}",
            f"--block={block}",
            f"--seed={seed}",
            f"--sync-every={sync_every}",
            f"--design={design}",
            f"--out={out_dir}",
            *(["--control"] if control else []),
        ]
        port = free_port()
        if nodes == 1:
            launch = ["--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}"]
            cmds = [[sys.executable, "-m", "torch.distributed.run", *launch, *script]]
        else:
            cmds = [
                [
                    *(sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"),
                    *(f"--node_rank={n}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"),
                    *(f"--rdzv_id=bench-{port}", *script),
                ]
                for n in range(2)
            ]
        env = clean_env(OMP_NUM_THREADS="1", BENCH_SIDECAR_PID=str(sidecar.proc.pid), **sidecar.env())
        log_path = root / f"{name}.torchrun.log"
        t0 = time.perf_counter()
        rcs: list[int | None] = []
        with open(log_path, "w") as log:
            for cmd in cmds:
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
                    )
                )
            for proc in procs:
                try:
                    rcs.append(proc.wait(timeout_s))
                except subprocess.TimeoutExpired:
                    rcs.append(None)
        wall = time.perf_counter() - t0
        if any(rc != 0 for rc in rcs):
            raise RuntimeError(f"torchrun ({name}) exited with {rcs}:\n" + log_path.read_text()[-3000:])
        ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                stop_group(proc)
        stopped = sidecar.stop()
    r0, r1 = ranks
    out = {
        **describe(r0, warmup, seed, design, control),
        "measured_on": "rank 0 (rank 1's figures under rank1)",
        "sync_every": sync_every,
        "nodes": nodes,
        "batch_per_rank": f"{batch} x {BLOCK_SIZE} (one micro-batch per step)",
        "torch_threads_per_rank": r0["torch_threads"],
        "rank1": {
            k: v
            for k, v in summarize(r1["times_a"], r1["times_b"], r1["cluster"], seed).items()
            if k in ("median_ratio", "ratio_ci95", "overhead_pct", "median_step_ms_baseline")
        },
        "attached_and_plain_weights_equal": None
        if r0["weights_equal"] is None
        else all(r["weights_equal"] for r in ranks),
        "torchrun_wall_s": round(wall, 1),
        **stopped,
    }
    if control:
        return out
    out["on_step_rank0"] = on_step_stats(r0["on_step_s"])
    out["on_step_rank1"] = on_step_stats(r1["on_step_s"])
    out["telemetry_records_expected"] = warmup + r0["attached_steps_in_window"]
    return add_costs(out, r0["on_step_s"], r0["attached_steps_in_window"])


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop torchrun and its workers (it runs in its own session, started here)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ---- main ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import torch

    return {
        "cpu_cores": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="measured steps per loop (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps per loop, not measured")
    p.add_argument("--quick", action="store_true", help="50 steps and sync_every=1 only: a smoke run")
    p.add_argument("--skip-two-ranks", action="store_true", help="only the single-rank run")
    p.add_argument("--skip-single-rank", action="store_true", help="only the two-rank runs")
    p.add_argument(
        "--two-nodes",
        action="store_true",
        help="also two ranks as two torchrun nodes (c10d rendezvous on this machine), against one node",
    )
    p.add_argument("--batch", type=int, default=16, help="samples per step, single rank")
    p.add_argument("--rank-batch", type=int, default=8, help="samples per step per rank, two ranks")
    p.add_argument(
        "--sync-every",
        type=int,
        nargs="+",
        default=None,
        help="sync_every values for the two-rank runs (default 1 8)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=2,
        help="steps per block: the loops alternate in blocks of this many steps, the first of each "
        "not recorded (default %(default)s: A A B B or B B A A, the second of each recorded; "
        "1: alternate step by step and record every step, which charges part of the agent's "
        "asynchronous work to the plain loop)",
    )
    p.add_argument(
        "--design",
        choices=DESIGNS,
        default="one-copy",
        help="one-copy (default): one model whose steps alternate between the plain and the "
        "attached path; two-copies: two models with identical weights, A plain and B attached (the "
        "method before issue 18 part 3, whose copies differ in memory placement and DDP buckets)",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="the A/A control: B runs the plain loop too and trainwarden is not attached; the ratio "
        "it reads is the method's own bias",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="where to write the JSON (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = args.steps or (50 if args.quick else 200)
    syncs = args.sync_every or ([1] if args.quick else [1, 8])
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "agent_overhead",
        "design": args.design,
        "control": args.control,
        "goal_overhead_pct": GOAL_OVERHEAD_PCT,
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="tw-bench-") as tmp:
        root = Path(tmp)
        if not args.skip_single_rank:
            print(f"single rank: {steps} steps each, blocks of {args.block} ...", file=sys.stderr, flush=True)
            result["single_rank"] = single_rank(
                root, steps, args.warmup, args.batch, args.block, args.seed, args.design, args.control
            )
        # A two-rank loop runs 2 x block steps per block pair, ~0.15 s each here: room for a slow machine.
        timeout_s = max(900, int(steps * 2 * args.block * 0.6))
        if not args.skip_two_ranks:
            result["two_ranks"] = {}
            for s in syncs:
                print(f"two ranks, sync_every={s} ...", file=sys.stderr, flush=True)
                result["two_ranks"][f"sync_every_{s}"] = two_ranks(
                    *(root, steps, args.warmup, args.rank_batch, args.block, args.seed, s),
                    timeout_s=timeout_s,
                    design=args.design,
                    control=args.control,
                )
                if args.two_nodes:
                    print(f"two nodes, sync_every={s} ...", file=sys.stderr, flush=True)
                    result.setdefault("two_nodes", {})[f"sync_every_{s}"] = two_ranks(
                        root,
                        steps,
                        args.warmup,
                        args.rank_batch,
                        args.block,
                        args.seed,
                        s,
                        timeout_s,
                        nodes=2,
                        design=args.design,
                        control=args.control,
                    )
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # Keep the headline fields first when read by a person.
    ordered = {
        k: result[k]
        for k in (
            "benchmark",
            "design",
            "control",
            "single_rank",
            "two_ranks",
            "two_nodes",
            "goal_overhead_pct",
            "machine",
            "wall_s",
        )
        if k in result
    }
    text = json.dumps(ordered, indent=2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
