"""`trainwarden run` in a hostile or failing world (issue 15, findings 1, 2, 6 and 8, and the run
side of its Low items): a dead controller is restarted and the budget still ends the run; with no
controller to be had the job keeps the budget's end by itself; a reused run directory never hands
the job a stale endpoint, and a server that cannot prove the token is neither sent it nor obeyed;
`run` owns its job's whole process tree; the run directory is private and follows no link.

Real processes throughout: `trainwarden run` as a user starts it, the demo's own training script
(examples/train_gpt.py, a one-layer model: tiny_job) or plain Python jobs, real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import REPO, TRAINWARDEN, job_env, tiny_job, wait_for

from trainwarden.adapters.core.channel import ChannelDown, HttpChannel
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import PROTOCOL_VERSION, JobShape, KnobSpec
from trainwarden.controller.runlog import read_jsonl
from trainwarden.controller.server import ChannelServer

STEADY = [sys.executable, str(REPO / "tests" / "jobs" / "steady_job.py")]
#: A wall-time budget the compute policy stops the job at.
BUDGET_POLICY = """\
version: 1
budget:
  wall_time: {wall}s
controller:
  sync_every: 1
policies:
  - kind: compute
"""


def policy(tmp: Path, wall: float) -> Path:
    p = tmp / "policy.yaml"
    p.write_text(BUDGET_POLICY.format(wall=wall))
    return p


def start_run(tmp: Path, *args: str, job: list[str], **env: str) -> subprocess.Popen[str]:
    """`trainwarden run ARGS -- JOB`, in a session of its own (the test can clean up after it)."""
    return subprocess.Popen(
        [*TRAINWARDEN, "run", *args, "--", *job],
        env=job_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
        start_new_session=True,
    )


def run_once(tmp: Path, *args: str, job: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TRAINWARDEN, "run", *args, "--", *job],
        env=job_env(),
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=timeout,
    )


def last_step(run_dir: Path) -> int:
    path = run_dir / "telemetry.jsonl"
    if not path.exists():
        return -1
    return max((r["step"] for r in read_jsonl(path) if r.get("event") == "step"), default=-1)


def cleanup(*procs: subprocess.Popen[str] | None, pids: tuple[int, ...] = ()) -> None:
    for p in procs:
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---- finding 1: the controller is supervised ------------------------------------------------------
@pytest.mark.slow
def test_chaos_a_controller_killed_mid_run_is_restarted_and_the_budget_still_stops_the_job(
    tmp_path: Path,
) -> None:
    """The proof of issue 15: the demo's script under `run`, its controller SIGKILLed mid-run: a
    new controller picks the run up on the same run directory and port, the job's later steps
    reach it, its compute policy stops the job at the budget's end, `run` exits 0 with a summary."""
    run_dir = tmp_path / "run"
    run = start_run(
        tmp_path,
        *("--policy", str(policy(tmp_path, 10)), "--run-dir", str(run_dir), "--status-every", "1"),
        job=tiny_job(100_000),  # ~1000 s unbounded: only the budget can end it in time
    )
    try:
        assert wait_for(lambda: last_step(run_dir) >= 100, 90), "the job never reached step 100"
        first = json.loads((run_dir / "controller.json").read_text())
        os.kill(first["pid"], signal.SIGKILL)
        killed_at_step = last_step(run_dir)
        out, err = run.communicate(timeout=120)
    finally:
        cleanup(run)
    assert run.returncode == 0, err[-3000:]
    assert "killed by SIGKILL; restarting it" in err and "controller restarted" in err, err[-3000:]
    second = json.loads((run_dir / "controller.json").read_text())
    assert second["pid"] != first["pid"] and second["endpoint"] == first["endpoint"]
    assert "picked up run" in (run_dir / "controller.log").read_text()
    # Steps after the kill reached the new controller, every one once.
    steps = [r["step"] for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "step"]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] > killed_at_step + 50
    # The budget's stop came from the new controller's compute policy (not the agent's fallback).
    stops = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["kind"] == "stop"]
    assert stops and all(d["policy"] == "compute" and d["outcome"] == "applied" for d in stops), stops
    assert "could not be kept up" not in err and "restarted 1 time(s)" in err
    assert "stopping: trainwarden says the budget is spent" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop"]["cause"] == "budget" and summary["step"] == steps[-1]


