"""What every form of the data mixture shares: its domains, its knobs and how they are applied.

The mixture's controllable state is small: the domain weights, the curriculum level, the
fraction of examples that may be pruned, and the data policy's own state (`data_state`, which
the policy hands over in its actions and reads back from the job's configuration, so the policy
stays a pure function and a resumed job continues its bandit). The sampler and the iterable
dataset inherit this and decide only how those values turn into a stream of samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from trainwarden.controller.protocol import (
    CONFIG_DATA_STATE,
    CONFIG_DATA_VERSION,
    CONFIG_PRUNED_FRACTION,
    KNOB_CURRICULUM_LEVEL,
    KNOB_DOMAIN_WEIGHTS,
    KNOB_PRUNE_FRACTION,
    MAX_DOMAINS,
    Action,
    KnobSpec,
    domain_weights_problem,
)

log = logging.getLogger("trainwarden")

#: Lowest curriculum level: a level of 0 would leave a domain with nothing to draw.
MIN_LEVEL = 0.01
#: Most of the examples any mixture lets a policy prune (the policy's own bound is lower).
MAX_PRUNE_FRACTION = 0.9
#: Samples over which a domain's reported loss is averaged (an EMA by sample, not by step): a
#: domain at a 5% weight sees under one sample a step, and the data policy reads differences of
#: these losses, so a one-sample loss would be mostly noise. Costs a lag of about this many samples.
LOSS_WINDOW_SAMPLES = 128


class DataMixtureError(ValueError):
    """A mixture was given something it cannot use; the message names the cause and the fix."""


def check_names(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise DataMixtureError("a mixture needs at least one domain: pass {name: dataset, ...}")
    if len(names) > MAX_DOMAINS:
        raise DataMixtureError(f"{len(names)} domains is more than the {MAX_DOMAINS} a mixture may have")
    for n in names:
        if not isinstance(n, str) or not n:
            raise DataMixtureError(f"domain names must be non-empty text, got {n!r}")
    return names


def normalized(weights: Mapping[str, float], names: Sequence[str]) -> tuple[float, ...]:
    """Weights in `names` order summing to one; a domain left out gets 0. DataMixtureError names
    the bad entry (unknown domain, negative or non-finite weight, zero sum)."""
    problem = domain_weights_problem(weights, names)
    if problem:
        raise DataMixtureError(problem)
    total = float(sum(weights.values()))
    return tuple(float(weights.get(n, 0.0)) / total for n in names)


class MixtureControl:
    """The knobs of a mixture and their values. Subclasses call `_control_changed()` hooks."""

    def __init__(
        self,
        names: Sequence[str],
        weights: Mapping[str, float] | None,
        *,
        curriculum: bool,
        curriculum_level: float,
        max_prune_fraction: float,
    ) -> None:
        self.names = check_names(names)
        self._weights = (
            normalized(weights, self.names)
            if weights is not None
            else (1.0 / len(self.names),) * len(self.names)
        )
        if not 0.0 <= max_prune_fraction <= MAX_PRUNE_FRACTION:
            raise DataMixtureError(
                f"max_prune_fraction must be in [0, {MAX_PRUNE_FRACTION}], got {max_prune_fraction}"
            )
        if not MIN_LEVEL <= curriculum_level <= 1.0:
            raise DataMixtureError(f"curriculum_level must be in [{MIN_LEVEL}, 1], got {curriculum_level}")
        self.curriculum = curriculum
        self._level = float(curriculum_level) if curriculum else 1.0
        self.max_prune_fraction = float(max_prune_fraction)
        self._prune_fraction = 0.0
        #: Bumped when the examples a domain draws from change (level, pruned set): the policy does
        #: not read a loss change across it as learnability.
        self.data_version = 0
        #: The data policy's state, kept for it (and checkpointed): {knob: state it last sent}.
        self.data_state: dict[str, Any] = {}
        self._loss_ema: dict[str, float] = {}

    # ---- values ------------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, float]:
        """The weights now, by domain, summing to one."""
        return dict(zip(self.names, self._weights, strict=True))

    @property
    def curriculum_level(self) -> float:
        return self._level

    @property
    def prune_fraction(self) -> float:
        return self._prune_fraction

    def pruned_fraction(self) -> float:
        """Fraction of the examples left out now (0 where the mixture cannot prune)."""
        return 0.0

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Change the weights (at a step boundary: the adapter calls this when an action applies)."""
        new = normalized(weights, self.names)
        if new != self._weights:
            self._weights = new
            self._control_changed()

    def set_curriculum_level(self, level: float) -> None:
        if not self.curriculum:
            raise DataMixtureError("this mixture has no curriculum: give it a difficulty per example")
        if not (isinstance(level, (int, float)) and MIN_LEVEL <= level <= 1.0):
            raise DataMixtureError(f"curriculum_level must be a number in [{MIN_LEVEL}, 1], got {level!r}")
        if float(level) != self._level:
            self._level = float(level)
            self.data_version += 1
            self._control_changed()

    def set_prune_fraction(self, fraction: float) -> None:
        if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= self.max_prune_fraction):
            raise DataMixtureError(
                f"prune_fraction must be a number in [0, {self.max_prune_fraction}] (the mixture's "
                f"max_prune_fraction), got {fraction!r}"
            )
        if float(fraction) != self._prune_fraction:
            self._prune_fraction = float(fraction)
            self._refresh_pruning()

    def _smoothed(self, sums: Any, counts: Any) -> dict[str, float]:
        """Per-domain loss, an EMA over the last ~LOSS_WINDOW_SAMPLES samples of each domain, for
        the domains with samples this step (sums and counts of this step's per-sample losses)."""
        out = {}
        for d, name in enumerate(self.names):
            n = int(counts[d])
            if not n:
                continue
            mean = float(sums[d]) / n
            prev = self._loss_ema.get(name)
            keep = (1.0 - 1.0 / LOSS_WINDOW_SAMPLES) ** n
            out[name] = self._loss_ema[name] = mean if prev is None else keep * prev + (1 - keep) * mean
        return out

    def _control_changed(self) -> None:
        """The weights, level or pruned set changed: subclasses take it from the next draw."""

    def _refresh_pruning(self) -> None:
        """Recompute which examples are left out (map-style mixtures that track examples)."""

    # ---- what the adapters call --------------------------------------------------------------
    def knob_specs(self) -> tuple[KnobSpec, ...]:
        specs = [KnobSpec(KNOB_DOMAIN_WEIGHTS, self.weights)]
        if self.curriculum:
            specs.append(KnobSpec(KNOB_CURRICULUM_LEVEL, self._level, minimum=MIN_LEVEL, maximum=1.0))
        if self.max_prune_fraction > 0:
            specs.append(
                KnobSpec(
                    KNOB_PRUNE_FRACTION, self._prune_fraction, minimum=0.0, maximum=self.max_prune_fraction
                )
            )
        return tuple(specs)

    def config(self) -> dict[str, Any]:
        """What the job reports with every step: the data knobs, the pruned fraction, the policy state."""
        out: dict[str, Any] = {KNOB_DOMAIN_WEIGHTS: self.weights}
        if self.curriculum:
            out[KNOB_CURRICULUM_LEVEL] = self._level
        if self.max_prune_fraction > 0:
            out[KNOB_PRUNE_FRACTION] = self._prune_fraction
            out[CONFIG_PRUNED_FRACTION] = self.pruned_fraction()
        if self.curriculum or self.max_prune_fraction > 0:
            out[CONFIG_DATA_VERSION] = self.data_version
        if self.data_state:
            out[CONFIG_DATA_STATE] = dict(self.data_state)
        return out

    def apply(self, action: Action) -> tuple[str, str] | None:
        """(outcome, detail) for a data knob; None for any other kind. Raises nothing."""
        kind = action.kind
        if kind not in (KNOB_DOMAIN_WEIGHTS, KNOB_CURRICULUM_LEVEL, KNOB_PRUNE_FRACTION):
            return None
        if kind == KNOB_CURRICULUM_LEVEL and not self.curriculum:
            return "rejected", "this mixture has no curriculum (no difficulty per example was given)"
        if kind == KNOB_PRUNE_FRACTION and self.max_prune_fraction <= 0:
            return "rejected", "this mixture does not prune (max_prune_fraction is 0)"
        value = action.params.get("value")
        before = self.config()
        try:
            if kind == KNOB_DOMAIN_WEIGHTS:
                self.set_weights(value)
            elif kind == KNOB_CURRICULUM_LEVEL:
                self.set_curriculum_level(value)
            else:
                self.set_prune_fraction(value)
        except DataMixtureError as exc:
            return "rejected", str(exc)
        state = action.params.get("state")
        state_changed = isinstance(state, Mapping) and self.data_state.get(kind) != dict(state)
        if state_changed:
            self.data_state[kind] = dict(state)
        if self.config().get(kind) == before.get(kind):
            return ("applied", "policy state updated") if state_changed else ("noop", "")
        if kind == KNOB_DOMAIN_WEIGHTS:
            shown = ", ".join(f"{n} {w:.3f}" for n, w in self.weights.items())
            return "applied", f"weights now {shown}"
        if kind == KNOB_PRUNE_FRACTION:
            return "applied", f"{self.pruned_fraction():.1%} of the examples left out now"
        return "applied", ""

    def control_state(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "weights": list(self._weights),
            "curriculum_level": self._level,
            "prune_fraction": self._prune_fraction,
            "data_state": dict(self.data_state),
            "data_version": self.data_version,
            "loss_ema": dict(self._loss_ema),
        }

    def load_control_state(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != list(self.names):
            raise DataMixtureError(
                f"the checkpoint's mixture has domains {list(state['names'])}, this one has "
                f"{list(self.names)}: build the mixture with the same domains, in the same order"
            )
        weights = tuple(float(w) for w in state["weights"])
        if len(weights) != len(self.names) or not all(math.isfinite(w) and w >= 0 for w in weights):
            raise DataMixtureError(f"the checkpoint's weights are not valid: {weights}")
        self._weights = weights
        self._level = float(state["curriculum_level"])
        self._prune_fraction = float(state["prune_fraction"])
        self.data_state = dict(state["data_state"])
        self.data_version = int(state.get("data_version", 0))
        self._loss_ema = {str(k): float(v) for k, v in state.get("loss_ema", {}).items()}
