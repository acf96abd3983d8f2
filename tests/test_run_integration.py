"""`trainwarden run` end to end: a real controller process, a real training job, a real scrape.

The job is the demo's own script (examples/train_gpt.py) on a tiny model; the policy's memory
cap is far below the process's RSS, so the memory policy must step the micro-batch down.
The test checks, from the run directory and from /metrics scraped while the job ran, that
a decision was made, applied at a step boundary, and that the job's configuration changed.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAINWARDEN, free_port, job_env, scrape, tiny_job, wait_for

from trainwarden.controller.runlog import read_jsonl

pytestmark = pytest.mark.slow

POLICY = """\
version: 1
budget:
  device_memory: 64MiB   # far below any Python process: the policy must act
  wall_time: 10m
controller:
  decide_interval_s: 0.1
policies:
  - kind: memory
    cooldown_steps: 2
    min_micro_batch: 2
"""

#: Steps of the switched job. The ladder 16 -> 8 -> 4 -> 2 takes three decisions, about half a second
#: apart (the exchange cadence while the memory policy watches); 400 steps once lasted 4 s, but a
#: faster machine ran them in 1.6 s, before the third. 1500 last 6 s at 250 steps a second.
STEPS = 1500
TINY_JOB = tiny_job(STEPS)


def test_run_switches_the_job_and_metrics_show_it(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run_dir = tmp_path / "run"
    port = free_port()
    proc = subprocess.Popen(
        [
            *TRAINWARDEN,
            "run",
            "--policy",
            str(policy),
            "--run-dir",
            str(run_dir),
            "--metrics-port",
            str(port),
            "--status-every",
            "1",
            "--",
            *TINY_JOB,
        ],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    scrapes = []
    while proc.poll() is None:
        s = scrape(f"http://127.0.0.1:{port}/metrics", timeout=1.0)
        if s:
            scrapes.append(s)
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.returncode == 0, out

    # The status line and the summary were shown.
    assert "trainwarden: step" in out and "loss" in out and "mem" in out
    assert "job exited with 0" in out and "actions applied" in out

    # The decision log: micro-batch steps down, each applied, each with its reason.
    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    applied = [d for d in decisions if d["kind"] == "micro_batch_size" and d["outcome"] == "applied"]
    values = [d["params"]["value"] for d in applied]
    # Halved first (no forecast yet), then straight to the rung the fitted line says fits.
    assert values[0] == 8 and values == sorted(values, reverse=True) and values[-1] == 2, decisions
    for d in applied:
        assert "above the high-water mark" in d["reason"] and "global batch 16 kept" in d["reason"]
        assert d["duration_s"] >= 0

    # The telemetry: the configuration changes exactly at the boundary after the step the action
    # was applied at, and every step still trains on the whole global batch.
    steps = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    by_step = {r["step"]: r for r in steps}
    for d in applied:
        s = d["step"]
        assert by_step[s]["config"]["micro_batch_size"] != d["params"]["value"]
        assert by_step[s + 1]["config"]["micro_batch_size"] == d["params"]["value"]
        assert by_step[s + 1]["config"]["gradient_accumulation_steps"] == 16 // d["params"]["value"]
    samples = [r["samples"] for r in steps]
    assert all(b - a == 16 for a, b in itertools.pairwise(samples))
    assert steps[-1]["step"] == STEPS

    # A real scrape taken while the job ran shows the action and the new configuration.
    summary = json.loads((run_dir / "summary.json").read_text())
    run_label = ("run", summary["run_id"])
    applied_key = (
        "trainwarden_actions_total",
        (("kind", "micro_batch_size"), ("outcome", "applied"), run_label),
    )
    after = [s for s in scrapes if s.get(applied_key, 0) >= 1]
    assert after, f"no scrape of {len(scrapes)} saw an applied action"
    last = after[-1]
    assert last[("trainwarden_config_value", (("knob", "micro_batch_size"), run_label))] < 16
    assert last[("trainwarden_device_memory_cap_bytes", (run_label,))] == 64 * 2**20
    assert any(k[0] == "trainwarden_device_memory_peak_bytes" and ("rank", "0") in k[1] for k in last)
    assert last[("trainwarden_step", (run_label,))] > 0

    assert summary["step"] == STEPS and summary["config"]["micro_batch_size"] == 2


def test_run_returns_the_jobs_exit_code(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *TRAINWARDEN,
            "run",
            "--run-dir",
            str(tmp_path / "r"),
            "--",
            sys.executable,
            "-c",
            "raise SystemExit(3)",
        ],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr
    assert "job exited with 3" in out.stderr


def test_run_refuses_a_bad_policy_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nbudget:\n  device_memory: 24 GB\n")
    out = subprocess.run(
        [*TRAINWARDEN, "run", "--policy", str(bad), "--", sys.executable, "-c", "pass"],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "bad.yaml:3" in out.stderr and "device_memory" in out.stderr


def test_sidecar_controller_alone(tmp_path: Path) -> None:
    """`trainwarden controller` for a job launched elsewhere (the Kubernetes case)."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-from-a-kubernetes-secret\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    port, metrics_port = free_port(), free_port()
    run_dir = tmp_path / "sidecar"
    ctl = subprocess.Popen(
        [
            *TRAINWARDEN,
            "controller",
            "--policy",
            str(policy),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-port",
            str(metrics_port),
            "--run-dir",
            str(run_dir),
            "--token-file",
            str(token_file),
        ],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert wait_for(lambda: (run_dir / "controller.json").exists(), 30), "controller did not start"
        job = subprocess.run(
            tiny_job(300),
            env=job_env(
                TRAINWARDEN_ENDPOINT=f"http://127.0.0.1:{port}", TRAINWARDEN_TOKEN_FILE=str(token_file)
            ),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert job.returncode == 0, job.stderr
        assert wait_for(
            lambda: (
                (scrape(f"http://127.0.0.1:{metrics_port}/metrics") or {}).get(
                    ("trainwarden_step", (("run", "sidecar"),))
                )
                == 300
            ),
            10,
        )
    finally:
        ctl.send_signal(signal.SIGTERM)
        ctl.wait(30)
    assert ctl.returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 300 and summary["finished"] is True
    assert any(d["outcome"] == "applied" for d in read_jsonl(run_dir / "decisions.jsonl"))
    # The job did not fall back to an embedded controller.
    assert not (tmp_path / "runs").exists()
