"""Data policy: what to train on. Online mixing, a loss-aware curriculum, pruning.

- Online mixing: a bandit over the domains. Each domain's reward (`reward: gain`, the default) is
  what a sample of it buys: the absolute decrease of its smoothed training loss over the last
  interval, per unit of sampling (divided by its weight relative to uniform, so a domain is not
  rewarded only for being sampled more), and for a domain whose loss is under the domains' mean,
  multiplied by (its loss / the mean)^`loss_weight`: a loss caps what is left to learn, so learnt
  boilerplate that keeps falling a little (memorised) earns little. A domain near its loss floor
  (learnt boilerplate) and one that cannot be learned (noise) both end near the floor weight. Not the
  raw loss, as ODM uses (that rewards noise that cannot be learned), and not the relative decrease
  (`reward: relative`, kept for comparison): a ratio stays large as a loss approaches zero, so the
  mixture chased domains that were already learnt (issue 20). Rewards are smoothed (EMA), turned
  into target weights by a softmax with a temperature (scale-free: rewards are divided by their
  mean magnitude), mixed with a floor so no domain starves, and the weights move part of the way
  (`step_size`) towards the target at each decision.
- Curriculum: the level (the easiest fraction of each domain the sampler draws from) advances by
  `level_step` when the smoothed training loss fell less than `plateau_threshold` (relative) over
  the last `plateau_steps` steps: on a plateau, not on a fixed schedule.
- Pruning: after `prune_after_steps`, the fraction of examples the mixture may leave out (those
  whose loss stopped falling between visits: learned or unlearnable) grows by `prune_step` every
  `every_steps`, up to `max_prune_fraction`.

Pure: the bandit's and the curriculum's state travel in the actions (`params["state"]`), the job
keeps them (in its checkpoint too) and reports them back in `config["data_state"]`; a resumed job
and a restarted controller carry on from there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from trainwarden.controller.protocol import (
    CONFIG_DATA_STATE,
    CONFIG_DATA_VERSION,
    KNOB_CURRICULUM_LEVEL,
    KNOB_DOMAIN_WEIGHTS,
    KNOB_PRUNE_FRACTION,
    Action,
    JobShape,
)
from trainwarden.controller.schema import Budget
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies.base import PolicyKind, Range, param, register

_INF = float("inf")
#: The rewards a domain can earn (DataParams.reward).
REWARDS = ("gain", "relative")


@dataclass(frozen=True)
class DataParams:
    domains: tuple[str, ...] | None = param(
        None, doc="The job's domain names; when given, the job must have exactly these (checked at connect)."
    )
    initial_weights: Mapping[str, float] | None = param(
        None,
        valid=Range(0.0, _INF),
        doc="Weights to start from (normalised), by domain; default: the job's own.",
    )
    mixing: bool = param(True, doc="Change the domain weights online (the bandit).")
    every_steps: int = param(
        20, valid=Range(1, 100_000), tune=Range(5, 100), doc="Steps between two mixing decisions."
    )
    warmup_steps: int = param(
        20, valid=Range(0, 10_000_000), tune=Range(0, 200), doc="Steps before the first weight change."
    )
    floor: float = param(
        0.05, valid=Range(0.0, 0.5), tune=Range(0.01, 0.2), doc="Least weight of any domain (no starving)."
    )
    temperature: float = param(
        0.2,
        valid=Range(0.01, 100.0),
        tune=Range(0.1, 5.0, log=True),
        doc="Softmax temperature over rewards divided by their mean magnitude; lower is greedier.",
    )
    smoothing: float = param(
        0.3,
        valid=Range(0.01, 1.0),
        tune=Range(0.05, 0.9),
        doc="EMA weight of the newest reward in each domain's smoothed reward.",
    )
    reward: str = param(
        "gain",
        choices=REWARDS,
        doc="What a domain's reward measures: `gain`, the absolute decrease of its loss per interval "
        "per unit of sampling (what a sample buys: a learnt domain and noise both earn ~0); "
        "`relative`, that decrease divided by the loss (the reward before issue 20: it grows as a "
        "loss nears zero, so a learnt domain keeps winning; kept for comparison).",
    )
    loss_weight: float = param(
        2.0,
        valid=Range(0.0, 4.0),
        tune=Range(0.0, 3.0),
        doc="For `gain`: the reward of a domain whose loss is under the domains' mean is multiplied by "
        "(its loss / the mean) to this power. A loss bounds what is left to learn (a loss is >= 0), so a "
        "domain far below the others (learnt boilerplate) earns little even while it keeps falling, and "
        "the jitter of its few samples cannot win it weight back; 0: the plain absolute decrease.",
    )
    min_reward_scale: float = param(
        0.0005,
        valid=Range(0.0, 1.0),
        tune=Range(0.0001, 0.02, log=True),
        doc="Least scale the rewards are divided by before the softmax, as a fraction of the loss per "
        "interval (for `gain`, of the domains' mean loss): when every domain has stopped learning, "
        "noise in tiny rewards must not swing the weights.",
    )
    step_size: float = param(
        0.5,
        valid=Range(0.01, 1.0),
        tune=Range(0.1, 1.0),
        doc="How far the weights move towards the bandit's target at each decision.",
    )
    curriculum: bool = param(False, doc="Advance a curriculum level when the loss plateaus.")
    start_level: float = param(
        0.3, valid=Range(0.01, 1.0), tune=Range(0.1, 0.8), doc="Curriculum level to start at."
    )
    level_step: float = param(
        0.2, valid=Range(0.01, 1.0), tune=Range(0.05, 0.5), doc="Level increase on each plateau."
    )
    plateau_steps: int = param(
        40, valid=Range(1, 1_000_000), tune=Range(10, 200), doc="Steps over which a plateau is judged."
    )
    plateau_threshold: float = param(
        0.02,
        valid=Range(0.0, 1.0),
        tune=Range(0.002, 0.1, log=True),
        doc="A relative loss decrease below this over `plateau_steps` is a plateau.",
    )
    pruning: bool = param(False, doc="Leave out examples whose loss stopped falling.")
    max_prune_fraction: float = param(
        0.2, valid=Range(0.0, 0.9), tune=Range(0.0, 0.5), doc="Most of the examples ever pruned."
    )
    prune_after_steps: int = param(
        100, valid=Range(0, 10_000_000), tune=Range(20, 1000), doc="Steps before any pruning."
    )
    prune_step: float = param(
        0.05,
        valid=Range(0.001, 0.9),
        tune=Range(0.01, 0.2),
        doc="Increase of the pruned fraction per `every_steps`.",
    )

    def check(self) -> Iterator[str | tuple[str, str]]:
        """Rules across fields; a (key, message) pair is reported at that key's line."""
        names = self.domains
        if names is not None:
            if not names:
                yield "domains", "the list is empty; name the job's domains or leave `domains:` out"
            if len(set(names)) != len(names):
                yield "domains", f"a name is listed twice in {list(names)}; list each domain once"
            if names and self.floor * len(names) > 1:
                yield (
                    "floor",
                    f"{self.floor:g} x {len(names)} domains is over 1: no weights can respect it; "
                    f"lower floor to at most {1 / len(names):.3g}",
                )
        w = self.initial_weights
        if w is not None:
            if names is not None:
                for k in w:
                    if k not in names:
                        yield (
                            "initial_weights",
                            f"unknown domain {k!r}; the domains listed are "
                            f"{', '.join(names)}: fix the name or add it to `domains:`",
                        )
            if not sum(w.values()) > 0:
                yield "initial_weights", "every weight is 0; give at least one domain a positive weight"
            if self.floor * len(w) > 1:
                yield (
                    "floor",
                    f"{self.floor:g} x {len(w)} domains is over 1; lower floor to at most {1 / len(w):.3g}",
                )


