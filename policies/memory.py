"""Memory policy: keep every rank's per-step peak under the cap by walking a ladder of rungs.

Two kinds of rung, walked in this order:

- Engine rungs, when the job's adapter reports engine knobs (DeepSpeed: `zero_stage`,
  `offload_optimizer`, `offload_param`, `precision`, and `activation_checkpointing` where the model
  can switch it). Each rung is a whole configuration of those knobs, fastest first, leanest last.
  The default ladders change only the stage and the offloads (precision changes the numerics;
  checkpointing's saving is activation memory, which nothing here estimates): a file's ladder
  may name the others. The default ladder is derived from what the adapter accepts,
  the device, the parameter count and the world size (`default_ladder`); a policy file may give its
  own (`ladder:`). A switch between rungs builds a new engine (seconds), so they move rarely.
- The micro-batch, the innermost rung (the global batch is kept: gradient accumulation grows as
  the micro-batch shrinks). It is the whole ladder for adapters without engine knobs, and the last
  resort below the leanest engine rung.

Down: when a rank's per-step peak is above the high-water mark, or when the trend of the peak since
the last change is forecast to cross it within `forecast_steps` (so the switch lands before the cap
is hit), go to the fastest leaner rung whose footprint is forecast to fit; a rung seen over the mark
is never entered again in the run (it would flap) unless what it is keyed by changed (the
micro-batch, the precision). Up: after `room_steps` steps in which every sample stayed below the
low-water mark, one rung at a time, to a rung not seen over the mark and forecast to fit. Every
action's reason says which rule fired, on which numbers.

Footprints are learnt at run time: the peak observed under each configuration (`config_key`).
Before a rung has been seen, its footprint is estimated: on a GPU from the model-state bytes per
rank (DeepSpeed's ZeRO arithmetic, `model_state_bytes`), on a CPU from the measurements below
(`cpu_rss_delta`), since on a CPU device memory is RSS and it does not follow the GPU arithmetic.

What the snapshot must carry: `memory`, `config`, `knobs`, `peak_by_micro_batch`, and for the
engine ladder at full strength `peak_by_config` (peak per `config_key`) and `recent_peaks`
((step, peak) samples). Without those two (an older controller) the policy still steps down on
the peak now, one rung at a time, and steps up only when nothing at this micro-batch was ever seen
over the mark (`peak_by_micro_batch`, a run-wide high-water record): it never flaps either way.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainwarden.controller.protocol import (
    KNOB_ACTIVATION_CHECKPOINTING,
    KNOB_MICRO_BATCH,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_ZERO_STAGE,
    Action,
    KnobSpec,
)
from trainwarden.controller.schema import Budget
from trainwarden.controller.snapshot import FOOTPRINT_KNOBS, Snapshot, config_key
from trainwarden.policies.base import PolicyKind, Range, param, register
from trainwarden.policies.units import format_bytes

#: Knobs a ladder rung may name: the footprint's knobs (the contract's, controller/snapshot.py)
#: but the micro-batch, which the ladder steps within a rung.
RUNG_KNOBS = tuple(k for k in FOOTPRINT_KNOBS if k != KNOB_MICRO_BATCH)
PRECISIONS = ("fp32", "bf16", "fp16")
#: Rung knobs every rung must name once one rung does (they have no natural default);
#: an offload or activation checkpointing a rung does not name is off.
_REQUIRED_IF_USED = (KNOB_ZERO_STAGE, KNOB_PRECISION)
#: Fewest samples since the last change that the trend forecast fits a line through.
MIN_TREND_SAMPLES = 4
#: The job's first optimizer step is left out of the trend: it runs before the optimizer's update
#: has created its state (Adam's moments are made lazily, at the first step), so its peak sits below
#: every later one by that state's size, and a line from it reads as growth (measured on a CPU run:
#: 501 MiB at step 1, 530 flat after; the line forecast a crossing 16 steps on and stepped down).
FIRST_STEP = 1
#: Most recent samples the trend forecast looks at.
MAX_TREND_SAMPLES = 16

#: A rung: sorted (knob, value) pairs over the ladder's knobs. Hashable and canonical.
Rung = tuple[tuple[str, Any], ...]

# ---- what RSS does on a CPU (the numbers behind the CPU ladder) ----------------------------------
# Per-rank per-step peak RSS (VmHWM, reset every step), two ranks under torchrun, gloo, one torch
# thread each, this repository's GPT, fp32, DeepSpeed 0.19.8 / torch 2.13 CPU, config AdamW with
# torch_adam, reduce/allgather buckets 2e6, glibc's M_MMAP_THRESHOLD at 64 KiB (without it, freed
# tensors stay resident and a switched engine measured 100-200 MiB above a fresh one), switched in
# place in one process, in MiB (seconds per optimizer step in brackets, on a shared 2-core box):
#
#   params  layout          ZeRO 0      ZeRO 1      ZeRO 2      Z2+off opt  ZeRO 3      Z3+off opt  Z3+off all
#   3.24M   mb 2x64, gas 1  410.7       445.5       444.6
#   7.22M   mb 2x64, gas 1  487.0       503.4       503.7
#   28.6M   mb 1x64, gas 2  895.0(1.4)  830.3(1.6)  830.6(2.3)  962.7(2.3)  842.0(3.5)  876.0(3.6)  1204(2.4)
#   28.6M   the demo, fresh 913.3(0.9)  847.9(1.0)
#   42.8M   mb 2x64, gas 1  1166.9      1048.2      1048.5
#
# Measured on an Intel Xeon with AVX512-FP16, and again on an AMD EPYC (Zen 4: AVX512 without
# AVX512-FP16; kernel 6.18, glibc 2.36), where the rows it repeated agree to within 2 MiB, so the
# table and the constants below hold on both (no per-CPU term): plain DeepSpeed, 28.6M, mb 1x64,
# gas 1: ZeRO 0 896.3, ZeRO 1 830.6; the demo: ZeRO 0 914.3, ZeRO 1 849-851 fresh and 849.4-849.8
# switched into. What does move ZeRO 1 (measured on the EPYC): DeepSpeed's default 5e8 buckets
# (+56 MiB over 2e6, plain); no mmap threshold (the demo: ZeRO 1 fresh 919-964, switched into
# 995-1069, ZeRO 0 931-936);
# torch's fused CPU AdamW (`"fused": true`), which drops the two partition-sized temporaries the
# unfused update makes over ZeRO's flat partition: ZeRO 1 791.3 plain and 803-811 in the demo,
# ZeRO 0 unchanged (895.7, 914.0). The constants are for the unfused default, so with a fused Adam
# they under-forecast the saving (never its sign).
#
# So on a CPU: ZeRO 1 and 2 sit at the same RSS (2 is only slower), ZeRO 3 is above them and 2-3x
# slower, and every offload is *above* ZeRO 0 (offloading "to the CPU" from the CPU saves nothing
# and adds pinned buffers). ZeRO 1 against ZeRO 0 is a fixed ~47 MiB (DeepSpeed's buffers) minus
# ~4.07 bytes per parameter at two ranks (the partitioned fp32 masters and Adam moments): a least-
# squares line through the 3.24M and 42.8M rows, within 3 MiB of the 7.22M and 28.6M rows. It
# breaks even near 12M parameters. The CPU ladder is therefore ZeRO 0 -> ZeRO 1 for models above
# that size, and ZeRO 0 alone (the micro-batch does the work) below it.
#: DeepSpeed's fixed resident cost of a ZeRO 1/2 engine over ZeRO 0 on a CPU (measured, see above).
CPU_ZERO12_FIXED_BYTES = 47 * 2**20
#: Bytes per parameter a ZeRO 1/2 engine saves over ZeRO 0 on a CPU at two ranks (measured); the
#: partitioned share grows as 1 - 1/world, so the saving at N ranks is 2 x this x (1 - 1/N).
CPU_ZERO12_SAVED_PER_PARAM_2_RANKS = 4.07


def describe_rung(rung: Rung | Mapping[str, Any]) -> str:
    """`ZeRO 2 + optimizer offload, bf16`: a rung in words, for reasons and logs."""
    d = dict(rung)
    words = []
    if KNOB_ZERO_STAGE in d:
        words.append(f"ZeRO {d[KNOB_ZERO_STAGE]}")
    offloads = [
        w for k, w in ((KNOB_OFFLOAD_OPTIMIZER, "optimizer"), (KNOB_OFFLOAD_PARAM, "parameter")) if d.get(k)
    ]
    if offloads:
        words.append(f"{' and '.join(offloads)} offload")
    if d.get(KNOB_ACTIVATION_CHECKPOINTING):
        words.append("activation checkpointing")
    text = " + ".join(words)
    if KNOB_PRECISION in d:
        text = f"{text}, {d[KNOB_PRECISION]}" if text else str(d[KNOB_PRECISION])
    return text or "as configured"


# ---- the ladder: parsing and checking ------------------------------------------------------------


def parse_ladder(raw: Any) -> tuple[tuple[Rung, ...], list[str]]:
    """The rungs of a `ladder:` parameter and every problem with it (rungs are empty if any).

    Each item is a mapping knob -> value. A rung names a subset of RUNG_KNOBS; the ladder's knobs
    are those any rung names; an offload a rung leaves out is off; `zero_stage` and `precision`,
    once one rung names them, every rung must name (they have no default that would not surprise).
    Values are checked as DeepSpeed would check them (an offload the stage cannot carry is refused).
    Never raises, whatever `raw` holds (it comes from a file)."""
    if raw is None or (isinstance(raw, (tuple, list)) and not raw):
        return (), []
    if not isinstance(raw, (tuple, list)):
        return (), [f"ladder must be a list of rungs (mappings of knob: value), got {type(raw).__name__}"]
    problems: list[str] = []
    items: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"ladder[{i}]"
        if not isinstance(item, Mapping):
            problems.append(
                f"{where} must be a mapping of knob: value (like {{zero_stage: 2}}), got {item!r}"[:200]
            )
            continue
        if not item:
            problems.append(f"{where} is empty; name at least one of {', '.join(RUNG_KNOBS)}")
            continue
        rung: dict[str, Any] = {}
        for key, value in item.items():
            problem = _check_rung_value(where, key, value)
            if problem:
                problems.append(problem)
            else:
                rung[str(key)] = value
        items.append(rung)
    if problems:
        return (), problems
    if len(items) < 2:
        return (), [
            "ladder needs at least two rungs (fastest first, leanest last); leave it out for the default"
        ]
    used = {k for item in items for k in item}
    for knob in _REQUIRED_IF_USED:
        if knob in used:
            for i, item in enumerate(items):
                if knob not in item:
                    problems.append(f"ladder[{i}] does not say {knob}; every rung must, since another does")
    rungs: list[Rung] = []
    for i, item in enumerate(items):
        full = {k: item.get(k, False) for k in used}
        stage = full.get(KNOB_ZERO_STAGE)
        if full.get(KNOB_OFFLOAD_PARAM) and stage is not None and stage != 3:
            problems.append(f"ladder[{i}]: offload_param needs zero_stage 3 (this rung has {stage})")
        if full.get(KNOB_OFFLOAD_OPTIMIZER) and stage == 0:
            problems.append(f"ladder[{i}]: offload_optimizer needs zero_stage 1, 2 or 3 (this rung has 0)")
        rung = tuple(sorted(full.items()))
        if rung in rungs:
            problems.append(f"ladder[{i}] repeats ladder[{rungs.index(rung)}] ({describe_rung(rung)})")
        rungs.append(rung)
    if problems:
        return (), problems
    return tuple(rungs), []


def _check_rung_value(where: str, key: Any, value: Any) -> str | None:
    if key not in RUNG_KNOBS:
        close = difflib.get_close_matches(str(key), RUNG_KNOBS, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{where}: unknown knob {str(key)[:40]!r}{hint} A rung may name: {', '.join(RUNG_KNOBS)}"
    if key == KNOB_ZERO_STAGE:
        if isinstance(value, bool) or value not in (0, 1, 2, 3) or not isinstance(value, int):
            return f"{where}: zero_stage must be one of 0, 1, 2, 3, got {value!r}"[:200]
    elif key == KNOB_PRECISION:
        if value not in PRECISIONS or not isinstance(value, str):
            return f"{where}: precision must be one of {', '.join(PRECISIONS)}, got {value!r}"[:200]
    elif not isinstance(value, bool):
        return f"{where}: {key} must be true or false, got {value!r}"[:200]
    return None


# ---- footprints: estimates before a rung is seen -------------------------------------------------


def model_state_bytes(config: Mapping[str, Any], param_count: int, world_size: int) -> float:
    """Bytes of model state one rank holds on its device under `config` (ZeRO's arithmetic, as in
    DeepSpeed's `estimate_zero*_model_states_mem_needs`): low-precision parameters and gradients
    (2 bytes each in bf16/fp16, 4 in fp32), fp32 master copies (under mixed precision, or ZeRO >= 1)
    and Adam's two fp32 moments; ZeRO 1 partitions the optimizer state over the ranks, 2 also the
    gradients, 3 also the parameters; optimizer offload moves the optimizer state off the device,
    parameter offload the parameters. Activations are not in it (they do not change with the rung)."""
    stage = int(config.get(KNOB_ZERO_STAGE) or 0)
    lp = 2 if config.get(KNOB_PRECISION) in ("bf16", "fp16") else 4
    n, p = max(1, world_size), float(param_count)
    params, grads = lp * p, lp * p
    optimizer = (8 + (4 if lp == 2 or stage >= 1 else 0)) * p
    if stage >= 1:
        optimizer /= n
    if stage >= 2:
        grads /= n
    if stage >= 3:
        params /= n
    if config.get(KNOB_OFFLOAD_OPTIMIZER):
        optimizer = 0.0
    if config.get(KNOB_OFFLOAD_PARAM):
        params = 0.0
    return params + grads + optimizer


def cpu_rss_delta(config: Mapping[str, Any], param_count: int, world_size: int) -> float | None:
    """Resident bytes per rank of `config` on a CPU relative to ZeRO 0 without offload, from the
    measurements above; None where nothing was measured that would carry (ZeRO 3, offload, another
    precision than fp32)."""
    stage = config.get(KNOB_ZERO_STAGE)
    if config.get(KNOB_OFFLOAD_OPTIMIZER) or config.get(KNOB_OFFLOAD_PARAM):
        return None
    if config.get(KNOB_PRECISION, "fp32") not in ("fp32", None):
        return None
    if stage in (0, None):
        return 0.0
    if stage in (1, 2):
        n = max(1, world_size)
        saved = 2 * CPU_ZERO12_SAVED_PER_PARAM_2_RANKS * (1 - 1 / n) * param_count
        return CPU_ZERO12_FIXED_BYTES - saved
    return None


def _on_cpu(snapshot: Snapshot) -> bool:
    return not any(m.device.startswith("cuda") for m in snapshot.memory)


def footprint_delta(snapshot: Snapshot, src: Mapping[str, Any], dst: Mapping[str, Any]) -> float | None:
    """Estimated change of the per-rank peak from configuration `src` to `dst`; None: no estimate
    (activation memory is not modelled, so neither is a change of activation checkpointing)."""
    p, n = snapshot.param_count, snapshot.world_size
    ckpt = KNOB_ACTIVATION_CHECKPOINTING
    if p <= 0 or bool(src.get(ckpt)) != bool(dst.get(ckpt)):
        return None
    if _on_cpu(snapshot):
        a, b = cpu_rss_delta(src, p, n), cpu_rss_delta(dst, p, n)
        return None if a is None or b is None else b - a
    return model_state_bytes(dst, p, n) - model_state_bytes(src, p, n)


# ---- the default ladders -------------------------------------------------------------------------

#: GPU rungs in DeepSpeed's own speed order ("Stage 0 > 1 > 2 > 2 + offload > 3 > 3 + offloads").
_GPU_CANDIDATES: tuple[dict[str, Any], ...] = (
    {KNOB_ZERO_STAGE: 0},
    {KNOB_ZERO_STAGE: 1},
    {KNOB_ZERO_STAGE: 2},
    {KNOB_ZERO_STAGE: 2, KNOB_OFFLOAD_OPTIMIZER: True},
    {KNOB_ZERO_STAGE: 3},
    {KNOB_ZERO_STAGE: 3, KNOB_OFFLOAD_OPTIMIZER: True},
    {KNOB_ZERO_STAGE: 3, KNOB_OFFLOAD_OPTIMIZER: True, KNOB_OFFLOAD_PARAM: True},
)
#: CPU rungs in speed order; ZeRO 2, 3 and every offload are left out: measured no leaner than
#: ZeRO 1 (and slower), or above ZeRO 0 (see the table above).
_CPU_CANDIDATES: tuple[dict[str, Any], ...] = ({KNOB_ZERO_STAGE: 0}, {KNOB_ZERO_STAGE: 1})


def default_ladder(snapshot: Snapshot) -> tuple[Rung, ...]:
    """The engine ladder for this job: candidates in speed order (GPU: DeepSpeed's order; CPU: the
    measured one), kept only where the adapter accepts every value and where the rung is estimated
    strictly leaner than the rung kept before it (at this parameter count and world size: ZeRO 1
    saves nothing on one rank, and on a CPU nothing below ~12M parameters). Empty without engine
    knobs."""
    knobs = snapshot.knobs
    if KNOB_ZERO_STAGE not in knobs:
        return ()
    cpu = _on_cpu(snapshot)
    candidates = _CPU_CANDIDATES if cpu else _GPU_CANDIDATES
    used = sorted({k for c in candidates for k in c if k in knobs})
    base = {k: v for k, v in snapshot.config.items() if k in FOOTPRINT_KNOBS}
    out: list[Rung] = []
    last: Mapping[str, Any] | None = None
    for cand in candidates:
        if any(k not in knobs for k in cand):
            continue
        full = {k: cand.get(k, False) for k in used}
        if not all(knobs[k].accepts(v) for k, v in full.items()):
            continue
        cfg = {**base, **full}
        if last is not None:
            delta = footprint_delta(snapshot, last, cfg)
            if delta is None or delta >= 0:
                continue
        out.append(tuple(sorted(full.items())))
        last = cfg
    return tuple(out)


# ---- parameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryParams:
    high_water: float = param(
        0.9,
        valid=Range(0.1, 1.0),
        tune=Range(0.7, 0.98),
        doc="Step down when a rank's per-step peak exceeds this fraction of the cap.",
    )
    low_water: float = param(
        0.6,
        valid=Range(0.05, 0.99),
        tune=Range(0.3, 0.85),
        doc="Consider stepping up only when every rank's peak is below this fraction of the cap.",
    )
    cooldown_steps: int = param(
        5,
        valid=Range(0, 1_000_000),
        tune=Range(1, 50),
        doc="Optimizer steps to wait after a change before the next one (hysteresis).",
    )
    min_micro_batch: int = param(1, valid=Range(1, 1_000_000), doc="Never go below this micro-batch.")
    step_up: bool = param(True, doc="Step back up when the rung above is forecast to fit.")
    ladder: tuple[dict[str, Any], ...] = param(
        (),
        doc=(
            "Engine rungs, fastest first, leanest last: a list of mappings knob: value over "
            "zero_stage, offload_optimizer, offload_param, precision, activation_checkpointing "
            "(e.g. [{zero_stage: 0}, "
            "{zero_stage: 2}, {zero_stage: 2, offload_optimizer: true}]). Empty: derived from the "
            "adapter's knobs, the device, the model size and the world size."
        ),
    )
    forecast_steps: int = param(
        16,
        valid=Range(0, 1_000_000),
        tune=Range(0, 64),
        doc=(
            "Step down now when the trend of the peak since the last change says it crosses the "
            "high-water mark within this many steps (0: only when it has crossed). Cover at least "
            "the sync cadence: a decision lands at the next sync step."
        ),
    )
    room_steps: int = param(
        20,
        valid=Range(1, 1_000_000),
        tune=Range(5, 200),
        doc="Step an engine rung up only after this many steps with every sample below the low-water mark.",
    )

    def check(self) -> list[str]:
        problems = []
        if self.low_water >= self.high_water:
            problems.append(f"low_water ({self.low_water}) must be below high_water ({self.high_water})")
        problems += parse_ladder(self.ladder)[1]
        return problems

    def rungs(self) -> tuple[Rung, ...]:
        """The file's ladder, parsed (empty when not given, or when it is invalid)."""
        return parse_ladder(self.ladder)[0]


def forecast_peak(peaks: dict[int, int], micro_batch: int) -> float | None:
    """Least-squares line through the observed (micro-batch, peak) points, at `micro_batch`.

    Needs two distinct sizes; the slope is clamped at zero (memory never shrinks with more
    samples, and noise must not say it does)."""
    if micro_batch in peaks:
        return float(peaks[micro_batch])
    if len(peaks) < 2:
        return None
    xs, ys = list(peaks), [float(v) for v in peaks.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return my + slope * (micro_batch - mx)


def peak_trend(samples: Sequence[tuple[int, int]]) -> tuple[float, float] | None:
    """(slope in bytes per step, fitted peak at the last sample's step) of a least-squares line
    through (step, peak) samples; None with fewer than MIN_TREND_SAMPLES or a single step."""
    pts = list(samples)[-MAX_TREND_SAMPLES:]
    if len(pts) < MIN_TREND_SAMPLES:
        return None
    xs, ys = [float(s) for s, _ in pts], [float(v) for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
    return slope, my + slope * (xs[-1] - mx)


# ---- the policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """What one decision works on, read once from the snapshot."""

    snapshot: Snapshot
    params: MemoryParams
    cap: int
    peak: int
    high: float
    low: float
    ladder: tuple[Rung, ...]
    index: int | None
    """The rung the job is on now; None when its configuration is not on the ladder."""
    last_change: int | None
    """Last step any of the policy's knobs changed."""
    samples: tuple[tuple[int, int], ...] | None
    """(step, peak) samples taken under the current configuration; None: the snapshot has none."""
    peaks: Mapping[str, int] | None
    """Observed peak per `config_key`; None: the snapshot does not carry them."""

    def config_of(self, rung: Rung) -> dict[str, Any]:
        return {**self.snapshot.config, **dict(rung)}

    def observed(self, rung: Rung) -> int | None:
        """The highest peak seen under `rung` (at the current micro-batch and other settings)."""
        if self.index is not None and rung == self.ladder[self.index]:
            seen = self.peaks.get(config_key(self.config_of(rung))) if self.peaks else None
            return max(self.peak, seen or 0)
        if self.peaks is None:
            return None
        return self.peaks.get(config_key(self.config_of(rung)))

    def seen_over(self, rung: Rung) -> bool:
        """Seen over the high-water mark: never entered again (with these settings). Without
        per-configuration peaks, anything ever seen over the mark at this micro-batch counts."""
        seen = self.observed(rung)
        if seen is not None:
            return seen > self.high
        above = self.index is not None and self.ladder.index(rung) < self.index
        if self.peaks is None and above:
            # No per-configuration peaks: going back up is refused if anything at this micro-batch
            # was ever over the mark (the run-wide record includes the rung we left).
            mb = self.snapshot.config.get(KNOB_MICRO_BATCH)
            return isinstance(mb, int) and self.snapshot.peak_by_micro_batch.get(mb, 0) > self.high
        return False

    def forecast(self, rung: Rung) -> tuple[float | None, str]:
        """The peak forecast under `rung` and how it was obtained (for the reason)."""
        seen = self.observed(rung)
        if seen is not None:
            return float(seen), "measured"
        delta = footprint_delta(self.snapshot, self.snapshot.config, self.config_of(rung))
        if delta is None:
            return None, "not measured yet"
        how = (
            "estimated from the CPU measurements"
            if _on_cpu(self.snapshot)
            else "estimated from ZeRO's model-state bytes"
        )
        return self.peak + delta, how


@register
class MemoryPolicy(PolicyKind):
    kind = "memory"
    Params = MemoryParams
    knobs = frozenset({KNOB_MICRO_BATCH, *RUNG_KNOBS})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        view = self._view(snapshot)
        if view is None:
            return self._micro_batch(snapshot)
        if self.knobs & snapshot.pending:
            return []  # wait for the job's answer to the last move
        p = view.params
        if view.last_change is not None and (
            snapshot.step - view.last_change < p.cooldown_steps or snapshot.memory_step <= view.last_change
        ):
            return []  # hysteresis, and never a decision on a sample taken before the change
        over = self._over(view)
        if over is not None:
            moved = self._down(view, over)
            return moved if moved is not None else self._micro_batch(snapshot)
        if p.step_up and view.peak < view.low:
            grown = self._micro_batch(snapshot) if KNOB_MICRO_BATCH in snapshot.knobs else []
            return grown or self._up(view)
        return []

    def watch_s(self, snapshot: Snapshot, budget: Budget) -> float:
        """At every exchange once a rank's peak reaches the low-water mark (from there the next
        step may cross the high-water mark); below it there is the whole band up to the high-water
        mark to grow through, and a step up (the only move there) is not urgent."""
        cap = snapshot.memory_cap_bytes
        if cap is None or not snapshot.memory:
            return math.inf  # no cap, or no sample yet: nothing to decide on
        return 0.0 if snapshot.memory_peak_bytes >= self.params.low_water * cap else math.inf

    # ---- reading the snapshot -------------------------------------------------------------
    def _view(self, snapshot: Snapshot) -> _View | None:
        """The decision's inputs; None when there is no engine ladder (micro-batch only).

        The default ladder needs DeepSpeed's knobs; a file's ladder runs on whatever adapter carries
        its knobs (precision rungs on Accelerate, activation checkpointing on plain PyTorch)."""
        p: MemoryParams = self.params
        cap = snapshot.memory_cap_bytes
        if cap is None or not snapshot.memory:
            return None
        ladder = self._ladder(snapshot)
        if len(ladder) < 2:
            return None
        index = None
        for i, rung in enumerate(ladder):
            if all(snapshot.config.get(k) == v for k, v in rung):
                index = i
                break
        changes = [snapshot.last_action_step[k] for k in self.knobs if k in snapshot.last_action_step]
        last_change = max(changes) if changes else None
        # Empty is read as absent: a controller that carries these has a sample by now.
        history = getattr(snapshot, "recent_peaks", None) or None
        samples = None
        if history is not None:
            samples = tuple(
                (s, v) for s, v in history if s > FIRST_STEP and (last_change is None or s > last_change)
            )
        peaks = getattr(snapshot, "peak_by_config", None) or None
        return _View(
            snapshot=snapshot,
            params=p,
            cap=cap,
            peak=snapshot.memory_peak_bytes,
            high=p.high_water * cap,
            low=p.low_water * cap,
            ladder=ladder,
            index=index,
            last_change=last_change,
            samples=samples,
            peaks=dict(peaks) if peaks is not None else None,
        )

    def _ladder(self, snapshot: Snapshot) -> tuple[Rung, ...]:
        """The file's ladder, less the rungs this adapter cannot carry; or the default one."""
        own = self.params.rungs()
        if not own:
            return default_ladder(snapshot)
        knobs: Mapping[str, KnobSpec] = snapshot.knobs
        return tuple(r for r in own if all(k in knobs and knobs[k].accepts(v) for k, v in r))

    # ---- down --------------------------------------------------------------------------------
    def _over(self, view: _View) -> str | None:
        """Why the peak is (or is about to be) too high; None when it is not."""
        cap, high, p = view.cap, view.high, view.params
        mark = f"the high-water mark {format_bytes(high)} ({p.high_water:g} of the {format_bytes(cap)} cap)"
        if view.peak > high:
            return f"memory peak {format_bytes(view.peak)} is above {mark}"
        if p.forecast_steps <= 0 or not view.samples:
            return None
        trend = peak_trend(view.samples)
        if trend is None:
            return None
        slope, fitted = trend
        ahead = fitted + slope * p.forecast_steps
        if slope <= 0 or ahead <= high:
            return None
        steps_left = max(0.0, (high - fitted) / slope)
        return (
            f"memory peak {format_bytes(view.peak)} is rising {format_bytes(slope)} per step "
            f"(line through {min(len(view.samples), MAX_TREND_SAMPLES)} samples): forecast "
            f"{format_bytes(ahead)} in {p.forecast_steps} steps, crossing {mark} in about "
            f"{steps_left:.0f} steps; stepping down before it does"
        )

    def _down(self, view: _View, why: str) -> list[Action] | None:
        """The move to a leaner engine rung; None when there is none left (micro-batch next)."""
        ladder = view.ladder
        candidates = list(ladder) if view.index is None else list(ladder[view.index + 1 :])
        open_ = [r for r in candidates if not view.seen_over(r)]
        # "Down" means leaner: a rung whose forecast is no lower than the peak now is no way down
        # (unmeasured rungs with no estimate stay: the next one is tried, to learn).
        not_leaner = [r for r in open_ if (f := view.forecast(r)[0]) is not None and f >= view.peak]
        open_ = [r for r in open_ if r not in not_leaner]
        if not open_:
            return None
        target, note = None, ""
        for rung in open_:
            f, how = view.forecast(rung)
            if f is None:
                if view.index is not None:
                    # Not measured, no estimate: the next rung down, one step at a time, and learn.
                    target, note = rung, f"{describe_rung(rung)} {how}"
                    break
                continue
            if f <= view.high:
                target, note = rung, f"{describe_rung(rung)} forecast at {format_bytes(f)} ({how})"
                break
        if target is None:
            target = open_[-1]
            f, how = view.forecast(target)
            note = f"no leaner rung is forecast under the mark: the leanest, {describe_rung(target)}" + (
                f", forecast at {format_bytes(f)} ({how})" if f is not None else f" ({how})"
            )
        skipped = [describe_rung(r) for r in candidates if r != target and view.seen_over(r)]
        if skipped:
            note += f"; {', '.join(skipped)} skipped (seen over the mark in this run)"
        if not_leaner:
            names = ", ".join(describe_rung(r) for r in not_leaner)
            note += f"; {names} skipped (forecast no leaner than now)"
        return self._move(view, target, f"{why}: {self._step_words(view, target)}, {note}")

    # ---- up ----------------------------------------------------------------------------------
    def _up(self, view: _View) -> list[Action]:
        if view.index is None or view.index == 0:
            return []  # at the top, or off the ladder: the job's own configuration stands
        p, snap = view.params, view.snapshot
        since = snap.step - view.last_change if view.last_change is not None else snap.step
        if since < p.room_steps:
            return []
        if view.samples is not None:
            window = [v for s, v in view.samples if s > snap.step - p.room_steps]
            if not window or max(window) >= view.low:
                return []
            room = f"every sample of the last {p.room_steps} steps was below"
        else:
            room = f"{since} steps since the last change and the peak now is below"
        target = view.ladder[view.index - 1]
        if view.seen_over(target):
            return []  # it was over the mark with these settings: never again this run
        f, how = view.forecast(target)
        if f is not None and f > view.high:
            return []
        forecast = (
            f"{describe_rung(target)} forecast at {format_bytes(f)} ({how}), under {format_bytes(view.high)}"
            if f is not None
            else f"{describe_rung(target)} {how}, never seen over {format_bytes(view.high)}"
        )
        why = (
            f"memory peak {format_bytes(view.peak)}: {room} the low-water mark {format_bytes(view.low)} "
            f"({p.low_water:g} of the {format_bytes(view.cap)} cap)"
        )
        return self._move(view, target, f"{why}: {self._step_words(view, target)}, {forecast}")

    # ---- actions -----------------------------------------------------------------------------
    @staticmethod
    def _step_words(view: _View, target: Rung) -> str:
        n = len(view.ladder)
        here = (
            f"rung {view.index + 1} ({describe_rung(view.ladder[view.index])})"
            if view.index is not None
            else f"the job's own configuration ({describe_rung(view.config_of(()))}, not on the ladder)"
        )
        return f"{here} -> rung {view.ladder.index(target) + 1} of {n} ({describe_rung(target)})"

    def _move(self, view: _View, target: Rung, reason: str) -> list[Action]:
        """One action per knob that changes, in an order whose every intermediate configuration is
        valid (offloads off, then the stage, precision and checkpointing, then offloads on), all for the
        same step; knobs the adapter changes by implication (parameter offload below ZeRO 3,
        optimizer offload at ZeRO 0) are left to it. Each action carries the whole move's reason."""
        snap = view.snapshot
        want = dict(target)
        cur = {k: snap.config.get(k) for k in want}
        stage = want.get(KNOB_ZERO_STAGE, cur.get(KNOB_ZERO_STAGE))
        offs = (KNOB_OFFLOAD_OPTIMIZER, KNOB_OFFLOAD_PARAM)
        implied = {KNOB_OFFLOAD_PARAM: stage != 3, KNOB_OFFLOAD_OPTIMIZER: stage == 0}
        stage_moves = KNOB_ZERO_STAGE in want and want[KNOB_ZERO_STAGE] != cur.get(KNOB_ZERO_STAGE)
        order: list[str] = [
            k for k in offs if k in want and cur[k] and not want[k] and not (stage_moves and implied[k])
        ]
        middle = (KNOB_ZERO_STAGE, KNOB_PRECISION, KNOB_ACTIVATION_CHECKPOINTING)
        order += [k for k in middle if k in want and want[k] != cur[k]]
        order += [k for k in offs if k in want and want[k] and not cur[k]]
        step = snap.step + 1
        return [Action(kind=k, params={"value": want[k]}, reason=reason, step=step) for k in order]

    # ---- the micro-batch rung --------------------------------------------------------------
    def _micro_batch(self, snapshot: Snapshot) -> list[Action]:
        """The micro-batch ladder: the whole ladder without engine knobs, the last resort below
        the leanest engine rung, and the first rung back up."""
        p: MemoryParams = self.params
        spec = snapshot.knobs.get(KNOB_MICRO_BATCH)
        cap = snapshot.memory_cap_bytes
        mb = snapshot.config.get(KNOB_MICRO_BATCH)
        if spec is None or cap is None or not isinstance(mb, int) or not snapshot.memory:
            return []
        if KNOB_MICRO_BATCH in snapshot.pending:
            return []
        last = snapshot.last_action_step.get(KNOB_MICRO_BATCH)
        if last is not None:
            # Hysteresis, and no decision on another rank's sample that arrived late from before it.
            taken = snapshot.memory_step
            if snapshot.step - last < p.cooldown_steps or (taken < snapshot.step and taken <= last):
                return []
        rungs = sorted(int(c) for c in spec.choices) if spec.choices else _powers_of_two(mb)
        rungs = [r for r in rungs if r >= p.min_micro_batch]
        peak = snapshot.memory_peak_bytes
        high, low = p.high_water * cap, p.low_water * cap
        peaks = dict(snapshot.peak_by_micro_batch)

        if peak > high:
            lower = [r for r in rungs if r <= mb // 2] or [r for r in rungs if r < mb]
            if not lower:
                return []  # already on the leanest rung: nothing this policy can do
            # The largest rung forecast to fit; without a forecast, or when the line says none
            # fits, halve: a line through two noisy points must not send the job to the bottom
            # rung (and its throughput) on an extrapolation; the next sample corrects the line.
            target = lower[-1]
            for r in reversed(lower):
                f = forecast_peak(peaks, r)
                if f is None or f <= high:
                    target = r
                    break
            why = (
                f"memory peak {format_bytes(peak)} is above the high-water mark {format_bytes(high)} "
                f"({p.high_water:g} of the {format_bytes(cap)} cap)"
            )
            return [self._set(snapshot, mb, target, why)]

        if p.step_up and peak < low:
            upper = [r for r in rungs if r > mb]
            if not upper:
                return []
            target = upper[0]
            f = forecast_peak(peaks, target)
            if f is None:
                # One point only: assume all memory scales with the micro-batch (conservative).
                f = peak * target / mb
            if f > high:
                return []
            why = (
                f"memory peak {format_bytes(peak)} is below the low-water mark {format_bytes(low)} and "
                f"micro-batch {target} is forecast at {format_bytes(f)}, under {format_bytes(high)}"
            )
            return [self._set(snapshot, mb, target, why)]
        return []

    def _set(self, snapshot: Snapshot, mb: int, target: int, why: str) -> Action:
        gb = snapshot.global_batch_size or mb * snapshot.world_size
        # The micro-batch is per rank: each rank's share of the global batch is what it accumulates.
        per_rank = max(1, gb // max(1, snapshot.world_size))
        accum_from, accum_to = -(-per_rank // mb), -(-per_rank // target)
        reason = (
            f"{why}: micro-batch {mb} -> {target}, gradient accumulation {accum_from} -> {accum_to}, "
            f"global batch {gb} kept"
        )
        return Action(kind=KNOB_MICRO_BATCH, params={"value": target}, reason=reason, step=snapshot.step + 1)


def _powers_of_two(mb: int) -> list[int]:
    out, r = [], 1
    while r <= max(mb, 1) * 2:
        out.append(r)
        r *= 2
    return out


__all__ = [
    "CPU_ZERO12_FIXED_BYTES",
    "CPU_ZERO12_SAVED_PER_PARAM_2_RANKS",
    "RUNG_KNOBS",
    "MemoryParams",
    "MemoryPolicy",
    "Rung",
    "config_key",
    "cpu_rss_delta",
    "default_ladder",
    "describe_rung",
    "forecast_peak",
    "model_state_bytes",
    "parse_ladder",
    "peak_trend",
]
