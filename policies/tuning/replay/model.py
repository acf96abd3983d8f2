"""How each knob changes memory, step time and loss, calibrated on recorded runs.

Three fits, each the simplest that the recordings can pin down:

- Memory: per-step peak against the tokens of a micro-batch (micro-batch x the step's tokens
  per sample), one curve per engine configuration (ZeRO stage, offloads, precision,
  checkpointing: `config_key` without the micro-batch): piecewise linear through the median peak
  seen at each size, non-decreasing, extended past the sizes seen by the slope of the nearest
  segment. Activations grow with the tokens a micro-batch holds; the rest does not. Counting
  tokens, not samples, is what lets a job whose sequence length grows mid-run (a long-context
  phase) be replayed: the replay runs each step at the recording's length for that step, so a
  micro-batch that fitted before the phase is charged what it costs after it. A length recorded
  at two sizes or more gets a curve of its own (attention's scores grow with the square of the
  length: measured on the demo, 4096 tokens a micro-batch peaked ~620 MiB as 16 x 256 bytes and
  ~520 MiB as 64 x 64); any other length is charged the curve of all lengths pooled.
- Step time: seconds per optimizer step against micro-batches per step, per engine
  configuration and sequence length, the same way: the samples of a step cost the same however
  they are cut, each micro-batch adds an overhead (kernel launches, Python). A length no
  recording ran under is charged the nearest recorded length's time scaled by the tokens. With
  one micro-batch size seen, the curve is flat (said in `notes`): record runs that visit the
  sizes the tuned policies will.
- Loss: the learning-rate annealing law of Tissue et al. 2024 ("Scaling Law with Learning Rate
  Annealing"): L(s) = L0 + A x S1^-alpha - C x S2, where S1 is the sum of the LR so far (the
  "forward area") and S2 the annealing area (a momentum of the LR's decreases). It is fitted on
  every recorded step's loss and LR, so the LR multiplier's cooldown moves the predicted loss
  as a real cooldown does. The micro-batch does not enter: trainwarden's adapters keep the
  global batch, so the same samples give the same gradient whatever the micro-batch.

The clock is the job's own where it can be: a CPU job's step is timed by its CPU seconds
(`StepRecord.cpu_time_s`, what the process itself spent) times the wall seconds a CPU second
took when the machine was quietest in the recordings (`cpu_to_wall`, the 10th percentile of
wall/CPU per step). On a machine shared with other jobs the wall time of a step swings 2-3x with
the neighbours' load, and a fit in wall seconds learns the load of the hour it was recorded in;
CPU seconds are the job's. The replay then says how long the job takes at the recordings' quietest,
and the recordings' load factors (their wall time over that) are in `notes`. A GPU job, or a
trace without CPU times (an older agent), is timed in wall seconds as before.

A run's noise is replayed, not averaged away: each recorded memory sample and step time is
kept as its ratio to the fit, and the replay multiplies the fit of the configuration it runs
by the ratio at the same sample index (cycled past the recording's end). Warm-up transients
and spikes land where they landed, and the same trace gives the same replay every time.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainwarden.controller.protocol import KNOB_MICRO_BATCH, StepRecord
from trainwarden.policies.memory import config_key
from trainwarden.policies.tuning.replay.trace import Trace

#: Grids of the loss law's two non-linear constants (the rest is a linear least-squares fit).
_ALPHAS = (0.01, 0.02, 0.03, *(0.05 * i for i in range(1, 31)))
_DECAYS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)


def engine_key(config: Mapping[str, Any]) -> str:
    """The configuration's footprint key without the micro-batch: what a curve is fitted per."""
    return config_key({k: v for k, v in config.items() if k != KNOB_MICRO_BATCH})


@dataclass(frozen=True)
class Curve:
    """A non-decreasing piecewise-linear curve through (x, y) points, extended past its ends by
    the slope of its end segments (flat with one point)."""

    points: tuple[tuple[float, float], ...]

    def at(self, x: float) -> float:
        pts = self.points
        if len(pts) == 1:
            return pts[0][1]
        if x <= pts[0][0]:
            (x0, y0), (x1, y1) = pts[0], pts[1]
        elif x >= pts[-1][0]:
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
        else:
            i = next(i for i in range(1, len(pts)) if pts[i][0] >= x)
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _fit_curve(points: Mapping[float, Sequence[float]]) -> Curve:
    """The curve through the median y at each x, made non-decreasing (more samples never need
    less memory or time, and noise must not say they do). Piecewise, not one line: measured on
    the demo, RSS grows ~8 MiB per sample below micro-batch 16 and ~3 above 32 (allocator
    caching), so a line through the large sizes is ~80 MiB off at the small ones."""
    xs = sorted(points)
    ys: list[float] = []
    for x in xs:
        ys.append(max(statistics.median(points[x]), ys[-1] if ys else float("-inf")))
    return Curve(tuple(zip(xs, ys)))


