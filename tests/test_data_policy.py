"""The data policy (policies/data.py): pure decisions, its invariants, and a policy file's errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    CONFIG_DATA_STATE,
    CONFIG_DATA_VERSION,
    KNOB_CURRICULUM_LEVEL,
    KNOB_DOMAIN_WEIGHTS,
    KNOB_PRUNE_FRACTION,
    JobShape,
    KnobSpec,
)
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies.base import tunable_ranges
from trainwarden.policies.data import DataParams, DataPolicy, mix_step, with_floor
from trainwarden.policies.loader import PolicyFileError, load_policy_file, load_policy_text
from trainwarden.policies.schema import Budget

NAMES = ("code", "text", "docstrings", "noise")
UNIFORM = dict.fromkeys(NAMES, 0.25)


def snap(
    step: int,
    *,
    weights: dict[str, float] | None = None,
    losses: dict[str, float] | None = None,
    state: dict[str, Any] | None = None,
    loss: float = 3.0,
    level: float | None = None,
    prune: float | None = None,
    last: dict[str, int] | None = None,
    version: int | None = None,
) -> Snapshot:
    weights = weights or UNIFORM
    knobs = {KNOB_DOMAIN_WEIGHTS: KnobSpec(KNOB_DOMAIN_WEIGHTS, weights)}
    config: dict[str, Any] = {KNOB_DOMAIN_WEIGHTS: weights}
    if level is not None:
        knobs[KNOB_CURRICULUM_LEVEL] = KnobSpec(KNOB_CURRICULUM_LEVEL, level, minimum=0.01, maximum=1.0)
        config[KNOB_CURRICULUM_LEVEL] = level
    if prune is not None:
        knobs[KNOB_PRUNE_FRACTION] = KnobSpec(KNOB_PRUNE_FRACTION, prune, minimum=0.0, maximum=0.3)
        config[KNOB_PRUNE_FRACTION] = prune
    if state:
        config[CONFIG_DATA_STATE] = state
    if version is not None:
        config[CONFIG_DATA_VERSION] = version
    return Snapshot(
        step=step,
        elapsed_s=10.0,
        loss=loss,
        tokens=0,
        samples=0,
        tokens_per_second=None,
        step_time_s=None,
        memory=(),
        memory_cap_bytes=None,
        config=config,
        knobs=knobs,
        last_action_step=last or {},
        domain_loss=losses or {},
    )


def policy(**kw: Any) -> DataPolicy:
    return DataPolicy("data", DataParams(**kw))


def test_every_parameter_but_the_switches_and_names_is_tunable() -> None:
    ranges = tunable_ranges(DataParams)
    assert {"every_steps", "floor", "temperature", "smoothing", "step_size", "level_step"} <= set(ranges)
    assert "domains" not in ranges and "mixing" not in ranges


def test_mixing_moves_weight_from_the_domain_that_stopped_learning() -> None:
    p = policy(every_steps=20, warmup_steps=0, floor=0.05)
    first = p.decide(snap(10, losses=dict.fromkeys(NAMES, 3.0)), Budget())
    assert [a.kind for a in first] == [KNOB_DOMAIN_WEIGHTS]
    state = {KNOB_DOMAIN_WEIGHTS: dict(first[0].params["state"])}
    assert state[KNOB_DOMAIN_WEIGHTS]["step"] == 10
    # Twenty steps on: clean domains fell 5%, the noise domain did not move.
    losses = {"code": 2.85, "text": 2.85, "docstrings": 2.85, "noise": 3.0}
    assert p.decide(snap(25, losses=losses, state=state), Budget()) == []  # not yet 20 steps
    (a,) = p.decide(snap(30, losses=losses, state=state), Budget())
    w = a.params["value"]
    assert w["noise"] < 0.25 < w["code"]
    assert math.isclose(sum(w.values()), 1.0) and min(w.values()) >= 0.05
    assert "noise +0.0000" in a.reason and "per-domain loss" in a.reason
    assert a.params["state"]["loss"] == losses and a.params["state"]["step"] == 30


def test_raw_loss_is_not_the_reward_a_high_flat_loss_earns_nothing() -> None:
    p = DataParams(every_steps=10, smoothing=1.0, step_size=1.0, floor=0.0)
    before = {"code": 2.0, "noise": 5.0}
    w, _, rewards = mix_step(
        {"code": 0.5, "noise": 0.5}, {"code": 1.9, "noise": 5.0}, {"step": 0, "loss": before}, 10, p
    )
    assert rewards["noise"] == 0.0 < rewards["code"]
    assert w["code"] > w["noise"]


def test_a_loss_far_under_the_others_earns_less_for_the_same_fall_a_high_one_no_more() -> None:
    """`loss_weight`: the same absolute fall earns less on a domain whose loss is under the mean
    (its loss / the mean, squared by default), and never more on one above it (noise's loss is high;
    scaling its reward up would scale its jitter up)."""
    p = DataParams(every_steps=10, smoothing=1.0, step_size=1.0, floor=0.0)
    weights = {"easy": 1 / 3, "prose": 1 / 3, "noise": 1 / 3}
    before = {"easy": 0.6, "prose": 2.6, "noise": 3.7}
    now = {"easy": 0.5, "prose": 2.5, "noise": 3.6}  # each fell by 0.1; the mean is 2.2
    _, _, rewards = mix_step(weights, now, {"step": 0, "loss": before}, 10, p)
    assert math.isclose(rewards["prose"], 0.1) and math.isclose(rewards["noise"], 0.1)
    assert math.isclose(rewards["easy"], 0.1 * (0.5 / 2.2) ** 2)
    plain = DataParams(every_steps=10, smoothing=1.0, step_size=1.0, floor=0.0, loss_weight=0.0)
    _, _, rewards = mix_step(weights, now, {"step": 0, "loss": before}, 10, plain)
    assert all(math.isclose(r, 0.1) for r in rewards.values()), rewards


@settings(max_examples=300, deadline=None)
@given(
    weights=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8).filter(lambda w: sum(w) > 0),
    losses=st.lists(st.floats(0.01, 20.0), min_size=8, max_size=8),
    before=st.lists(st.floats(0.01, 20.0), min_size=8, max_size=8),
    floor=st.floats(0.0, 0.5),
    temperature=st.floats(0.01, 100.0),
    step_size=st.floats(0.01, 1.0),
    smoothing=st.floats(0.01, 1.0),
)
def test_weights_always_sum_to_one_and_respect_the_floor(
    weights: list[float],
    losses: list[float],
    before: list[float],
    floor: float,
    temperature: float,
    step_size: float,
    smoothing: float,
) -> None:
    names = [f"d{i}" for i in range(len(weights))]
    total = sum(weights)
    current = {n: w / total for n, w in zip(names, weights, strict=False)}
    p = DataParams(floor=floor, temperature=temperature, step_size=step_size, smoothing=smoothing)
    state = {"step": 0, "loss": dict(zip(names, before, strict=False)), "score": {}}
    new, new_state, _ = mix_step(current, dict(zip(names, losses, strict=False)), state, 20, p)
    for w in (new, with_floor(current, floor)):
        assert set(w) == set(names)
        assert math.isclose(sum(w.values()), 1.0, abs_tol=1e-9)
        assert min(w.values()) >= min(floor, 1 / len(names)) - 1e-12
        assert all(math.isfinite(v) for v in w.values())
    # The next decision, from the state this one hands back, keeps the invariants too.
    again, _, _ = mix_step(new, dict(zip(names, before, strict=False)), new_state, 40, p)
    assert math.isclose(sum(again.values()), 1.0, abs_tol=1e-9)
    assert min(again.values()) >= min(floor, 1 / len(names)) - 1e-12


def test_curriculum_advances_on_a_plateau_only() -> None:
    p = policy(mixing=False, curriculum=True, start_level=0.3, level_step=0.2, plateau_steps=40)
    (start,) = p.decide(snap(5, level=1.0, loss=3.0), Budget())
    assert start.kind == KNOB_CURRICULUM_LEVEL and start.params["value"] == 0.3
    state = {KNOB_CURRICULUM_LEVEL: {"step": 5, "loss": 3.0, "version": 1}}
    assert p.decide(snap(30, level=0.3, loss=2.5, state=state, version=1), Budget()) == []  # too soon
    (learning,) = p.decide(snap(45, level=0.3, loss=2.5, state=state, version=1), Budget())
    assert learning.params["value"] == 0.3 and "still learning" in learning.reason
    (plateau,) = p.decide(snap(45, level=0.3, loss=2.99, state=state, version=1), Budget())
    assert plateau.params["value"] == 0.5 and "plateau" in plateau.reason
    assert plateau.params["state"] == {"step": 45, "loss": 2.99, "version": 1}
    # Pruning changed the examples since the last check: no judgement across it, a new baseline.
    (again,) = p.decide(snap(45, level=0.3, loss=2.99, state=state, version=2), Budget())
    assert again.params == {"value": 0.3, "state": {"step": 45, "loss": 2.99, "version": 2}}
    assert "measured again" in again.reason


def test_pruning_grows_in_steps_up_to_its_bound() -> None:
    p = policy(mixing=False, pruning=True, max_prune_fraction=0.5, prune_after_steps=100, prune_step=0.2)
    assert p.decide(snap(50, prune=0.0), Budget()) == []
    (a,) = p.decide(snap(120, prune=0.0), Budget())
    assert a.params["value"] == 0.2
    # The adapter's own bound (0.3 here) caps the policy's 0.5.
    (b,) = p.decide(snap(200, prune=0.2, last={KNOB_PRUNE_FRACTION: 120}), Budget())
    assert b.params["value"] == 0.3
    assert p.decide(snap(300, prune=0.3, last={KNOB_PRUNE_FRACTION: 200}), Budget()) == []


POLICY = """\
version: 1
budget: {{}}
policies:
  - kind: data
    domains: [code, text, docstrings, noise]
{extra}
"""


@pytest.mark.parametrize(
    ("extra", "line", "words"),
    [
        ("    initial_weights: {code: 0.5, prose: 0.5}", 6, "unknown domain 'prose'"),
        ("    initial_weights:\n      code: 0.5\n      text: -1", 8, "-1 is outside the valid range"),
        ("    initial_weights: {code: 0, text: 0}", 6, "every weight is 0"),
        ("    initial_weights: {code: lots}", 6, "expected a number"),
        ("    floor: 0.3", 6, "lower floor to at most 0.25"),
        ("    floor: 0.7", 6, "outside the valid range"),
        ("    reward: ratio", 6, "is not one of the choices: 'gain', 'relative'"),
    ],
)
def test_bad_weights_and_unknown_domains_in_a_file_are_clear_errors(
    tmp_path: Path, extra: str, line: int, words: str
) -> None:
    path = tmp_path / "data.yaml"
    path.write_text(POLICY.format(extra=extra))
    with pytest.raises(PolicyFileError) as e:
        load_policy_file(path)
    message = str(e.value)
    assert f"{path}:{line}:" in message and words in message, message


def test_a_policy_naming_domains_the_job_lacks_is_said_at_connect_and_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = POLICY.format(extra="    initial_weights: {code: 1, noise: 0.1}")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    pf = load_policy_file(path)
    ctl = Controller(tmp_path / "run", "r", policy_file=pf)
    knob = KnobSpec(KNOB_DOMAIN_WEIGHTS, {"code": 0.5, "prose": 0.5})
    shape = JobShape("r", "pytorch", 1, 10, 16, 32, (knob,), (1,), "cpu", 2**30, 4)
    with caplog.at_level(logging.ERROR):
        ctl.hello(shape)
    assert ctl.policies == []
    msg = caplog.text
    assert f"{path}:4:" in msg and "'docstrings', 'noise', 'text'" in msg and "prose" in msg, msg
    ctl.close()
    assert load_policy_text(text).policies[0].kind == "data"


def test_no_learnability_is_read_across_a_change_of_the_examples_drawn() -> None:
    """A curriculum level or pruned set changed between two decisions: the domains' losses are of
    other examples (pruning what stopped falling makes the rest look learnable), so the weights
    stay and the losses become the new baseline."""
    p = policy(every_steps=20, warmup_steps=0)
    state = {KNOB_DOMAIN_WEIGHTS: {"step": 10, "loss": dict.fromkeys(NAMES, 3.0), "score": {}, "version": 3}}
    losses = {"code": 2.85, "text": 2.85, "docstrings": 2.85, "noise": 2.0}
    (a,) = p.decide(snap(30, losses=losses, state=state, version=4), Budget())
    assert a.params["value"] == UNIFORM and "measured again" in a.reason
    assert a.params["state"] == {"step": 30, "loss": losses, "score": {}, "version": 4}
    (b,) = p.decide(snap(30, losses=losses, state=state, version=3), Budget())
    assert b.params["value"]["noise"] > 0.25  # the same losses, same examples: a real signal


def _closed_loop(
    reward: str, steps: int = 600, batch: int = 16, **kw: Any
) -> list[tuple[int, dict[str, float]]]:
    """The real policy, through its real decide, on a job whose per-domain loss follows how many
    samples of that domain it drew: `easy` (boilerplate: learnt in the first ~100 steps, its loss
    then still halving now and then towards zero), `prose` (still learning, ever more slowly, all
    run long) and `noise` (flat at its entropy, with a jitter). Returns the weights after each
    mixing decision."""
    curves = {
        "easy": lambda n: 3.5 * (1 + n / 40) ** -2,
        "prose": lambda n: 1.2 + 2.3 * (1 + n / 300) ** -0.5,
        "noise": lambda n: 5.5 + 0.003 * math.sin(n),
    }
    # The defaults but the warm-up: the easy domain's first 100 steps do buy loss (3.5 -> 0.02).
    p = policy(reward=reward, warmup_steps=100, **kw)
    weights = dict.fromkeys(curves, 1 / 3)
    drawn = dict.fromkeys(curves, 0.0)
    state: dict[str, Any] = {}
    last: dict[str, int] = {}
    history = []
    for step in range(1, steps + 1):
        for k in drawn:
            drawn[k] += batch * weights[k]
        losses = {k: curve(drawn[k]) for k, curve in curves.items()}
        s = snap(step, weights=weights, losses=losses, state=state, last=last)
        for a in p.decide(s, Budget()):
            weights = dict(a.params["value"])
            state = {**state, KNOB_DOMAIN_WEIGHTS: dict(a.params["state"])}
            last[KNOB_DOMAIN_WEIGHTS] = a.step
            history.append((step, weights))
    return history


def test_a_learnt_domain_and_noise_end_near_the_floor_the_learnable_one_gets_the_weight() -> None:
    """Issue 20: what a sample buys (the absolute loss decrease, `reward: gain`) sends a domain
    near its loss floor and one that cannot be learnt to the floor (0.05), the learnable one up."""
    history = _closed_loop("gain")
    after_warmup = [(step, w) for step, w in history if step > 100]
    assert len(after_warmup) >= 20
    for step, w in after_warmup:
        assert max(w, key=w.get) == "prose", (step, w)
        if step >= 200:
            assert w["easy"] < 0.125 and w["noise"] < 0.125, (step, w)
    final = history[-1][1]
    assert final["prose"] > 0.8 and final["easy"] < 0.1 and final["noise"] < 0.1, final


def test_the_reward_before_issue_20_chases_the_learnt_domain() -> None:
    """The relative decrease of the loss (the reward and least scale before issue 20, still
    selectable as `reward: relative`) stays large as a loss nears zero: the same job ends with the
    learnt domain holding the most weight."""
    history = _closed_loop("relative", min_reward_scale=0.002)
    final = history[-1][1]
    assert final["easy"] > 0.5 > final["prose"], final
    assert all(max(w, key=w.get) == "easy" for step, w in history if step > 200), history
