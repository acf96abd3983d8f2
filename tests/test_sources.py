"""Memory the controller sees for itself: procfs for real, NVML replayed from recorded samples.

This machine has no GPU, so NVML (the driver's library) is the one thing faked: a replay
object answers the pynvml calls NvmlSource makes from tests/data/nvml_samples.json, in the
form nvidia-ml-py returns them. NvmlSource itself, and the controller around it, are real.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pynvml
import pytest

from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import KNOB_MICRO_BATCH, JobShape, KnobSpec, RankMemory, StepRecord
from trainwarden.controller.sources import NvmlSource, ProcfsSource, default_sources

MiB = 2**20
GiB = 2**30
SAMPLES = Path(__file__).resolve().parent / "data" / "nvml_samples.json"
RECORDING = json.loads(SAMPLES.read_text())
JOB_PIDS = tuple(48211 + r for r in range(8))
FOREIGN_PID = 77120
H100_TOTAL = 81559 * MiB


class _Handle:
    """An opaque device handle, as pynvml's c_nvmlDevice_t is; only the replay looks inside."""

    def __init__(self, index: int) -> None:
        self._index = index


class NvmlReplay:
    """The pynvml functions NvmlSource calls, answered from the recording, one sample at a time."""

    def __init__(self, recording: dict[str, Any], lost: frozenset[int] = frozenset()) -> None:
        self._samples = recording["samples"]
        self._count = recording["device_count"]
        self._lost = lost
        self.sample = 0
        self.inits = 0
        self.shutdowns = 0

    def _require_init(self) -> None:
        if self.inits <= self.shutdowns:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: Any) -> dict[str, Any]:
        self._require_init()
        if not isinstance(handle, _Handle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._samples[self.sample]["devices"][handle._index]

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._require_init()
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        return self._count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._require_init()
        if not 0 <= index < self._count:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        device = self._device(handle)
        if device["index"] in self._lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return [SimpleNamespace(**p) for p in device["compute_processes"]]

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> SimpleNamespace:
        return SimpleNamespace(**self._device(handle)["memory"])


# --- the recording itself -----------------------------------------------------------------------


def test_the_recording_is_consistent() -> None:
    assert RECORDING["device_count"] == 8
    assert len(RECORDING["samples"]) >= 3
    for sample in RECORDING["samples"]:
        assert [d["index"] for d in sample["devices"]] == list(range(8))
        for d in sample["devices"]:
            mem = d["memory"]
            assert mem["total"] == H100_TOTAL
            assert mem["used"] + mem["free"] == mem["total"]
            attributed = sum(p["usedGpuMemory"] or 0 for p in d["compute_processes"])
            assert attributed < mem["used"], "the driver's reserve is in `used`, in no process"


# --- procfs -------------------------------------------------------------------------------------


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_procfs_reports_this_process_rss() -> None:
    src = ProcfsSource()
    pid = os.getpid()
    src.watch([pid])
    used = src.used_bytes(pid)
    assert used is not None
    assert abs(used - psutil.Process().memory_info().rss) < 16 * MiB
    assert abs(used - _vm_rss()) < 16 * MiB
    src.close()
    assert src.used_bytes(pid) is None, "closed: watches nothing"


def test_procfs_unknown_pids_are_none() -> None:
    src = ProcfsSource()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    src.watch([pid_max + 1])  # cannot exist: ignored, like a remote rank's pid
    assert src.used_bytes(pid_max + 1) is None
    assert src.used_bytes(os.getpid()) is None, "not watched"


def test_procfs_a_rank_that_exits_becomes_none() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        src = ProcfsSource()
        src.watch([proc.pid])
        assert (src.used_bytes(proc.pid) or 0) > 0
    finally:
        proc.kill()
        proc.wait()
    assert src.used_bytes(proc.pid) is None
    assert src.used_bytes(proc.pid) is None


# --- NVML, replayed -----------------------------------------------------------------------------


def expected_used(sample: int, pid: int) -> int | None:
    """Independent of NvmlSource: the pid's memory summed over every device of the sample."""
    total = None
    for d in RECORDING["samples"][sample]["devices"]:
        for p in d["compute_processes"]:
            if p["pid"] == pid and p["usedGpuMemory"] is not None:
                total = (total or 0) + p["usedGpuMemory"]
    return total


def test_nvml_used_bytes_per_pid_summed_across_devices() -> None:
    replay = NvmlReplay(RECORDING)
    src = NvmlSource(replay)
    src.watch(JOB_PIDS)
    assert replay.inits == 1
    # First sample: one process per GPU.
    assert src.used_bytes(JOB_PIDS[0]) == 61234 * MiB
    assert src.used_bytes(JOB_PIDS[3]) == 60978 * MiB
    # Second sample: rank 3 has a stray context on GPU 0 too; NVML is read live, not cached.
    replay.sample = 1
    assert src.used_bytes(JOB_PIDS[3]) == (66162 + 518) * MiB
    assert src.used_bytes(JOB_PIDS[0]) == 66418 * MiB
    for sample in range(len(RECORDING["samples"])):
        replay.sample = sample
        for pid in JOB_PIDS:
            assert src.used_bytes(pid) == expected_used(sample, pid), (sample, pid)
    src.close()
    assert replay.shutdowns == 1


def test_nvml_unknown_or_unattributed_pids_are_none() -> None:
    src = NvmlSource(NvmlReplay(RECORDING))
    assert src.used_bytes(os.getpid()) is None, "no process of ours on any GPU"
    assert src.used_bytes(FOREIGN_PID) is None, "NVML_VALUE_NOT_AVAILABLE is not zero"


def test_nvml_device_used_bytes() -> None:
    replay = NvmlReplay(RECORDING)
    src = NvmlSource(replay)
    for sample in range(len(RECORDING["samples"])):
        replay.sample = sample
        got = src.device_used_bytes()
        want = [
            (d["index"], d["memory"]["used"], d["memory"]["total"])
            for d in RECORDING["samples"][sample]["devices"]
        ]
        assert got == want
    replay.sample = 0
    index, used, total = src.device_used_bytes()[7]
    assert (index, total) == (7, H100_TOTAL)
    assert used == 568 * MiB + 60978 * MiB + 1024 * MiB, "reserve + rank 7 + the other container's process"


def test_nvml_a_lost_gpu_does_not_hide_the_others() -> None:
    src = NvmlSource(NvmlReplay(RECORDING, lost=frozenset({5})))
    assert src.used_bytes(JOB_PIDS[5]) is None
    assert src.used_bytes(JOB_PIDS[4]) == 60978 * MiB


def test_nvml_open_is_none_without_the_library() -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has the NVML library")
    with pytest.raises(pynvml.NVMLError_LibraryNotFound):
        pynvml.nvmlInit()
    assert NvmlSource.open() is None
    assert [s.name for s in default_sources()] == ["procfs"]


@pytest.mark.gpu
def test_nvml_open_on_a_gpu_host() -> None:
    src = NvmlSource.open()
    if src is None:
        pytest.skip("no NVML or no GPU here")
    try:
        devices = src.device_used_bytes()
        assert devices and all(0 < used <= total for _, used, total in devices)
        assert src.used_bytes(os.getpid()) is None or src.used_bytes(os.getpid()) > 0
    finally:
        src.close()


# --- the controller folds its own readings in -----------------------------------------------------


def shape(device: str, pids: tuple[int, ...]) -> JobShape:
    return JobShape(
        run_id="src-run",
        adapter="deepspeed",
        world_size=len(pids),
        param_count=7_000_000_000,
        global_batch_size=256,
        tokens_per_sample=4096,
        knobs=(KnobSpec(KNOB_MICRO_BATCH, 4, choices=(1, 2, 4)),),
        pids=pids,
        device=device,
        device_total_bytes=H100_TOTAL,
        sync_every=1,
    )


def record(peaks: list[int], device: str, pids: tuple[int, ...]) -> StepRecord:
    return StepRecord(
        step=1,
        time=100.0,
        loss=2.0,
        samples=256,
        tokens=256 * 4096,
        step_time_s=3.0,
        lr=1e-4,
        config={KNOB_MICRO_BATCH: 4},
        memory=tuple(
            RankMemory(r, p, p, H100_TOTAL, device if device == "cpu" else f"cuda:{r}", pids[r])
            for r, p in enumerate(peaks)
        ),
    )


def test_cuda_job_takes_the_larger_of_agent_peak_and_nvml(tmp_path: Path) -> None:
    replay = NvmlReplay(RECORDING)
    ctl = Controller(tmp_path / "run", "src-run", sources=[ProcfsSource(), NvmlSource(replay)])
    ctl.hello(shape("cuda:0", JOB_PIDS))
    # The agent (torch.cuda) sees less than NVML on most ranks (no CUDA context, no NCCL
    # buffers), more on rank 0 (a peak between two NVML readings).
    agent = [70 * GiB] + [50 * GiB] * 7
    ctl.exchange([record(agent, "cuda", JOB_PIDS)], [])
    replay.sample = 1
    snap = ctl.observe()
    peaks = {m.rank: m.peak_bytes for m in snap.memory}
    assert peaks[0] == 70 * GiB
    assert peaks[3] == (66162 + 518) * MiB, "NVML's reading, stray context on GPU 0 included"
    for rank in (1, 2, 4, 5, 6, 7):
        assert peaks[rank] == 66162 * MiB
    assert snap.memory_peak_bytes == 70 * GiB
    used = {m.rank: m.used_bytes for m in snap.memory}
    assert used[3] == peaks[3], "used is raised with the peak"
    ctl.close()
    assert replay.shutdowns == 1, "the controller closes its sources"


def test_cuda_job_ignores_procfs_rss(tmp_path: Path) -> None:
    me = (os.getpid(),)
    ctl = Controller(tmp_path / "cuda", "src-run", sources=[ProcfsSource()])
    ctl.hello(shape("cuda:0", me))
    ctl.exchange([record([MiB], "cuda", me)], [])
    assert ctl.observe().memory_peak_bytes == MiB, "RSS is not device memory"
    ctl.close()


def test_cpu_job_takes_procfs_rss(tmp_path: Path) -> None:
    me = (os.getpid(),)
    ctl = Controller(tmp_path / "cpu", "src-run", sources=[ProcfsSource(), NvmlSource(NvmlReplay(RECORDING))])
    ctl.hello(shape("cpu", me))
    ctl.exchange([record([MiB], "cpu", me)], [])
    peak = ctl.observe().memory_peak_bytes
    assert abs(peak - psutil.Process().memory_info().rss) < 16 * MiB
    assert peak > MiB
    ctl.close()
