"""The data mixture under DeepSpeed: `initialize(training_data=MixtureDataset, mixture=sampler)`."""

from __future__ import annotations

import pytest
from ds_helpers import SEQ, deepspeed_env, ds_config, tiny_gpt  # noqa: F401 - deepspeed_env is a fixture

import trainwarden.adapters.deepspeed as twds
from trainwarden.adapters.data import MixtureDataset, MixtureSampler
from trainwarden.controller.protocol import KNOB_DOMAIN_WEIGHTS, Action
from trainwarden.examples.domains import Windows, stdlib_domains

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("deepspeed_env")]


def test_training_data_is_drawn_through_the_mixture_and_its_knobs_apply() -> None:
    split = stdlib_domains(40_000)
    data = MixtureDataset({d: Windows(split.train[d][:8000], SEQ) for d in ("code", "text", "noise")})
    mix = MixtureSampler(data, seed=1)
    model = tiny_gpt()
    h, _, loader, _ = twds.initialize(
        model=model,
        model_parameters=model.parameters(),
        training_data=data,
        config=ds_config(stage=0),
        attach_agent=False,
        mixture=mix,
    )
    try:
        assert loader.data_sampler is mix
        assert KNOB_DOMAIN_WEIGHTS in {k.name for k in h._knob_specs()}
        it = iter(loader)

        def steps(n: int) -> list[int]:
            seen: list[int] = []
            for _ in range(n):
                for _ in range(h.gradient_accumulation_steps()):
                    x, y, index = next(it)
                    _, per_sample = h(x, y, reduction="none")
                    mix.observe(per_sample, index)  # the same forward pass
                    h.backward(per_sample.mean())
                    h.step()
                    seen += index.tolist()
            return seen

        first = steps(2)
        assert len(set(data.domain_of(first).tolist())) > 1
        assert mix.state_dict()["position"] == 2 * h.train_batch_size()  # consumed, step by step
        outcome = h.apply(Action(KNOB_DOMAIN_WEIGHTS, {"value": {"code": 1.0}}, "test", 3))
        assert outcome.outcome == "applied", outcome
        assert h.config()[KNOB_DOMAIN_WEIGHTS] == {"code": 1.0, "text": 0.0, "noise": 0.0}
        after = steps(2)  # trainwarden's loader reads in the process: no batch drawn before the change
        assert set(data.domain_of(after).tolist()) == {0}
    finally:
        h.close()
