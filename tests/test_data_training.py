"""The data mixture in real training: the GPT of the examples on the stdlib's four domains."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import REPO
from torch.utils.data import DataLoader

from trainwarden.adapters import pytorch as tw
from trainwarden.adapters.data import MixtureDataset, MixtureSampler
from trainwarden.controller.protocol import KNOB_DOMAIN_WEIGHTS, KNOB_PRUNE_FRACTION, Action
from trainwarden.examples.domains import Windows, stdlib_domains
from trainwarden.examples.gpt import GPT, GPTConfig
from trainwarden.examples.train_mixture import Options, train

MIXING = REPO / "policies" / "examples" / "data_mixing.yaml"


@pytest.mark.slow
def test_weights_move_away_from_the_degraded_domain_within_400_steps(tmp_path: Path) -> None:
    r = train(Options(steps=400, policy=str(MIXING), run_dir=str(tmp_path / "run"), max_bytes=100_000))
    weights = r["weights"]
    assert all(abs(sum(w.values()) - 1) < 1e-9 and min(w.values()) >= 0.05 - 1e-12 for _, w in weights)
    below = [step for step, w in weights if w["noise"] < 0.2]
    assert below, f"the degraded domain kept its weight: {weights}"
    assert below[0] <= 400
    final = weights[-1][1]
    assert final["noise"] == min(final.values()), final
    decisions = [json.loads(line) for line in (tmp_path / "run" / "decisions.jsonl").read_text().splitlines()]
    mixing = [d for d in decisions if d["kind"] == KNOB_DOMAIN_WEIGHTS and d["outcome"] == "applied"]
    assert len(mixing) >= 2
    last = mixing[-1]
    assert "per-domain loss" in last["reason"] and "learnability" in last["reason"]
    assert set(last["params"]["value"]) == {"code", "text", "docstrings", "noise"}
    assert set(last["params"]["state"]["loss"]) == {"code", "text", "docstrings", "noise"}


def _job(
    tmp_path: Path, name: str
) -> tuple[GPT, torch.optim.Optimizer, MixtureSampler, DataLoader, tw.Handle]:
    torch.manual_seed(0)
    split = stdlib_domains(60_000)
    # 40 windows a domain: examples come back within the run, so pruning has records to act on.
    data = MixtureDataset({d: Windows(split.train[d][: 40 * 32 + 1], 32) for d in ("code", "text", "noise")})
    mix = MixtureSampler(data, seed=5, max_prune_fraction=0.3, prune_refresh_steps=5)
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    opt = model.configure_optimizer(lr=3e-3)
    loader = DataLoader(data, batch_size=8, sampler=mix, num_workers=2)
    handle = tw.attach(
        model, opt, global_batch_size=8, micro_batch_size=4, run_dir=tmp_path / name, mixture=mix
    )
    return model, opt, mix, loader, handle


def _steps(model, mix, loader, handle, n: int, actions: dict[int, Action]) -> list[tuple[list[int], float]]:
    out = []
    for step_batch in handle.steps(loader):
        indices: list[int] = []
        for x, y, index in step_batch:
            _, per_sample = model(x, y, reduction="none")
            mix.observe(per_sample, index)
            handle.backward(per_sample.mean())
            indices += index.tolist()
        handle.step()
        if handle.step_count in actions:
            assert handle.apply(actions[handle.step_count]).outcome == "applied"
        out.append((indices, handle.last_loss))
        if len(out) == n:
            return out
    raise AssertionError("the loader ran out")


@pytest.mark.slow
def test_a_resumed_job_trains_on_exactly_the_same_batches(tmp_path: Path) -> None:
    """Train, change the weights and the pruned fraction at step boundaries (as the agent does),
    checkpoint model, optimizer and mixture, train on; a fresh job loaded from the checkpoint
    sees the same samples and the same losses, bit for bit, although the first job's DataLoader
    workers had prefetched past the checkpoint."""
    actions = {
        6: Action(KNOB_DOMAIN_WEIGHTS, {"value": {"code": 0.6, "text": 0.3, "noise": 0.1}}, "test", 7),
        12: Action(KNOB_PRUNE_FRACTION, {"value": 0.2}, "test", 13),
        22: Action(KNOB_DOMAIN_WEIGHTS, {"value": {"code": 0.2, "text": 0.7, "noise": 0.1}}, "test", 23),
    }
    model, opt, mix, loader, handle = _job(tmp_path, "a")
    _steps(model, mix, loader, handle, 20, actions)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "mix": mix.state_dict()})
    ckpt = {
        k: json.loads(json.dumps(v, default=lambda t: t.tolist())) if k == "mix" else v
        for k, v in ckpt.items()
    }
    after = _steps(model, mix, loader, handle, 10, actions)
    handle.close()
    assert mix.pruned_fraction() > 0

    model2, opt2, mix2, loader2, handle2 = _job(tmp_path, "b")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    mix2.load_state_dict(ckpt["mix"])  # through JSON: a checkpoint may be any serialisation
    handle2.step_count = 20
    again = _steps(model2, mix2, loader2, handle2, 10, actions)
    handle2.close()
    assert [i for i, _ in again] == [i for i, _ in after]
    assert [loss for _, loss in again] == [loss for _, loss in after]
    assert mix2.weights == mix.weights and mix2.pruned_fraction() == mix.pruned_fraction()
