"""The live data mixture (adapters/data*.py) on real stdlib text, through real DataLoaders."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from trainwarden.adapters.data import (
    DataMixtureError,
    MixtureDataset,
    MixtureIterableDataset,
    MixtureSampler,
    domain_losses,
)
from trainwarden.controller.protocol import (
    CONFIG_DATA_STATE,
    KNOB_CURRICULUM_LEVEL,
    KNOB_DOMAIN_WEIGHTS,
    KNOB_PRUNE_FRACTION,
    Action,
)
from trainwarden.examples.domains import Windows, difficulty, stdlib_domains

BLOCK = 16
BATCH = 8


@pytest.fixture(scope="module")
def windows() -> dict[str, Windows]:
    split = stdlib_domains(60_000)
    return {d: Windows(split.train[d][:20_000], BLOCK) for d in ("code", "text", "noise")}


def _action(kind: str, value: object, state: dict | None = None) -> Action:
    params = {"value": value} if state is None else {"value": value, "state": state}
    return Action(kind=kind, params=params, reason="test", step=1)


def _sampler(windows: dict[str, Windows], **kw: object) -> tuple[MixtureDataset, MixtureSampler]:
    data = MixtureDataset(windows)
    diff = {d: difficulty(w) for d, w in windows.items()}
    return data, MixtureSampler(data, seed=3, difficulty=diff, max_prune_fraction=0.5, **kw)


def _run(
    data: MixtureDataset,
    mix: MixtureSampler,
    steps: range,
    changes: dict[int, list[Action]],
    workers: int,
    seen: list[torch.Tensor],
    save_at: int | None = None,
) -> dict | None:
    """Consume batches as a training loop does: observe losses (a fixed function of the sample),
    tell the mixture the step consumed its samples, apply the actions due at that step."""
    saved = None
    loader = DataLoader(data, batch_size=BATCH, sampler=mix, num_workers=workers)
    it = iter(loader)
    for step in steps:
        x, _, index = next(it)
        seen.append(index.clone())
        mix.observe(x.float().mean(dim=1) / 255 + 0.1 * (index % 7).float(), index)
        mix.on_step(step, BATCH)
        mix.take_domain_loss()
        for a in changes.get(step, []):
            mix.apply(a)
        if step == save_at:
            saved = mix.state_dict()
    del it
    return saved


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_next_batches_exactly_with_changes_in_flight(windows, workers) -> None:
    """Weights, curriculum and pruning change while the DataLoader has batches prefetched; a
    mixture restored from the checkpoint draws the same batches as the original after it."""
    changes = {
        3: [_action(KNOB_DOMAIN_WEIGHTS, {"code": 0.6, "text": 0.3, "noise": 0.1}, {"step": 3})],
        5: [_action(KNOB_CURRICULUM_LEVEL, 0.5)],
        7: [_action(KNOB_PRUNE_FRACTION, 0.2)],
        9: [_action(KNOB_DOMAIN_WEIGHTS, {"code": 0.2, "text": 0.2, "noise": 0.6})],
        14: [_action(KNOB_CURRICULUM_LEVEL, 1.0)],
    }
    # Small domains (50 windows each), so examples come back and pruning has records to act on.
    windows = {d: Windows(bytes(w.data[: 50 * BLOCK + 1].tolist()), BLOCK) for d, w in windows.items()}
    data, mix = _sampler(windows, prune_refresh_steps=4)
    first: list[torch.Tensor] = []
    saved = _run(data, mix, range(1, 21), changes, workers, first, save_at=8)
    assert saved is not None
    assert mix.pruned_fraction() > 0  # pruning did happen in the part that is compared

    data2, mix2 = _sampler(windows, prune_refresh_steps=4)
    mix2.load_state_dict(saved)
    again: list[torch.Tensor] = []
    _run(data2, mix2, range(9, 21), changes, workers, again)
    for a, b in zip(first[8:], again, strict=True):
        assert torch.equal(a, b)
    assert mix2.weights == mix.weights
    assert mix2.data_state == mix.data_state == {KNOB_DOMAIN_WEIGHTS: {"step": 3}}


def test_batches_are_tagged_and_per_domain_loss_needs_no_extra_forward(windows) -> None:
    data, mix = _sampler(windows)
    x, y, index = next(iter(DataLoader(data, batch_size=64, sampler=mix)))
    assert x.shape == y.shape == (64, BLOCK) and torch.equal(x[:, 1:], y[:, :-1])
    dom = torch.as_tensor(data.domain_of(index))
    losses = torch.rand(64, generator=torch.Generator().manual_seed(0))
    mix.observe(losses, index)
    got = mix.take_domain_loss()
    want = domain_losses(losses, dom, data.names)
    assert got.keys() == want.keys() == set(data.names)
    for k in got:
        assert got[k] == pytest.approx(want[k])
        assert want[k] == pytest.approx(float(losses[dom == data.names.index(k)].mean()))
    for i in index.tolist():  # the tag is the mixture index: the same window comes back
        d, local = data.locate(i)
        assert torch.equal(data[i][0], windows[data.names[d]][local][0])


def test_weights_steer_the_draws_and_bad_values_are_refused(windows) -> None:
    data, mix = _sampler(windows)
    out = mix.apply(_action(KNOB_DOMAIN_WEIGHTS, {"code": 0, "text": 0, "noise": 1}))
    assert out == ("applied", "weights now code 0.000, text 0.000, noise 1.000")
    drawn = [next(iter(mix)) for _ in range(50)]
    assert set(data.domain_of(drawn).tolist()) == {data.names.index("noise")}

    outcome, detail = mix.apply(_action(KNOB_DOMAIN_WEIGHTS, {"code": 1, "prose": 1}))
    assert outcome == "rejected" and "unknown domain 'prose'" in detail and "code, text, noise" in detail
    outcome, detail = mix.apply(_action(KNOB_DOMAIN_WEIGHTS, {"code": -1}))
    assert outcome == "rejected" and "finite number >= 0" in detail
    outcome, detail = mix.apply(_action(KNOB_PRUNE_FRACTION, 0.7))
    assert outcome == "rejected" and "max_prune_fraction" in detail
    assert mix.weights["noise"] == 1.0  # unchanged by the refused actions
    with pytest.raises(DataMixtureError, match="unknown domain 'prose'"):
        MixtureSampler(data, weights={"prose": 1.0})
    with pytest.raises(DataMixtureError, match="positive sum"):
        MixtureSampler(data, weights={"code": 0.0})


def test_curriculum_draws_only_the_easiest_windows(windows) -> None:
    data, mix = _sampler(windows, curriculum_level=0.2)
    diff = {d: difficulty(w) for d, w in windows.items()}
    drawn = [next(iter(mix)) for _ in range(300)]
    for i in drawn:
        d, local = data.locate(i)
        scores = torch.as_tensor(diff[data.names[d]])
        assert float((scores < scores[local]).float().mean()) < 0.2


def test_policy_state_round_trips_through_the_config(windows) -> None:
    _, mix = _sampler(windows)
    state = {"step": 40, "loss": {"code": 2.5}, "score": {"code": 0.01}}
    w = {"code": 0.5, "text": 0.3, "noise": 0.2}
    assert mix.apply(_action(KNOB_DOMAIN_WEIGHTS, w, state))[0] == "applied"
    cfg = mix.config()
    assert cfg[KNOB_DOMAIN_WEIGHTS] == pytest.approx(w)
    assert cfg[CONFIG_DATA_STATE] == {KNOB_DOMAIN_WEIGHTS: state}
    # The same weights with new state: applied (the state is the policy's memory), not a noop.
    assert mix.apply(_action(KNOB_DOMAIN_WEIGHTS, w, {**state, "step": 60}))[0] == "applied"
    assert mix.apply(_action(KNOB_DOMAIN_WEIGHTS, w, {**state, "step": 60}))[0] == "noop"


def _domains_of(batch_tags: list[torch.Tensor]) -> list[int]:
    return [int(d) for t in batch_tags for d in t]


def test_iterable_weights_reach_the_workers(windows) -> None:
    streams = {"code": windows["code"], "noise": windows["noise"]}
    mix = MixtureIterableDataset(streams, seed=1)
    loader = DataLoader(mix, batch_size=BATCH, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    before = [next(it)[2] for _ in range(4)]
    assert set(_domains_of(before)) == {0, 1}
    mix.apply(_action(KNOB_DOMAIN_WEIGHTS, {"code": 1.0, "noise": 0.0}))
    # Two workers x two prefetched batches (and one each being built) may carry the old weights;
    # after them, only code.
    after = [next(it)[2] for _ in range(14)]
    assert set(_domains_of(after[8:])) == {0}
    del it


def test_iterable_resume_without_workers_continues_the_same_stream(windows) -> None:
    streams = {"code": windows["code"], "text": windows["text"]}
    mix = MixtureIterableDataset(streams, seed=2, weights={"code": 0.7, "text": 0.3})
    it = iter(DataLoader(mix, batch_size=BATCH))
    for _ in range(5):
        next(it)
    saved = mix.state_dict()
    rest = [next(it) for _ in range(5)]
    mix2 = MixtureIterableDataset(streams, seed=2)
    mix2.load_state_dict(saved)
    it2 = iter(DataLoader(mix2, batch_size=BATCH))
    for a, b in zip(rest, (next(it2) for _ in range(5)), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert mix2.weights == pytest.approx({"code": 0.7, "text": 0.3})


def test_reported_domain_loss_is_averaged_over_samples_not_steps(windows) -> None:
    """A domain with one sample a step must not report that one sample's loss: the policy reads
    differences of these losses. The report is an EMA over the domain's last ~128 samples."""
    data, mix = _sampler(windows)
    code = data.offsets[data.names.index("code")]
    mix.observe(torch.full((64,), 2.0), torch.arange(code, code + 64))
    assert mix.take_domain_loss() == {"code": 2.0}
    mix.observe(torch.tensor([10.0]), torch.tensor([code]))  # one outlier sample
    got = mix.take_domain_loss()["code"]
    assert got == pytest.approx(2.0 + 8.0 / 128)
    assert mix.take_domain_loss() == {}  # nothing observed since: nothing reported


def test_pruning_leaves_out_only_what_stopped_falling_and_at_most_half_of_a_domain(windows) -> None:
    data, mix = _sampler(windows)
    tracker = mix.tracker
    n = len(data)
    everything = torch.arange(n)
    # Two visits: the noise domain's loss stays flat (unlearnable), the others fall 10%.
    noise = torch.as_tensor(data.domain_of(everything) == data.names.index("noise"))
    tracker.observe(everything.numpy(), torch.full((n,), 3.0).numpy())
    tracker.observe(everything.numpy(), torch.where(noise, 3.0, 2.7).numpy())
    pruned = tracker.choose_pruned(0.5, data._ends)
    doms = data.domain_of(pruned)
    size = data.sizes[data.names.index("noise")]
    # Only the flat ones (still-falling examples teach, whatever the fraction allows), and at most
    # half of their domain.
    assert set(doms.tolist()) == {data.names.index("noise")}
    assert len(pruned) == int(0.5 * size)
    assert mix.apply(_action(KNOB_PRUNE_FRACTION, 0.3)) == (
        "applied",
        f"{mix.pruned_fraction():.1%} of the examples left out now",
    )
    assert 0 < mix.pruned_fraction() <= 0.3
