"""What `trainwarden tune` searches comes from each kind's own Params, through the registry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies import base
from trainwarden.policies.base import PolicyKind, Range, param
from trainwarden.policies.loader import load_policy_text
from trainwarden.policies.schema import Budget
from trainwarden.policies.tuning.space import InvalidParams, distributions, search_space, with_params
from trainwarden.policies.tuning.study import TrialResult, open_study, policy_text, run_study


@dataclass(frozen=True)
class NewParams:
    threshold: float = param(0.5, valid=Range(0.0, 1.0), tune=Range(0.1, 0.9), doc="a float")
    window: int = param(8, valid=Range(1, 1000), tune=Range(2, 64, log=True), doc="an int, log scale")
    floor: float = param(0.1, valid=Range(0.0, 1.0), doc="not tunable")

    def check(self) -> list[str]:
        return [] if self.floor < self.threshold else ["floor must be below threshold"]


class NewKind(PolicyKind):
    """A kind the tuner has never heard of: it is tunable by declaring its ranges, nothing more."""

    kind = "test_new_kind"
    Params = NewParams
    knobs = frozenset({"test_knob"})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list:  # type: ignore[type-arg]
        return []


@pytest.fixture(autouse=True)
def _new_kind() -> Iterator[None]:
    added = NewKind.kind not in base.KINDS
    if added:
        base.register(NewKind)
    yield
    if added:
        base.KINDS.pop(NewKind.kind, None)


FILE = """\
version: 1
budget: {wall_time: 1m}
policies:
  - kind: test_new_kind
    name: new.v2
    threshold: 0.7
  - kind: compute
objective:
  maximize: tokens
"""


def test_a_new_kind_is_tunable_without_touching_the_tuner(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(FILE)
    pf = load_policy_text(FILE, str(path))
    dims = {d.name: d for d in search_space(pf)}
    assert dims["new.v2.threshold"].range == Range(0.1, 0.9) and not dims["new.v2.threshold"].integer
    assert dims["new.v2.window"].integer and "new.v2.floor" not in dims
    assert any(name.startswith("compute.") for name in dims)
    dists = distributions(tuple(dims.values()))
    assert dists["new.v2.window"] == optuna.distributions.IntDistribution(2, 64, log=True)

    changed = with_params(pf, {"new.v2.threshold": 0.3, "new.v2.window": 5})
    assert changed.policies[0].params == NewParams(threshold=0.3, window=5)
    with pytest.raises(InvalidParams, match="floor must be below threshold"):
        with_params(pf, {"new.v2.threshold": 0.05})
    # The file written for a trial holds the values, and loads.
    text = policy_text(changed, {"new.v2.threshold": 0.3, "new.v2.window": 5}, "# trial\n")
    assert load_policy_text(text).policies[0].params == NewParams(threshold=0.3, window=5)


def test_the_first_trial_of_a_new_study_is_the_files_own_values(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(FILE)
    pf = load_policy_text(FILE, str(path))
    seen = []

    def evaluate(trial, trial_pf):  # type: ignore[no-untyped-def]
        seen.append(trial_pf.policies[0].params)
        return TrialResult(value=float(len(seen)))

    study = open_study(
        f"sqlite:///{tmp_path / 't.db'}", "s", "maximize", optuna.samplers.RandomSampler(seed=0)
    )
    run_study(pf, study, evaluate, 3, say=lambda _: None)
    assert seen[0] == NewParams(threshold=0.7, window=8)
    assert len(study.trials) == 3 and study.best_trial.number == 2


def test_a_policy_whose_knobs_the_replay_does_not_model_is_named(tmp_path: Path) -> None:
    from trainwarden.policies.tuning.trial_replay import unmodelled

    pf = load_policy_text(FILE, str(tmp_path / "p.yaml"))
    (line,) = unmodelled(pf)  # compute's knobs are modelled; the new kind's are not
    assert line.startswith("policy 'new.v2' sets test_knob, which the replay does not model")


def test_only_names_the_policies_searched(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(FILE)
    pf = load_policy_text(FILE, str(path))
    assert {d.policy for d in search_space(pf, {"compute"})} == {"compute"}
    assert {d.policy for d in search_space(pf)} == {"new.v2", "compute"}
    with pytest.raises(InvalidParams, match=r"no policy named memory .*its policies: new\.v2, compute"):
        search_space(pf, {"memory"})
