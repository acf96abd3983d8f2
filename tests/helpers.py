"""Small helpers shared by the tests that run real processes."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trainwarden.controller.protocol import KNOB_MICRO_BATCH, JobShape, KnobSpec, RankMemory, StepRecord

REPO = Path(__file__).resolve().parents[1]
TRAINWARDEN = [sys.executable, "-m", "trainwarden.controller.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_two(job: str | os.PathLike[str], *args: str) -> list[str]:
    """The command that runs `job` with `args` on two CPU ranks under torchrun, on a free port."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"),
        *("--master_addr=127.0.0.1", f"--master_port={free_port()}", str(job), *args),
    ]


def job_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child job: quiet threads, no inherited trainwarden settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def scrape(url: str, timeout: float = 2.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """One scrape of /metrics as {(sample name, sorted labels): value}, or None if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def wait_for(pred, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def tiny_job(steps: int) -> list[str]:
    """The demo's own script (examples/train_gpt.py) on a one-layer model: a real job that runs
    100-250 steps a second (by the machine: a test must not count on the rate), for tests that need
    a controller to see many steps quickly."""
    return [
        sys.executable,
        str(REPO / "examples" / "train_gpt.py"),
        *("--steps", str(steps), "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32"),
        *("--global-batch", "16", "--micro-batch", "16", "--eval-every", "0", "--threads", "1"),
    ]


# ---- the job and its steps, as a test's controller meets them ----------------------------------
def job_shape(
    run_id: str,
    *,
    micro_batch: int = 8,
    choices: tuple[int, ...] = (1, 2, 4, 8),
    knobs: tuple[KnobSpec, ...] | None = None,
    world_size: int = 1,
    param_count: int = 1000,
    global_batch_size: int = 8,
    tokens_per_sample: int = 16,
    pids: tuple[int, ...] | None = None,
    device_total_bytes: int = 2**34,
    sync_every: int = 1,
) -> JobShape:
    """A plain-PyTorch job on the CPU; its knobs are a micro-batch unless `knobs` says otherwise,
    its pid this process's unless `pids` does."""
    return JobShape(
        run_id=run_id,
        adapter="plain",
        world_size=world_size,
        param_count=param_count,
        global_batch_size=global_batch_size,
        tokens_per_sample=tokens_per_sample,
        knobs=knobs if knobs is not None else (KnobSpec(KNOB_MICRO_BATCH, micro_batch, choices=choices),),
        pids=pids if pids is not None else (os.getpid(),),
        device="cpu",
        device_total_bytes=device_total_bytes,
        sync_every=sync_every,
    )


def step_record(
    step: int,
    memory: tuple[RankMemory, ...],
    *,
    time: float | None = None,
    loss: float = 3.0,
    batch: int = 8,
    tokens_per_sample: int = 16,
    step_time_s: float = 1.0,
    micro_batch: int = 8,
) -> StepRecord:
    """Step `step` of a job training `batch` samples a step since step 0 (time: 1000 + step)."""
    return StepRecord(
        step=step,
        time=1000.0 + step if time is None else time,
        loss=loss,
        samples=batch * step,
        tokens=batch * tokens_per_sample * step,
        step_time_s=step_time_s,
        lr=1e-3,
        config={KNOB_MICRO_BATCH: micro_batch},
        memory=memory,
    )


def step_record_json(
    step: int,
    *,
    used_bytes: int,
    peak_bytes: int,
    total_bytes: int,
    batch: int = 64,
    tokens_per_sample: int = 16,
    **override: Any,
) -> dict[str, Any]:
    """A step record as the agent sends it (a JSON object) from rank 0 of this process, fields
    overridden by `override`. Huge step numbers keep plausible times and counts."""
    n = min(step, 10**6)
    rec: dict[str, Any] = {
        "step": step,
        "time": 1000.0 + n,
        "loss": 3.0,
        "samples": batch * n,
        "tokens": batch * tokens_per_sample * n,
        "step_time_s": 1.0,
        "lr": 1e-3,
        "config": {KNOB_MICRO_BATCH: 8},
        "memory": [
            {
                "rank": 0,
                "used_bytes": used_bytes,
                "peak_bytes": peak_bytes,
                "total_bytes": total_bytes,
                "device": "cpu",
                "pid": os.getpid(),
            }
        ],
        "domain_loss": {},
    }
    rec.update(override)
    return rec
