"""Another rank's memory reaches rank 0 one sync late (adapters/core/rank_sync.py is pipelined, so
its record carries RankMemory.step): the controller's state files each sample under the step, and
so the configuration, it was taken at, never under the record's."""

from __future__ import annotations

import dataclasses

from trainwarden.controller.protocol import KNOB_MICRO_BATCH, RankMemory, StepRecord
from trainwarden.controller.schema import Budget
from trainwarden.controller.state import JobState

GiB = 2**30


def rec(step: int, mb: int, peaks: tuple[float, float], late: bool) -> StepRecord:
    """A sync step's record on two ranks: rank 0's sample of this step, rank 1's of the previous
    sync (4 steps earlier) when `late`."""

    def taken(rank: int) -> int | None:
        return step - 4 if late and rank else None

    return StepRecord(
        step=step,
        time=100.0 + step,
        loss=3.0,
        samples=16 * step,
        tokens=2048 * step,
        step_time_s=1.0,
        lr=1e-3,
        config={KNOB_MICRO_BATCH: mb},
        memory=tuple(
            RankMemory(r, int(g * GiB), int(g * GiB), 80 * GiB, "cpu", 100 + r, taken(r))
            for r, g in enumerate(peaks)
        ),
    )


def test_a_late_sample_is_filed_under_its_own_steps_configuration() -> None:
    state = JobState()
    state.ingest(rec(4, 8, (6.0, 6.0), late=False))  # the first sync is complete
    state.ingest(rec(8, 8, (6.5, 6.2), late=True))  # rank 1's: step 4, micro-batch 8
    # Micro-batch 8 -> 4 applied at step 8: rank 0's sample of step 12 is under 4, rank 1's
    # (of step 8, micro-batch 8, 9.0 GiB) arrives with it and is not micro-batch 4's.
    state.ingest(rec(12, 4, (3.0, 9.0), late=True))
    assert state.peak_by_micro_batch == {8: int(9.0 * GiB), 4: int(3.0 * GiB)}
    # The trend's samples by step: rank 1's late peaks joined the steps they were taken at.
    assert list(state.recent_peaks) == [(4, int(6.2 * GiB)), (8, int(9.0 * GiB)), (12, int(3.0 * GiB))]
    snap = state.snapshot(Budget(), frozenset(), {})
    assert snap.memory_step == 8 and snap.step == 12
    assert [m.step for m in snap.memory] == [12, 8]


def test_a_sample_older_than_what_is_kept_is_not_filed() -> None:
    state = JobState()
    state.ingest(rec(100, 8, (6.0, 6.0), late=False))
    stale = rec(104, 8, (6.0, 7.0), late=True)
    old = dataclasses.replace(stale.memory[1], step=50)
    stale = dataclasses.replace(stale, memory=(stale.memory[0], old))
    state.ingest(stale)
    assert state.peak_by_micro_batch == {8: int(6.0 * GiB)}  # step 50's configuration is unknown
    assert state.memory[1].peak_bytes == int(7.0 * GiB)  # but it is rank 1's latest memory


def test_a_sample_from_after_its_record_or_from_no_sync_counts_as_the_records() -> None:
    """A bad `step` (after the record's, negative) cannot make every sample look older than the
    last change, which would hold the memory policy off for good."""
    state = JobState()
    state.ingest(rec(8, 8, (6.0, 6.0), late=False))
    for bad in (9_999, -5):
        r = rec(12 if bad > 0 else 16, 8, (6.0, 7.0), late=True)
        state.ingest(dataclasses.replace(r, memory=(r.memory[0], dataclasses.replace(r.memory[1], step=bad))))
        assert state.memory[1].step == r.step
