"""Two CPU ranks (gloo) under torchrun: the data policy's weights change at the same step on both."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import torchrun_two

from trainwarden.controller.runlog import read_jsonl

JOB = Path(__file__).parent / "jobs" / "data_two_rank_job.py"
STEPS = 60
SYNC = 3
POLICY = f"""\
version: 1
budget: {{}}
controller:
  sync_every: {SYNC}
  decide_interval_s: 0.01
policies:
  - kind: data
    every_steps: 6
    warmup_steps: 3
"""


@pytest.mark.slow
def test_both_ranks_change_the_weights_at_the_same_step(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env.update(OMP_NUM_THREADS="1", TRAINWARDEN_RUN_ID="data-two-ranks", PYTHONUNBUFFERED="1")
    cmd = torchrun_two(
        JOB,
        *("--log-dir", str(tmp_path), "--policy", str(policy), "--run-dir", str(tmp_path / "run")),
        *("--steps", str(STEPS)),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = [[json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [row["step"] for row in logs[0]] == [row["step"] for row in logs[1]] == list(range(1, STEPS + 1))

    def changes(rows: list[dict]) -> list[int]:
        """Steps after which the weights or the policy's state changed (applied at that boundary)."""
        return [
            b["step"]
            for a, b in itertools.pairwise(rows)
            if (a["weights"], a["state"]) != (b["weights"], b["state"])
        ]

    assert changes(logs[0]), "no data action reached the job"
    assert changes(logs[0]) == changes(logs[1]), "the ranks changed their mixture at different steps"
    assert all(s % SYNC == 0 for s in changes(logs[0]))
    assert [(r["weights"], r["state"]) for r in logs[0]] == [(r["weights"], r["state"]) for r in logs[1]]
    assert any(r["weights"] != logs[0][0]["weights"] for r in logs[0]), "the weights themselves never moved"
    applied = [d for d in read_jsonl(tmp_path / "run" / "decisions.jsonl") if d["outcome"] == "applied"]
    assert sorted({d["step"] for d in applied}) == changes(logs[0])
