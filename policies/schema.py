"""The budget file's typed form, re-exported from its home in the contract,
`trainwarden.controller.schema` (controller, policies and adapters all read it), so that
`from trainwarden.controller.schema import Budget` keeps working."""

from trainwarden.controller.schema import (
    OBJECTIVE_METRICS,
    STOP_MODES,
    Budget,
    ControllerSettings,
    Cost,
    MemoryCap,
    Objective,
    PolicyFile,
    PolicySpec,
    Tuned,
)

__all__ = [
    "OBJECTIVE_METRICS",
    "STOP_MODES",
    "Budget",
    "ControllerSettings",
    "Cost",
    "MemoryCap",
    "Objective",
    "PolicyFile",
    "PolicySpec",
    "Tuned",
]
