"""Memory probes inside the job: what a rank uses now and its peak since the last sample.

CPU: the process's RSS, and its per-step peak from the kernel's high-water mark (VmHWM),
reset after each sample by writing 5 to /proc/self/clear_refs (Linux >= 4.0). Both files stay
open and are read with pread/written with write: opening them per step (Python's open() in text
mode) cost ~30 us per reset and ~35 us per read on this machine, against ~1 us and ~14 us kept
open; a step pays a reset and a read, plus a sample at sync steps (bench/agent_overhead.py).
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


def _status_kib(text: bytes, name: bytes) -> int | None:
    """The value of field `name` (e.g. b"VmHWM:") of a /proc/<pid>/status text, in bytes."""
    at = text.find(name)
    if at < 0:
        return None
    end = text.find(b"\n", at)
    return int(text[at + len(name) : end if end >= 0 else None].split()[0]) * 1024


class _ProcSelf:
    """/proc/self/status and /proc/self/clear_refs, kept open. Reopened in a forked child (a
    DataLoader worker): an inherited descriptor would read its parent's."""

    def __init__(self) -> None:
        self._pid = -1
        self._status = self._clear = -1

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        self.close()
        self._pid = os.getpid()
        self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._clear = os.open("/proc/self/clear_refs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self._clear = -1  # not Linux >= 4.0, or not allowed: no resettable peak

    def status(self) -> bytes:
        self._open()
        return os.pread(self._status, 16384, 0)

    def reset(self) -> bool:
        try:
            self._open()
            if self._clear < 0:
                return False
            os.write(self._clear, b"5")
            return True
        except OSError:
            return False

    def close(self) -> None:
        for fd in (self._status, self._clear):
            if fd >= 0 and self._pid == os.getpid():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._status = self._clear = -1


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
        self._proc = _ProcSelf()
        self._can_reset = self._proc.reset()
        self._trim = _malloc_trim()

    def _read(self) -> tuple[int, int | None]:
        """(RSS, high-water mark) in bytes; (0, None) where /proc cannot be read."""
        try:
            text = self._proc.status()
        except OSError:
            return 0, None
        return _status_kib(text, b"VmRSS:") or 0, _status_kib(text, b"VmHWM:")

    def sample(self) -> tuple[int, int]:
        used, hwm = self._read()
        # Without a resettable high-water mark the peak is the whole run's: report RSS instead.
        peak = hwm if self._can_reset and hwm is not None else used
        if self._can_reset:
            self._proc.reset()
        return used, max(peak, used)

    def reset_peak(self) -> None:
        """Start a new peak window now (a training step begins), without sampling."""
        if self._can_reset:
            self._proc.reset()

    def peak(self) -> int:
        """The peak since the last reset, without starting a new window."""
        used, hwm = self._read()
        return hwm if self._can_reset and hwm is not None else used

    def release(self) -> None:
        # glibc keeps freed heap pages resident; without this a process that stepped down
        # from a large micro-batch keeps its old RSS and the step down never shows.
        # malloc_trim(0) hands them back (about 16 ms on the demo, only after a switch).
        if self._trim is not None:
            self._trim(0)
        if self._can_reset:
            self._proc.reset()


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
