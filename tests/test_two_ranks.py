"""Two CPU ranks (gloo) under torchrun: the controller's action reaches every rank at the same
sync step, and every rank's memory reaches the controller through that step's collective."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import torchrun_two

from trainwarden.controller.protocol import KNOB_MICRO_BATCH
from trainwarden.controller.runlog import read_jsonl

JOB = Path(__file__).parent / "jobs" / "two_rank_job.py"
STEPS = 30
SYNC = 3

POLICY = """\
version: 1
budget:
  device_memory: 1MiB
controller:
  sync_every: {sync}
  decide_interval_s: 0.01
policies:
  - kind: memory
    cooldown_steps: 1
    step_up: false
    min_micro_batch: 4
"""


def _run_job(tmp_path: Path, sync_in_attach: bool, timeout_s: float = 120) -> subprocess.CompletedProcess:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(sync=SYNC))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(OMP_NUM_THREADS="1", TRAINWARDEN_RUN_ID="two-ranks", PYTHONUNBUFFERED="1")
    cmd = torchrun_two(
        JOB,
        *("--log-dir", str(tmp_path), "--policy", str(policy), "--run-dir", str(tmp_path / "run")),
        *("--steps", str(STEPS)),
    )
    if sync_in_attach:
        cmd += ["--sync-every", str(SYNC)]
    else:
        cmd += ["--timeout", "5"]  # a rank stuck on an unmatched collective fails, not hangs
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def _switch_steps(rows: list[dict]) -> list[int]:
    """Steps after which the micro-batch changed (applied at that step boundary)."""
    return [r["step"] for r in rows if r["next_micro_batch_size"] != r["micro_batch_size"]]


def _rank_log(tmp_path: Path, rank: int, event: str = "step") -> list[dict]:
    path = tmp_path / f"rank{rank}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r["event"] == event]


@pytest.mark.slow
def test_both_ranks_switch_at_the_same_sync_step(tmp_path: Path) -> None:
    proc = _run_job(tmp_path, sync_in_attach=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    logs = [_rank_log(tmp_path, r) for r in (0, 1)]
    for r, rows in enumerate(logs):
        assert [row["step"] for row in rows] == list(range(1, STEPS + 1)), f"rank {r} did not finish"
        assert all(row["rank"] == r for row in rows)
    switches = [_switch_steps(rows) for rows in logs]
    assert switches[0], "the memory policy's step-down never reached the job"
    assert switches[0] == switches[1], "the ranks switched at different steps"
    assert all(s % SYNC == 0 for s in switches[0]), f"switched off a sync step: {switches[0]}"
    assert [row["micro_batch_size"] for row in logs[0]] == [row["micro_batch_size"] for row in logs[1]]
    assert logs[0][-1]["next_micro_batch_size"] < 16

    run_dir = tmp_path / "run"
    records = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        if r["step"] % SYNC == 0:  # the collective ran: every rank's memory is in
            assert sorted(m["rank"] for m in r["memory"]) == [0, 1], r
            assert all(m["peak_bytes"] >= m["used_bytes"] > 0 for m in r["memory"])
            assert r["memory"][0]["pid"] != r["memory"][1]["pid"]
        else:  # no collective ran
            assert r["memory"] == [], r
        assert r["samples"] == 2 * 16 * r["step"]  # the job's samples, both ranks

    hello = next(r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello")
    assert hello["shape"]["world_size"] == 2 and hello["shape"]["sync_every"] == SYNC

    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    applied = [d for d in decisions if d["outcome"] == "applied"]
    assert [d["step"] for d in applied] == switches[0], decisions
    assert all(d["kind"] == KNOB_MICRO_BATCH for d in applied)
    assert applied[0]["params"] == {"value": 8}


@pytest.mark.slow
def test_sync_every_from_the_policy_file_reaches_every_rank(tmp_path: Path) -> None:
    """`controller.sync_every` in the policy file (and not given to attach) must be the same on
    every rank: rank 0 alone reads the file, and ranks that gather at different steps pair
    their collectives wrongly (a hang, or actions applied at different steps)."""
    proc = _run_job(tmp_path, sync_in_attach=False)
    sync = {r: [a["sync_every"] for a in _rank_log(tmp_path, r, "attach")] for r in (0, 1)}
    assert sync[0] == sync[1] == [SYNC], f"the ranks disagree on sync_every: {sync}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = [_rank_log(tmp_path, r) for r in (0, 1)]
    assert len(logs[0]) == len(logs[1]) == STEPS
    assert _switch_steps(logs[0]) == _switch_steps(logs[1])
