"""What every policy kind is: a pure `decide` over snapshots, parameters in a frozen dataclass.

Each parameter field declares, in its metadata, the range that is valid (checked when a
file is loaded) and the range it may be tuned in (read by the tuner, nothing else). A kind
also declares the knobs it owns: a file that gives one knob to two policies is refused.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from trainwarden.controller.protocol import Action
from trainwarden.controller.schema import Budget
from trainwarden.controller.snapshot import Snapshot


@dataclass(frozen=True)
class Range:
    """A closed numeric interval; `log` says the tuner should sample it on a log scale."""

    low: float
    high: float
    log: bool = False

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def param(
    default: Any,
    *,
    valid: Range | None = None,
    tune: Range | None = None,
    choices: Sequence[Any] = (),
    doc: str = "",
) -> Any:
    """A policy parameter: default, the valid range, the tunable range (inside the valid one)."""
    if tune is not None and valid is not None:
        assert valid.contains(tune.low) and valid.contains(tune.high), "tune range outside valid range"
    return dataclasses.field(
        default=default,
        metadata={"valid": valid, "tune": tune, "choices": tuple(choices), "doc": doc},
    )


def tunable_ranges(params_type: type) -> dict[str, Range]:
    """The tunable parameters of a Params dataclass and their ranges: all a tuner needs."""
    return {f.name: f.metadata["tune"] for f in dataclasses.fields(params_type) if f.metadata.get("tune")}


class PolicyKind(abc.ABC):
    """A policy kind. Instances hold only their name and frozen params: `decide` is pure."""

    kind: ClassVar[str]
    Params: ClassVar[type]
    #: Knobs (action kinds) this policy may set; each knob has one owner per file.
    knobs: ClassVar[frozenset[str]]

    def __init__(self, name: str, params: Any) -> None:
        self.name = name
        self.params = params

    @abc.abstractmethod
    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        """Actions to take now, given the snapshot; the same inputs give the same actions."""

    def watch_s(self, snapshot: Snapshot, budget: Budget) -> float:
        """How soon this policy needs a fresher snapshot than `snapshot` to decide in time, in
        seconds (0: at every exchange; `math.inf`: nothing it could decide is close). The controller
        asks the job for its next exchange by the soonest of its policies', within its settings'
        bounds: a job far from every threshold exchanges less often, which is CPU the sidecar and
        the agent's thread no longer take from training (issue 18). Pure, like `decide`. A kind that
        does not say is watched at every exchange."""
        return 0.0


#: kind name -> class; filled by `register`.
KINDS: dict[str, type[PolicyKind]] = {}


def register(cls: type[PolicyKind]) -> type[PolicyKind]:
    assert cls.kind not in KINDS, f"policy kind {cls.kind!r} registered twice"
    KINDS[cls.kind] = cls
    return cls


def kinds() -> dict[str, type[PolicyKind]]:
    """All policy kinds, importing the modules that define them."""
    from trainwarden.policies import compute, data, memory  # noqa: F401  (registers)

    return dict(KINDS)
