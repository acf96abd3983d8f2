"""The example corpus (stdlib code + pydoc prose, byte-level) and the example GPT."""

from __future__ import annotations

import io
import sysconfig
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from trainwarden.examples import corpus  # noqa: E402
from trainwarden.examples.corpus import (  # noqa: E402
    Batch,
    WindowSampler,
    eval_batches,
    load_code_domain,
    load_domains,
    load_prose_domain,
    split_domain,
)
from trainwarden.examples.gpt import GPT, GPTConfig  # noqa: E402

CAP = 1_000_000  # a smaller cap than the default keeps the tests fast; same code path
TINY = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def domains() -> dict[str, torch.Tensor]:
    return load_domains(CAP)


def _bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------- corpus


def test_domains_are_non_empty_uint8_and_deterministic(domains: dict[str, torch.Tensor]) -> None:
    assert list(domains) == ["code", "prose"]
    for data in domains.values():
        assert data.dtype == torch.uint8 and data.dim() == 1
    assert len(domains["code"]) == CAP  # the stdlib holds far more than 1 MB of source: capped
    assert 100_000 < len(domains["prose"]) <= CAP
    # Freshly re-read from disk, bypassing the cache: byte-identical.
    assert _bytes(domains["code"]) == load_code_domain(CAP)
    assert _bytes(domains["prose"]) == load_prose_domain(CAP)
    assert b"def " in load_code_domain(CAP) and b"import " in load_code_domain(CAP)
    load_prose_domain(CAP).decode("utf-8")  # valid UTF-8 text
    # Cached per process: the same tensors come back, in a fresh dict.
    again = load_domains(CAP)
    assert again is not domains and again["code"] is domains["code"]


def test_code_domain_skips_tests_idle_lib2to3_site_packages() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = corpus._stdlib_py_files(root)
    assert files, "no stdlib files found"
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    banned = {"test", "tests", "idlelib", "lib2to3", "site-packages"}
    assert not [r for r in rel if banned & set(r.split("/")[:-1])]
    assert all(r.endswith(".py") for r in rel)


def test_split_is_last_five_percent(domains: dict[str, torch.Tensor]) -> None:
    for data in domains.values():
        train, val = split_domain(data, "train"), split_domain(data, "val")
        assert len(train) + len(val) == len(data)
        assert len(val) == int(len(data) * 0.05)
        assert torch.equal(torch.cat([train, val]), data)
    with pytest.raises(ValueError):
        split_domain(domains["code"], "test")


def test_sampler_is_deterministic_and_shifts_targets(domains: dict[str, torch.Tensor]) -> None:
    a = WindowSampler(domains, block_size=64, global_batch_size=8, seed=7)
    b = WindowSampler(domains, block_size=64, global_batch_size=8, seed=7)
    c = WindowSampler(domains, block_size=64, global_batch_size=8, seed=8)
    for _ in range(3):
        ba, bb, bc = next(a), next(b), next(c)
        assert ba.x.shape == ba.y.shape == (8, 64) and ba.domain.shape == (8,)
        assert ba.x.dtype == ba.y.dtype == ba.domain.dtype == torch.long
        assert torch.equal(ba.x[:, 1:], ba.y[:, :-1])
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.domain, bb.domain)
        assert not torch.equal(ba.x, bc.x)
    assert a.batches_drawn == 3 and int(a.samples_drawn.sum()) == 24


def test_sampler_state_dict_round_trip(domains: dict[str, torch.Tensor]) -> None:
    a = WindowSampler(domains, block_size=32, global_batch_size=4, seed=1)
    for _ in range(5):
        next(a)
    a.set_weights({"code": 3.0, "prose": 1.0})
    a.global_batch_size = 6
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # the state must survive a real checkpoint file
    expected = [next(a) for _ in range(4)]

    b = WindowSampler(domains, block_size=32, global_batch_size=2, seed=99)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.weights == pytest.approx({"code": 0.75, "prose": 0.25})
    assert b.global_batch_size == 6 and b.batches_drawn == 5
    for want in expected:
        got = next(b)
        assert torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
        assert torch.equal(got.domain, want.domain)
    assert torch.equal(a.samples_drawn, b.samples_drawn)

    wrong = WindowSampler(domains, block_size=16, global_batch_size=2)
    with pytest.raises(ValueError):
        wrong.load_state_dict(a.state_dict())


def test_domain_tags_match_window_source(domains: dict[str, torch.Tensor]) -> None:
    train = {name: _bytes(split_domain(d, "train")) for name, d in domains.items()}
    s = WindowSampler(domains, block_size=48, global_batch_size=32, seed=3)
    batch = next(s)
    assert set(batch.domain.tolist()) == {0, 1}  # both domains drawn at equal weights
    for x, y, d in zip(batch.x, batch.y, batch.domain, strict=True):
        window = _bytes(torch.cat([x, y[-1:]]))
        assert window in train[batch.domain_names[int(d)]]


