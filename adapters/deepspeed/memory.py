"""Memory as a switch reports it, giving the memory of a destroyed engine back, and what torch's
transparent huge pages would buy a switch on the CPU (`huge_pages_hint`).

The meter reads process RSS and its high-water mark on the CPU (/proc, Linux), torch.cuda's
allocated bytes on a GPU: a file read or a CUDA call each, nothing while no switch runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


class MemoryMeter:
    """Memory now and the peak since `start`: process RSS on the CPU, allocated bytes on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.device = device

    def start(self) -> int:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")  # resets VmHWM (Linux >= 4.0)
            except OSError:
                pass
        return self.now()

    def now(self) -> int:
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return self._status("VmRSS:")

    def peak(self) -> int:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(self._status("VmHWM:"), self.now())

    @staticmethod
    def _status(field_name: str) -> int:
        try:
            with open("/proc/self/status", "rb") as fh:
                for line in fh:
                    if line.startswith(field_name.encode()):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


def release_memory(device: torch.device) -> None:
    """Give freed memory back: hand glibc's free heap pages back, empty the CUDA cache.

    No `gc.collect()`: a full collection walks every tracked object of the process (400k with
    torch and DeepSpeed imported: 0.15-0.45 s on this CPU, most of a switch's own work), and a
    destroyed engine's tensors no longer wait for it (adapters/deepspeed/build.py `destroy`
    frees them by reference counting). What cycles remain are small Python objects, collected
    by the interpreter's own schedule."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: Where Linux says whether transparent huge pages are on: "always [madvise] never", the mode in brackets.
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_hint(
    duration_s: float, moved_bytes: int, environ: Mapping[str, str] | None = None
) -> str | None:
    """What a CPU switch would gain from torch's transparent huge pages, when the job has them off
    and the kernel would give them (mode `always` or `madvise`); None otherwise.

    A switch writes the state into the new engine's freshly allocated buffers; without huge pages
    every 4 KiB of them is a page fault. torch asks for huge pages for tensors of 2 MiB and more
    only with THP_MEM_ALLOC_ENABLE=1, read at its first allocation, so only the job's environment
    can set it (bench/README.md, switch_latency: a 25M-parameter GPT's switches 1.6x as fast)."""
    env = os.environ if environ is None else environ
    if env.get("THP_MEM_ALLOC_ENABLE", "") == "1":
        return None
    try:
        with open(THP_MODE_FILE) as fh:
            mode = fh.read()
    except OSError:
        return None  # not Linux, or no THP: nothing to gain
    if "[always]" not in mode and "[madvise]" not in mode:
        return None
    return (
        f"this switch moved {moved_bytes / 2**20:.0f} MiB of state in {duration_s:.2f} s into fresh buffers, "
        "4 KiB pages faulted one by one; THP_MEM_ALLOC_ENABLE=1 in the job's environment (torch then asks "
        "for transparent huge pages) made switches 1.6x as fast on a 25M-parameter GPT here. Set it "
        "before the job starts: torch reads it once"
    )


__all__ = ["MemoryMeter", "huge_pages_hint", "release_memory"]
