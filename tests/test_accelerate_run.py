"""The Accelerate example under `trainwarden run --attach`, unchanged (`--plain` imports
accelerate's own Accelerator): a real controller process, the memory policy steps the micro-batch
down with the global batch kept, the compute policy cools the LR down and stops the job at the
budget's end, and the job's loop sees `should_stop`."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate_helpers import fresh_job_env
from helpers import REPO, TRAINWARDEN

from trainwarden.controller.runlog import read_jsonl

pytestmark = pytest.mark.slow

POLICY = """\
version: 1
budget:
  device_memory: 64MiB   # far below any Python process: the memory policy must act
  wall_time: 12s
controller:
  decide_interval_s: 0.1
  sync_every: 2
policies:
  - kind: memory
    cooldown_steps: 2
    min_micro_batch: 4
  - kind: compute
    cooldown_fraction: 0.5
"""

JOB = [
    sys.executable,
    str(REPO / "examples" / "accelerate_train.py"),
    *("--plain", "--steps", "100000", "--threads", "1", "--block-size", "32", "--n-embd", "64"),
    *("--batch-size", "16"),
]


def test_attach_runs_the_unchanged_accelerate_job_under_the_budget(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*TRAINWARDEN, "run", "--attach", "--policy", str(policy), "--run-dir", str(run_dir), "--", *JOB],
        env=fresh_job_env(HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "stopping: trainwarden says the budget is spent" in out

    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    applied = [d for d in decisions if d["outcome"] == "applied"]
    micro = [d["params"]["value"] for d in applied if d["kind"] == "micro_batch_size"]
    assert micro == [8, 4], decisions
    lrs = [d["params"]["value"] for d in applied if d["kind"] == "lr_multiplier"]
    assert lrs and lrs == sorted(lrs, reverse=True) and lrs[0] < 1.0, lrs
    assert [d["kind"] for d in applied if d["kind"] == "stop"] == ["stop"]
    assert not [d for d in decisions if d["outcome"] in ("rejected", "rolled_back")], decisions

    steps = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    hello = next(r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello")
    assert hello["shape"]["adapter"] == "accelerate" and hello["shape"]["global_batch_size"] == 16
    knobs = {k["name"]: k for k in hello["shape"]["knobs"]}
    assert knobs["precision"]["choices"] == ["fp32", "bf16"]  # fp16 is a no-op on the CPU: not offered
    assert knobs["micro_batch_size"]["choices"] == [1, 2, 4, 8, 16]
    # Each switch shows at the boundary after the step it was applied at; every step trained on
    # the whole global batch of 16 whatever the micro-batch.
    by_step = {r["step"]: r for r in steps}
    for d in (d for d in applied if d["kind"] == "micro_batch_size"):
        s, v = d["step"], d["params"]["value"]
        assert by_step[s]["config"]["micro_batch_size"] != v
        assert by_step[s + 1]["config"]["micro_batch_size"] == v
        assert by_step[s + 1]["config"]["gradient_accumulation_steps"] == 16 // v
    assert all(b["samples"] - a["samples"] == 16 for a, b in itertools.pairwise(steps))
    assert all(b["tokens"] - a["tokens"] == 16 * 32 for a, b in itertools.pairwise(steps))
    assert all(set(r["domain_loss"]) == {"code", "prose"} for r in steps)
    # The stop applied at the boundary of the job's last step (recorded just before it applied).
    [stop] = [d for d in applied if d["kind"] == "stop"]
    assert stop["step"] == steps[-1]["step"] and steps[-1]["config"]["lr_multiplier"] < 1.0
