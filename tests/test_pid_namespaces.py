"""A sidecar that cannot see the job's pids (a pod without a shared process namespace): job
liveness comes from the channel's heartbeat, never from pids (issue 15, finding 5).

The integration test puts the controller and the job in separate pid namespaces with
`unshare --pid --fork --mount-proc` (util-linux; root), as two containers of a pod are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TRAINWARDEN, free_port, job_env, scrape, wait_for

from trainwarden.controller import loop
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import KNOB_MICRO_BATCH, JobShape, KnobSpec, StepRecord
from trainwarden.controller.runlog import read_jsonl

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def shape(pid_namespace: str) -> JobShape:
    return JobShape(
        run_id="ns-run",
        adapter="plain",
        world_size=1,
        param_count=1000,
        global_batch_size=8,
        tokens_per_sample=8,
        knobs=(KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8)),),
        pids=(2**22 + 7,),  # above any pid_max: no such process here
        device="cpu",
        device_total_bytes=1 << 30,
        sync_every=1,
        pid_namespace=pid_namespace,
    )


def record(step: int, t: float) -> StepRecord:
    return StepRecord(step, t, 1.0, 8 * step, 64 * step, 0.1, 1e-3, {KNOB_MICRO_BATCH: 8}, ())


def test_a_job_in_another_pid_namespace_is_alive_while_its_heartbeat_is(tmp_path: Path) -> None:
    clock = Clock()
    ctl = Controller(tmp_path, "ns-run", clock=clock)
    ctl.hello(shape("another-boot/pid:[1]"))
    ctl.exchange([record(1, clock.t)], [])
    clock.t += loop.HEARTBEAT_LOST_S - 1
    assert ctl.check_job(), "invisible pids alone must not make a live job lost"
    ctl.exchange([record(2, clock.t)], [])  # the heartbeat goes on
    clock.t += loop.HEARTBEAT_LOST_S - 1
    assert ctl.check_job()
    clock.t += 2  # silent past HEARTBEAT_LOST_S: lost, said once
    assert not ctl.check_job() and ctl.job_lost
    ctl.close()


def test_a_job_in_this_pid_namespace_is_lost_soon_after_its_pids_are_gone(tmp_path: Path) -> None:
    from trainwarden.controller.identity import pid_namespace

    clock = Clock()
    ctl = Controller(tmp_path, "ns-run", clock=clock)
    ctl.hello(shape(pid_namespace()))
    ctl.exchange([record(1, clock.t)], [])
    assert ctl.check_job(), "a moment's silence is not death"
    clock.t += loop.PIDS_GONE_SILENCE_S + 0.5
    assert not ctl.check_job() and ctl.job_lost
    ctl.close()


def _unshare_works() -> bool:
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_a_sidecar_in_another_pid_namespace_keeps_a_healthy_job_and_exits_when_it_finishes(
    tmp_path: Path,
) -> None:
    if not _unshare_works():
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root with util-linux: `unshare --pid --fork --mount-proc` must work")
        pytest.skip("unshare --pid needs root (or user namespaces) here")
    run_dir, token = tmp_path / "run", tmp_path / "token"
    token.write_text("a-token-of-at-least-sixteen-chars")
    port, mport = free_port(), free_port()
    # As a pod's native sidecar on an older cluster: --exit-when-finished.
    ctl = subprocess.Popen(
        [
            *(
                *UNSHARE,
                *TRAINWARDEN,
                "controller",
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-port",
                str(mport),
            ),
            *("--run-dir", str(run_dir), "--token-file", str(token), "--exit-when-finished"),
        ],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    job = None
    try:
        assert wait_for(lambda: (run_dir / "controller.json").exists(), 30), ctl.communicate(timeout=5)[0]
        env = job_env(
            TRAINWARDEN_ENDPOINT=f"http://127.0.0.1:{port}",
            TRAINWARDEN_TOKEN_FILE=str(token),
            TRAINWARDEN_SYNC_EVERY="1",
        )
        # bash is pid 1 of the job's namespace, the trainer pid 2: a number the controller's
        # namespace has no process under.
        steady = f"{sys.executable} {REPO / 'tests' / 'jobs' / 'steady_job.py'} --steps 1200 --step-ms 10"
        job = subprocess.Popen(
            [*UNSHARE, "bash", "-c", f"{steady}; exit $?"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def step() -> float:
            s = scrape(f"http://127.0.0.1:{mport}/metrics") or {}
            return s.get(("trainwarden_step", (("run", "run"),)), -1.0)

        assert wait_for(lambda: step() >= 100, 90), job.stdout.read() if job.poll() is not None else ""
        shape = next(r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello")["shape"]
        assert shape["pid_namespace"], "the job says which pid namespace its pids are in"
        # Past several ticks of the sidecar's pid check and a whole exchange interval (5 s) of
        # silence, while the job still trains (~12 s in all): the check below is of a live job,
        # not of a sidecar that rightly exited after the job said it finished.
        wait_for(lambda: job.poll() is not None, 6.5)
        assert job.poll() is None, "the job ended before the check: " + job.stdout.read()[-2000:]
        assert ctl.poll() is None, (
            "the sidecar exited on a healthy job: " + ctl.communicate(timeout=5)[0][-2000:]
        )
        assert "never said it finished" not in (run_dir / "controller.log").read_text()
        assert job.wait(120) == 0
        # The job said it finished: --exit-when-finished ends the sidecar, with its summary.
        assert ctl.wait(30) == 0
    finally:
        for p in (job, ctl):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["job_lost"] is False and summary["step"] == 1200
    steps = [r["step"] for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert steps == list(range(1, 1201))