def test_a_controller_that_cannot_be_restarted_is_given_up_loudly(tmp_path: Path) -> None:
    from trainwarden.controller.rundir import ensure_private_dir, write_private
    from trainwarden.controller.supervise import Supervisor

    run_dir = ensure_private_dir(tmp_path / "run")
    token = run_dir / "token"
    write_private(token, "a-token-of-at-least-sixteen-chars")
    said: list[str] = []
    cmd = [*TRAINWARDEN, "controller", "--run-dir", str(run_dir), "--token-file", str(token)]
    sup = Supervisor(run_dir, cmd, said.append, max_restarts=2)
    try:
        sup.start(0)
        token.unlink()  # every restart now fails: the controller cannot read its token
        assert sup.proc is not None
        sup.proc.kill()
        assert wait_for(lambda: (sup.check(), sup.given_up)[1], 60), said
    finally:
        sup.stop()
    assert "killed by SIGKILL; restarting it in 0.5 s" in said[0]
    assert "restart 1 failed" in said[1] and "restarting it in 1.0 s" in said[1], said
    assert "gave up after 2 restarts" in said[-1] and "WITHOUT a controller" in said[-1], said


# ---- findings 1 and 6: no controller to be had, `run` itself killed ---------------------------------
@pytest.mark.slow
def test_run_sigkilled_leaves_the_job_training_until_its_budgets_end_then_it_stops_itself(
    tmp_path: Path,
) -> None:
    """SIGKILL of `run`: nothing kills the job by accident (it trains on), its controller exits
    (it watches run's pid), and the job, having no controller, stops itself at the budget's end
    through the same stop action, instead of training on unbounded."""
    run_dir = tmp_path / "run"
    wall = 6.0
    run = start_run(
        tmp_path, "--policy", str(policy(tmp_path, wall)), "--run-dir", str(run_dir), job=tiny_job(100_000)
    )
    job_pid = 0
    try:
        assert wait_for(lambda: last_step(run_dir) >= 50, 90), "the job never reached step 50"
        hello = next(r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello")
        job_pid = hello["shape"]["pids"][0]
        ctl_pid = json.loads((run_dir / "controller.json").read_text())["pid"]
        run.kill()
        run.wait()
        assert wait_for(lambda: gone(ctl_pid), 10), "the controller must not outlive `run`"
        time.sleep(1)
        assert not gone(job_pid), "the job was killed with `run`: it must not be, by accident"
        # It ends by itself, at the budget's end (~10 s of wall time), far before its 100000 steps.
        assert wait_for(lambda: gone(job_pid), 60), "the job trained on past its budget's end"
        out, err = run.communicate(timeout=10)  # the job held run's pipes until its end
    finally:
        cleanup(run, pids=(job_pid,) if job_pid else ())
    assert "stopping: trainwarden says the budget is spent" in out, out[-2000:]
    assert "WITHOUT a controller" in err and "the agent stops the job itself" in err, err[-3000:]


# ---- finding 2: a reused run directory, a server on a stale endpoint -------------------------------
class Impostor:
    """A server on an old run's endpoint that answers everything as a controller would, asks the
    job to stop, and records what it was sent."""

    def __init__(self) -> None:
        seen: list[dict[str, Any]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                stop = {"id": "evil", "kind": "stop", "params": {}, "reason": "x", "step": 0, "policy": "x"}
                body = json.dumps({"v": PROTOCOL_VERSION, "ok": True, "actions": [stop]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


#: A job that talks to the controller `run` hands it, through the agent's own channel (no torch:
#: what matters is the endpoint and token it is given): a hello and one step.
REPORTS_ONE_STEP = """\
from trainwarden.adapters.core.connect import sidecar_channel
from trainwarden.controller.protocol import JobShape, KnobSpec, StepRecord
ch = sidecar_channel()
ch.hello(JobShape("r", "plain", 1, 10, 8, 8, (KnobSpec("stop", False, choices=(True,)),), (1,), "cpu", 1, 1))
ch.exchange([StepRecord(1, 0.0, 1.0, 8, 64, 0.1, None, {}, ())], [], True)
"""


def test_a_reused_run_directory_never_hands_the_job_a_stale_endpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    impostor = Impostor()
    # The previous run's endpoint file, naming a live pid (this test's) and the impostor's port.
    stale = {
        "endpoint": impostor.url,
        "metrics": impostor.url + "/metrics",
        "pid": os.getpid(),
        "run_id": "old",
    }
    (run_dir / "controller.json").write_text(json.dumps(stale))
    try:
        done = run_once(tmp_path, "--run-dir", str(run_dir), job=[sys.executable, "-c", REPORTS_ONE_STEP])
    finally:
        impostor.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert impostor.seen == [], "the job talked to the old run's endpoint"
    assert json.loads((run_dir / "controller.json").read_text())["endpoint"] != impostor.url
    assert last_step(run_dir) == 1, "the job's step reaches this run's controller"


def test_a_reused_run_directory_shows_no_status_of_the_earlier_job(tmp_path: Path) -> None:
    """Before the new job's first message, the controller's state read back from a reused run
    directory is the earlier job's: the status line says the job is awaited, not the old step."""
    run_dir = tmp_path / "run"
    first = run_once(tmp_path, "--run-dir", str(run_dir), job=tiny_job(30))
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_step(run_dir) == 30
    # The second job connects ~3 s after it starts; `run` prints its status line every second.
    late = (
        "import runpy, sys, time; time.sleep(3); "
        f"sys.argv = {tiny_job(5)[1:]!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    second = run_once(
        tmp_path, "--run-dir", str(run_dir), "--status-every", "1", job=[sys.executable, "-c", late]
    )
    assert second.returncode == 0, second.stderr[-3000:]
    waiting = "trainwarden: waiting for the job to connect..."
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("trainwarden: step ") or ln == waiting]
    assert lines, second.stderr[-3000:]
    assert lines[0] == waiting, lines
    assert not any("step 30 |" in ln for ln in lines), "a status line of the earlier job was shown"


def _shape() -> JobShape:
    return JobShape("r", "plain", 1, 10, 8, 8, (KnobSpec("stop", False, choices=(True,)),), (1,), "cpu", 1, 1)


def test_a_server_that_cannot_prove_it_holds_the_token_is_not_sent_it_nor_obeyed(tmp_path: Path) -> None:
    token = "the-real-token-of-this-run-0123456789"
    impostor = Impostor()
    try:
        channel = HttpChannel(impostor.url, token)
        with pytest.raises(ChannelDown, match="did not prove it holds this job's token"):
            channel.hello(_shape())
        assert impostor.seen and all(token not in (s["authorization"] or "") for s in impostor.seen), (
            "the token went to a server that had not proved it holds it"
        )
        with pytest.raises(ChannelDown, match="did not prove"):  # its actions are never used
            channel.exchange([], [], False)
    finally:
        impostor.close()
    # The controller this run started proves it, and is talked to as before.
    ctl = Controller(tmp_path / "run", "r")
    server = ChannelServer(("127.0.0.1", 0), ctl, token)
    server.start()
    try:
        ok = HttpChannel(f"http://127.0.0.1:{server.port}", token)
        assert ok.hello(_shape())["run_id"] == "r" and ok.exchange([], [], False) == []
    finally:
        server.stop()
        ctl.close()


# ---- finding 6: run owns the job's process tree -----------------------------------------------------
LOOP = """\
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
try:
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(3)
"""
TRAPS_TERM = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


def _pids(*files: Path) -> list[int]:
    assert wait_for(lambda: all(f.exists() and f.read_text() for f in files), 60), "the job did not start"
    return [int(f.read_text()) for f in files]


def test_kill_int_to_run_reaches_the_job(tmp_path: Path) -> None:
    pidf = tmp_path / "job.pid"
    run = start_run(tmp_path, job=[sys.executable, "-c", LOOP, str(pidf)])
    try:
        (job_pid,) = _pids(pidf)
        run.send_signal(signal.SIGINT)  # `kill -INT <run pid>`
        out, err = run.communicate(timeout=30)
    finally:
        cleanup(run)
    assert "interrupted" in out and run.returncode == 3, err[-2000:]
    assert "SIGINT passed on to the job's process group" in err and "Traceback" not in err
    assert gone(job_pid)


def test_kill_int_reaches_the_job_of_a_run_started_with_sigint_ignored(tmp_path: Path) -> None:
    """`trainwarden run ... &` in a shell script starts `run` with SIGINT ignored (the shell does
    that to background commands), and an ignored signal stays ignored across exec: the job must
    still start with SIGINT at its default, or the INT passed on would not reach it."""
    pidf = tmp_path / "job.pid"
    run = subprocess.Popen(
        [*TRAINWARDEN, "run", "--", sys.executable, "-c", LOOP, str(pidf)],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        (job_pid,) = _pids(pidf)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=30)
    finally:
        cleanup(run)
    assert "interrupted" in out and run.returncode == 3, err[-2000:]
    assert gone(job_pid)


def test_sigterm_to_run_reaches_a_bash_wrappers_children_and_leftovers_are_reaped(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.pid" for n in "abc")
    script = (
        f"{sys.executable} -c '{LOOP}' {a} & "  # a background child of the wrapper
        f"(sleep 1000 & echo $! > {c}; wait) & "  # a grandchild in a subshell
        f"{sys.executable} -c '{LOOP}' {b}; wait"
    )
    run = start_run(tmp_path, job=["bash", "-c", script])
    pids: list[int] = []
    try:
        pids = _pids(a, b, c)
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=30)
    finally:
        cleanup(run, pids=tuple(pids))
    assert run.returncode != 0
    assert wait_for(lambda: all(gone(p) for p in pids), 10), [p for p in pids if not gone(p)]


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    pidf = tmp_path / "job.pid"
    run = start_run(tmp_path, "--stop-grace", "2", job=[sys.executable, "-c", TRAPS_TERM, str(pidf)])
    try:
        (job_pid,) = _pids(pidf)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)  # not for ever
    finally:
        cleanup(run)
    assert run.returncode == 137 and "killed by SIGKILL" in err, err[-2000:]
    assert "SIGKILL to all of it" in err and gone(job_pid)


def test_what_the_job_leaves_behind_when_it_exits_is_reaped(tmp_path: Path) -> None:
    pidf = tmp_path / "orphan.pid"
    done = run_once(tmp_path, job=["bash", "-c", f"(sleep 1000 & echo $! > {pidf}) ; exit 0"])
    assert done.returncode == 0, done.stderr[-2000:]
    (orphan,) = _pids(pidf)
    assert wait_for(lambda: gone(orphan), 10), "a process of the job outlived `run`"
    assert "outlived it" in done.stderr


# ---- finding 8 and the Low items: a private run directory ------------------------------------------
ENV_DUMP = "import json, os; print('ENV=' + json.dumps(dict(os.environ)))"


def test_the_run_directory_is_private_and_the_token_is_only_in_a_file_removed_at_the_end(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    done = run_once(tmp_path, "--run-dir", str(run_dir), job=[sys.executable, "-c", ENV_DUMP])
    assert done.returncode == 0, done.stderr[-2000:]
    env = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("ENV="))[4:])
    assert "TRAINWARDEN_TOKEN" not in env, "every child of the job would inherit the token"
    assert env["TRAINWARDEN_TOKEN_FILE"] == str(run_dir / "token")
    assert not (run_dir / "token").exists(), "the token is removed at the end"
    assert (run_dir.stat().st_mode & 0o777) == 0o700
    files = list(run_dir.iterdir())
    assert {"summary.json", "controller.log", "controller.json", "telemetry.jsonl"} <= {f.name for f in files}
    for f in files:
        assert (f.stat().st_mode & 0o777) == 0o600, f"{f.name} is {oct(f.stat().st_mode & 0o777)}"


def test_no_link_planted_in_the_run_directory_is_followed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    victims = {}
    for name in ("token", "summary.json", "controller.stderr", "controller.log", "decisions.jsonl"):
        victim = tmp_path / f"victim-{name}"
        victim.write_text("precious\n")
        victim.chmod(0o644)
        (run_dir / name).symlink_to(victim)
        victims[name] = victim
    done = run_once(tmp_path, "--run-dir", str(run_dir), job=[sys.executable, "-c", "pass"])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for name, victim in victims.items():
        assert victim.read_text() == "precious\n", f"{name}: written through the link"
        assert (victim.stat().st_mode & 0o777) == 0o644, f"{name}: its target's mode was changed"
    if done.returncode != 0:  # refused: then with the cause and the fix
        assert done.returncode == 2 and "link" in done.stderr, done.stderr[-2000:]


def test_a_run_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    run_dir = tmp_path / "theirs"
    run_dir.mkdir(mode=0o777)
    os.chown(run_dir, 65534, 65534)
    done = run_once(tmp_path, "--run-dir", str(run_dir), job=[sys.executable, "-c", "pass"])
    assert done.returncode == 2 and "belongs to uid 65534" in done.stderr, done.stderr[-2000:]
    assert list(run_dir.iterdir()) == [], "nothing is written there"


@pytest.mark.parametrize("planted", ["garbage", "directory", "link"])
def test_a_planted_controller_json_is_never_a_traceback(tmp_path: Path, planted: str) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    path = run_dir / "controller.json"
    victim = tmp_path / "victim"
    victim.write_text('{"endpoint": "http://127.0.0.1:9", "metrics": "x", "pid": 1}')
    if planted == "garbage":
        path.write_text("{not json")
    elif planted == "directory":
        path.mkdir()
    else:
        path.symlink_to(victim)
    done = run_once(tmp_path, "--run-dir", str(run_dir), job=[sys.executable, "-c", "pass"])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    if planted == "directory":
        assert done.returncode == 2 and "controller.json is a directory" in done.stderr, done.stderr
    else:  # the stale file is replaced by this start's
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(path.read_text())["endpoint"] != "http://127.0.0.1:9"
    assert victim.read_text().startswith('{"endpoint": "http://127.0.0.1:9"')


@pytest.mark.parametrize("run_id", ["../..", "a/b", "two\nlines", ".."])
def test_a_run_id_that_is_not_a_plain_name_is_refused(tmp_path: Path, run_id: str) -> None:
    done = run_once(tmp_path, "--run-id", run_id, job=[sys.executable, "-c", "pass"], timeout=30)
    assert done.returncode == 2 and "is not a plain name" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_a_fifo_as_the_policy_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    done = run_once(tmp_path, "--policy", str(fifo), job=[sys.executable, "-c", "pass"], timeout=30)
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr[-2000:]
