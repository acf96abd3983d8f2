"""What `trainwarden tune` searches: every tunable parameter of every policy in a file.

The ranges come from each kind's `Params` dataclass (`policies.base.tunable_ranges`), found
through the registry: a new policy kind is tunable as soon as it declares `tune=Range(...)`
on a field, with nothing to change here. Optuna names a parameter `<policy name>.<field>`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from trainwarden.controller.schema import PolicyFile
from trainwarden.policies.base import Range, kinds, tunable_ranges


@dataclass(frozen=True)
class Dimension:
    """One tunable parameter: which policy, which field, its range and whether it is whole."""

    policy: str
    field: str
    range: Range
    integer: bool

    @property
    def name(self) -> str:
        return f"{self.policy}.{self.field}"


def search_space(pf: PolicyFile, only: Collection[str] | None = None) -> tuple[Dimension, ...]:
    """The tunable parameters of every policy in the file (of the policies named in `only`, when
    given: the others keep the file's values), in file order."""
    registry = kinds()
    names = [spec.name for spec in pf.policies]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise InvalidParams(
            f"no policy named {', '.join(unknown)} in {pf.path} (its policies: {', '.join(names) or 'none'}; "
            "a policy's name is its kind unless the file gives it `name:`)"
        )
    dims = []
    for spec in pf.policies:
        if only and spec.name not in only:
            continue
        params_type = registry[spec.kind].Params
        hints = typing.get_type_hints(params_type)
        for name, rng in tunable_ranges(params_type).items():
            integer = hints.get(name) is int
            dims.append(Dimension(spec.name, name, rng, integer))
    return tuple(dims)


def distributions(dims: tuple[Dimension, ...]) -> dict[str, Any]:
    """Optuna distributions for the dimensions (optuna imported here: it is the `tune` extra)."""
    import optuna

    out: dict[str, Any] = {}
    for d in dims:
        log = d.range.log and d.range.low > 0
        if d.integer:
            out[d.name] = optuna.distributions.IntDistribution(int(d.range.low), int(d.range.high), log=log)
        else:
            out[d.name] = optuna.distributions.FloatDistribution(d.range.low, d.range.high, log=log)
    return out


def current_values(pf: PolicyFile, dims: tuple[Dimension, ...]) -> dict[str, Any]:
    """The file's own values of the dimensions that lie inside their tunable range: the baseline
    trial (a file value outside the range cannot be a trial of this space, and is left out)."""
    by_name = {spec.name: spec for spec in pf.policies}
    out = {}
    for d in dims:
        value = getattr(by_name[d.policy].params, d.field)
        if isinstance(value, (int, float)) and math.isfinite(value) and d.range.contains(value):
            out[d.name] = int(value) if d.integer else float(value)
    return out


class InvalidParams(ValueError):
    """A combination of sampled values that the policy refuses (e.g. low_water above high_water)."""


def with_params(pf: PolicyFile, values: Mapping[str, Any]) -> PolicyFile:
    """A copy of the file with `values` (`policy.field` -> value) set; InvalidParams when a
    policy's own `check()` refuses the combination."""
    by_policy: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        policy, _, field_name = name.rpartition(".")  # policy names may hold dots
        by_policy.setdefault(policy, {})[field_name] = value
    unknown = set(by_policy) - {spec.name for spec in pf.policies}
    if unknown:
        raise InvalidParams(f"no policy named {', '.join(sorted(unknown))} in {pf.path}")
    specs = []
    problems: list[str] = []
    for spec in pf.policies:
        changes = by_policy.get(spec.name)
        if not changes:
            specs.append(spec)
            continue
        params = dataclasses.replace(spec.params, **changes)
        check = getattr(params, "check", None)
        for p in check() if callable(check) else []:
            # A check may name the key it is about: (key, message), as the loader reports it.
            problems.append(f"{spec.name}: {p[0]}: {p[1]}" if isinstance(p, tuple) else f"{spec.name}: {p}")
        specs.append(dataclasses.replace(spec, params=params))
    if problems:
        raise InvalidParams("; ".join(problems))
    return dataclasses.replace(pf, policies=tuple(specs))
