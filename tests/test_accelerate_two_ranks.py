"""Two CPU ranks (gloo, DDP) under torchrun through trainwarden's Accelerator: the memory policy's
micro-batch step-down and a precision switch reach both ranks at the same sync step, and both
ranks then compute in the new precision with the global batch kept."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from accelerate_helpers import fresh_job_env
from helpers import torchrun_two

from trainwarden.controller.runlog import read_jsonl

JOB = Path(__file__).parent / "jobs" / "accelerate_two_rank_job.py"
#: Steps enough for the memory policy's step-down to arrive on a loaded machine: the controller
#: decides at the agent's first exchanges (0.5 s apart), and a decision reaches the ranks two syncs
#: after rank 0 has it (adapters/core/rank_sync.py is pipelined); 12 steps of this tiny model took
#: under that on two loaded cores.
STEPS, SYNC, PRECISION_AT = 30, 3, 4

POLICY = """\
version: 1
budget:
  device_memory: 1MiB
controller:
  sync_every: 3
  decide_interval_s: 0.01
policies:
  - kind: memory
    cooldown_steps: 1
    step_up: false
    min_micro_batch: 4
"""


def _run(tmp_path: Path, *extra: str) -> list[list[dict[str, Any]]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    cmd = torchrun_two(
        JOB,
        *("--log-dir", str(tmp_path), "--policy", str(policy), "--run-dir", str(tmp_path / "run")),
        *("--steps", str(STEPS), "--sync-every", str(SYNC), "--precision-at", str(PRECISION_AT)),
    )
    env = fresh_job_env(TRAINWARDEN_RUN_ID="accelerate-two-ranks", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [[json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


@pytest.mark.slow
def test_both_ranks_switch_precision_and_micro_batch_at_the_same_step(tmp_path: Path) -> None:
    logs = _run(tmp_path)
    for rows in logs:
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The same configuration at every step on both ranks.
    for key in ("micro_batch_size", "accumulation", "dtypes", "next_precision"):
        assert [r[key] for r in logs[0]] == [r[key] for r in logs[1]], key
    micro_switches = [r["step"] for r in logs[0] if r["next_micro_batch_size"] != r["micro_batch_size"]]
    assert micro_switches and all(s % SYNC == 0 for s in micro_switches), micro_switches
    # The precision action, put in at step 4, is offered at the next sync step (6) and reaches
    # both ranks at the one after (9: adapters/core/rank_sync.py is pipelined); it applies there.
    precision_switch = next(r["step"] for r in logs[0] if r["next_precision"] == "bf16")
    assert precision_switch == 3 * SYNC  # step 4 is past the sync at 3
    for rows in logs:
        assert all(r["dtypes"] == ["float32"] for r in rows if r["step"] <= precision_switch)
        assert all(r["dtypes"] == ["bfloat16"] for r in rows if r["step"] > precision_switch)
    for r in logs[0]:
        assert r["accumulation"] * r["next_micro_batch_size"] == 8  # the global batch kept: 8 per rank

    run_dir = tmp_path / "run"
    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    applied = [d for d in decisions if d["outcome"] == "applied"]
    assert [d["step"] for d in applied if d["kind"] == "micro_batch_size"] == micro_switches
    records = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert all(r["samples"] == 2 * 8 * r["step"] for r in records)
    assert all(sorted(m["rank"] for m in r["memory"]) == [0, 1] for r in records if r["step"] % SYNC == 0)


@pytest.mark.slow
def test_both_ranks_draw_their_own_mixture_and_change_it_at_the_same_step(tmp_path: Path) -> None:
    """The mixture's loader is not sharded by Accelerate: each rank trains on every sample its own
    stream draws, and a change of weights reaches both at the same sync step."""
    logs = _run(tmp_path, "--mixture")
    streams = [rows.pop(0)["stream"] for rows in logs]
    assert streams[0] != streams[1]  # a stream per rank
    for rows, stream in zip(logs, streams):
        # Each rank trains on its own stream in order, every sample of it: Accelerate did not
        # shard the batches across ranks (which would skip every other batch of each stream).
        trained = [i for r in rows[: len(stream) // 8] for i in r["drawn"]]
        assert trained == stream
        assert all(len(r["drawn"]) == 8 for r in rows)
    assert [r["domains"] for r in logs[0]] == [r["domains"] for r in logs[1]]
    # Weights {code: 1} put in at step 4, offered at sync step 6, applied at sync step 9 (the sync is
    # pipelined); step 10 was prefetched before it.
    for rows in logs:
        assert all(r["domains"] == ["code", "prose"] for r in rows[:10])
        assert rows[10:] and all(r["domains"] == ["code"] for r in rows[10:])
    decisions = list(read_jsonl(tmp_path / "run" / "decisions.jsonl"))
    records = [r for r in read_jsonl(tmp_path / "run" / "telemetry.jsonl") if r.get("event") == "step"]
    assert records[-1]["config"]["domain_weights"] == {"code": 1.0, "prose": 0.0}
    assert all(r["samples"] == 2 * 8 * r["step"] for r in records)
    assert not [d for d in decisions if d["outcome"] in ("rejected", "rolled_back")]
