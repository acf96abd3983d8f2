"""Small helpers shared by the tests that run real processes."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

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
    ~100 steps a second, for tests that need a controller to see many steps quickly."""
    return [
        sys.executable,
        str(REPO / "examples" / "train_gpt.py"),
        *("--steps", str(steps), "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32"),
        *("--global-batch", "16", "--micro-batch", "16", "--eval-every", "0", "--threads", "1"),
    ]
