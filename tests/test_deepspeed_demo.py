"""`trainwarden demo --deepspeed --quick`: two real CPU ranks (torchrun, gloo) train under DeepSpeed
with a per-rank RSS cap that lies between what ZeRO 0 and ZeRO 1 measure on this job, so only a
real switch meets it. The memory policy switches the ZeRO stage live on both ranks; the run
completes; every rank's per-step peak RSS after the first decision is under the cap (from the
job's own telemetry); and the decision log says why each step was taken.

One run serves both the demo and the real two-rank ladder test: a two-rank DeepSpeed launch costs
~15 s before the first step on these machines, and the slow tests share two cores."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import TRAINWARDEN, job_env

from trainwarden.controller.runlog import read_jsonl
from trainwarden.policies.loader import load_policy_file

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

POLICY = Path(__file__).resolve().parent.parent / "policies" / "examples" / "deepspeed_demo.yaml"


def test_demo_deepspeed_quick_switches_the_zero_stage_under_a_cap(tmp_path: Path) -> None:
    from ds_helpers import ds_env  # noqa: F401 - sets TORCH_EXTENSIONS_DIR for the children

    pf = load_policy_file(POLICY)
    cap = pf.budget.device_memory.bytes  # type: ignore[union-attr]
    [memory] = [p.params for p in pf.policies if p.kind == "memory"]
    high = memory.high_water * cap
    run_dir = tmp_path / "demo"
    t = time.monotonic()
    out = subprocess.run(
        [*TRAINWARDEN, "demo", "--deepspeed", "--quick", "--run-dir", str(run_dir)],
        env=job_env(PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    took = time.monotonic() - t
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "switched: zero_stage 0 -> 1" in out.stdout, out.stdout[-3000:]

    # The decision log: the memory policy switched the ZeRO stage, and said why.
    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    assert decisions and all(d["reason"] for d in decisions), decisions
    applied = [d for d in decisions if d["outcome"] == "applied"]
    [switch] = [d for d in applied if d["kind"] == "zero_stage"]
    assert switch["policy"] == "memory" and switch["params"] == {"value": 1}
    assert "is above the high-water mark" in switch["reason"], switch
    assert "rung 1 (ZeRO 0) -> rung 2 of 2 (ZeRO 1)" in switch["reason"], switch
    assert "zero_stage 0 -> 1" in switch["detail"], switch
    assert all(d["outcome"] == "applied" for d in decisions), decisions

    # The telemetry: both ranks, every step; ZeRO 0 was over the cap (no other way to meet it
    # than a switch); from the switch on, every rank's per-step peak RSS is under the cap, and
    # under the high-water mark.
    steps = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(len(r["memory"]) == 2 for r in steps), "sync_every 1: both ranks' memory every step"
    before = [r for r in steps if r["config"]["zero_stage"] == 0]
    after = [r for r in steps if r["step"] > switch["step"]]
    assert before and len(after) >= 8
    assert max(m["peak_bytes"] for r in before for m in r["memory"]) > cap
    assert all(r["config"]["zero_stage"] == 1 for r in after)

    # Each sample by the step it was taken at: rank 1's reaches rank 0's record a sync late.
    def taken(r: dict[str, Any], m: dict[str, Any]) -> int:
        return int(m.get("step", r["step"]))

    assert all(taken(r, m) == r["step"] - (m["rank"] != 0) for r in steps[1:] for m in r["memory"])
    worst = max(m["peak_bytes"] for r in after for m in r["memory"] if taken(r, m) > switch["step"])
    assert worst <= high < cap, f"{worst / 2**20:.1f} MiB after the switch, mark {high / 2**20:.1f}"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["zero_stage"] == 1 and summary["step"] == 16
    print(
        f"demo --deepspeed --quick took {took:.0f} s; ZeRO 0 peak "
        f"{max(m['peak_bytes'] for r in before for m in r['memory']) / 2**20:.1f} MiB, ZeRO 1 peak "
        f"{worst / 2**20:.1f} MiB, cap {cap / 2**20:.0f} MiB, mark {high / 2**20:.1f} MiB"
    )
