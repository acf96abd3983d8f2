"""The plain-PyTorch adapter: micro-batch switches keep every step's samples and gradient; the LR
multiplier rides on top of the user's schedule; bad actions are refused, never raised."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from trainwarden.adapters import pytorch as tw
from trainwarden.adapters.core.connect import AttachError
from trainwarden.adapters.core.probes import CpuProbe
from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_MICRO_BATCH, KNOB_STOP, Action
from trainwarden.examples.gpt import GPT, GPTConfig

GLOBAL = 16


@pytest.fixture(autouse=True)
def no_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    """No controller at all: the adapter still carries its knobs, nothing touches the network."""
    for name in ("TRAINWARDEN_ENDPOINT", "TRAINWARDEN_TOKEN", "TRAINWARDEN_POLICY", "TRAINWARDEN_SYNC_EVERY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRAINWARDEN_DISABLE", "1")


def _act(kind: str, value: object = None) -> Action:
    params = {} if value is None else {"value": value}
    return Action(kind=kind, params=params, reason="test", step=0)


def _loader(n_samples: int, user_batch: int, dim: int = 6, seed: int = 0) -> Iterator[tuple]:
    """(index, x, y) batches of a fixed random regression set, in a fixed order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, dim, generator=g)
    y = torch.randn(n_samples, 1, generator=g)
    idx = torch.arange(n_samples)
    for s in range(0, n_samples, user_batch):
        yield idx[s : s + user_batch], x[s : s + user_batch], y[s : s + user_batch]


def _attach(model: torch.nn.Module, opt: torch.optim.Optimizer, **kw: object) -> tw.Handle:
    kw.setdefault("global_batch_size", GLOBAL)
    return tw.attach(model, opt, **kw)


# ---- a micro-batch switch changes how a step is cut, nothing else ---------------------------------


