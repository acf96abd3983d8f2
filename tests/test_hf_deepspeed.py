"""The HF Trainer callback under the Trainer's own DeepSpeed integration (real DeepSpeed on the
CPU): telemetry and the stop work; the LR multiplier is not offered and a request for it is
refused with the reason (DeepSpeed steps inside backward, before any callback event)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate_helpers import fresh_accelerate_state
from ds_helpers import ds_env
from test_hf import Inject
from transformers import Trainer, TrainingArguments

from trainwarden.adapters.hf import TrainwardenCallback
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_STOP, Action
from trainwarden.controller.runlog import read_jsonl
from trainwarden.examples.accelerate_train import CorpusWindows, gpt2

pytestmark = pytest.mark.slow
BLOCK = 32


@pytest.fixture(autouse=True)
def _one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    ds_env()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")  # the Trainer sets it process-wide
    monkeypatch.delenv("TRAINWARDEN_DISABLE", raising=False)
    monkeypatch.delenv("TRAINWARDEN_ENDPOINT", raising=False)
    with fresh_accelerate_state():
        yield


def test_under_deepspeed_the_callback_reports_and_stops_but_does_not_offer_the_multiplier(
    tmp_path: Path,
) -> None:
    data = CorpusWindows(8 * 10, BLOCK, seed=0, max_bytes_per_domain=300_000)
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
    }
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=8,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        deepspeed=ds,
        logging_steps=1,
    )
    tw = TrainwardenCallback(run_dir=tmp_path / "run", sync_every=1)
    probe = Inject(
        tw,
        {
            2: Action(KNOB_LR_MULTIPLIER, {"value": 0.5}, "test", 2),
            3: Action(KNOB_STOP, {}, "budget spent", 3),
        },
    )
    trainer = Trainer(
        model=gpt2(BLOCK, n_layer=1, n_embd=32, n_head=2),
        args=args,
        train_dataset=data,
        data_collator=lambda rows: {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "labels": torch.stack([r["labels"] for r in rows]),
        },
        callbacks=[tw, probe],
    )
    trainer.train()
    assert probe.outcomes == ["rejected", "applied"]
    assert trainer.state.global_step == 4  # stopped at the boundary after the stop was handed over
    assert (tmp_path / "out" / "checkpoint-4").is_dir()
    log = list(read_jsonl(tmp_path / "run" / "telemetry.jsonl"))
    hello = next(r for r in log if r.get("event") == "hello")
    assert {k["name"] for k in hello["shape"]["knobs"]} == {KNOB_STOP}
    records = [r for r in log if r.get("event") == "step"]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records] == pytest.approx(logged, abs=1e-3)
    assert all(r["config"][KNOB_LR_MULTIPLIER] == 1.0 for r in records)
