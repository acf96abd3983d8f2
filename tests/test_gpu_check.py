"""The GPU check kit (bench/gpu_check.sh) cannot rot while no GPU is lent: its dry run is the same
script on the CPU, every section through the real adapter, controller and exporter at a tiny size,
with NVML's library missing and the OOM simulated. On a GPU the same sections run for real
(docs/gpu.md)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402 - bench/ is not a package


def test_sections_out_of_time_are_skipped_and_say_so(tmp_path: Path) -> None:
    """A budget too short for a section skips it (its JSON says how much was left) instead of
    starting what the device tool's limit would kill half-way; nothing runs, so no GPU is needed."""
    args = argparse.Namespace(
        out=str(tmp_path), sections=["metrics", "oom"], in_process=False, dry_run=False, budget_s=5.0
    )
    assert gpu_check.drive(args) == 0
    for name in ("metrics", "oom"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["status"] == "skipped" and "budget left" in data["error"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sections"] == {
        "metrics": {"status": "skipped", "wall_s": None},
        "oom": {"status": "skipped", "wall_s": None},
    }


def test_a_section_that_fails_still_writes_its_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: Any) -> dict[str, Any]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(gpu_check.RUNNERS, "oom", broken)
    ctx = argparse.Namespace(out=tmp_path)
    data = gpu_check.run_section(ctx, "oom")  # type: ignore[arg-type]
    on_disk = json.loads((tmp_path / "oom.json").read_text())
    assert data["status"] == on_disk["status"] == "failed"
    assert "illegal memory access" in on_disk["error"] and "Traceback" in on_disk["traceback"]
    assert not list(tmp_path.glob("*.tmp"))  # written whole, by rename


@pytest.mark.slow
def test_dry_run_exercises_every_section_on_the_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    env["PYTHON"] = sys.executable
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "trainwarden" / "torch_extensions"))
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check (dry run)" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {n: s["status"] for n, s in summary["sections"].items()} == dict.fromkeys(gpu_check.SECTIONS, "ok")
    s = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in gpu_check.SECTIONS}

    # env: NVML's library is missing here, and the controller's NVML source says so.
    assert s["env"]["device"] == "cpu" and s["env"]["deepspeed_accelerator"] == "cpu"
    assert s["env"]["nvml"]["available"] is False and s["env"]["nvml"].get("open()") is None
    assert s["env"]["optuna_imported"] is False  # the GPU machine has no Optuna
    assert s["env"]["trainwarden_from"].endswith("adapters")

    # metrics: the exporter's /metrics, scraped over HTTP, against the framework's own numbers.
    m = s["metrics"]
    assert m["controller_sources"] == ["ProcfsSource"] and m["nvml_now"] == {"available": False}
    assert m["on_metrics"]["device"] == "cpu" and m["on_metrics"]["used_bytes"] > 0
    assert all(m["checks"].values()) and len(m["checks"]) == 3

    # switches: ZeRO 1 -> 3, offload on and off, bf16 -> fp32, each exact, with its cost.
    legs = s["switches"]["legs"]
    assert [(r["from"], r["to"]) for r in legs] == [
        (a.describe(), b.describe()) for a, b in gpu_check.SWITCH_LEGS
    ]
    for r in legs:
        assert r["state"]["status"] == "exact", r
        assert r["bytes_moved"] > 0 and r["switch_s"] > 0 and r["over_floor"] > 0
        assert r["step_before"]["peak_bytes"] > 0 and r["step_after"]["peak_bytes"] > 0
    assert s["switches"]["copy_floor"]["floor_s"] > 0

    # oom: caught, one rung down, the same samples again, no step lost.
    o = s["oom"]
    assert o["error"] is None and len(o["retries"]) == 1
    assert o["retries"][0]["rung"] == "micro-batch 8 -> 4 (accumulation 1 -> 2)"
    assert o["retries"][0]["replayed"] and "simulated" in o["retries"][0]["error"]
    assert o["steps_taken"] == 2 and o["samples_drawn"] == 16 and o["micro_batch_after"] == 4
    assert all(o["checks"].values())

    # policy: static runs, a cap from the fastest one's peak, a run the memory policy stepped down.
    p = s["policy"]
    assert len(p["static"]) == 3 and all(v["tokens_per_s"] > 0 for v in p["static"].values())
    assert p["cap_bytes"] == int(0.6 * p["static"][p["fastest_static"]]["peak_bytes"])
    first = p["ladder"]["decisions"][0]
    assert first["kind"] == "micro_batch_size" and first["outcome"] == "applied"
    assert p["ladder"]["steps"][-1]["micro_batch"] < 8
    assert all(p["checks"].values())

    # jit: the builders are found; nothing is built on the CPU.
    assert all(op["builder"] and not op["built"] for op in s["jit"]["ops"].values())


@pytest.mark.slow
def test_each_section_can_run_in_a_process_of_its_own(tmp_path: Path) -> None:
    """How the GPU run goes (a CUDA error or an OOM in one section leaves the next standing): the
    driver spawns one process per section with the options passed on, and collects their JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINWARDEN_")}
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry-run", "--isolate"]
    cmd += ["--out", str(tmp_path), "--sections", "env", "jit", "--cap-factor", "0.5"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env_json = json.loads((tmp_path / "env.json").read_text())
    assert env_json["status"] == "ok" and env_json["dry_run"] is True and env_json["size"] == "tiny"
    assert json.loads((tmp_path / "jit.json").read_text())["status"] == "ok"
    assert set(json.loads((tmp_path / "summary.json").read_text())["sections"]) == {"env", "jit"}
