"""The ranks' sync step: every rank's memory to all, rank 0's due actions to all, in one collective.

`all_gather_object` (what this replaced) pickles each rank's object, gathers the sizes, then the
padded bytes: two collectives and a pickle per rank at every sync step, ~5 ms a sync on two CPU
ranks of a loaded 2-core machine (bench/agent_overhead.py: 2.8% of a 180 ms step at a sync every
step). Here the memory is six integers a rank in one `all_gather` of a small int64 tensor; the
actions, which are rare, follow as one `broadcast` of their pickle from rank 0 only at the sync
steps that carry some (every rank reads their size from the gather, so every rank takes the same
branch). Each rank's device name is gathered once, at the first sync.

On NCCL the tensors live on the current CUDA device, as `all_gather_object` puts them; on gloo
(the CPU) in host memory.
"""

from __future__ import annotations

import pickle
from typing import Any

from trainwarden.controller.protocol import Action, RankMemory

#: used, peak, total bytes, pid, rank, bytes of rank 0's pickled actions (0: none).
_FIELDS = 6


class RankSync:
    def __init__(self, rank: int, world_size: int, group: Any = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self._devices: tuple[str, ...] | None = None
        self._device: Any = None

    def exchange(self, mine: RankMemory, offer: list[Action]) -> tuple[tuple[RankMemory, ...], list[Action]]:
        """Every rank's memory (by rank) and the actions rank 0 offered; called at the same sync
        step by every rank (a collective)."""
        import torch
        import torch.distributed as dist

        if self._devices is None:
            names: list[Any] = [None] * self.world_size
            dist.all_gather_object(names, mine.device, group=self.group)
            self._devices = tuple(str(n) for n in names)
            backend = str(dist.get_backend(self.group))
            on_gpu = "nccl" in backend
            self._device = (
                torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
            )
        payload = pickle.dumps(offer) if offer and self.rank == 0 else b""
        row = torch.tensor(
            [mine.used_bytes, mine.peak_bytes, mine.total_bytes, mine.pid, mine.rank, len(payload)],
            dtype=torch.int64,
            device=self._device,
        )
        rows = [torch.empty(_FIELDS, dtype=torch.int64, device=self._device) for _ in range(self.world_size)]
        dist.all_gather(rows, row, group=self.group)
        table = torch.stack(rows).cpu().tolist()
        memory = tuple(
            RankMemory(int(r[4]), int(r[0]), int(r[1]), int(r[2]), self._devices[i], int(r[3]))
            for i, r in enumerate(table)
        )
        size = int(table[0][5])
        if size == 0:
            return memory, []
        if self.rank == 0:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device)
        else:
            buf = torch.empty(size, dtype=torch.uint8, device=self._device)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(buf, src=src, group=self.group)
        actions = pickle.loads(buf.cpu().numpy().tobytes()) if self.rank != 0 else list(offer)
        return memory, actions
