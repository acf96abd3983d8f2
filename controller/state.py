"""The controller's picture of the job, folded from telemetry: what `observe()` reads.

Level-based: the configuration the job reports in its telemetry is the truth; actions only
ask for a change, and the next records say whether it happened.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainwarden.controller.forecast import ThroughputForecast
from trainwarden.controller.protocol import (
    KNOB_MICRO_BATCH,
    MAX_DOMAINS,
    JobShape,
    KnobSpec,
    RankMemory,
    StepRecord,
)
from trainwarden.controller.schema import Budget
from trainwarden.controller.snapshot import BudgetUse, Snapshot, config_key

if TYPE_CHECKING:
    from trainwarden.controller.protocol import AdapterEvent

log = logging.getLogger(__name__)

#: Smoothing of the reported loss (EMA weight of the newest step).
LOSS_EMA = 0.1
#: Seconds a job's clock may run ahead of its steps before it counts as a jump.
CLOCK_JUMP_SLACK_S = 60.0
#: Steps in the throughput window: long enough to average out noise, short enough to see a switch.
THROUGHPUT_WINDOW = 20
#: Memory samples kept for the memory policy's trend forecast (it fits at most the last 16).
PEAK_HISTORY = 64
#: Most steps a rank's memory sample may be older than the record it came in (it comes a sync late).
MAX_SAMPLE_LAG_STEPS = 100_000
#: The training-loss curve keeps a point each time this much more of the budget is spent (at
#: most ~500 points over a whole budget: what the compute policy's stopping rule fits lines to).
CURVE_RESOLUTION = 0.002
#: Validation losses kept (one per report) and action lags remembered.
EVAL_HISTORY = 1000
LAG_HISTORY = 8


@dataclass
class JobState:
    """Mutable fold of the job's telemetry; only the controller, under its lock, touches it."""

    shape: JobShape | None = None
    step: int = -1
    first_time: float | None = None
    last_time: float | None = None
    loss_ema: float | None = None
    last_loss: float | None = None
    tokens: int = 0
    samples: int = 0
    lr: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    #: The configuration the job's last step ran with (`config` also takes an action the job
    #: applied before any step ran under it: what the summary must not report as having run).
    ran_config: dict[str, Any] = field(default_factory=dict)
    memory: dict[int, RankMemory] = field(default_factory=dict)
    last_action_step: dict[str, int] = field(default_factory=dict)
    peak_by_micro_batch: dict[int, int] = field(default_factory=dict)
    peak_by_config: dict[str, int] = field(default_factory=dict)
    recent_peaks: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=PEAK_HISTORY))
    #: The configuration (micro-batch, config_key) of recent steps that carried memory: a rank's
    #: memory that reaches rank 0 one sync late (RankMemory.step) was taken under its own step's.
    _sampled_configs: dict[int, tuple[Any, str]] = field(default_factory=dict)
    domain_loss: dict[str, float] = field(default_factory=dict)
    domain_loss_ema: dict[str, float] = field(default_factory=dict)
    finished: bool = False
    nonfinite_losses: int = 0
    last_nonfinite_step: int | None = None
    clock_jumps: int = 0
    _clock_offset: float = 0.0
    _window: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=THROUGHPUT_WINDOW))
    budget: Budget | None = None
    """The budget the progress curves are measured against (None: no curves)."""
    forecast: ThroughputForecast = field(default_factory=ThroughputForecast)
    train_curve: list[tuple[float, float]] = field(default_factory=list)
    """(fraction of the budget spent, smoothed training loss), a point per CURVE_RESOLUTION."""
    eval_curve: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=EVAL_HISTORY))
    """(fraction of the budget spent, validation loss), one point per loss the job reported."""
    eval_loss: float | None = None
    action_lags: deque[int] = field(default_factory=lambda: deque(maxlen=LAG_HISTORY))
    """Steps between a decision and the step its action applied at, latest last."""
    domains_dropped: int = 0
    """Losses of domains past the MAX_DOMAINS a run tracks, left out (said once in the log)."""
    _new_incarnation: bool = False

    def new_incarnation(self) -> None:
        """A new start of the job (a new hello) on this run: its steps are its own sequence, even
        below the last one's (a restart from an earlier checkpoint). Spend so far stays; the time
        between the two jobs is not charged (their first record continues the time line)."""
        self.step = -1
        self.last_action_step.clear()
        self._window.clear()
        self.recent_peaks.clear()
        self._sampled_configs.clear()
        self.finished = False
        self._new_incarnation = True

    def ingest(self, rec: StepRecord) -> None:
        if rec.step <= self.step:
            return  # a resent record: telemetry is idempotent by step
        # Whatever the job's clock says, never a negative step time or a clock running back.
        step_time = rec.step_time_s if math.isfinite(rec.step_time_s) and rec.step_time_s > 0 else 0.0
        t = (rec.time if math.isfinite(rec.time) else (self.last_time or 0.0)) - self._clock_offset
        if self.last_time is not None:
            # A clock running back is held; one leaping far ahead of what the steps took (an NTP
            # correction, a bad host) advances only by the step time, so a jump cannot spend a
            # wall-time budget (and stop the job) on its own. The jump is remembered as an
            # offset, so the records after it are read on the same time line.
            typical = self.step_time_s or step_time or 1.0
            most = CLOCK_JUMP_SLACK_S + 10 * typical * max(1, rec.step - self.step)
            if self._new_incarnation or t < self.last_time or t - self.last_time > most:
                self.clock_jumps += 0 if self._new_incarnation else 1
                held = self.last_time + (step_time if t > self.last_time else 0.0)
                self._clock_offset += t - held
                t = held
        if self.first_time is None:
            # The first step's start, not its end: wall time includes the first step.
            self.first_time = t - step_time
        if self._new_incarnation:
            self.forecast.restart(rec.step)
            self._new_incarnation = False
        self.step = rec.step
        self.last_time = t
        if rec.loss is not None:
            self.last_loss = rec.loss
            if math.isfinite(rec.loss):
                self.loss_ema = (
                    rec.loss
                    if self.loss_ema is None
                    else ((1 - LOSS_EMA) * self.loss_ema + LOSS_EMA * rec.loss)
                )
            else:
                # A diverged step is an event policies see, not a value that poisons the average.
                self.nonfinite_losses += 1
                self.last_nonfinite_step = rec.step
        self.tokens = max(0, rec.tokens)
        self.samples = max(0, rec.samples)
        self.lr = rec.lr
        self.config = dict(rec.config)
        self.ran_config = dict(rec.config)
        domain_loss = self._tracked_domains(rec)
        self.domain_loss.update({k: v for k, v in domain_loss.items() if math.isfinite(v)})
        for k, v in domain_loss.items():
            if math.isfinite(v):
                prev = self.domain_loss_ema.get(k)
                self.domain_loss_ema[k] = v if prev is None else (1 - LOSS_EMA) * prev + LOSS_EMA * v
        self._window.append((t, self.tokens, step_time))
        self.forecast.add(rec.step, t, self.tokens, rec.config)
        self._extend_curves(rec)
        # Each sample with the step it was taken at: the record's, unless it came a sync late. A
        # step after the record's, or far before it, is no sync's: taken as the record's, so a bad
        # value cannot hold the memory policy off (it waits for samples after its last change).
        peaks: dict[int, int] = {}  # step taken at -> the largest peak taken then
        for m in rec.memory:
            late = m.step is not None and max(0, rec.step - MAX_SAMPLE_LAG_STEPS) <= m.step <= rec.step
            at = m.step if late and m.step is not None else rec.step
            if m.step != at:  # (built, not dataclasses.replace: this runs for every record)
                m = RankMemory(m.rank, m.used_bytes, m.peak_bytes, m.total_bytes, m.device, m.pid, at)
            self.memory[m.rank] = m
            peaks[at] = max(m.peak_bytes, peaks.get(at, 0))
        if peaks:
            self._attribute_peaks(rec.step, rec.config, peaks)

    def _attribute_peaks(self, step: int, config: dict[str, Any], peaks: dict[int, int]) -> None:
        """Each sample's peak (`peaks`: by the step it was taken at) to the configuration it was
        taken under and to its step. A record's configuration is its own samples' (adapters record
        the step, then apply the actions due at it); another rank's sample read one sync late (an
        earlier step) is its own step's, or nobody's when that step is no longer known."""
        self._sampled_configs[step] = (config.get(KNOB_MICRO_BATCH), config_key(config))
        if len(self._sampled_configs) > PEAK_HISTORY:
            del self._sampled_configs[min(self._sampled_configs)]
        for at, peak in sorted(peaks.items()):
            if at not in self._sampled_configs:
                continue  # before this start of the job, or too old to place
            mb, key = self._sampled_configs[at]
            if isinstance(mb, int):
                self.peak_by_micro_batch[mb] = max(peak, self.peak_by_micro_batch.get(mb, 0))
            if key:
                self.peak_by_config[key] = max(peak, self.peak_by_config.get(key, 0))
            # The trend forecast's samples, by step: a late one joins its step's.
            if self.recent_peaks and at <= self.recent_peaks[-1][0]:
                for i in range(len(self.recent_peaks) - 1, -1, -1):
                    s, v = self.recent_peaks[i]
                    if s == at:
                        self.recent_peaks[i] = (at, max(peak, v))
                    if s <= at:
                        break
            else:
                self.recent_peaks.append((at, peak))

    def _tracked_domains(self, rec: StepRecord) -> dict[str, float]:
        """The record's domain losses, but no domain past the first MAX_DOMAINS of the run: each is a
        series on every scrape (a job naming a new domain per step would grow both without bound)."""
        known = self.domain_loss.keys() | self.domain_loss_ema.keys()
        new = [k for k in rec.domain_loss if k not in known]
        room = MAX_DOMAINS - len(known)
        if len(new) <= room:
            return dict(rec.domain_loss)
        dropped = set(new[max(0, room) :])
        if not self.domains_dropped:
            log.warning(
                "the job reports losses of more than %d data domains; the run tracks the first %d and "
                "leaves out the rest (first left out: %r). Group domains, or report fewer",
                MAX_DOMAINS,
                MAX_DOMAINS,
                next(iter(dropped))[:80],
            )
        self.domains_dropped += len(dropped)
        return {k: v for k, v in rec.domain_loss.items() if k not in dropped}

    def _extend_curves(self, rec: StepRecord) -> None:
        if self.budget is None:
            return
        x = self.progress(self.budget)
        if x is None:
            return
        if self.loss_ema is not None and (
            not self.train_curve or x >= self.train_curve[-1][0] + CURVE_RESOLUTION
        ):
            self.train_curve.append((x, self.loss_ema))
        if rec.eval_loss is not None and math.isfinite(rec.eval_loss):
            self.eval_loss = rec.eval_loss
            self.eval_curve.append((x, rec.eval_loss))

    def progress(self, budget: Budget) -> float | None:
        """Fraction of the budget spent: of the most-spent one when there are several (None: no
        wall-time, token, FLOP or cost budget)."""
        fractions = [b.fraction for b in self.budgets(budget)]
        return max(fractions) if fractions else None

    def note_lag(self, steps: int) -> None:
        """An action decided at one step applied `steps` later (what the compute policy leads by)."""
        self.action_lags.append(max(0, steps))

    @property
    def tokens_per_second(self) -> float | None:
        if len(self._window) < 2:
            return None
        (t0, k0, _), (t1, k1, _) = self._window[0], self._window[-1]
        return max(0.0, (k1 - k0) / (t1 - t0)) if t1 > t0 else None

    @property
    def step_time_s(self) -> float | None:
        if not self._window:
            return None
        times = sorted(s for _, _, s in self._window)
        return times[len(times) // 2]

    @property
    def elapsed_s(self) -> float:
        if self.first_time is None or self.last_time is None:
            return 0.0
        return max(0.0, self.last_time - self.first_time)

    def take_event(self, event: AdapterEvent) -> None:
        """The adapter changed its configuration by itself (an OOM retry): take the configuration
        it reports, count the move as a change of each knob (a policy's hysteresis starts again),
        and mark the configuration it left as having needed the whole device (an OOM there: the
        memory policy never steps back up into it this run)."""
        before = dict(event.config)
        for knob, old, _ in event.changes:
            before[knob] = old
            self.last_action_step[knob] = event.step
        self.config = dict(event.config)
        if event.kind != "oom_retry":
            return
        total = self.shape.device_total_bytes if self.shape else 0
        key = config_key(before)
        if key:
            self.peak_by_config[key] = max(self.peak_by_config.get(key, 0), total)
        mb = before.get(KNOB_MICRO_BATCH)
        if isinstance(mb, int) and any(k == KNOB_MICRO_BATCH for k, _, _ in event.changes):
            self.peak_by_micro_batch[mb] = max(self.peak_by_micro_batch.get(mb, 0), total)

    def budgets(self, budget: Budget) -> tuple[BudgetUse, ...]:
        """Spend against each budget given, with its current rate."""
        uses: list[BudgetUse] = []
        # The forecast's rate (since the last throughput change), not the fixed window's.
        rate = self.forecast.rate()
        tps = rate.tokens_per_s if rate is not None else self.tokens_per_second
        world = self.shape.world_size if self.shape else 1
        params = self.shape.param_count if self.shape else 0
        elapsed = self.elapsed_s
        if budget.wall_time_s is not None:
            uses.append(BudgetUse("wall_time", "seconds", elapsed, budget.wall_time_s, 1.0))
        if budget.tokens is not None:
            uses.append(BudgetUse("tokens", "tokens", float(self.tokens), float(budget.tokens), tps))
        if budget.flops is not None:
            # 6 FLOPs per parameter per token: forward 2, backward 4 (Kaplan et al.).
            rate = 6.0 * params * tps if tps else None
            uses.append(BudgetUse("flops", "flops", 6.0 * params * self.tokens, budget.flops, rate))
        if budget.cost is not None:
            per_s = budget.cost.per_device_hour * world / 3600.0
            uses.append(BudgetUse("cost", "money", elapsed * per_s, budget.cost.max, per_s))
        return tuple(uses)

    def snapshot(self, budget: Budget, pending: frozenset[str], observed: dict[int, int]) -> Snapshot:
        """The frozen view policies decide on. `observed` is memory seen by the controller's own
        sources (NVML, procfs) per rank; a rank's peak is the larger of that and the agent's."""
        memory = []
        for rank, m in sorted(self.memory.items()):
            seen = observed.get(rank, 0)
            memory.append(m if seen <= m.peak_bytes else _with_peak(m, seen))
        shape = self.shape
        knobs: dict[str, KnobSpec] = {k.name: k for k in shape.knobs} if shape else {}
        rate = self.forecast.rate()
        cap = None
        if budget.device_memory is not None and memory:
            cap = budget.device_memory.resolve(min(m.total_bytes for m in memory))
        return Snapshot(
            step=self.step,
            elapsed_s=self.elapsed_s,
            loss=self.loss_ema,
            tokens=self.tokens,
            samples=self.samples,
            tokens_per_second=self.tokens_per_second,
            step_time_s=self.step_time_s,
            memory=tuple(memory),
            memory_cap_bytes=cap,
            config=dict(self.config),
            knobs=knobs,
            world_size=shape.world_size if shape else 1,
            global_batch_size=shape.global_batch_size if shape else 0,
            param_count=shape.param_count if shape else 0,
            last_action_step=dict(self.last_action_step),
            pending=pending,
            peak_by_micro_batch=dict(self.peak_by_micro_batch),
            peak_by_config=dict(self.peak_by_config),
            recent_peaks=tuple(self.recent_peaks),
            budgets=self.budgets(budget),
            finished=self.finished,
            nonfinite_losses=self.nonfinite_losses,
            last_nonfinite_step=self.last_nonfinite_step,
            domain_loss=dict(self.domain_loss_ema),
            # The job's own clock (a jump it made is held as an offset here): what an action due
            # at a time (the compute policy's wall-time stop) is compared with in the job.
            time=None if self.last_time is None else self.last_time + self._clock_offset,
            seconds_per_step=rate.seconds_per_step if rate else None,
            throughput_since_step=rate.since_step if rate else None,
            train_curve=tuple(self.train_curve),
            eval_curve=tuple(self.eval_curve),
            eval_loss=self.eval_loss,
            action_lag_steps=max(self.action_lags) if self.action_lags else None,
            sync_every=shape.sync_every if shape else 1,
        )


def _with_peak(m: RankMemory, peak: int) -> RankMemory:
    return dataclasses.replace(m, used_bytes=max(m.used_bytes, peak), peak_bytes=peak)
