"""Faults really injected into real processes: whatever happens to trainwarden, the job trains on.

Each test runs a steady job (tests/jobs/steady_job.py: a known step rate) against a real
sidecar controller process, then kills, stops or starves the controller, or kills the job.
Timings come from the job's own step timestamps in telemetry.jsonl, which the agent keeps
and re-sends when the controller comes back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TRAINWARDEN, free_port, job_env, scrape, wait_for

from trainwarden.controller.runlog import read_jsonl

pytestmark = pytest.mark.slow

STEADY = [sys.executable, str(REPO / "tests" / "jobs" / "steady_job.py")]
POLICY = """\
version: 1
budget:
  device_memory: 64MiB
controller:
  sync_every: 1
  decide_interval_s: 0.1
policies:
  - kind: memory
    cooldown_steps: 5
    min_micro_batch: 4
"""


class Sidecar:
    """`trainwarden controller` as a Kubernetes sidecar would run it."""

    def __init__(self, tmp: Path, run_dir: Path, port: int | None = None) -> None:
        self.tmp, self.run_dir = tmp, run_dir
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.token_file = tmp / "token"
        if not self.token_file.exists():
            self.token_file.write_text("a-token-of-at-least-sixteen-chars")
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        self.proc = subprocess.Popen(
            [
                *TRAINWARDEN,
                "controller",
                "--policy",
                str(policy),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--metrics-port",
                str(self.metrics_port),
                "--run-dir",
                str(run_dir),
                "--token-file",
                str(self.token_file),
            ],
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = run_dir / "controller.json"
        assert wait_for(
            lambda: ready.exists() and json.loads(ready.read_text())["pid"] == self.proc.pid, 30
        ), self.output()

    def job(self, steps: int, step_ms: float = 10.0) -> subprocess.Popen[str]:
        env = job_env(
            TRAINWARDEN_ENDPOINT=f"http://127.0.0.1:{self.port}",
            TRAINWARDEN_TOKEN_FILE=str(self.token_file),
            TRAINWARDEN_SYNC_EVERY="1",
        )
        return subprocess.Popen(
            [*STEADY, "--steps", str(steps), "--step-ms", str(step_ms)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.tmp,
        )

    def step(self) -> float:
        s = scrape(f"http://127.0.0.1:{self.metrics_port}/metrics") or {}
        return s.get(("trainwarden_step", (("run", self.run_dir.name),)), -1.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def output(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stdout.read() if self.proc.stdout else ""


def step_times(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["time"] for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"}


def steps_between(times: dict[int, float], t0: float, t1: float) -> int:
    return sum(1 for t in times.values() if t0 <= t < t1)


def test_controller_killed_then_restarted_picks_up_and_the_job_reconnects(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    side = Sidecar(tmp_path, run_dir)
    job = side.job(steps=900)
    try:
        assert wait_for(lambda: side.step() >= 150, 60), "the job never reported 150 steps"
        decided = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["outcome"] == "applied"]
        assert decided, "the memory policy should have acted before the kill"
        side.proc.kill()  # SIGKILL: no summary, no flush
        side.proc.wait(10)
        killed_at = time.time()
        time.sleep(3)
        assert job.poll() is None, "the job must train on without its controller"
        side2 = Sidecar(tmp_path, run_dir, port=side.port)
        restarted_at = time.time()
        assert job.wait(120) == 0, job.stdout.read() if job.stdout else ""
    finally:
        if job.poll() is None:
            job.kill()
    assert wait_for(lambda: side2.step() == 900, 15)
    side2.stop()
    times = step_times(run_dir)
    # Every step reached the controllers exactly once: queued while it was gone, then re-sent.
    assert sorted(times) == list(range(1, 901))
    # Unslowed: as many steps per second during the outage as before it (generous bound).
    before = steps_between(times, killed_at - 3, killed_at) / 3
    during = steps_between(times, killed_at, restarted_at) / (restarted_at - killed_at)
    assert during >= 0.5 * before, (before, during)
    # The new controller picked up the decision log: the actions before the kill are counted.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sum(n for k, n in summary["actions"].items() if k.endswith(":applied")) >= len(decided)
    assert summary["step"] == 900 and summary["finished"] is True
    assert "picked up run" in (run_dir / "controller.log").read_text()


def test_controller_hung_does_not_slow_the_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    side = Sidecar(tmp_path, run_dir)
    job = side.job(steps=100_000, step_ms=10)
    try:
        assert wait_for(lambda: side.step() >= 100, 60)
        time.sleep(10)  # ten seconds of normal running to compare with
        stopped_at = time.time()
        os.kill(side.proc.pid, signal.SIGSTOP)
        time.sleep(10)
        os.kill(side.proc.pid, signal.SIGCONT)
        resumed_at = time.time()
        assert job.poll() is None
        # The records of the hang reach the controller once it answers again.
        assert wait_for(
            lambda: (
                side.step() >= 0
                and max(step_times(run_dir), default=0) > 0
                and max(step_times(run_dir).values()) > resumed_at
            ),
            30,
        )
    finally:
        job.send_signal(signal.SIGTERM)
        job.wait(30)
        side.stop()
    times = step_times(run_dir)
    before = steps_between(times, stopped_at - 10, stopped_at)
    during = steps_between(times, stopped_at, resumed_at)
    assert before > 0 and during >= before / 2, (before, during)


def test_job_killed_under_run_exits_nonzero_with_a_summary_and_no_orphan(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [*TRAINWARDEN, "run", "--run-dir", str(run_dir), "--", *STEADY, "--steps", "100000"],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    ready = run_dir / "controller.json"
    assert wait_for(lambda: ready.exists(), 30)
    ctl_pid = json.loads(ready.read_text())["pid"]
    assert wait_for(
        lambda: any(r.get("event") == "step" for r in read_jsonl(run_dir / "telemetry.jsonl")), 60
    )
    import psutil

    job_pid = next(c.pid for c in psutil.Process(proc.pid).children() if c.pid != ctl_pid)
    os.kill(job_pid, signal.SIGKILL)
    t = time.monotonic()
    rc = proc.wait(30)
    noticed = time.monotonic() - t
    out = proc.stdout.read() if proc.stdout else ""
    assert rc == 128 + signal.SIGKILL, out
    assert noticed < 15, noticed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["finished"] is False and summary["step"] > 0
    assert "job was killed by SIGKILL (exit 137)" in out
    assert not psutil.pid_exists(ctl_pid) or psutil.Process(ctl_pid).status() == psutil.STATUS_ZOMBIE


def test_sidecar_notices_a_killed_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    side = Sidecar(tmp_path, run_dir)
    job = side.job(steps=100_000)
    try:
        assert wait_for(lambda: side.step() >= 20, 60)
        job.kill()
        job.wait(10)
        log = run_dir / "controller.log"
        assert wait_for(lambda: "never said it finished" in log.read_text(), 10)
    finally:
        side.stop()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["job_lost"] is True


def _mount_tiny_tmpfs(path: Path) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_training_goes_on_and_metrics_keep_flowing(tmp_path: Path) -> None:
    run_dir = tmp_path / "full"
    if not _mount_tiny_tmpfs(run_dir):
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root and must be able to mount a tmpfs for the disk-full test")
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        side = Sidecar(tmp_path, run_dir)
        job = side.job(steps=1500, step_ms=2)
        assert job.wait(120) == 0, job.stdout.read() if job.stdout else ""
        assert wait_for(lambda: side.step() == 1500, 15), "metrics must keep flowing on a full disk"
        side.stop()
        out = side.output()
        # Said once per file, not once per record.
        assert out.count("cannot write") <= 3, out[-2000:]
        assert "cannot write" in out
        assert "Traceback" not in out
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], capture_output=True)
