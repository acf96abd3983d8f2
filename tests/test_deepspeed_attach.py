"""`trainwarden run --attach`: a DeepSpeed job whose code never mentions trainwarden gets the live
handle from `deepspeed.initialize` (an import hook installed by a sitecustomize on the job's
PYTHONPATH), so the controller's actions reach it; without --attach the same job runs untouched.

The hook's mechanics are checked first against a stand-in `deepspeed` package (no torch: under
a second each); then the real job under `trainwarden run`, with a policy kind that the test's own
sitecustomize registers in the `run` and controller processes (the job's hook chains to it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import TRAINWARDEN, free_port, job_env

from trainwarden.adapters import attach as attach_hook
from trainwarden.controller.runlog import read_jsonl

pytestmark = pytest.mark.slow

JOB = Path(__file__).parent / "jobs" / "ds_unmodified_job.py"

PROBE = """\
import json, os, sys
out = {
    "early": "deepspeed" in sys.modules or "torch" in sys.modules,
    "other_sitecustomize": os.environ.get("OTHER_SITECUSTOMIZE_RAN"),
    "first_finder": type(sys.meta_path[0]).__name__,
}
import deepspeed
from deepspeed import initialize
from trainwarden.adapters import attach as attach_hook
out["dropin"] = hasattr(initialize, attach_hook.ORIGINAL_ATTR)
out["looks_like"] = [initialize.__module__, initialize.__name__]
out["same"] = initialize is deepspeed.initialize
out["loaders"] = [type(deepspeed.__loader__).__name__, type(deepspeed.__spec__.loader).__name__]
out["original"] = attach_hook.original_initialize(deepspeed)()
scope = {"__name__": "accelerate.accelerator", "deepspeed": deepspeed}
exec("result = deepspeed.initialize()", scope)  # as Accelerate would call it
out["from_a_library"] = scope["result"]
out["torch"] = "torch" in sys.modules
print(json.dumps(out))
"""


def _probe(tmp_path: Path, attach: str) -> dict[str, Any]:
    fake = tmp_path / "fake"
    (fake / "deepspeed").mkdir(parents=True, exist_ok=True)
    (fake / "deepspeed" / "__init__.py").write_text(
        "def initialize(args=None, model=None, **kwargs):\n    return 'deepspeed-own'\n"
    )
    other = tmp_path / "other"
    other.mkdir(exist_ok=True)
    (other / "sitecustomize.py").write_text("import os\nos.environ['OTHER_SITECUSTOMIZE_RAN'] = '1'\n")
    env = job_env(PYTHONPATH=f"{other}{os.pathsep}{fake}")
    env.update(attach_hook.job_env(tmp_path / "run", env))
    env["TRAINWARDEN_ATTACH"] = attach
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_hook_is_lazy_replaces_initialize_on_import_and_chains(tmp_path: Path) -> None:
    out = _probe(tmp_path, "1")
    assert out["early"] is False and out["torch"] is False  # nothing imported before the job does
    assert out["first_finder"] == "DeepSpeedFinder"
    assert out["other_sitecustomize"] == "1"  # the sitecustomize ours hides still ran
    assert out["dropin"] and out["same"]
    assert out["looks_like"] == ["deepspeed", "initialize"]  # functools.wraps: DeepSpeed's name and doc
    assert out["loaders"] == ["SourceFileLoader", "SourceFileLoader"]  # nothing of the hook left
    assert out["original"] == "deepspeed-own"
    assert out["from_a_library"] == "deepspeed-own"  # Accelerate & co. get DeepSpeed's own
    assert (tmp_path / "run" / "attach" / "sitecustomize.py").is_file()

    off = _probe(tmp_path, "0")  # the directory on PYTHONPATH, attaching off: DeepSpeed untouched
    assert off["first_finder"] != "DeepSpeedFinder" and off["dropin"] is False
    assert off["other_sitecustomize"] == "1"


# ---- the real job under `trainwarden run` --------------------------------------------------------

TEST_SITECUSTOMIZE = """\
import os

