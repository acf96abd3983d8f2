"""The budget file's typed form: frozen dataclasses, one docstring per field.

Part of the contract: the controller, the policies and the adapters all read it.
`trainwarden.policies.loader` builds these from YAML; nothing else constructs them from untrusted
input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MemoryCap:
    """Device memory allowed per rank: absolute bytes, or a fraction of the device's total."""

    bytes: int | None = None
    """Absolute cap in bytes (`24GiB`, `512MiB` in the file)."""
    fraction: float | None = None
    """Fraction of the device's total memory (`0.9` in the file); on a CPU the device is RAM."""

    def resolve(self, device_total_bytes: int) -> int:
        """The cap in bytes on a device of `device_total_bytes`."""
        if self.bytes is not None:
            return self.bytes
        assert self.fraction is not None
        return int(self.fraction * device_total_bytes)

    def describe(self) -> str:
        if self.bytes is not None:
            return f"{self.bytes / 2**20:.0f} MiB"
        return f"{self.fraction:g} of the device"


@dataclass(frozen=True)
class Cost:
    """A money budget: spend at most `max` at `per_device_hour` for every device of the job."""

    max: float
    """Most money the run may spend, in the currency of `per_device_hour`."""
    per_device_hour: float
    """Price of one device for one hour."""


@dataclass(frozen=True)
class Budget:
    """What the run may spend. Every limit is optional; of those given, the first to run out binds."""

    device_memory: MemoryCap | None = None
    """Device memory cap per rank."""
    wall_time_s: float | None = None
    """Wall time from the job's first step, in seconds (`90m`, `6h` in the file)."""
    tokens: int | None = None
    """Training tokens (`50M`, `2e9`)."""
    flops: float | None = None
    """Training FLOPs, counted as 6 x parameters x tokens (`3e18`)."""
    cost: Cost | None = None
    """Money, at a price per device-hour."""


#: What a stop does (ControllerSettings.stop).
STOP_MODES = ("auto", "cooperative", "end_job")


@dataclass(frozen=True)
class ControllerSettings:
    """How the control loop runs."""

    sync_every: int = 8
    """Every this many optimizer steps the ranks gather telemetry and rank 0 broadcasts
    pending actions; no collective runs on the other steps. Larger costs less, reacts later."""
    decide_interval_s: float = 0.5
    """Least time between two decisions of the controller."""
    max_exchange_interval_s: float = 5.0
    """Longest the controller lets the job go between two exchanges when every policy is far
    from its thresholds (each says how far: `watch_s`); while one watches closely (an action
    pending, memory above the low-water mark, a cooldown) the job exchanges every
    EXCHANGE_INTERVAL_S (0.5 s), and a memory surge, an outcome, an event or a backlog of step
    records sends one at once. Each exchange costs ~1-3 ms of CPU in the job and as much in the
    sidecar, taken from training on a job's own cores: longer saves that, and delays what a
    far-from-its-thresholds policy and the dashboard see by as much. Below 0.5 s: 0.5 s."""
    stop: str = field(default="auto", metadata={"choices": STOP_MODES})
    """What a stop does to a job that does not read `should_stop`: `end_job` (trainwarden ends it
    at the start of its next training step past `stop_grace_steps`: on_stop hooks, a checkpoint,
    exit code 0 on every rank), `cooperative` (only `should_stop` turns true; a job that trains
    on is reported as having ignored the stop), `auto` (end_job for a job attached with zero lines,
    `trainwarden run --attach`; cooperative for one that attached in its code)."""
    stop_grace_steps: int = 0
    """Training steps a job may still start after the stop before trainwarden ends it (end_job)."""
    checkpoint_on_stop: str = field(default="auto", metadata={"choices": ("auto", "always", "never")})
    """When trainwarden ends a job, save a checkpoint first through the framework's own save
    (`accelerator.save_state`, `engine.save_checkpoint`, the Trainer's checkpoint): `auto` (in
    zero-line attach mode), `always`, `never`."""
    stale_after_s: float = 30.0
    """A rank whose telemetry is missing this long (or 20 sync intervals at the job's step time,
    if longer; plus a grace while an engine switch is under way) is said lost: a node gone, or the
    job hung in a collective. Longer than the job's pauses between steps (evaluation, saving)."""


