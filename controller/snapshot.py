"""The frozen view of a job that policies decide on.

The controller builds one Snapshot per decision from the telemetry it has received; a
policy never sees anything else, which is what makes `decide` pure, replayable from a
recorded trace, and tunable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainwarden.controller.protocol import (
    KNOB_ACTIVATION_CHECKPOINTING,
    KNOB_MICRO_BATCH,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_ZERO_STAGE,
    KnobSpec,
    RankMemory,
)

#: Knobs whose values key a memory footprint (`config_key`): a memory ladder rung's and the
#: micro-batch. The controller keys what it learns by them and the memory policy reads it back.
FOOTPRINT_KNOBS = (
    KNOB_ZERO_STAGE,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_ACTIVATION_CHECKPOINTING,
    KNOB_MICRO_BATCH,
)


def config_key(config: Mapping[str, Any]) -> str:
    """The canonical name of a configuration's footprint: `micro_batch_size=4,offload_optimizer=false,
    offload_param=false,precision=fp32,zero_stage=1` (the knobs of FOOTPRINT_KNOBS it has, sorted).

    The controller keys `peak_by_config` by it; a rung's key changes when its micro-batch or
    precision does, which is what lets a rung once seen over the mark be forecast again."""
    parts = []
    for knob in sorted(FOOTPRINT_KNOBS):
        if knob in config and config[knob] is not None:
            value = config[knob]
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            parts.append(f"{knob}={text}")
    return ",".join(parts)


@dataclass(frozen=True)
class BudgetUse:
    """One budget's spend: `spent` of `limit`, in `unit`, and how fast it is being spent."""

    name: str
    """`wall_time`, `tokens`, `flops` or `cost`."""
    unit: str
    """`seconds`, `tokens`, `flops` or `money`."""
    spent: float
    limit: float
    rate_per_s: float | None
    """Spend per second of wall time now (None until measured)."""

    @property
    def fraction(self) -> float:
        return self.spent / self.limit if self.limit > 0 else 1.0

    @property
    def remaining_s(self) -> float | None:
        """Forecast seconds until this budget runs out at the current rate."""
        if self.spent >= self.limit:
            return 0.0
        if not self.rate_per_s:
            return None
        return (self.limit - self.spent) / self.rate_per_s


@dataclass(frozen=True)
class Snapshot:
    """Everything a policy may look at, as of `step`."""

    step: int
    """Last optimizer step the job reported."""
    elapsed_s: float
    """Wall time since the job's first reported step."""
    loss: float | None
    """Training loss, smoothed (EMA) over recent steps."""
    tokens: int
    samples: int
    tokens_per_second: float | None
    step_time_s: float | None
    memory: tuple[RankMemory, ...]
    """Latest memory of every rank (per-step peak since the previous sync)."""
    memory_cap_bytes: int | None
    """The budget's cap resolved against the device (None: no cap)."""
    config: Mapping[str, Any]
    """Configuration the job runs with now: knob -> value."""
    knobs: Mapping[str, KnobSpec]
    """Knobs the adapter can carry: the controller never sends anything else."""
    world_size: int = 1
    global_batch_size: int = 0
    param_count: int = 0
    last_action_step: Mapping[str, int] = field(default_factory=dict)
    """Step at which each knob was last changed (applied)."""
    pending: frozenset[str] = frozenset()
    """Knobs with an action issued and not yet answered: policies leave them alone."""
    peak_by_micro_batch: Mapping[int, int] = field(default_factory=dict)
    """Highest per-step memory peak (max over ranks) observed at each micro-batch size."""
    peak_by_config: Mapping[str, int] = field(default_factory=dict)
    """Highest per-step memory peak (max over ranks) observed under each configuration, keyed by
    `config_key` (above) (ZeRO stage, offloads, precision, micro-batch):
    what the memory ladder learns each rung's footprint from."""
    recent_peaks: tuple[tuple[int, int], ...] = ()
    """(step, per-step peak, max over ranks) of the latest memory samples, oldest first (at most
    `state.PEAK_HISTORY`): what the memory ladder's trend forecast fits its line through."""
    budgets: tuple[BudgetUse, ...] = ()
    finished: bool = False
    nonfinite_losses: int = 0
    """Steps whose reported loss was NaN or infinite (left out of `loss`)."""
    last_nonfinite_step: int | None = None
    domain_loss: Mapping[str, float] = field(default_factory=dict)
    """Training loss per data domain, smoothed (EMA, `state.LOSS_EMA` per step that reported the
    domain): what the data policy's learnability reward is computed from."""
    time: float | None = None
    """The job's clock (Unix seconds) at the end of `step`."""
    seconds_per_step: float | None = None
    """Forecast wall time per optimizer step, measured since the last throughput change
    (controller/forecast.py), so a ZeRO or micro-batch switch shows within a few steps."""
    throughput_since_step: int | None = None
    """First step of the stretch the throughput forecast is measured over."""
    train_curve: tuple[tuple[float, float], ...] = ()
    """(fraction of the budget spent, smoothed training loss), a point per 0.2% of the budget."""
    eval_curve: tuple[tuple[float, float], ...] = ()
    """(fraction of the budget spent, validation loss), a point per loss the job reported."""
    eval_loss: float | None = None
    """Latest validation loss the job reported (None: it reports none)."""
    action_lag_steps: int | None = None
    """Most steps between a decision and its action applying, over the last few (None: none yet)."""
    sync_every: int = 1
    """Steps between the job's syncs with the controller (actions apply at or after one)."""

    @property
    def memory_peak_bytes(self) -> int:
        return max((m.peak_bytes for m in self.memory), default=0)

    @property
    def memory_step(self) -> int:
        """The step the oldest of the latest memory samples was taken at: another rank's arrives a
        sync late (RankMemory.step). A policy reads a change's effect only from samples after it."""
        return min((self.step if m.step is None else m.step for m in self.memory), default=self.step)

    @property
    def binding_budget(self) -> BudgetUse | None:
        """The budget that runs out first: by forecast when known, else by fraction spent."""
        if not self.budgets:
            return None

        def key(b: BudgetUse) -> tuple[float, float]:
            r = b.remaining_s
            return (r if r is not None else float("inf"), -b.fraction)

        return min(self.budgets, key=key)

    def forecast_end_time(self, b: BudgetUse) -> float | None:
        """Unix time at which budget `b` is forecast to run out (None: no rate yet)."""
        r = b.remaining_s
        return None if r is None or self.time is None else self.time + r
