"""The HF Trainer example under `trainwarden run`: a real controller process, the compute policy
cools the LR down through the callback and stops the Trainer at the budget's end through its own
control flags, which also save a checkpoint at that step."""

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
  wall_time: 10s
controller:
  decide_interval_s: 0.1
  sync_every: 2
policies:
  - kind: compute
    cooldown_fraction: 0.5
"""


def test_the_trainer_cools_down_and_stops_at_the_budget_with_a_checkpoint(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    job = [
        sys.executable,
        str(REPO / "examples" / "hf_trainer.py"),
        *("--steps", "100000", "--threads", "1", "--block-size", "32", "--n-embd", "64"),
        *("--output-dir", str(out_dir)),
    ]
    proc = subprocess.run(
        [*TRAINWARDEN, "run", "--policy", str(policy), "--run-dir", str(run_dir), "--", *job],
        env=fresh_job_env(HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    applied = [d for d in decisions if d["outcome"] == "applied"]
    lrs = [d["params"]["value"] for d in applied if d["kind"] == "lr_multiplier"]
    assert lrs and lrs == sorted(lrs, reverse=True) and lrs[0] < 1.0, decisions
    [stop] = [d for d in applied if d["kind"] == "stop"]
    assert not [d for d in decisions if d["outcome"] in ("rejected", "rolled_back")], decisions

    steps = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert steps[-1]["step"] == stop["step"], "the Trainer did not stop at the stop's step"
    assert (out_dir / f"checkpoint-{stop['step']}").is_dir(), "no checkpoint at the stop"
    assert f"done: {stop['step']} steps" in proc.stdout
    assert all(b["samples"] - a["samples"] == 16 for a, b in itertools.pairwise(steps))
    assert all(r["loss"] is not None and 0 < r["loss"] < 10 for r in steps)
    # The multiplier reached the optimizer: the LR a step used is the scheduled one (cosine from
    # 1e-3 over 100000 steps: still ~1e-3 here) times the multiplier in force for that step.
    assert any(r["config"]["lr_multiplier"] < 0.5 for r in steps)
    for r in steps:
        m = r["config"]["lr_multiplier"]
        assert r["lr"] == pytest.approx(1e-3 * m, rel=1e-3, abs=1e-12), r
    hello = next(r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello")
    assert hello["shape"]["adapter"] == "hf-trainer"