def test_mixture_weights_steer_sampling() -> None:
    # Disjoint byte ranges make each sample's true source visible in its bytes.
    synthetic = {
        "low": torch.randint(0, 100, (5000,), dtype=torch.uint8),
        "high": torch.randint(150, 250, (5000,), dtype=torch.uint8),
    }
    s = WindowSampler(synthetic, block_size=16, global_batch_size=4000, seed=0)
    s.set_weights({"low": 0.8, "high": 0.2})
    batch = next(s)
    from_high = (batch.x >= 150).all(dim=1)
    assert torch.equal(from_high, batch.domain == 1)
    assert 0.17 < float(from_high.float().mean()) < 0.23
    s.set_weights({"low": 1.0})  # a domain left out gets weight 0
    assert (next(s).domain == 0).all()
    for bad in ({"nope": 1.0}, {"low": -1.0}, {"low": 0.0, "high": 0.0}, {"low": float("nan")}):
        with pytest.raises((KeyError, ValueError)):
            s.set_weights(bad)


def test_micro_batches_partition_the_batch(domains: dict[str, torch.Tensor]) -> None:
    batch = next(WindowSampler(domains, block_size=16, global_batch_size=10))
    parts = batch.micro_batches(4)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([p.x for p in parts]), batch.x)
    assert torch.equal(torch.cat([p.domain for p in parts]), batch.domain)


def test_eval_batches_are_fixed_and_from_the_validation_split(domains: dict[str, torch.Tensor]) -> None:
    kwargs = {"block_size": 32, "batch_size": 4, "n_batches": 2, "seed": 5}
    first = eval_batches(domains, "val", **kwargs)
    second = eval_batches(domains, "val", **kwargs)
    assert list(first) == ["code", "prose"]
    for index, name in enumerate(first):
        val = _bytes(split_domain(domains[name], "val"))
        assert len(first[name]) == 2
        for b1, b2 in zip(first[name], second[name], strict=True):
            assert isinstance(b1, Batch) and b1.x.shape == (4, 32)
            assert torch.equal(b1.x, b2.x)
            assert (b1.domain == index).all()
            for x, y in zip(b1.x, b1.y, strict=True):
                assert _bytes(torch.cat([x, y[-1:]])) in val
    # Another domain set leaves a domain's windows unchanged (seeded by name, not position).
    only_prose = eval_batches({"prose": domains["prose"]}, "val", **kwargs)
    assert torch.equal(only_prose["prose"][0].x, first["prose"][0].x)


# ----------------------------------------------------------------------------- model


def test_per_sample_loss_mean_equals_mean_loss() -> None:
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    x = torch.randint(0, 256, (5, 32))
    y = torch.randint(0, 256, (5, 32))
    logits, mean_loss = model(x, y)
    _, per_sample = model(x, y, reduction="none")
    assert logits.shape == (5, 32, 256)
    assert per_sample.shape == (5,)
    torch.testing.assert_close(per_sample.mean(), mean_loss)
    reference = torch.nn.functional.cross_entropy(logits.view(-1, 256), y.view(-1))
    torch.testing.assert_close(mean_loss, reference)
    assert model(x)[1] is None


def test_tied_weights_param_count_and_optimizer_groups() -> None:
    model = GPT(TINY)
    assert model.lm_head.weight is model.wte.weight
    params = list(model.parameters())
    assert model.num_params() == sum(p.numel() for p in params)
    assert model.num_params(non_embedding=True) == model.num_params() - 32 * 32
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW)
    grouped = {g["name"]: g for g in opt.param_groups}
    assert grouped["decay"]["weight_decay"] == 0.1 and grouped["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in grouped["decay"]["params"])
    assert all(p.dim() < 2 for p in grouped["no_decay"]["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in params)  # every parameter exactly once


def test_training_steps_lower_the_loss(domains: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    opt = model.configure_optimizer(lr=3e-3, weight_decay=0.0)
    batch = next(WindowSampler(domains, block_size=32, global_batch_size=8, seed=0))
    with torch.no_grad():
        before = float(model(batch.x, batch.y)[1])
    for _ in range(25):
        _, loss = model(batch.x, batch.y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = float(model(batch.x, batch.y)[1])
    assert before > 5.0  # about ln(256) = 5.55 at init
    assert after < before - 1.0


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    x = torch.randint(0, 256, (3, 32))
    grads = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        model(x, x.roll(-1, dims=1))[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError):
        GPT(TINY)(torch.zeros(1, 33, dtype=torch.long))
