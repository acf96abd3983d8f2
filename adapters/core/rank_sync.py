"""The ranks' sync step: every rank's memory to all, rank 0's due actions to all, pipelined.

`all_gather_object` (what this replaced) pickles each rank's object, gathers the sizes, then the
padded bytes: two collectives and a pickle per rank at every sync step, ~5 ms a sync on two CPU
ranks of a loaded 2-core machine (bench/agent_overhead.py: 2.8% of a 180 ms step at a sync every
step). Here the memory is six integers a rank in one `all_gather` of a small int64 tensor; the
actions, which are rare, follow as one `broadcast` of their pickle from rank 0 only at the sync
steps that carry some (every rank reads their size from the gather, so every rank takes the same
branch). Each rank's device name is gathered once, at the first sync.

Pipelined: a sync posts its gather (`async_op`) and reads the one the previous sync posted, done
long since. A blocking gather is a rendezvous: each rank waits there for the slowest, which on
busy cores is a scheduling delay of milliseconds (p90 1.8 ms a sync on two CPU ranks, 0.5% of the
step at a sync every 8 steps); a posted one completes while the ranks train. What it costs: what
rank 0 offers at one sync reaches every rank at the next (the agent offers what comes due within
two intervals, `LAG_SYNCS`), and the other ranks' memory is one interval old (the rank's own is
current). The first sync is blocking, so memory is complete from the start.

On NCCL the tensors live on the current CUDA device, as `all_gather_object` puts them; on gloo
(the CPU) in host memory.
"""

from __future__ import annotations

import pickle
from typing import Any

from trainwarden.controller.protocol import Action, RankMemory

#: used, peak, total bytes, pid, rank, bytes of rank 0's pickled actions (0: none).
_FIELDS = 6
#: Syncs between rank 0's offer and every rank having it (several ranks; one rank has no sync).
LAG_SYNCS = 1


class RankSync:
    def __init__(self, rank: int, world_size: int, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self._devices: tuple[str, ...] | None = None
        self._device: Any = None
        # The gather the previous sync posted: (its step, work, rows, rank 0's actions, their pickle).
        self._posted: tuple[int, Any, list[Any], list[Action], bytes] | None = None
        self._table: list[list[int]] = []  # every rank's row as last read
        self._table_step = 0  # the sync step those rows were posted at

    def exchange(
        self, step: int, mine: RankMemory, offer: list[Action]
    ) -> tuple[tuple[RankMemory, ...], list[Action]]:
        """Every rank's memory (by rank: this rank's `mine`, the others' as of the previous sync,
        which their `step` says) and the actions rank 0 offered at the previous sync (at the
        first, those it offers now); called at the same sync `step` by every rank (a collective)."""
        import torch.distributed as dist

        first = self._devices is None
        if first:
            self._start(dist, mine.device)
        actions = self._read(dist) if self._posted is not None else []
        self._post(dist, step, mine, offer)
        if first:
            actions = self._read(dist)  # blocking once: complete memory, and the first offer now
        devices, at = self._devices or (), self._table_step
        memory = tuple(
            mine
            if i == self.rank
            else RankMemory(
                int(r[4]), int(r[0]), int(r[1]), int(r[2]), devices[i], int(r[3]), None if at == step else at
            )
            for i, r in enumerate(self._table)
        )
        return memory, actions

    def _start(self, dist: Any, device: str) -> None:
        import torch

        names: list[Any] = [None] * self.world_size
        dist.all_gather_object(names, device, group=self.group)
        self._devices = tuple(str(n) for n in names)
        on_gpu = "nccl" in str(dist.get_backend(self.group))
        self._device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")

    def _post(self, dist: Any, step: int, mine: RankMemory, offer: list[Action]) -> None:
        import torch

        payload = pickle.dumps(offer) if offer and self.rank == 0 else b""
        row = torch.tensor(
            [mine.used_bytes, mine.peak_bytes, mine.total_bytes, mine.pid, mine.rank, len(payload)],
            dtype=torch.int64,
            device=self._device,
        )
        rows = [torch.empty(_FIELDS, dtype=torch.int64, device=self._device) for _ in range(self.world_size)]
        work = dist.all_gather(rows, row, group=self.group, async_op=True)
        self._posted = (step, work, rows, list(offer) if payload else [], payload)

    def _read(self, dist: Any) -> list[Action]:
        """The posted gather's rows (waited for: done long since but at the first sync), then rank
        0's actions, broadcast if it offered some (every rank read the same size)."""
        import torch

        assert self._posted is not None
        self._table_step, work, rows, offered, payload = self._posted
        self._posted = None
        work.wait()
        self._table = torch.stack(rows).cpu().tolist()
        size = int(self._table[0][5])
        if size == 0:
            return []
        if self.rank == 0:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=self._device)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(buf, src=src, group=self.group)
        return pickle.loads(buf.cpu().numpy().tobytes()) if self.rank != 0 else offered