def with_floor(weights: Mapping[str, float], floor: float) -> dict[str, float]:
    """Weights that sum to one with every one >= floor: the excess over the floor, renormalised,
    shares what the floors leave (1 - n x floor). Uniform when nothing is above the floor."""
    names = list(weights)
    n = len(names)
    floor = min(floor, 1.0 / n)
    excess = {k: max(0.0, float(weights[k]) - floor) if math.isfinite(weights[k]) else 0.0 for k in names}
    total = sum(excess.values())
    if total <= 0:
        return {k: 1.0 / n for k in names}
    free = 1.0 - n * floor
    return {k: floor + free * excess[k] / total for k in names}


def softmax_target(
    scores: Mapping[str, float], temperature: float, min_scale: float = 0.0
) -> dict[str, float]:
    """Softmax of the scores divided by their mean magnitude (so the temperature has no units),
    or by `min_scale` when they are all smaller than that."""
    scale = max(sum(abs(v) for v in scores.values()) / max(1, len(scores)), min_scale)
    if scale <= 0 or not math.isfinite(scale):
        return {k: 1.0 / len(scores) for k in scores}
    z = {k: v / (scale * temperature) for k, v in scores.items()}
    top = max(z.values())
    e = {k: math.exp(v - top) for k, v in z.items()}
    total = sum(e.values())
    return {k: v / total for k, v in e.items()}