@dataclass(frozen=True)
class LossLaw:
    """L = l0 + a x S1^-alpha - c x S2 over the LR normalised by `lr_ref` (Tissue et al. 2024)."""

    l0: float
    a: float
    alpha: float
    c: float
    decay: float
    """Momentum of the annealing area (their lambda)."""
    lr_ref: float
    rmse: float
    """Root-mean-square error of the fit on the recorded steps."""


class LossCurve:
    """The law's running sums over one replayed run: `next(lr)` is the loss of the next step."""

    def __init__(self, law: LossLaw) -> None:
        self.law = law
        self.s1 = 0.0
        self.s2 = 0.0
        self.m = 0.0
        self.prev: float | None = None

    def next(self, lr: float) -> float:
        eta = lr / self.law.lr_ref if self.law.lr_ref > 0 else 0.0
        if self.prev is not None:
            self.m = self.law.decay * self.m + (self.prev - eta)
        self.prev = eta
        self.s1 += eta
        self.s2 += self.m
        law = self.law
        return law.l0 + law.a * max(self.s1, 1e-9) ** -law.alpha - law.c * self.s2


def _areas(etas: Sequence[float], decay: float) -> tuple[list[float], list[float]]:
    s1, s2, m, prev = 0.0, 0.0, 0.0, None
    out1, out2 = [], []
    for eta in etas:
        if prev is not None:
            m = decay * m + (prev - eta)
        prev = eta
        s1 += eta
        s2 += m
        out1.append(s1)
        out2.append(s2)
    return out1, out2


def fit_loss_law(traces: Sequence[Trace]) -> LossLaw:
    """The law fitted on every finite recorded loss of every trace (least squares on a grid)."""
    import numpy as np

    lr_ref = max((s.lr or 0.0) for t in traces for s in t.steps) or 1.0
    best: tuple[float, LossLaw] | None = None
    for decay in _DECAYS:
        cols: list[tuple[float, float, float]] = []  # (S1, S2, loss)
        for t in traces:
            etas = [(s.lr or 0.0) / lr_ref for s in t.steps]
            s1, s2 = _areas(etas, decay)
            for rec, a1, a2 in zip(t.steps, s1, s2):
                if rec.loss is not None and math.isfinite(rec.loss) and a1 > 0:
                    cols.append((a1, a2, rec.loss))
        arr = np.array(cols)
        y = arr[:, 2]
        for alpha in _ALPHAS:
            for use_c in (True, False):
                x = [np.ones(len(arr)), arr[:, 0] ** -alpha] + ([-arr[:, 1]] if use_c else [])
                design = np.stack(x, axis=1)
                coef, *_ = np.linalg.lstsq(design, y, rcond=None)
                c = float(coef[2]) if use_c else 0.0
                if coef[1] < 0 or c < 0:
                    continue  # loss must fall with LR area, and annealing must not raise it
                rmse = float(np.sqrt(np.mean((design @ coef - y) ** 2)))
                law = LossLaw(float(coef[0]), float(coef[1]), alpha, c, decay, lr_ref, rmse)
                if best is None or rmse < best[0]:
                    best = (rmse, law)
    if best is None:  # nothing decreasing to fit: the mean loss, flat
        mean = float(np.mean([s.loss for t in traces for s in t.steps if s.loss is not None]))
        return LossLaw(mean, 0.0, 1.0, 0.0, 0.0, lr_ref, float("nan"))
    return best[1]


