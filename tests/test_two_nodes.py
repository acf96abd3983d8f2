"""Two nodes on one machine: `torchrun --nnodes 2 --nproc-per-node 1` started twice, one node agent
per "host" (c10d rendezvous on 127.0.0.1), each with its own environment and working folder,
running a real DeepSpeed job (tests/jobs/two_node_job.py) under a memory and a wall-time policy.

One controller for the whole job: global rank 0 (on whichever node c10d puts it) talks to it,
the other rank never does and neither node starts a controller of its own, the memory policy's
switches (ZeRO 0 -> 1, then the micro-batch) apply at the same step on both nodes, the wall-time
stop ends both at the same step, and /metrics shows memory of the ranks on both nodes. Then node
1's job is killed mid-run: the controller says which ranks fell silent and writes its summary;
torchrun's elastic restart brings the job back to the same controller, and the run's logs go on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAINWARDEN, free_port, job_env, scrape, wait_for

from trainwarden.controller.protocol import KNOB_MICRO_BATCH, KNOB_STOP, KNOB_ZERO_STAGE
from trainwarden.controller.runlog import read_jsonl

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

JOB = Path(__file__).parent / "jobs" / "two_node_job.py"
#: A cap no configuration of the job meets: the memory policy walks the whole ladder, each move a
#: real switch on both nodes. The job starts on ZeRO 1: for a model this small ZeRO 0 is the leaner
#: stage on a CPU (DeepSpeed's fixed buffers outweigh the partitioned state; policies/memory.py),
#: so the ladder's way down is ZeRO 1 -> 0, then the micro-batch halved down to 1.
POLICY = """\
version: 1
budget:
  device_memory: 64MiB
  wall_time: 10s
controller:
  sync_every: 2
  decide_interval_s: 0.2
policies:
  - kind: memory
    ladder: [{zero_stage: 1}, {zero_stage: 0}]
    cooldown_steps: 2
    step_up: false
  - kind: compute
"""
LOST_POLICY = """\
version: 1
budget:
  wall_time: 10m
controller:
  sync_every: 2
  stale_after_s: 5s
policies:
  - kind: compute
"""

#: The lost-node job's length: node 1 is killed after 20 steps, checkpoints every 10.
STEPS = 60


def node_cmd(node: int, port: int, *job_args: str, max_restarts: int = 0) -> list[str]:
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
        *("--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
        *("--rdzv-id", f"two-nodes-{port}", "--max-restarts", str(max_restarts), str(JOB), *job_args),
    ]


def node_env(**extra: str) -> dict[str, str]:
    """A node's own environment (as on its own host): no trainwarden setting but what is given.
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each rendezvous round gets a fresh store hosted by rank 0;
    with the agent's shared store (torchrun's default) a restarted round's gloo ranks read the
    previous round's addresses and fail to connect until a later restart (measured: 2-3 restarts)."""
    from ds_helpers import ds_env  # noqa: F401 - TORCH_EXTENSIONS_DIR for the children

    return job_env(
        DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra
    )


def start_node(node: int, cmd: list[str], env: dict[str, str], tmp: Path) -> subprocess.Popen[str]:
    home = tmp / f"host{node}"
    home.mkdir(exist_ok=True)
    out = open(tmp / f"node{node}.out", "w")  # noqa: SIM115 - held by the child
    return subprocess.Popen(cmd, env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, text=True)


def rows(tmp: Path, node: int) -> list[dict]:
    path = tmp / f"node{node}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps(tmp: Path, node: int) -> list[dict]:
    return [r for r in rows(tmp, node) if r["event"] == "step"]


def tail(tmp: Path, node: int) -> str:
    return (tmp / f"node{node}.out").read_text()[-3000:]


def wait_nodes(nodes: list[subprocess.Popen[str]], tmp: Path, timeout_s: float) -> None:
    for node, p in enumerate(nodes):
        assert p.wait(timeout_s) == 0, tail(tmp, node)


def stop_all(nodes: list[subprocess.Popen[str] | None], ctl: subprocess.Popen[bytes] | None = None) -> None:
    """Nothing left behind, passed or failed."""
    for p in nodes:
        if p is not None:
            p.kill()
    if ctl is not None:
        ctl.terminate()
        ctl.wait(30)


def memory_ranks(metrics_url: str) -> set[str]:
    samples = scrape(metrics_url) or {}
    return {
        dict(labels).get("rank", "")
        for (name, labels), value in samples.items()
        if name == "trainwarden_device_memory_peak_bytes" and value > 0
    }


