"""trainwarden.policies: pure decisions and the budget file. Imports no torch and nothing from
trainwarden.adapters (tests/test_layers.py).

The authoring API in one import, for writing a policy kind:

    from trainwarden.policies import PolicyKind, Range, Snapshot, Action, param, register

What lives where:
- base.py: PolicyKind (a pure `decide(snapshot) -> actions`), param, Range, register;
- memory.py, compute.py, data.py: the kinds, one module each;
- loader/: the strict budget-file loader (load_policy_file); schema.py re-exports the file's
  dataclasses from their home in the contract, trainwarden.controller.schema;
- units.py (sizes, durations, counts), validate.py (`trainwarden validate`);
- tuning/: `trainwarden tune` and the replay, a layer ABOVE the controller (it drives it).
"""

from trainwarden.controller.protocol import (
    KNOB_ACTIVATION_CHECKPOINTING,
    KNOB_CURRICULUM_LEVEL,
    KNOB_DOMAIN_WEIGHTS,
    KNOB_LR_MULTIPLIER,
    KNOB_MICRO_BATCH,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_PRUNE_FRACTION,
    KNOB_STOP,
    KNOB_ZERO_STAGE,
    Action,
    KnobSpec,
)
from trainwarden.controller.schema import Budget
from trainwarden.controller.snapshot import BudgetUse, Snapshot
from trainwarden.policies.base import PolicyKind, Range, param, register

__all__ = [
    "KNOB_ACTIVATION_CHECKPOINTING",
    "KNOB_CURRICULUM_LEVEL",
    "KNOB_DOMAIN_WEIGHTS",
    "KNOB_LR_MULTIPLIER",
    "KNOB_MICRO_BATCH",
    "KNOB_OFFLOAD_OPTIMIZER",
    "KNOB_OFFLOAD_PARAM",
    "KNOB_PRECISION",
    "KNOB_PRUNE_FRACTION",
    "KNOB_STOP",
    "KNOB_ZERO_STAGE",
    "Action",
    "Budget",
    "BudgetUse",
    "KnobSpec",
    "PolicyKind",
    "Range",
    "Snapshot",
    "param",
    "register",
]