def _record_run(switches: dict[int, int], steps: int = 6) -> tuple[list[list[int]], list[int]]:
    """Train `steps` steps from micro 16 with user batches of 5; switch the micro-batch after the
    steps in `switches`. Returns the sample indices of each step and its micro-batch count."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    h = _attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=16)
    seen: list[list[int]] = []
    counts: list[int] = []
    for step_batch in h.steps(_loader(GLOBAL * steps + 7, user_batch=5)):
        expected_count = h.gradient_accumulation_steps
        assert len(step_batch) == expected_count
        samples: list[int] = []
        n_micro = 0
        for idx, x, y in step_batch:
            assert len(idx) == h.micro_batch_size
            samples += idx.tolist()
            n_micro += 1
            h.backward(torch.nn.functional.mse_loss(model(x), y))
        assert n_micro == expected_count
        seen.append(samples)
        counts.append(n_micro)
        h.step()
        if h.step_count in switches:
            out = h.apply(_act(KNOB_MICRO_BATCH, switches[h.step_count]))
            assert out.outcome == "applied", out.detail
            assert h.config()["gradient_accumulation_steps"] == GLOBAL // switches[h.step_count]
        if h.step_count == steps:
            break
    h.close()
    return seen, counts


def test_a_micro_batch_switch_keeps_each_steps_samples_and_order() -> None:
    plain, plain_counts = _record_run({})
    switched, counts = _record_run({2: 4, 4: 2})
    assert switched == plain  # the same samples per optimizer step, in the same order
    assert [len(s) for s in switched] == [GLOBAL] * 6
    assert switched[0] == list(range(16)) and switched[5] == list(range(80, 96))
    assert plain_counts == [1] * 6
    assert counts == [1, 1, 4, 4, 8, 8]  # accumulation follows: 16 -> 4 -> 2 samples per micro-batch


def _train(
    make_model, make_opt, switches: dict[int, int], steps: int, batch_fn, micro: int = 16
) -> torch.nn.Module:
    torch.manual_seed(1)
    model = make_model()
    h = _attach(model, make_opt(model), micro_batch_size=micro)
    for step_batch in h.steps(batch_fn()):
        for micro_batch in step_batch:
            h.backward(micro_batch_loss(model, micro_batch))
        h.step()
        if h.step_count in switches:
            assert h.apply(_act(KNOB_MICRO_BATCH, switches[h.step_count])).outcome == "applied"
        if h.step_count == steps:
            break
    h.close()
    return model


def micro_batch_loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    if isinstance(model, GPT):
        return model(batch[0], batch[1])[1]
    _, x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _gpt_batches() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        data = torch.randint(0, 256, (GLOBAL, 9), generator=g)
        yield data[:, :-1], data[:, 1:]


@pytest.mark.parametrize(
    ("name", "make_model", "make_opt", "batches"),
    [
        (
            "linear-sgd",
            lambda: torch.nn.Linear(6, 1),
            lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
            lambda: _loader(GLOBAL * 8, user_batch=GLOBAL),
        ),
        (
            "gpt-adamw",
            lambda: GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)),
            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
            _gpt_batches,
        ),
    ],
    ids=["linear-sgd-momentum", "gpt-adamw"],
)
def test_a_micro_batch_switch_leaves_the_parameters_unchanged(name, make_model, make_opt, batches) -> None:
    steps = 6
    plain = _train(make_model, make_opt, {}, steps, batches)
    switched = _train(make_model, make_opt, {2: 4, 4: 1}, steps, batches)
    ref = dict(plain.named_parameters())
    for pname, p in switched.named_parameters():
        assert torch.allclose(p, ref[pname], rtol=0, atol=1e-6), f"{name}: {pname} differs after a switch"
    # ...and training did something (the comparison is not between two untouched models).
    torch.manual_seed(1)
    init = make_model()
    assert any(not torch.allclose(p, q) for p, q in zip(init.parameters(), plain.parameters()))


def test_the_step_loss_is_the_global_mean_whatever_the_micro_batch() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    h = _attach(model, torch.optim.SGD(model.parameters(), lr=0.0), micro_batch_size=2)
    (step_batch,) = [sb for sb, _ in zip(h.steps(_loader(GLOBAL, user_batch=3)), range(1))]
    whole = torch.cat([x for _, x, _ in step_batch]), torch.cat([y for _, _, y in step_batch])
    for _, x, y in step_batch:
        h.backward(torch.nn.functional.mse_loss(model(x), y))
    h.step()
    with torch.no_grad():
        want = float(torch.nn.functional.mse_loss(model(whole[0]), whole[1]))
    assert h.last_loss == pytest.approx(want)
    h.close()


# ---- the LR multiplier ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["lambda", "exponential"])
def test_lr_multiplier_applies_on_top_of_the_schedule_every_step(schedule: str) -> None:
    torch.manual_seed(0)
    base = 0.1
    model = torch.nn.Linear(6, 1, bias=False, dtype=torch.float64)  # float64: a tight check of delta
    opt = torch.optim.SGD(model.parameters(), lr=base)  # no momentum: delta = lr_used x grad

    def factor(step: int) -> float:
        return (step + 1) / 4 if step < 4 else 0.8**step

    if schedule == "lambda":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    else:  # chainable: it reads the group's lr, so a multiplier left there would compound
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)

        def factor(step: int) -> float:
            return 0.8**step

    h = _attach(model, opt, scheduler=sched, micro_batch_size=8)
    assert h.apply(_act(KNOB_LR_MULTIPLIER, 0.5)).outcome == "applied"
    assert h.config()[KNOB_LR_MULTIPLIER] == 0.5
    batches = h.steps(_loader(GLOBAL * 11, user_batch=GLOBAL))
    for i in range(10):
        scheduled = base * factor(i)
        assert sched.get_last_lr()[0] == pytest.approx(scheduled, rel=1e-12)
        step_batch = next(batches)
        for _, x, y in step_batch:
            h.backward(torch.nn.functional.mse_loss(model(x.double()), y.double()))
        grad = model.weight.grad.clone()
        before = model.weight.detach().clone()
        h.step()
        used = scheduled * 0.5
        assert h.last_lr == pytest.approx(used, rel=1e-12)
        delta = before - model.weight.detach()
        assert torch.allclose(delta, used * grad, rtol=1e-9, atol=1e-15), (
            f"step {i}: the update used another lr"
        )
        # The scheduler's own LR is left as it scheduled it, never multiplied.
        assert opt.param_groups[0]["lr"] == pytest.approx(base * factor(i + 1), rel=1e-12)
    # Back to 1: the schedule alone again.
    assert h.apply(_act(KNOB_LR_MULTIPLIER, 1)).outcome == "applied"
    for _, x, y in next(batches):
        h.backward(torch.nn.functional.mse_loss(model(x.double()), y.double()))
    h.step()
    assert h.last_lr == pytest.approx(base * factor(10), rel=1e-12)
    h.close()


# ---- actions: refused with a reason, never raised ------------------------------------------------


def _handle(**kw: object) -> tw.Handle:
    model = torch.nn.Linear(2, 1)
    return _attach(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=8, **kw)


@pytest.mark.parametrize(
    ("kind", "value", "says"),
    [
        (KNOB_MICRO_BATCH, 5, "must divide the global batch 16, got 5"),
        (KNOB_MICRO_BATCH, 0, "must divide the global batch 16, got 0"),
        (KNOB_MICRO_BATCH, 32, "must divide the global batch 16, got 32"),
        (KNOB_MICRO_BATCH, "4", "got '4'"),
        (KNOB_MICRO_BATCH, True, "got True"),
        (KNOB_MICRO_BATCH, None, "got None"),
        (KNOB_LR_MULTIPLIER, -0.5, "lr_multiplier must be a number in [0, 10.0], got -0.5"),
        (KNOB_LR_MULTIPLIER, True, "got True"),
        (KNOB_LR_MULTIPLIER, 11.0, "got 11.0"),
        (KNOB_LR_MULTIPLIER, "0.5", "got '0.5'"),
        ("zero_stage", 3, "the pytorch adapter has no knob 'zero_stage'"),
    ],
)
def test_bad_actions_are_rejected_with_a_reason(kind: str, value: object, says: str) -> None:
    h = _handle()
    before = h.config()
    out = h.apply(_act(kind, value))
    assert out.outcome == "rejected"
    assert says in out.detail
    assert h.config() == before
    assert not h.should_stop
    h.close()


def test_noops_and_stop() -> None:
    h = _handle()
    a = _act(KNOB_MICRO_BATCH, 8)
    out = h.apply(a)
    assert (out.outcome, out.action_id) == ("noop", a.id)
    assert "already" in out.detail
    assert h.apply(_act(KNOB_LR_MULTIPLIER, 1.0)).outcome == "noop"
    assert not h.should_stop
    out = h.apply(_act(KNOB_STOP))
    assert out.outcome == "applied"
    assert h.should_stop and h.config()[KNOB_STOP] is True
    assert h.apply(_act(KNOB_STOP)).outcome == "noop"
    h.close()


def test_knobs_are_reported_with_what_they_accept() -> None:
    h = _handle()
    specs = {k.name: k for k in h.agent.shape.knobs}
    assert specs[KNOB_MICRO_BATCH].choices == (1, 2, 4, 8, 16)
    assert specs[KNOB_MICRO_BATCH].value == 8
    assert specs[KNOB_LR_MULTIPLIER].accepts(0.5) and not specs[KNOB_LR_MULTIPLIER].accepts(-1)
    assert h.agent.shape.global_batch_size == GLOBAL
    h.close()


@pytest.mark.parametrize(
    ("global_batch", "micro", "says"),
    [
        (16, 5, "micro_batch_size 5 must divide global_batch_size 16 (valid: 1, 2, 4, 8, 16)"),
        (12, 24, "micro_batch_size 24 must divide global_batch_size 12 (valid: 1, 2, 3, 4, 6, 12)"),
        (0, None, "global_batch_size must be >= 1"),
    ],
)
def test_attach_refuses_a_micro_batch_that_does_not_divide(global_batch: int, micro, says: str) -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(AttachError) as err:
        tw.attach(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            global_batch_size=global_batch,
            micro_batch_size=micro,
        )
    assert says in str(err.value)


# ---- the CPU memory probe -------------------------------------------------------------------------


def test_cpu_probe_sees_a_peak_between_two_samples() -> None:
    probe = CpuProbe()
    assert probe.device == "cpu" and probe.total_bytes > 0
    used, peak = probe.sample()
    assert peak >= used > 0
    # 48 MiB, written (so resident), and above glibc's largest mmap threshold (32 MiB): it is
    # mapped for itself and unmapped at once when freed.
    big = torch.ones(48 * 2**20 // 4)
    del big
    used2, peak2 = probe.sample()
    assert peak2 >= used2 > 0
    assert peak2 - used >= 40 * 2**20, "an allocation freed before the sample must still show in the peak"
    assert peak2 - used2 >= 40 * 2**20  # ...though it is gone by the sample
    # A sample starts a new window: the old peak is gone.
    _, peak3 = probe.sample()
    assert peak3 < peak2 - 30 * 2**20
    probe.release()
    used4, peak4 = probe.sample()
    assert peak4 >= used4 > 0


def test_a_forked_childs_probe_reads_its_own_process() -> None:
    """The probe keeps /proc/self open: a forked child (a DataLoader worker) must not read its
    parent's memory through the inherited descriptor. The child grows by 96 MiB while the parent
    waits: the child's probe sees it (the parent's would not)."""
    probe = CpuProbe()
    probe.sample()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (no torch here: its threads do not survive a fork)
        os.close(r)
        before, _ = probe.sample()
        big = b"\x01" * (96 * 2**20)
        after, _ = probe.sample()
        os.write(w, f"{before} {after}".encode())
        del big
        os._exit(0)
    os.close(w)
    before, after = map(int, os.read(r, 64).split())
    os.close(r)
    os.waitpid(pid, 0)
    assert after - before >= 80 * 2**20, (before, after)
