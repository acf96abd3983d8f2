"""Memory probes inside the job: what a rank uses now and its peak since the last sample.

CPU: the process's RSS, and its per-step peak from the kernel's high-water mark (VmHWM),
reset after each sample by writing 5 to /proc/self/clear_refs (Linux >= 4.0; about 20 us).
A CPU cap must be checked against the peak, not the RSS at the step boundary: by then the
activations are freed. CUDA: torch.cuda's reserved bytes and their peak, reset the same way.
"""

from __future__ import annotations

import os
from typing import Any, Protocol


class MemoryProbe(Protocol):
    device: str
    total_bytes: int

    def sample(self) -> tuple[int, int]:
        """(used now, peak since the previous sample) in bytes; starts a new peak window."""

    def release(self) -> None:
        """Give memory the job no longer uses back to the device (after a switch), and start a
        new peak window, so the next sample measures the new configuration alone."""


def _proc_status_kib(field_names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status", "rb") as fh:
        for line in fh:
            for name in field_names:
                if line.startswith(name.encode()):
                    out[name] = int(line.split()[1]) * 1024
    return out


def _cpu_total_bytes() -> int:
    """RAM this process may use: the machine's, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total)


def _malloc_trim() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim


class CpuProbe:
    device = "cpu"

    def __init__(self) -> None:
        self.total_bytes = _cpu_total_bytes()
        self._can_reset = self._reset()
        self._trim = _malloc_trim()

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def sample(self) -> tuple[int, int]:
        try:
            st = _proc_status_kib(("VmRSS:", "VmHWM:"))
        except OSError:
            return 0, 0
        used = st.get("VmRSS:", 0)
        # Without a resettable high-water mark the peak is the whole run's: report RSS instead.
        peak = st.get("VmHWM:", used) if self._can_reset else used
        if self._can_reset:
            self._reset()
        return used, max(peak, used)

    def reset_peak(self) -> None:
        """Start a new peak window now (a training step begins), without sampling."""
        if self._can_reset:
            self._reset()

    def peak(self) -> int:
        """The peak since the last reset, without starting a new window."""
        try:
            st = _proc_status_kib(("VmRSS:", "VmHWM:"))
        except OSError:
            return 0
        return st.get("VmHWM:", 0) if self._can_reset else st.get("VmRSS:", 0)

    def release(self) -> None:
        # glibc keeps freed heap pages resident; without this a process that stepped down
        # from a large micro-batch keeps its old RSS and the step down never shows.
        # malloc_trim(0) hands them back (about 16 ms on the demo, only after a switch).
        if self._trim is not None:
            self._trim(0)
        if self._can_reset:
            self._reset()


class CudaProbe:
    def __init__(self, torch: Any, device: Any) -> None:
        self._cuda = torch.cuda
        self._device = device
        self.device = f"cuda:{device.index if device.index is not None else self._cuda.current_device()}"
        self.total_bytes = int(self._cuda.get_device_properties(device).total_memory)

    def sample(self) -> tuple[int, int]:
        used = int(self._cuda.memory_reserved(self._device))
        peak = int(self._cuda.max_memory_reserved(self._device))
        self._cuda.reset_peak_memory_stats(self._device)
        return used, max(peak, used)

    def reset_peak(self) -> None:
        self._cuda.reset_peak_memory_stats(self._device)

    def peak(self) -> int:
        return int(self._cuda.max_memory_reserved(self._device))

    def release(self) -> None:
        self._cuda.empty_cache()
        self._cuda.reset_peak_memory_stats(self._device)


def probe_for(device: Any = None) -> MemoryProbe:
    """The probe for a torch device (CUDA when the model lives there), else the CPU's."""
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return CudaProbe(torch, device)
    return CpuProbe()
