"""The ranks' sync step (adapters/core/rank_sync.py) on two real gloo ranks: every rank gets every
rank's memory (its own current, the others' one sync old), and rank 0's actions arrive on every
rank as sent, one sync after rank 0 offered them (at the first sync, at once)."""

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
        early = Action(kind="micro_batch_size", params={"value": 4}, reason="high", step=1, policy="memory")
        stop = Action(kind="stop", params={"cause": "budget"}, reason="the end", step=12, policy="compute")
        for n, offer in enumerate(([early], [stop], [], [])):
            mine = RankMemory(rank, 1000 + rank + n, 2000 + rank + n, 8000, f"cpu{rank}", 40 + rank)
            memory, actions = sync.exchange(10 * n, mine, offer if rank == 0 else [])
            results[f"sync{n}"] = {
                "memory": [m.to_json() for m in memory],
                "actions": [a.to_json() for a in actions],
            }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_memory_to_every_rank_and_rank_0s_actions_one_sync_later(tmp_path: Path) -> None:
    mp.start_processes(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for me in (0, 1):
        for n in range(4):
            memory = got[me][f"sync{n}"]["memory"]
            # Its own row is this sync's; the other's was posted at the previous sync (the first is
            # blocking: complete from the start).
            at = {r: n if r == me or n == 0 else n - 1 for r in (0, 1)}
            assert [
                (m["rank"], m["used_bytes"], m["peak_bytes"], m["device"], m["pid"], m.get("step"))
                for m in memory
            ] == [
                (r, 1000 + r + at[r], 2000 + r + at[r], f"cpu{r}", 40 + r, None if at[r] == n else 10 * at[r])
                for r in (0, 1)
            ], (me, n)
    for n in range(4):  # every rank learns the same actions at the same sync
        assert got[0][f"sync{n}"]["actions"] == got[1][f"sync{n}"]["actions"], n
    (early,) = got[1]["sync0"]["actions"]  # the first sync waits for its own gather
    assert early["kind"] == "micro_batch_size" and early["params"] == {"value": 4}
    assert got[1]["sync1"]["actions"] == [], "offered at sync 1, it reaches the ranks at sync 2"
    (stop,) = got[1]["sync2"]["actions"]
    assert stop["kind"] == "stop" and stop["step"] == 12 and stop["params"] == {"cause": "budget"}
    assert got[1]["sync3"]["actions"] == []