@dataclass(frozen=True)
class KnobModel:
    """Memory and step time per configuration, and the loss law, fitted on some traces."""

    memory: Mapping[str, Curve]
    """engine key -> per-step peak bytes against the tokens of a micro-batch, every length pooled."""
    step_time: Mapping[str, Mapping[int, Curve]]
    """engine key -> tokens per sample -> seconds per optimizer step against micro-batches per step."""
    loss: LossLaw
    switch_s: Mapping[str, float]
    """knob -> median seconds an applied switch of it took (decisions.jsonl), added to the next step."""
    notes: tuple[str, ...] = ()
    """What the recordings could not pin down (said by `tune`, kept in the results)."""
    memory_by_length: Mapping[str, Mapping[int, Curve]] = dataclasses.field(default_factory=dict)
    """engine key -> tokens per sample -> the same, for each length recorded at two sizes or more."""
    cpu_to_wall: float | None = None
    """Wall seconds per CPU second on the quiet machine when steps are timed in CPU seconds
    (`step_seconds`); None: timed in wall seconds."""

    def step_seconds(self, rec: StepRecord) -> float:
        """The recorded step's duration in the model's units (0 when it has none)."""
        if self.cpu_to_wall is not None:
            cpu = rec.cpu_time_s
            return cpu * self.cpu_to_wall if cpu is not None and cpu > 0 and math.isfinite(cpu) else 0.0
        ok = rec.step_time_s > 0 and math.isfinite(rec.step_time_s)
        return rec.step_time_s if ok else 0.0

    def peak_bytes(self, config: Mapping[str, Any], tokens_per_sample: int) -> tuple[float, bool]:
        """Per-step peak under `config` with samples of `tokens_per_sample`, and whether its engine
        configuration was ever recorded (when not: the highest of the recorded curves at this size,
        a pessimistic guess)."""
        size = float(config.get(KNOB_MICRO_BATCH) or 1) * tokens_per_sample
        key = engine_key(config)
        curve = self.memory_by_length.get(key, {}).get(tokens_per_sample) or self.memory.get(key)
        if curve is not None:
            return curve.at(size), True
        return max(curve.at(size) for curve in self.memory.values()), False

    def seconds_per_step(
        self, config: Mapping[str, Any], global_batch: int, tokens_per_sample: int
    ) -> tuple[float, bool]:
        """Seconds of one optimizer step, and whether this configuration and length were recorded
        (when not: the nearest recorded length scaled by the tokens, averaged over the engine
        configurations when the engine's was never recorded)."""
        n_micro = _n_micro(config, global_batch)
        by_length = self.step_time.get(engine_key(config))
        if by_length is not None:
            return _at_length(by_length, tokens_per_sample, n_micro)
        guesses = [_at_length(c, tokens_per_sample, n_micro)[0] for c in self.step_time.values()]
        return statistics.mean(guesses), False


def _at_length(by_length: Mapping[int, Curve], length: int, n_micro: int) -> tuple[float, bool]:
    """The curve recorded at `length`, else the nearest length's, scaled by the tokens."""
    curve = by_length.get(length)
    if curve is not None:
        return curve.at(n_micro), True
    near = min(by_length, key=lambda n: (abs(math.log(n / length)), n))
    return by_length[near].at(n_micro) * length / near, False


def _n_micro(config: Mapping[str, Any], global_batch: int) -> int:
    mb = int(config.get(KNOB_MICRO_BATCH) or global_batch or 1)
    return math.ceil(global_batch / mb) if global_batch else 1