def sidecar(tmp: Path, policy: str) -> tuple[subprocess.Popen[bytes], dict, str]:
    """`trainwarden controller` alone, as a Kubernetes sidecar would run it for node 0."""
    (tmp / "policy.yaml").write_text(policy)
    token = "two-nodes-test-token-0123456789"
    (tmp / "token").write_text(token)
    run_dir = tmp / "run"
    ctl = subprocess.Popen(
        [
            *(*TRAINWARDEN, "controller", "--policy", str(tmp / "policy.yaml"), "--listen", "127.0.0.1:0"),
            *("--metrics-port", "0", "--run-dir", str(run_dir), "--token-file", str(tmp / "token")),
        ],
        env=job_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert wait_for(lambda: (run_dir / "controller.json").exists(), 60), "the controller did not start"
    return ctl, json.loads((run_dir / "controller.json").read_text()), token


def check_switches_and_stop(tmp: Path, run_dir: Path) -> dict:
    """Both nodes ran the same steps under the same configuration at every step, switched the ZeRO
    stage and the micro-batch where the controller logged them applied, and stopped together."""
    a, b = steps(tmp, 0), steps(tmp, 1)
    assert a and [r["step"] for r in a] == [r["step"] for r in b]
    assert [(r["zero_stage"], r["micro_batch"]) for r in a] == [
        (r["zero_stage"], r["micro_batch"]) for r in b
    ]
    applied = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["outcome"] == "applied"]
    kinds = [d["kind"] for d in applied]
    assert KNOB_ZERO_STAGE in kinds and KNOB_MICRO_BATCH in kinds and KNOB_STOP in kinds, kinds
    for d in applied:
        if d["kind"] in (KNOB_ZERO_STAGE, KNOB_MICRO_BATCH):
            field = "zero_stage" if d["kind"] == KNOB_ZERO_STAGE else "micro_batch"
            # The row of a step shows the configuration after its boundary, where actions apply.
            for node_rows in (a, b):
                first = next(r["step"] for r in node_rows if r[field] == d["params"]["value"])
                assert first == d["step"], (d, first)
    stop = next(d["step"] for d in applied if d["kind"] == KNOB_STOP)
    assert all(d["step"] <= stop for d in applied)
    for node in (0, 1):
        last = steps(tmp, node)[-1]
        assert last["stop"] and last["step"] == stop, last
        assert rows(tmp, node)[-1] == {"event": "done", "node": node, "step": stop, "restart": 0}
    return {d["kind"] + "@" + str(d["step"]): d["step"] - d["decided_step"] for d in applied}


