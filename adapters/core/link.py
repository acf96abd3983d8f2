"""Attaching an adapter to its controller: the part every adapter does the same way.

`open_link` finds this process's rank, connects rank 0 to the controller (a sidecar named by
the environment, or an embedded one), settles the sync cadence and gathers every rank's pid;
`start_agent` sends the job's shape (refusing a budget already spent) and starts the agent.
Each adapter supplies only what it knows: its knobs, batch and parameter count.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from trainwarden.adapters.core.agent import Agent
from trainwarden.adapters.core.channel import Channel
from trainwarden.adapters.core.connect import connect, run_id_from_env
from trainwarden.adapters.core.probes import MemoryProbe
from trainwarden.adapters.knobs import check_budget_at_start
from trainwarden.controller.protocol import ENV_SYNC_EVERY, JobShape
from trainwarden.controller.schema import ControllerSettings


@dataclass(frozen=True)
class Link:
    """This rank's place in the job and its way to the controller."""

    rank: int
    world_size: int
    run_id: str
    channel: Channel | None
    """Rank 0's channel; None on other ranks and when trainwarden is disabled."""
    controller: Any
    """The embedded Controller on rank 0 without a sidecar, else None."""
    sync_every: int
    """Rank 0's cadence, taken by every rank: they must run their collectives at the same steps."""
    pids: tuple[int, ...]
    """Every rank's pid, in rank order."""


def open_link(
    policy: str | os.PathLike[str] | None,
    run_dir: str | os.PathLike[str] | None,
    sync_every: int | None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> Link:
    """Connect (rank 0) and agree on the cadence (every rank, one all_gather_object when there
    are several). `sync_every` given wins over the policy file's, then TRAINWARDEN_SYNC_EVERY."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
    world = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
    run_id = run_id_from_env()
    channel, controller = connect(rank, run_id, policy, run_dir)
    settings_sync = controller.settings.sync_every if controller is not None else None
    sync = sync_every or settings_sync or int(os.environ.get(ENV_SYNC_EVERY, ControllerSettings.sync_every))
    pids: tuple[int, ...] = (os.getpid(),)
    if initialized and world > 1:
        # Only rank 0 has the embedded controller's settings: its cadence is the job's.
        out: list[Any] = [None] * world
        dist.all_gather_object(out, (os.getpid(), sync))
        pids, sync = tuple(int(p) for p, _ in out), int(out[0][1])
    return Link(rank, world, run_id, channel, controller, sync, pids)


def start_agent(link: Link, probe: MemoryProbe, **shape: Any) -> Agent:
    """Tell the controller the job's shape (`shape`: JobShape's adapter-specific fields) and start
    the agent. A budget spent before the first step is an AttachError here."""
    job = JobShape(
        run_id=link.run_id,
        world_size=link.world_size,
        pids=link.pids,
        device=probe.device,
        device_total_bytes=probe.total_bytes,
        sync_every=link.sync_every,
        # This start of the job: a reconnect says hello with it again, a restart has a new one.
        incarnation=secrets.token_hex(8),
        **shape,
    )
    check_budget_at_start(link.controller, job)
    return Agent(
        job, link.channel, probe, rank=link.rank, world_size=link.world_size, sync_every=link.sync_every
    )