def cpu_to_wall(traces: Sequence[Trace]) -> float | None:
    """Wall seconds per CPU second at the quietest steps, when every trace is of a CPU job with
    CPU times on nearly every step; else None (time in wall seconds)."""
    ratios: list[float] = []
    for t in traces:
        devices = {m.device for s in t.steps for m in s.memory}
        if not devices or any(not d.startswith("cpu") for d in devices):
            return None  # a GPU's step is not its host process's CPU time
        timed = [s for s in t.steps[1:] if s.cpu_time_s and s.cpu_time_s > 0 and s.step_time_s > 0]
        if len(timed) < 0.9 * (len(t.steps) - 1) or not timed:
            return None
        per = sorted(s.step_time_s / s.cpu_time_s for s in timed if s.cpu_time_s)
        ratios.append(per[len(per) // 10])
    return min(ratios) if ratios else None


def load_factors(traces: Sequence[Trace], cpu_to_wall: float) -> list[float]:
    """Each trace's wall time over its CPU time on the quiet machine: what the load cost it."""
    out = []
    for t in traces:
        steps = [s for s in t.steps[1:] if s.cpu_time_s]
        cpu = sum(s.cpu_time_s or 0.0 for s in steps) * cpu_to_wall
        out.append(sum(s.step_time_s for s in steps) / cpu if cpu > 0 else float("nan"))
    return out


def fit_model(traces: Sequence[Trace]) -> KnobModel:
    """Calibrate on `traces` (runs of the same job: same model, same global batch)."""
    clock = KnobModel({}, {}, LossLaw(0, 0, 1, 0, 0, 1, 0), {}, cpu_to_wall=cpu_to_wall(traces))
    mem_by_length: dict[str, dict[int, dict[float, list[float]]]] = {}
    time_points: dict[str, dict[int, dict[float, list[float]]]] = {}
    for t in traces:
        gb = t.shape.global_batch_size
        lengths = t.sequence_lengths()
        for i, (rec, length) in enumerate(zip(t.steps, lengths)):
            key = engine_key(rec.config)
            if rec.memory:
                size = float(rec.config.get(KNOB_MICRO_BATCH) or 1) * length
                peak = float(max(m.peak_bytes for m in rec.memory))
                mem_by_length.setdefault(key, {}).setdefault(length, {}).setdefault(size, []).append(peak)
            # The first step carries start-up work (allocator, caches), and so does the first at a
            # new length (measured: 3.6 s against 2.1-2.8 for the next ones at 256 bytes): neither
            # is a step of the configuration. (One such step poisoned a whole curve, which is kept
            # non-decreasing from its smallest point.)
            seconds = clock.step_seconds(rec)
            if i > 0 and lengths[i - 1] == length and seconds > 0:
                n = float(_n_micro(rec.config, gb))
                time_points.setdefault(key, {}).setdefault(length, {}).setdefault(n, []).append(seconds)
    # Every length pooled: the curve for a length with one size recorded, or none.
    mem_points: dict[str, dict[float, list[float]]] = {}
    for key, by_length in mem_by_length.items():
        for pts in by_length.values():
            for size, peaks in pts.items():
                mem_points.setdefault(key, {}).setdefault(size, []).extend(peaks)
    notes = []
    for key, pts in sorted(mem_points.items()):
        if len(pts) == 1:
            notes.append(
                f"memory of {key or 'the configuration'} was recorded at one micro-batch size only: "
                "assumed the same at every size (record a run that changes it)"
            )
    if clock.cpu_to_wall is not None:
        factors = ", ".join(f"{f:.2f}" for f in load_factors(traces, clock.cpu_to_wall))
        notes.append(
            f"step time replayed in CPU seconds x {clock.cpu_to_wall:.3f} (wall per CPU second at the "
            f"recordings' quietest steps): the recordings ran {factors}x slower than that overall"
        )
    switch: dict[str, list[float]] = {}
    for t in traces:
        for d in t.decisions:
            if d.get("outcome") == "applied" and isinstance(d.get("duration_s"), (int, float)):
                switch.setdefault(str(d.get("kind")), []).append(float(d["duration_s"]))
    return KnobModel(
        memory={k: _fit_curve(v) for k, v in mem_points.items()},
        memory_by_length={
            k: {n: _fit_curve(pts) for n, pts in v.items() if len(pts) > 1} for k, v in mem_by_length.items()
        },
        step_time={k: {n: _fit_curve(c) for n, c in v.items()} for k, v in time_points.items()},
        loss=fit_loss_law(traces),
        switch_s={k: statistics.median(v) for k, v in switch.items()},
        notes=tuple(notes),
        cpu_to_wall=clock.cpu_to_wall,
    )


@dataclass(frozen=True)
class Residuals:
    """One trace's noise as ratios to the model: memory per sample, step time per step."""

    memory: tuple[float, ...]
    step_time: tuple[float, ...]

    def memory_at(self, i: int) -> float:
        return self.memory[i % len(self.memory)] if self.memory else 1.0

    def time_at(self, i: int) -> float:
        return self.step_time[i % len(self.step_time)] if self.step_time else 1.0


def residuals(model: KnobModel, trace: Trace) -> Residuals:
    gb = trace.shape.global_batch_size
    mem, times = [], []
    for rec, length in zip(trace.steps, trace.sequence_lengths()):
        if rec.memory:
            fit, _ = model.peak_bytes(rec.config, length)
            mem.append(max(m.peak_bytes for m in rec.memory) / fit if fit > 0 else 1.0)
        fit_t, _ = model.seconds_per_step(rec.config, gb, length)
        seconds = model.step_seconds(rec)
        times.append(seconds / fit_t if seconds > 0 and fit_t > 0 else 1.0)
    return Residuals(tuple(mem), tuple(times))
