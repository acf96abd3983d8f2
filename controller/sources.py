"""Memory the controller sees for itself, from outside the job: procfs (CPU) and NVML (GPU).

The agent reports what the framework knows (per-step peaks, torch.cuda stats); these
sources add what only the OS or the driver sees (the CUDA context, NCCL buffers, other
allocators). The snapshot takes, per rank, the larger of the two.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

log = logging.getLogger(__name__)


class MemorySource(Protocol):
    name: str
    device: str
    """The device kind whose memory this source measures: `cpu` or `cuda`."""

    def watch(self, pids: Iterable[int]) -> None:
        """Start watching these processes (the job's ranks)."""

    def used_bytes(self, pid: int) -> int | None:
        """Memory the process uses now, or None if this source cannot tell."""

    def close(self) -> None: ...


class ProcfsSource:
    """Resident set size of the job's processes, through psutil (procfs on Linux)."""

    name = "procfs"
    device = "cpu"

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._procs: dict[int, Any] = {}

    def watch(self, pids: Iterable[int]) -> None:
        for pid in pids:
            try:
                self._procs[pid] = self._psutil.Process(pid)
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                pass  # another host's pid (a remote rank), or gone already

    def used_bytes(self, pid: int) -> int | None:
        proc = self._procs.get(pid)
        if proc is None:
            return None
        try:
            return int(proc.memory_info().rss)
        except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
            self._procs.pop(pid, None)
            return None

    def close(self) -> None:
        self._procs.clear()


class NvmlSource:
    """Per-process device memory from NVML (nvidia-ml-py), across every GPU of the host.

    `nvml` is the `pynvml` module, or anything with the same functions (the tests replay
    samples recorded on a GPU host). Use `NvmlSource.open()` to get one only where NVML works.
    """

    name = "nvml"
    device = "cuda"

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._pids: set[int] = set()
        nvml.nvmlInit()
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]

    @classmethod
    def open(cls) -> NvmlSource | None:
        """An NVML source, or None where there is no NVML library or no GPU (said once, at debug)."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            src = cls(pynvml)
        except Exception as exc:  # NVMLError_LibraryNotFound and friends: no GPU here
            log.debug("NVML unavailable: %s", exc)
            return None
        return src if src._handles else None

    def watch(self, pids: Iterable[int]) -> None:
        self._pids.update(pids)

    def used_bytes(self, pid: int) -> int | None:
        total = None
        for handle in self._handles:
            for proc in self._processes(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total = (total or 0) + int(proc.usedGpuMemory)
        return total

    def device_used_bytes(self) -> list[tuple[int, int, int]]:
        """(index, used, total) of every device, for the exporter."""
        out = []
        for i, handle in enumerate(self._handles):
            info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append((i, int(info.used), int(info.total)))
        return out

    def _processes(self, handle: Any) -> list[Any]:
        try:
            return list(self._nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except Exception as exc:
            log.debug("NVML process query failed: %s", exc)
            return []

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


def default_sources() -> list[MemorySource]:
    """procfs always; NVML where a GPU and its library exist."""
    sources: list[MemorySource] = [ProcfsSource()]
    nvml = NvmlSource.open()
    if nvml is not None:
        sources.append(nvml)
    return sources
