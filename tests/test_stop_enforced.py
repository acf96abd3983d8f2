"""What a stop does to a job that never reads `should_stop` (adapters/core/stop.py), in-process with the
plain-PyTorch adapter and a real embedded controller: `end_job` ends it at the start of the first
training step past the grace, with a checkpoint that loads and exit code 0; `cooperative` lets it
train on and says the stop was ignored. Also the training-only step peak, the token count from
the batch, the unsupported-knob notice at connect, and the policy file's stop settings."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from trainwarden.adapters import pytorch as tw
from trainwarden.adapters.core.batching import counted_tokens
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, JobShape, KnobSpec, StepRecord
from trainwarden.controller.runlog import read_jsonl
from trainwarden.policies.loader import PolicyFileError, load_policy_text

POLICY = """\
version: 1
budget:
  tokens: 480          # 30 steps of 16 samples
controller:
  decide_interval_s: 0.05
  sync_every: 1
  stop: {mode}
  stop_grace_steps: {grace}
  checkpoint_on_stop: always
policies:
  - kind: compute
"""


@pytest.fixture(autouse=True)
def embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRAINWARDEN_ENDPOINT", "TRAINWARDEN_TOKEN", "TRAINWARDEN_DISABLE", "TRAINWARDEN_RUN_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TRAINWARDEN_ATTACH", raising=False)


def _train_ignoring_stop(tmp_path: Path, mode: str, grace: int, steps: int = 60) -> tuple[list[int], Path]:
    """A loop that never reads should_stop; returns the steps it began and the run directory."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY.format(mode=mode, grace=grace))
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    h = tw.attach(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        global_batch_size=16,
        policy=policy,
        run_dir=run_dir,
    )
    began: list[int] = []
    data = [(torch.randn(16, 4), torch.randn(16, 1)) for _ in range(steps)]
    try:
        for step_batch in h.steps(data):
            began.append(h.step_count + 1)
            for x, y in step_batch:
                h.backward(torch.nn.functional.mse_loss(model(x), y))
            h.step()
            time.sleep(0.03)  # a step the controller can follow
    finally:
        h.close()
    return began, run_dir


def test_end_job_ends_a_loop_that_ignores_should_stop_after_the_grace(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as ended:
        _train_ignoring_stop(tmp_path, "end_job", grace=2)
    assert ended.value.code == 0
    [stop] = [d for d in read_jsonl(tmp_path / "run" / "decisions.jsonl") if d["kind"] == KNOB_STOP]
    assert stop["outcome"] == "applied" and "trainwarden ended the job" in stop["detail"], stop
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # Two grace steps ran after the stop, the third was ended before its compute.
    assert summary["step"] == stop["step"] + 2 and summary["stop"]["outcome"] == "applied"
    assert summary["tokens"] <= 480 + 2 * 16
    ckpt = torch.load(tmp_path / "run" / f"checkpoint-step-{stop['step'] + 2}" / "trainwarden.pt")
    torch.nn.Linear(4, 1).load_state_dict(ckpt["model"])
    assert ckpt["step"] == stop["step"] + 2


def test_cooperative_lets_it_train_on_and_says_the_stop_was_ignored(tmp_path: Path) -> None:
    began, run_dir = _train_ignoring_stop(tmp_path, "cooperative", grace=0, steps=40)
    assert began[-1] == 40  # nobody ended it
    [stop] = [d for d in read_jsonl(run_dir / "decisions.jsonl") if d["kind"] == KNOB_STOP]
    assert stop["outcome"] == "ignored" and "outside its budget" in stop["detail"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stop"]["outcome"] == "ignored"
    from trainwarden.controller.cli import _summary_text, status_line

    assert "IGNORED" in _summary_text(summary, 0, run_dir)
    assert "STOP IGNORED" in status_line({**summary, "connected": True})
    from trainwarden.controller.report import headline, load_run

    assert any("WAS IGNORED" in line for line in headline(load_run(run_dir)))


def test_a_step_peak_is_the_training_steps_not_what_ran_between_steps(tmp_path: Path) -> None:
    """An evaluation pass between steps that allocates 256 MiB is not the next training step's peak."""
    monkey_run = tmp_path / "run"
    model = torch.nn.Linear(64, 64)
    h = tw.attach(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        global_batch_size=8,
        run_dir=monkey_run,
        sync_every=1,
    )
    data = [torch.randn(8, 64) for _ in range(6)]
    for i, step_batch in enumerate(h.steps(data)):
        for x in step_batch:
            h.backward(model(x).square().mean())
        h.step()
        if i % 2 == 0:  # "evaluation": a large temporary, touched, freed before the next step
            big = torch.ones(256 * 2**20 // 4)
            del big
    h.close()
    steps = [r for r in read_jsonl(monkey_run / "telemetry.jsonl") if r.get("event") == "step"]
    peaks = [max(m["peak_bytes"] for m in r["memory"]) for r in steps if r["memory"]]
    used = [max(m["used_bytes"] for m in r["memory"]) for r in steps if r["memory"]]
    assert len(peaks) == 6
    assert max(p - u for p, u in zip(peaks, used)) < 128 * 2**20, (peaks, used)


def test_tokens_are_counted_from_the_batch_without_padding() -> None:
    ids = torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0]])
    mask = (ids != 0).long()
    assert counted_tokens({"input_ids": ids, "attention_mask": mask}) == 4
    assert counted_tokens({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100)}) == 4
    assert counted_tokens({"input_ids": ids}) == 8
    assert counted_tokens({"pixel_values": torch.zeros(2, 3)}) is None