@dataclass(frozen=True)
class PolicySpec:
    """One policy of the file: its kind, a name unique in the file, and its typed parameters."""

    name: str
    kind: str
    params: Any
    """An instance of the kind's frozen `Params` dataclass."""
    line: int = 0
    """Line of the policy in the file, for messages."""


#: What `trainwarden tune` can optimise, each read from a run (or a replayed one) at its end.
OBJECTIVE_METRICS = ("final_loss", "eval_loss", "tokens", "tokens_per_second", "wall_time_s")


def _choices(*values: str, doc: str = "") -> Any:
    return field(default=None, metadata={"choices": values, "doc": doc})


@dataclass(frozen=True)
class Objective:
    """What `trainwarden tune` optimises: one metric, one direction, and what makes a trial fail."""

    minimize: str | None = _choices(*OBJECTIVE_METRICS)
    """Metric to minimise: final_loss (the smoothed training loss at the end), eval_loss (the last
    validation loss the job reported), wall_time_s, ..."""
    maximize: str | None = _choices(*OBJECTIVE_METRICS)
    """Metric to maximise: tokens (trained within the budget), tokens_per_second, ..."""
    max_cap_violations: int = 0
    """Steps whose memory peak may exceed the cap before the trial counts as failed (an OOM on a
    GPU); a failed trial is recorded as failed, never as a value."""
    grace_steps: int = 0
    """Steps at the start not counted as violations: the job's starting configuration runs them
    before any policy has seen a memory sample."""

    @property
    def metric(self) -> str:
        return self.minimize or self.maximize or ""

    @property
    def direction(self) -> str:
        return "minimize" if self.minimize else "maximize"

    def check(self) -> list[str]:
        problems = []
        if (self.minimize is None) == (self.maximize is None):
            problems.append("give exactly one of `minimize:` or `maximize:` (e.g. `minimize: final_loss`)")
        for name in ("max_cap_violations", "grace_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        return problems


@dataclass(frozen=True)
class Tuned:
    """Where a tuned policy file came from: written by `trainwarden tune`, read back by `validate`."""

    study: str
    """Name of the Optuna study in its storage."""
    trial: int
    """Number of the trial whose parameters this file holds."""
    value: float
    """That trial's objective value."""
    metric: str = field(default="", metadata={"choices": ("", *OBJECTIVE_METRICS)})
    direction: str = field(default="minimize", metadata={"choices": ("minimize", "maximize")})
    mode: str = field(default="replay", metadata={"choices": ("replay", "run")})
    """`replay`: trials replayed recorded traces; `run`: trials were short real runs."""
    trials: int = 0
    """Trials the study had finished when this file was written."""
    traces: tuple[str, ...] = ()
    """Run directories replayed (replay mode)."""
    command: tuple[str, ...] = ()
    """Launch command of the trial runs (run mode)."""
    storage: str = ""
    """The Optuna storage URL, any password removed."""
    base: str = ""
    """The policy file that was tuned."""
    created: str = ""
    """When this file was written (UTC, ISO 8601)."""

    def check(self) -> list[str]:
        return [] if self.trial >= 0 else [f"trial must be 0 or more, got {self.trial}"]


@dataclass(frozen=True)
class PolicyFile:
    """A whole budget file."""

    path: str
    version: int
    budget: Budget
    controller: ControllerSettings
    policies: tuple[PolicySpec, ...]
    objective: Objective | None = None
    """What `trainwarden tune` optimises (ignored by `run`)."""
    tuned: Tuned | None = None
    """Provenance of a tuned file (ignored by `run`)."""
