"""Shared by the Accelerate and HF tests that start real jobs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from accelerate.state import AcceleratorState, GradientState
from helpers import job_env

#: Variables of a launch that tests in this process may have set (the DeepSpeed tests set a
#: one-rank "launch" for their own in-process engines): a job a test starts is a launch of its own.
_LAUNCH = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def fresh_job_env(**extra: str) -> dict[str, str]:
    """helpers.job_env, without this process's launch variables and Accelerate settings."""
    env = {
        k: v
        for k, v in job_env().items()
        if k not in _LAUNCH and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))
    }
    env.update(extra)
    return env


@contextmanager
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps its state per process: the test inside starts from none and leaves none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
