"""The live data mixture (adapters/data/) through the Accelerate drop-in: its knobs are reported
and carried at a step boundary, the per-domain loss it observes goes out with each step, and the
loader Accelerate prepared draws the new mixture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from accelerate_helpers import fresh_accelerate_state

from trainwarden.adapters.accelerate import Accelerator
from trainwarden.adapters.data import MixtureDataset, MixtureSampler
from trainwarden.controller.protocol import KNOB_DOMAIN_WEIGHTS, Action
from trainwarden.examples.accelerate_train import CorpusWindows, DomainWindows, gpt2, per_sample_loss

BLOCK = 32


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")
    with fresh_accelerate_state():
        yield


def test_mixture_knobs_and_domain_loss_through_the_accelerator() -> None:
    windows = CorpusWindows(400, BLOCK, seed=0, max_bytes_per_domain=300_000)
    data = MixtureDataset({"code": DomainWindows(windows, 0), "prose": DomainWindows(windows, 1)})
    mix = MixtureSampler(data, seed=0)
    torch.manual_seed(0)
    acc = Accelerator(attach_agent=False, mixture=mix)
    model = gpt2(BLOCK, n_layer=1, n_embd=32, n_head=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=mix)
    model, opt, loader = acc.prepare(model, opt, loader)

    specs = {k.name for k in acc._knob_specs()}
    assert KNOB_DOMAIN_WEIGHTS in specs and acc.config()[KNOB_DOMAIN_WEIGHTS] == {"code": 0.5, "prose": 0.5}
    domains_per_step: list[set[str]] = []
    seen: set[str] = set()
    for batch in loader:
        with acc.accumulate(model):
            per_sample = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["input_ids"])
            mix.observe(per_sample, batch["index"])
            acc.backward(per_sample.mean())
            seen |= {data.names[d] for d in data.domain_of(batch["index"].numpy())}
            opt.step()
            opt.zero_grad()
        domains_per_step.append(seen)
        seen = set()
        assert set(acc.last_domain_loss) == domains_per_step[-1]  # what the step drew, observed
        if acc.step_count == 2:
            action = Action(KNOB_DOMAIN_WEIGHTS, {"value": {"code": 1.0, "prose": 0.0}}, "test", 2)
            assert acc.apply(action).outcome == "applied"
        if acc.step_count == 8:
            break
    assert domains_per_step[0] == {"code", "prose"}
    # Accelerate's loader prefetched step 3's batch before the change; from step 4 on only code.
    assert all(s == {"code"} for s in domains_per_step[3:]), domains_per_step
    assert acc.config()[KNOB_DOMAIN_WEIGHTS] == {"code": 1.0, "prose": 0.0}
