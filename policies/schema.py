"""The budget file's typed form: frozen dataclasses, one docstring per field.

`trainwarden.policies.loader` builds these from YAML; nothing else constructs them from
untrusted input.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class ControllerSettings:
    """How the control loop runs."""

    sync_every: int = 8
    """Every this many optimizer steps the ranks gather telemetry and rank 0 broadcasts
    pending actions; no collective runs on the other steps. Larger costs less, reacts later."""
    decide_interval_s: float = 0.5
    """Least time between two decisions of the controller."""


@dataclass(frozen=True)
class PolicySpec:
    """One policy of the file: its kind, a name unique in the file, and its typed parameters."""

    name: str
    kind: str
    params: Any
    """An instance of the kind's frozen `Params` dataclass."""
    line: int = 0
    """Line of the policy in the file, for messages."""


@dataclass(frozen=True)
class PolicyFile:
    """A whole budget file."""

    path: str
    version: int
    budget: Budget
    controller: ControllerSettings
    policies: tuple[PolicySpec, ...]
