"""Two real gloo ranks: a controller's stop that rank 0 has offered at a sync is on its way to the
ranks (adapters/core/rank_sync.py delivers it one sync later) and as good as applied. Rank 0's own
count of a tokens budget that ends at the same step must not place a second stop beside it: the
job stops once, at that step, on both ranks, by the controller's stop."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from helpers import free_port

from trainwarden.adapters.core.agent import Agent
from trainwarden.adapters.core.probes import CpuProbe
from trainwarden.controller.budget_end import ENV_BUDGET_END
from trainwarden.controller.protocol import KNOB_STOP, Action, JobShape, Outcome, StepRecord

TOKENS_PER_STEP = 100
LAST_STEP = 15  # the budget's last step: 1500 tokens
SHAPE = JobShape("r", "pytorch", 2, 10, 8, 1, (), (1, 2), "cpu", 2**34, 4)


class Delivers:
    """The controller's side, reduced to a stop it re-sends until answered (as a controller does)."""

    def __init__(self, stop: Action) -> None:
        self.stop = stop

    def hello(self, shape: JobShape) -> dict[str, Any]:
        return {}

    def exchange(
        self, records: list[StepRecord], outcomes: list[Outcome], finished: bool, **_: Any
    ) -> list[Action]:
        return [self.stop]

    def close(self) -> None:
        pass


def _rank(rank: int, port: int, out: str) -> None:
    import time

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ[ENV_BUDGET_END] = json.dumps({"tokens": LAST_STEP * TOKENS_PER_STEP})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stop = Action(kind=KNOB_STOP, params={"cause": "budget"}, reason="controller", step=LAST_STEP + 1)
        agent = Agent(SHAPE, Delivers(stop) if rank == 0 else None, CpuProbe(), rank, 2, sync_every=4)
        if rank == 0:
            deadline = time.monotonic() + 10
            while not agent._inbox and time.monotonic() < deadline:  # the first exchange
                time.sleep(0.01)
        due: dict[int, list[str]] = {}
        for step in range(1, 25):
            got = agent.on_step(step, 1.0, step * 8, step * TOKENS_PER_STEP, 0.01, 0.1, {})
            if got:
                due[step] = [f"{a.kind}:{a.reason}" for a in got]
                break
        Path(out, f"rank{rank}.json").write_text(json.dumps({"due": due, "by_agent": agent.stopped_by_agent}))
        agent.close()
    finally:
        dist.destroy_process_group()


def test_a_stop_in_flight_is_not_placed_again_by_the_jobs_own_count(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in got:
        assert r["due"] == {str(LAST_STEP): [f"{KNOB_STOP}:controller"]}, r
    assert not got[0]["by_agent"], "rank 0 placed a second stop beside the controller's, in flight"