def test_one_sidecar_controller_steers_both_nodes(tmp_path: Path) -> None:
    ctl, ready, token = sidecar(tmp_path, POLICY)
    port = free_port()
    # Steps enough that the budget's stop, not the script's last step, ends the job on a fast machine.
    args = ("--log-dir", str(tmp_path), "--zero-stage", "1", "--steps", "100000")
    # The same settings on every node, as one manifest gives every pod: global rank 0 may land on
    # either node (c10d assigns ranks), and it alone connects.
    shared = {
        "TRAINWARDEN_ENDPOINT": ready["endpoint"],
        "TRAINWARDEN_TOKEN": token,
        "TRAINWARDEN_SYNC_EVERY": "2",
    }
    nodes = [start_node(n, node_cmd(n, port, *args), node_env(**shared), tmp_path) for n in (0, 1)]
    try:
        # Memory of the ranks on both nodes reaches /metrics while the job runs.
        seen: set[str] = set()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and nodes[0].poll() is None and seen != {"0", "1"}:
            seen |= memory_ranks(ready["metrics"])
            time.sleep(0.3)
        assert seen == {"0", "1"}, seen
        wait_nodes(nodes, tmp_path, 240)
    finally:
        stop_all(nodes, ctl)
    run_dir = tmp_path / "run"
    check_switches_and_stop(tmp_path, run_dir)
    hellos = [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello"]
    assert len(hellos) == 1 and hellos[0]["shape"]["world_size"] == 2  # one job, one rank talking
    # Neither node embedded a controller of its own (an embedded one writes runs/<id> here).
    assert not (tmp_path / "host0" / "runs").exists() and not (tmp_path / "host1" / "runs").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop"]["cause"] == "budget" and summary["telemetry_gaps"] == []


def test_run_on_node_0_and_a_plain_job_on_node_1(tmp_path: Path) -> None:
    """`trainwarden run` on node 0 only; node 1's torchrun is started plainly, with the endpoint
    and the token file in its environment: c10d, not --node-rank, decides which node holds global
    rank 0 (measured: node 1 about half the time), and that rank connects wherever it is."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    port = free_port()
    run_dir = tmp_path / "run"
    # Steps enough that the budget's stop, not the script's last step, ends the job on a fast machine.
    args = ("--log-dir", str(tmp_path), "--zero-stage", "1", "--steps", "100000")
    run = [*TRAINWARDEN, "run", "--policy", str(tmp_path / "policy.yaml"), "--run-dir", str(run_dir), "--"]
    node0 = start_node(0, [*run, *node_cmd(0, port, *args)], node_env(), tmp_path)
    node1 = None
    try:
        assert wait_for(lambda: (run_dir / "controller.json").exists(), 60), tail(tmp_path, 0)
        endpoint = json.loads((run_dir / "controller.json").read_text())["endpoint"]
        env1 = node_env(TRAINWARDEN_ENDPOINT=endpoint, TRAINWARDEN_TOKEN_FILE=str(run_dir / "token"))
        node1 = start_node(1, node_cmd(1, port, *args), env1, tmp_path)
        wait_nodes([node0, node1], tmp_path, 300)
    finally:
        stop_all([node0, node1])
    check_switches_and_stop(tmp_path, run_dir)
    assert len([r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == "hello"]) == 1
    assert not (tmp_path / "host0" / "runs").exists() and not (tmp_path / "host1" / "runs").exists()
    telemetry = list(read_jsonl(run_dir / "telemetry.jsonl"))
    # Each sync step's record carries the memory of the ranks on both nodes (rank 0 gathers it).
    assert any(sorted(m["rank"] for m in r.get("memory", [])) == [0, 1] for r in telemetry)


def test_a_lost_node_is_noticed_and_the_elastic_restart_reconnects(tmp_path: Path) -> None:
    ctl, ready, token = sidecar(tmp_path, LOST_POLICY)
    port = free_port()
    args = ("--log-dir", str(tmp_path), "--ckpt-dir", str(tmp_path / "ckpt"), "--steps", str(STEPS))
    # The replacement takes longer than the staleness limit to come back, as a lost host's does:
    # a restart within it is not a gap (measured: a restart here can take as little as ~6 s).
    args += ("--step-sleep", "0.02", "--save-every", "10", "--restart-delay", "15")
    shared = {
        "TRAINWARDEN_ENDPOINT": ready["endpoint"],
        "TRAINWARDEN_TOKEN": token,
        "TRAINWARDEN_SYNC_EVERY": "2",
    }
    nodes = [
        start_node(n, node_cmd(n, port, *args, max_restarts=3), node_env(**shared), tmp_path) for n in (0, 1)
    ]
    run_dir = tmp_path / "run"
    try:
        assert wait_for(lambda: len(steps(tmp_path, 1)) >= 20, 240, 0.1), tail(tmp_path, 1)
        killed = steps(tmp_path, 1)[-1]
        subprocess.run(["kill", "-9", str(killed["pid"])], check=True)  # node 1's training process
        # The controller notices from the missing telemetry, says so and writes its summary.
        summary_path = run_dir / "summary.json"
        assert wait_for(lambda: summary_path.exists(), 60), "no summary while the node was lost"
        lost = json.loads(summary_path.read_text())
        assert lost["telemetry_stale_ranks"] == [0, 1], lost["telemetry_stale_ranks"]
        log = (run_dir / "controller.log").read_text()
        assert "no telemetry from rank(s) 0, 1 of 2" in log
        wait_nodes(nodes, tmp_path, 300)
    finally:
        stop_all(nodes, ctl)
    # torchrun restarted both nodes' processes (node 0's for the new round, without counting it
    # as a restart of its own); they resumed from the checkpoint and went on.
    for node in (0, 1):
        first_pid = steps(tmp_path, node)[0]["pid"]
        after = [r for r in steps(tmp_path, node) if r["pid"] != first_pid]
        assert after and after[0]["step"] <= killed["step"] + 1 and after[-1]["step"] == STEPS
    telemetry = list(read_jsonl(run_dir / "telemetry.jsonl"))
    hellos = [r for r in telemetry if r.get("event") == "hello"]
    assert len(hellos) >= 2 and len({tuple(h["shape"]["pids"]) for h in hellos}) == len(hellos)
    # The run's log goes on across the restart; each start of the job (each hello) has its own
    # step sequence, so the restarted job's steps from its checkpoint on are recorded again.
    starts: list[list[int]] = []
    for r in telemetry:
        if r.get("event") == "hello":
            starts.append([])
        elif r.get("event") == "step":
            starts[-1].append(r["step"])
    assert all(seq == sorted(set(seq)) for seq in starts), starts
    resumed = [seq for seq in starts if seq][-1]
    assert resumed[0] <= killed["step"] + 1 and resumed[-1] == STEPS, resumed
    log = (run_dir / "controller.log").read_text()
    assert "started again" in log and "telemetry from rank(s) 0, 1 again" in log  # a new start (hello)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["telemetry_stale_ranks"] == [] and summary["step"] == STEPS
    (gap,) = summary["telemetry_gaps"]
    assert gap["ranks"] == [0, 1] and gap["last_step"] <= killed["step"] + 2
