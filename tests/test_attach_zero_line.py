"""Scripts nobody wrote for trainwarden (tests/jobs/: an Accelerate loop in the style of HF's
run_clm_no_trainer.py, a DeepSpeed CIFAR-style loop on two gloo ranks, a Trainer script in the
style of run_clm.py), each with an evaluation pass and none reading `should_stop`, under
`trainwarden run --attach` with a budget that binds: the job ends at the stop on every rank, exit
0, the checkpoint is on disk and loads, summary.json says what happened. And a job that never
attaches: the status line says why, summary.json says "no job connected"."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate_helpers import fresh_job_env
from helpers import TRAINWARDEN, torchrun_two

from trainwarden.controller.runlog import read_jsonl

pytestmark = pytest.mark.slow

JOBS = Path(__file__).parent / "jobs"
POLICY = """\
version: 1
budget:
  {budget}
controller:
  decide_interval_s: 0.1
  sync_every: 2
policies:
{extra}  - kind: compute
    cooldown_fraction: 0.3
"""


def _run(tmp_path: Path, budget: str, command: list[str], extra: str = "", **env: str) -> tuple[str, Path]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(budget=budget, extra=extra))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [*TRAINWARDEN, "run", "--attach", "--policy", str(policy), "--run-dir", str(run_dir), "--", *command],
        env=fresh_job_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), **env),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out, run_dir


def _stop(run_dir: Path) -> dict:
    # One stop applied: a stop of the controller's that the job's own (a counted budget's end,
    # adapters/core/agent.py) superseded is an `unanswered` line.
    lines = read_jsonl(run_dir / "decisions.jsonl")
    [stop] = [d for d in lines if d["kind"] == "stop" and d["outcome"] != "unanswered"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop"]["outcome"] == "applied" and summary["stop"]["step"] == stop["step"]
    return stop


def _last_steps(out: str) -> dict[int, int]:
    last: dict[int, int] = {}
    # Two ranks write to one pipe: their lines may interleave, so read the rows, not the lines.
    for step, rank in re.findall(r'\{"step": (\d+), "rank": (\d+)\}', out):
        last[int(rank)] = max(last.get(int(rank), 0), int(step))
    return last


def test_an_accelerate_loop_that_never_reads_should_stop_is_ended_at_the_stop(tmp_path: Path) -> None:
    out, run_dir = _run(tmp_path, "tokens: 3000", [sys.executable, str(JOBS / "clm_accelerate_job.py")])
    stop = _stop(run_dir)
    assert "trainwarden ended the job" in stop["detail"] and "finished all steps" not in out
    assert _last_steps(out) == {0: stop["step"]}  # grace 0: no step past the stop
    summary = json.loads((run_dir / "summary.json").read_text())
    # Tokens counted from the batch: the attention mask's ones, not 8 x 16 per step with padding.
    assert stop["step"] * 8 * 8 <= summary["tokens"] < stop["step"] * 8 * 16
    assert summary["tokens"] <= 3000 + 8 * 16  # at most one step over
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    state = load_file(run_dir / f"checkpoint-step-{stop['step']}" / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding


def test_a_deepspeed_job_on_two_ranks_is_ended_at_the_same_step_on_both(tmp_path: Path) -> None:
    out, run_dir = _run(tmp_path, "wall_time: 5s", torchrun_two(JOBS / "cifar_deepspeed_job.py"))
    stop = _stop(run_dir)
    assert "trainwarden ended the job" in stop["detail"]
    assert _last_steps(out) == {0: stop["step"], 1: stop["step"]}
    ckpt = (
        run_dir
        / f"checkpoint-step-{stop['step']}"
        / f"global_step{stop['step']}"
        / "mp_rank_00_model_states.pt"
    )
    state = torch.load(ckpt, weights_only=False)["module"]
    sys.path.insert(0, str(JOBS))
    try:
        from cifar_deepspeed_job import Net
    finally:
        sys.path.remove(str(JOBS))
    Net().load_state_dict(state)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == stop["step"]


def test_every_trainer_the_script_builds_gets_the_callback(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out, run_dir = _run(
        tmp_path,
        "tokens: 20000\n  device_memory: 64MiB",
        [sys.executable, str(JOBS / "clm_trainer_job.py"), "--output_dir", str(out_dir)],
        extra="  - kind: memory\n",
    )
    assert out.count("trainwarden --attach: transformers.Trainer attached") == 1
    stop = _stop(run_dir)
    assert "it read should_stop" in stop["detail"]  # the Trainer's own control flag obeys it
    assert f"trained {stop['step']} steps" in out
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(out_dir / f"checkpoint-{stop['step']}")  # the Trainer's checkpoint
    summary = json.loads((run_dir / "summary.json").read_text())
    # The memory policy cannot act under the Trainer: said once, with the reason.
    [note] = summary["notices"]
    assert "memory" in note and "HF Trainer" in note
    [line] = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["outcome"] == "unsupported"]
    assert line["policy"] == "memory" and line["reason"] == note


def test_a_job_that_never_connects_is_said_with_what_it_imported(tmp_path: Path) -> None:
    job = [sys.executable, "-c", "import torch, time; time.sleep(4)"]
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nbudget: {wall_time: 1h}\npolicies: []\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            *TRAINWARDEN,
            "run",
            "--attach",
            "--status-every",
            "0.5",
            "--policy",
            str(policy),
            "--run-dir",
            str(run_dir),
            "--",
            *job,
        ],
        env=fresh_job_env(TRAINWARDEN_NO_CONNECT_AFTER_S="1"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no job connected after" in proc.stderr and "the job imported torch" in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] is None and summary["job"].startswith("no job connected")
    assert "no job connected" in proc.stderr.split("job exited with 0")[-1]  # in the closing summary


def test_an_environment_variable_attaches_a_job_another_launcher_started(tmp_path: Path) -> None:
    site = subprocess.run(
        [sys.executable, "-m", "trainwarden.adapters.attach", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    probe = "from transformers import Trainer; print(hasattr(Trainer.__init__, '__trainwarden_original__'))"
    env = fresh_job_env(PYTHONPATH=site, TRAINWARDEN_ATTACH="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
