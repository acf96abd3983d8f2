"""trainwarden.adapters: what runs inside the training job. Which entry point for which loop:

- plain PyTorch: `trainwarden.adapters.pytorch.attach(model, optimizer, ...)`;
- DeepSpeed: `trainwarden.adapters.deepspeed.initialize(...)` (as `deepspeed.initialize`);
- Accelerate: `trainwarden.adapters.accelerate.Accelerator` (as `accelerate.Accelerator`);
- HF Trainer: `trainwarden.adapters.hf.TrainwardenCallback()`;
- zero lines: `trainwarden run --attach` (`trainwarden.adapters.attach`);
- the live data mixture any of them carries: `trainwarden.adapters.data`.
All four are built on `core/` (the step boundary, the agent, the channel) and `knobs.py`.
Importing this package imports nothing: the job's sitecustomize (`attach`) imports it at the
start of every Python process, so the two names below load on first use.
"""

from typing import Any

__all__ = ["AttachError", "StopInfo"]


def __getattr__(name: str) -> Any:
    if name == "AttachError":
        from trainwarden.adapters.core.connect import AttachError

        return AttachError
    if name == "StopInfo":
        from trainwarden.adapters.knobs import StopInfo

        return StopInfo
    raise AttributeError(f"module 'trainwarden.adapters' has no attribute {name!r}")
