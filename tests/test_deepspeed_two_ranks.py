"""Two CPU ranks (gloo) under torchrun: a ZeRO stage switch happens at the same step on both ranks,
carries each rank's state exactly, and really partitions: from stage 0 to 1 each rank's share of
the optimizer state halves (bytes counted in the engine's own partitions)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import job_env, torchrun_two

from trainwarden.controller.runlog import read_jsonl

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

JOB = Path(__file__).parent / "jobs" / "ds_two_rank_job.py"
POLICY = """\
version: 1
budget:
  device_memory: 64GiB
controller:
  sync_every: 1
  decide_interval_s: 0.01
policies:
  - kind: test_ds_two_ranks_stage2
"""


def _rows(tmp_path: Path, rank: int, event: str) -> list[dict]:
    rows = [json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def test_two_ranks_switch_together_and_partition(tmp_path: Path) -> None:
    from ds_helpers import ds_env  # noqa: F401 - sets TORCH_EXTENSIONS_DIR for the children

    (tmp_path / "policy.yaml").write_text(POLICY)
    cmd = torchrun_two(
        JOB,
        *("--log-dir", str(tmp_path), "--policy", str(tmp_path / "policy.yaml")),
        *("--run-dir", str(tmp_path / "run")),
    )
    env = job_env(DS_ACCELERATOR="cpu", TRAINWARDEN_RUN_ID="ds-two-ranks", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    switches = [_rows(tmp_path, r, "switch") for r in (0, 1)]
    assert [s["new"] for s in switches[0]] == [1, 3, 2, 0]
    for a, b in zip(*switches):
        assert a["step"] == b["step"] and a["engine_stage"] == b["engine_stage"] == a["new"]
        # Exact on each rank, and both ranks hold the same full state (it is data-parallel).
        assert a["digest_before"] == a["digest_after"] == b["digest_before"] == b["digest_after"]
    numel = switches[0][0]["numel"]
    for rows in switches:
        by_new = {s["new"]: s for s in rows}
        # Stage 0: each rank holds all of Adam's state (2 x 4 bytes per parameter).
        assert by_new[1]["held_before"][2] == 8 * numel
        # Stage 1: each rank holds half of it (and half of the fp32 masters), padding aside.
        opt1 = by_new[1]["held_after"][2]
        assert 8 * numel // 2 <= opt1 <= 8 * numel // 2 + 64
        assert 4 * numel // 2 <= by_new[1]["held_after"][1] <= 4 * numel // 2 + 32
        # Stage 3 partitions the parameters too: each rank keeps about half of them.
        params3 = by_new[3]["held_after"][0]
        assert params3 < 4 * numel * 0.6, params3
        assert by_new[0]["held_after"][2] == 8 * numel  # back at stage 0: all of it again

    # Phase 2: the controller's action reached both ranks at the same step.
    steps = [_rows(tmp_path, r, "step") for r in (0, 1)]
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]]
    assert [s["stage"] for s in steps[0]] == [s["stage"] for s in steps[1]]
    assert [_rows(tmp_path, r, "done")[0]["stage"] for r in (0, 1)] == [2, 2]
    decisions = [d for d in read_jsonl(tmp_path / "run" / "decisions.jsonl") if d["outcome"] == "applied"]
    assert [d["kind"] for d in decisions] == ["zero_stage"] and decisions[0]["params"] == {"value": 2}
    # The row of a step shows the stage after its boundary, where the action was applied.
    phase2 = [s for s in steps[0] if s["step"] > switches[0][-1]["step"]]
    assert phase2[0]["stage"] == 0
    assert decisions[0]["step"] == next(s["step"] for s in phase2 if s["stage"] == 2)
