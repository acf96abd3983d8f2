"""The ranks' sync step (adapters/core/rank_sync.py) on two real gloo ranks: every rank gets every
rank's memory, and rank 0's actions arrive on rank 1 as sent, only at the syncs that carry some."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from helpers import free_port

from trainwarden.adapters.core.rank_sync import RankSync
from trainwarden.controller.protocol import Action, RankMemory


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results: dict[str, Any] = {}
        sync = RankSync(rank, world)
        stop = Action(kind="stop", params={"cause": "budget"}, reason="the end", step=12, policy="compute")
        for n, offer in enumerate(([], [stop], [])):
            mine = RankMemory(rank, 1000 + rank + n, 2000 + rank + n, 8000, f"cpu{rank}", 40 + rank)
            memory, actions = sync.exchange(mine, offer if rank == 0 else [])
            results[f"sync{n}"] = {
                "memory": [m.to_json() for m in memory],
                "actions": [a.to_json() for a in actions],
            }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_memory_to_every_rank_and_rank_0s_actions_as_sent(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0] == got[1]  # every rank learns the same
    for n in range(3):
        memory = got[0][f"sync{n}"]["memory"]
        assert [(m["rank"], m["used_bytes"], m["peak_bytes"], m["device"], m["pid"]) for m in memory] == [
            (r, 1000 + r + n, 2000 + r + n, f"cpu{r}", 40 + r) for r in (0, 1)
        ]
    assert got[0]["sync0"]["actions"] == [] and got[0]["sync2"]["actions"] == []
    (stop,) = got[1]["sync1"]["actions"]
    assert stop["kind"] == "stop" and stop["step"] == 12 and stop["params"] == {"cause": "budget"}