def mix_step(
    weights: Mapping[str, float],
    losses: Mapping[str, float],
    state: Mapping[str, Any],
    step: int,
    p: DataParams,
    version: int | None = None,
) -> tuple[dict[str, float], dict[str, Any], dict[str, float]]:
    """One bandit decision: (new weights, new state, this interval's rewards). `version` is the
    mixture's data version: when it changed since the last decision (a curriculum level or pruned
    set changed which examples each domain gives), the losses are of other examples, so there is
    no reward this time, only a new baseline."""
    names = list(weights)
    n = len(names)
    prev_step = state.get("step")
    if version is not None and state.get("version", version) != version:
        prev_step = None
    prev_loss = state.get("loss", {})
    scores = {k: float(v) for k, v in state.get("score", {}).items() if k in weights}
    rewards: dict[str, float] = {}
    known = [float(v) for k, v in losses.items() if k in weights and math.isfinite(v)]
    mean_loss = sum(known) / len(known) if known else 0.0
    if isinstance(prev_step, int) and step > prev_step:
        per_interval = p.every_steps / (step - prev_step)
        for k in names:
            before, now = prev_loss.get(k), losses.get(k)
            if before is None or now is None or not before > 0:
                continue
            # Per unit of sampling (exposure relative to uniform), but at most doubled: a domain at
            # the floor has the noisiest loss, and dividing by its small share would amplify that.
            share = max(float(weights[k]) * n, 0.5)
            fell = before - now if p.reward == "gain" else (before - now) / before
            r = fell * per_interval / share
            if p.reward == "gain" and p.loss_weight and mean_loss > 0:
                # Only a loss under the mean lowers the reward: a low loss caps what is left to learn,
                # a high one says nothing (noise's is high), and scaling it up would scale its jitter.
                r *= min(1.0, max(now, 0.0) / mean_loss) ** p.loss_weight
            rewards[k] = r
            scores[k] = r if k not in scores else (1 - p.smoothing) * scores[k] + p.smoothing * r
    new = dict(weights)
    if rewards:
        scored = {k: scores.get(k, 0.0) for k in names}
        least = p.min_reward_scale
        if p.reward == "gain":  # rewards in loss units: the least scale is a fraction of the loss
            least *= mean_loss
        target = with_floor(softmax_target(scored, p.temperature, least), p.floor)
        new = {k: (1 - p.step_size) * float(weights[k]) + p.step_size * target[k] for k in names}
    new = with_floor(new, p.floor)
    state_out: dict[str, Any] = {
        "step": step,
        "loss": {k: losses[k] for k in names if k in losses},
        "score": scores,
    }
    if version is not None:
        state_out["version"] = version
    return new, state_out, rewards