def _shape(adapter: str, knobs: tuple[KnobSpec, ...]) -> JobShape:
    return JobShape(
        run_id="r",
        world_size=1,
        pids=(1,),
        adapter=adapter,
        param_count=10,
        global_batch_size=8,
        tokens_per_sample=1,
        device="cpu",
        device_total_bytes=2**34,
        sync_every=1,
        knobs=knobs,
    )


def _first_step(tokens: int) -> StepRecord:
    return StepRecord(
        step=1,
        time=time.time(),
        loss=1.0,
        samples=8,
        tokens=tokens,
        step_time_s=0.1,
        lr=0.1,
        config={},
        memory=(),
    )


def test_a_policy_whose_knobs_the_job_cannot_carry_is_said_once_at_connect(tmp_path: Path) -> None:
    pf = load_policy_text(
        "version: 1\nbudget: {device_memory: 1GiB}\npolicies:\n  - kind: memory\n  - kind: compute\n"
    )
    c = Controller(tmp_path, "r", policy_file=pf)
    knobs = (
        KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=10.0),
        KnobSpec(KNOB_STOP, False, choices=(True,)),
    )
    shape = _shape("hf-trainer", knobs)
    c.hello(shape)
    c.hello(shape)  # a reconnect says nothing again
    c.exchange([_first_step(tokens=8)], [])
    lines = [d for d in read_jsonl(tmp_path / "decisions.jsonl") if d["outcome"] == "unsupported"]
    assert len(lines) == 1 and lines[0]["policy"] == "memory" and "HF Trainer" in lines[0]["reason"]
    assert c.status()["notices"] == [lines[0]["reason"]]
    c.close()


def test_the_policy_file_says_what_a_stop_does_and_refuses_a_bad_word() -> None:
    pf = load_policy_text(
        "version: 1\nbudget: {}\ncontroller: {stop: end_job, stop_grace_steps: 3}\npolicies: []\n"
    )
    assert (pf.controller.stop, pf.controller.stop_grace_steps, pf.controller.checkpoint_on_stop) == (
        "end_job",
        3,
        "auto",
    )
    with pytest.raises(PolicyFileError, match=r"controller.stop: .*'end-job'.*did you mean 'end_job'"):
        load_policy_text("version: 1\nbudget: {}\ncontroller: {stop: end-job}\npolicies: []\n")
    with pytest.raises(PolicyFileError, match="stop_grace_steps"):
        load_policy_text("version: 1\nbudget: {}\ncontroller: {stop_grace_steps: -1}\npolicies: []\n")


def test_a_token_budget_under_the_first_counted_step_is_said(tmp_path: Path) -> None:
    pf = load_policy_text("version: 1\nbudget: {tokens: 100}\npolicies:\n  - kind: compute\n")
    c = Controller(tmp_path, "r", policy_file=pf)
    c.hello(_shape("accelerate", (KnobSpec(KNOB_STOP, False, choices=(True,)),)))  # tokens counted: unknown
    c.exchange([_first_step(tokens=500)], [])
    [note] = c.status()["notices"]
    assert "smaller than one optimizer step" in note and "500 tokens counted" in note
    c.close()


def test_the_status_line_and_attach_help_say_it_plainly() -> None:
    from trainwarden.controller.cli import build_parser, status_line

    st = {
        "connected": True,
        "step": 7,
        "loss": 1.0,
        "last_decision": {"kind": "stop", "params": {"cause": "budget"}, "outcome": "applied", "step": 7},
    }
    assert "stop=" not in status_line(st) and "last: stop applied at step 7" in status_line(st)
    run = next(
        a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run")
    )
    text = " ".join(run.format_help().split())
    assert all(
        name in text for name in ("deepspeed.initialize", "accelerate.Accelerator", "transformers.Trainer")
    )
