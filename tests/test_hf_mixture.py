"""The live data mixture (adapters/data/) under the HF Trainer: the callback carries its knobs
at a step boundary, the Trainer's loader (drawing from the MixtureSampler) follows them, and the
per-domain loss observed in `compute_loss` goes to the controller with each step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from test_hf import Inject
from transformers import Trainer, TrainingArguments

from trainwarden.adapters.data import MixtureDataset, MixtureSampler
from trainwarden.adapters.hf import TrainwardenCallback
from trainwarden.controller.protocol import KNOB_DOMAIN_WEIGHTS, Action
from trainwarden.controller.runlog import read_jsonl
from trainwarden.examples.accelerate_train import CorpusWindows, DomainWindows, gpt2, per_sample_loss

BLOCK = 32


class MixtureTrainer(Trainer):
    """What a user writes to train on the mixture: its sampler, and its per-sample losses."""

    def __init__(self, *args: Any, mixture: MixtureSampler, tw: TrainwardenCallback, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mixture, self.tw = mixture, tw
        self.domains_per_step: list[set[str]] = [set()]

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        return self.mixture

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, **kw: Any) -> Any:
        index = inputs.pop("index")
        logits = model(input_ids=inputs["input_ids"]).logits
        per_sample = per_sample_loss(logits, inputs["input_ids"])
        self.mixture.observe(per_sample, index)
        self.tw.log_loss(per_sample.mean())  # computed outside the model: no output.loss to read
        names = self.mixture.dataset.names
        self.domains_per_step[-1] |= {names[d] for d in self.mixture.dataset.domain_of(index.numpy())}
        return per_sample.mean()


def test_the_trainer_draws_the_mixture_the_callback_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRAINWARDEN_DISABLE", raising=False)
    monkeypatch.delenv("TRAINWARDEN_ENDPOINT", raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    windows = CorpusWindows(400, BLOCK, seed=0, max_bytes_per_domain=300_000)
    data = MixtureDataset({"code": DomainWindows(windows, 0), "prose": DomainWindows(windows, 1)})
    mix = MixtureSampler(data, seed=0, num_samples=8 * 7)
    tw = TrainwardenCallback(run_dir=tmp_path / "run", sync_every=1, mixture=mix)
    probe = Inject(tw, {2: Action(KNOB_DOMAIN_WEIGHTS, {"value": {"code": 1.0, "prose": 0.0}}, "test", 2)})
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=7,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = MixtureTrainer(
        model=gpt2(BLOCK, n_layer=1, n_embd=32, n_head=2),
        args=args,
        train_dataset=data,
        data_collator=lambda rows: {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "index": torch.tensor([r["index"] for r in rows]),
        },
        callbacks=[tw, probe],
        mixture=mix,
        tw=tw,
    )

    class NextStep(Inject):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            trainer.domains_per_step.append(set())

    trainer.add_callback(NextStep(tw, {}))
    trainer.train()
    steps = trainer.domains_per_step[:-1]
    assert probe.outcomes == ["applied"]
    assert steps[0] == {"code", "prose"}
    # The Trainer's loader prefetched step 3's batch before the change; from step 4 on only code.
    assert all(s == {"code"} for s in steps[3:]), steps
    records = [r for r in read_jsonl(tmp_path / "run" / "telemetry.jsonl") if r.get("event") == "step"]
    assert [set(r["domain_loss"]) for r in records] == steps
    assert all(0 < r["loss"] < 10 for r in records)
    assert records[-1]["config"][KNOB_DOMAIN_WEIGHTS] == {"code": 1.0, "prose": 0.0}
    hello = next(r for r in read_jsonl(tmp_path / "run" / "telemetry.jsonl") if r.get("event") == "hello")
    assert KNOB_DOMAIN_WEIGHTS in {k["name"] for k in hello["shape"]["knobs"]}