@register
class DataPolicy(PolicyKind):
    kind = "data"
    Params = DataParams
    knobs = frozenset({KNOB_DOMAIN_WEIGHTS, KNOB_CURRICULUM_LEVEL, KNOB_PRUNE_FRACTION})

    def check_job(self, shape: JobShape) -> list[str]:
        """Problems of this policy with the job that connected (its domains), with the fix."""
        p: DataParams = self.params
        knob = shape.knob(KNOB_DOMAIN_WEIGHTS)
        if knob is None or not isinstance(knob.value, Mapping):
            return []
        job = list(knob.value)
        problems = []
        named = set(p.domains or ()) | set(p.initial_weights or {})
        unknown = sorted(named - set(job))
        if unknown:
            problems.append(
                f"names domain(s) {', '.join(map(repr, unknown))} that the job does not have; the job's "
                f"domains are {', '.join(job)}: fix the names in `domains:`/`initial_weights:`"
            )
        if p.domains is not None and set(p.domains) != set(job):
            missing = sorted(set(job) - set(p.domains))
            if missing:
                problems.append(
                    f"`domains:` leaves out the job's {', '.join(map(repr, missing))}; list every domain"
                )
        if p.floor * len(job) > 1:
            problems.append(
                f"floor {p.floor:g} x {len(job)} domains is over 1; lower floor to at most {1 / len(job):.3g}"
            )
        return problems

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        state = snapshot.config.get(CONFIG_DATA_STATE)
        state = state if isinstance(state, Mapping) else {}
        actions: list[Action] = []
        for act in (
            self._mixing(snapshot, state),
            self._curriculum(snapshot, state),
            self._pruning(snapshot),
        ):
            if act is not None:
                actions.append(act)
        return actions

    def watch_s(self, snapshot: Snapshot, budget: Budget) -> float:
        """The time, at the job's step time, until the soonest of its next decisions (mixing every
        `every_steps`, a curriculum check every `plateau_steps`, pruning every `every_steps`): a
        decision is read from the first exchange past its step."""
        p: DataParams = self.params
        state = snapshot.config.get(CONFIG_DATA_STATE)
        state = state if isinstance(state, Mapping) else {}

        def state_step(knob: str) -> Any:  # where its decider reads it (pruning keeps no state)
            mine = state.get(knob)
            return mine.get("step") if isinstance(mine, Mapping) else None

        due: list[int] = []
        for on, knob, every, since in (
            (p.mixing, KNOB_DOMAIN_WEIGHTS, p.every_steps, state_step(KNOB_DOMAIN_WEIGHTS)),
            (p.curriculum, KNOB_CURRICULUM_LEVEL, p.plateau_steps, state_step(KNOB_CURRICULUM_LEVEL)),
            (p.pruning, KNOB_PRUNE_FRACTION, p.every_steps, None),
        ):
            if not on or knob not in snapshot.knobs:
                continue
            last = _last_decision(snapshot, knob, since)
            if last < 0:
                return 0.0  # not started: the first decision is due now
            due.append(last + every)  # in the warm-up too: its baseline is read before it ends
        if not due:
            return math.inf
        step_s = snapshot.seconds_per_step or snapshot.step_time_s
        if not step_s:
            return 0.0
        return max(0.0, (min(due) - snapshot.step) * step_s)

    def _ready(self, snap: Snapshot, knob: str, every: int, state_step: Any) -> bool:
        if knob not in snap.knobs or knob in snap.pending:
            return False
        return snap.step - _last_decision(snap, knob, state_step) >= every

    def _mixing(self, snap: Snapshot, state: Mapping[str, Any]) -> Action | None:
        p: DataParams = self.params
        weights = snap.config.get(KNOB_DOMAIN_WEIGHTS)
        if not p.mixing or not isinstance(weights, Mapping) or not weights:
            return None
        bandit = state.get(KNOB_DOMAIN_WEIGHTS)
        bandit = bandit if isinstance(bandit, Mapping) else {}
        if not bandit:
            # First decision: the file's initial weights (if any), and the losses to measure from.
            if KNOB_DOMAIN_WEIGHTS not in snap.knobs or KNOB_DOMAIN_WEIGHTS in snap.pending:
                return None
            start = dict(weights)
            if p.initial_weights:
                known = {k: v for k, v in p.initial_weights.items() if k in weights}
                if not known or not sum(known.values()) > 0:
                    return None  # check_job said why at connect
                total = sum(known.values())
                start = {k: known.get(k, 0.0) / total for k in weights}
            start = with_floor(start, p.floor)
            losses = {k: v for k, v in snap.domain_loss.items() if k in weights}
            return Action(
                kind=KNOB_DOMAIN_WEIGHTS,
                params={"value": start, "state": {"step": snap.step, "loss": losses, "score": {}}},
                step=snap.step + 1,
                reason="data mixing starts: " + _show(start) + "; per-domain loss " + _show(losses),
            )
        losses = {k: v for k, v in snap.domain_loss.items() if k in weights}
        version = snap.config.get(CONFIG_DATA_VERSION)
        version = version if isinstance(version, int) and not isinstance(version, bool) else None
        if snap.step < p.warmup_steps:
            # The first reward is read over the warm-up's last interval, not from the start: a loss's
            # first fall (fastest on the easiest domain) is not what a sample of it buys later.
            base, last = bandit.get("step"), p.warmup_steps - p.every_steps
            if (
                not (isinstance(base, int) and base < last <= snap.step)
                or KNOB_DOMAIN_WEIGHTS in snap.pending
            ):
                return None
            baseline: dict[str, Any] = {"step": snap.step, "loss": losses, "score": {}}
            if version is not None:
                baseline["version"] = version
            return Action(
                kind=KNOB_DOMAIN_WEIGHTS,
                params={"value": dict(weights), "state": baseline},
                step=snap.step + 1,
                reason=f"warm-up ends at step {p.warmup_steps}: learnability is measured from here; "
                "per-domain loss " + _show(losses),
            )
        if not self._ready(snap, KNOB_DOMAIN_WEIGHTS, p.every_steps, bandit.get("step")):
            return None
        new, new_state, rewards = mix_step(weights, losses, bandit, snap.step, p, version)
        if not rewards and version is not None and bandit.get("version", version) != version:
            return Action(
                kind=KNOB_DOMAIN_WEIGHTS,
                params={"value": dict(weights), "state": new_state},
                step=snap.step + 1,
                reason="the examples drawn changed (curriculum level or pruned set): learnability is "
                "measured again from here; per-domain loss " + _show(losses),
            )
        return Action(
            kind=KNOB_DOMAIN_WEIGHTS,
            params={"value": new, "state": new_state},
            step=snap.step + 1,
            reason=(
                f"learnability ({_REWARD_WORDS[p.reward]} per {p.every_steps} steps, per unit of sampling) "
                + _show(rewards, signed=True)
                + "; smoothed "
                + _show(new_state["score"], signed=True)
                + "; per-domain loss "
                + _show(losses)
                + "; weights "
                + ", ".join(f"{k} {float(weights[k]):.3f}->{new[k]:.3f}" for k in new)
            ),
        )

    def _curriculum(self, snap: Snapshot, state: Mapping[str, Any]) -> Action | None:
        p: DataParams = self.params
        level = snap.config.get(KNOB_CURRICULUM_LEVEL)
        if not p.curriculum or not isinstance(level, (int, float)) or snap.loss is None:
            return None
        cur = state.get(KNOB_CURRICULUM_LEVEL)
        cur = cur if isinstance(cur, Mapping) else {}
        if not cur:
            if KNOB_CURRICULUM_LEVEL in snap.pending:
                return None
            return Action(
                kind=KNOB_CURRICULUM_LEVEL,
                params={
                    "value": p.start_level,
                    "state": {
                        "step": snap.step,
                        "loss": snap.loss,
                        "version": snap.config.get(CONFIG_DATA_VERSION),
                    },
                },
                step=snap.step + 1,
                reason=f"curriculum starts at level {p.start_level:g} (the easiest part of each domain)",
            )
        if not self._ready(snap, KNOB_CURRICULUM_LEVEL, p.plateau_steps, cur.get("step")):
            return None
        version = snap.config.get(CONFIG_DATA_VERSION)
        before = float(cur.get("loss", snap.loss))
        fell = (before - snap.loss) / before if before > 0 else 0.0
        new = float(level)
        if cur.get("version", version) != version:
            # A level change or pruning since the last check: the loss is of other examples now.
            why = "the examples drawn changed (level or pruning): the plateau is measured again from here"
        elif fell < p.plateau_threshold and level < 1.0:
            new = min(1.0, round(float(level) + p.level_step, 6))
            span = snap.step - int(cur.get("step", snap.step))
            why = f"plateau: loss {before:.4g} -> {snap.loss:.4g} ({fell:+.1%}) over {span} steps"
        else:
            why = f"still learning: loss {before:.4g} -> {snap.loss:.4g} ({fell:+.1%})"
        return Action(
            kind=KNOB_CURRICULUM_LEVEL,
            params={"value": new, "state": {"step": snap.step, "loss": snap.loss, "version": version}},
            step=snap.step + 1,
            reason=f"{why}; level {float(level):g} -> {new:g}",
        )

    def _pruning(self, snap: Snapshot) -> Action | None:
        p: DataParams = self.params
        current = snap.config.get(KNOB_PRUNE_FRACTION)
        spec = snap.knobs.get(KNOB_PRUNE_FRACTION)
        if not p.pruning or spec is None or not isinstance(current, (int, float)):
            return None
        most = min(p.max_prune_fraction, spec.maximum if spec.maximum is not None else p.max_prune_fraction)
        if snap.step < p.prune_after_steps or current >= most - 1e-12:
            return None
        if not self._ready(snap, KNOB_PRUNE_FRACTION, p.every_steps, None):
            return None
        new = round(min(most, float(current) + p.prune_step), 6)
        return Action(
            kind=KNOB_PRUNE_FRACTION,
            params={"value": new},
            step=snap.step + 1,
            reason=(
                f"step {snap.step} >= {p.prune_after_steps}: examples whose loss stopped falling may be left "
                f"out, up to {new:.0%} (bound {most:.0%})"
            ),
        )


def _last_decision(snap: Snapshot, knob: str, state_step: Any) -> int:
    """The step of the knob's last decision: its last action, or the step its state carries (a
    resumed job, a restarted controller); a large negative number when there was none."""
    return max(
        snap.last_action_step.get(knob, -(10**18)),
        state_step if isinstance(state_step, int) else -(10**18),
    )


_REWARD_WORDS = {"gain": "loss decrease", "relative": "relative loss decrease"}


def _show(values: Mapping[str, float], signed: bool = False) -> str:
    if not values:
        return "(none yet)"
    fmt = "{:+.4f}" if signed else "{:.4f}"
    return ", ".join(f"{k} {fmt.format(v)}" for k, v in values.items())