if os.environ.get("TRAINWARDEN_ENDPOINT"):
    # The job (only it has the endpoint): show that trainwarden's sitecustomize chained to this one.
    open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"chained.{os.getpid()}"), "w").close()
else:
    # `trainwarden run` and its controller: a policy kind that asks for ZeRO stage 2.
    from dataclasses import dataclass

    from trainwarden.controller.protocol import KNOB_ZERO_STAGE, Action
    from trainwarden.policies import base

    @dataclass(frozen=True)
    class _NoParams:
        pass

    class _AskStage2(base.PolicyKind):
        kind = "test_attach_stage2"
        Params = _NoParams
        knobs = frozenset({KNOB_ZERO_STAGE})

        def decide(self, snapshot, budget):
            if snapshot.step < 3 or snapshot.config.get(KNOB_ZERO_STAGE) == 2:
                return []
            return [Action(KNOB_ZERO_STAGE, {"value": 2}, "test: ZeRO 2", snapshot.step + 1)]

    base.register(_AskStage2)
"""

POLICY = """\
version: 1
budget:
  device_memory: 64GiB
controller:
  sync_every: 1
  decide_interval_s: 0.01
policies:
  - kind: test_attach_stage2
"""


def _run_job(
    tmp_path: Path, *, attach: bool, steps: int, sleep: float
) -> tuple[list[dict[str, Any]], Path, Path]:
    from ds_helpers import ds_env  # noqa: F401 - sets TORCH_EXTENSIONS_DIR for the children

    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(TEST_SITECUSTOMIZE)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run_dir = tmp_path / ("attached" if attach else "plain")
    cmd = [*TRAINWARDEN, "run", "--policy", str(policy), "--run-dir", str(run_dir), "--quiet"]
    cmd += ["--attach"] if attach else []
    cmd += ["--", sys.executable, str(JOB), "--steps", str(steps), "--step-sleep", str(sleep)]
    env = job_env(
        PYTHONPATH=str(site),
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows, run_dir, site


def test_attach_makes_an_unmodified_job_switchable(tmp_path: Path) -> None:
    rows, run_dir, site = _run_job(tmp_path, attach=True, steps=60, sleep=0.05)
    start = next(r for r in rows if r["event"] == "start")
    assert start["engine"] == "DeepSpeedHandle"
    assert (site / f"chained.{start['pid']}").exists()  # the job's other sitecustomize ran too
    steps = [r for r in rows if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 61))
    stages = [r["zero_stage"] for r in steps]
    assert stages[0] == 0 and stages[-1] == 2, stages
    switched = next(r["step"] for r in steps if r["zero_stage"] == 2)
    assert all(s == 2 for s in stages[switched - 1 :])  # once, and for good
    decisions = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["outcome"] == "applied"]
    assert [(d["kind"], d["params"]) for d in decisions] == [("zero_stage", {"value": 2})]
    assert decisions[0]["step"] == switched and "zero_stage 0 -> 2" in decisions[0]["detail"]
    telemetry = list(read_jsonl(run_dir / "telemetry.jsonl"))
    hello = next(r for r in telemetry if r.get("event") == "hello")
    assert hello["shape"]["adapter"] == "deepspeed"
    assert max(r["step"] for r in telemetry if r.get("event") == "step") == 60


def test_without_attach_the_same_job_runs_untouched(tmp_path: Path) -> None:
    rows, run_dir, _ = _run_job(tmp_path, attach=False, steps=6, sleep=0.0)
    assert next(r for r in rows if r["event"] == "start")["engine"] == "DeepSpeedEngine"
    assert [r["zero_stage"] for r in rows if r["event"] == "step"] == [0] * 6
    telemetry = (
        list(read_jsonl(run_dir / "telemetry.jsonl")) if (run_dir / "telemetry.jsonl").exists() else []
    )
    assert not [r for r in telemetry if r.get("event") in ("hello", "step")]
    decisions = (
        list(read_jsonl(run_dir / "decisions.jsonl")) if (run_dir / "decisions.jsonl").exists() else []
    )
    assert decisions == []
    assert not (run_dir / "attach").exists()
