"""The agent: lives in every rank of the job, between the user's loop and the controller.

At each optimizer-step boundary the adapter calls `on_step`. It costs a memory sample and a
few appends; it never touches the network. Adapters that mark where a training step begins
(`step_begins`, through adapters/core/stop.py) pay one more peak read per step (a /proc read, a write
to clear_refs on a CPU: tens of microseconds), so the peak covers the training step only.
Rank 0 has a background thread that sends the queued telemetry and outcomes to the controller
and keeps the actions it answers with.
Every `sync_every` steps the ranks run one collective (adapters/core/rank_sync.py: an all_gather
of a few integers, posted and read at the next sync, and a broadcast when there are actions): each
contributes its memory, rank 0 also the actions due within the next two intervals (what it offers
reaches every rank one sync later), so every rank learns the same actions at the
same step and applies them there. No collective runs on other steps, and every rank takes
the same branch at every step, so none can wait on a collective another rank skips.
If the controller goes away, the thread retries with back-off and training goes on with the
configuration it has, but not past the budget's end: while it has no controller, rank 0 stops
the job itself at the first step boundary past the end it was given (controller/budget_end.py),
with the same stop action the controller's compute policy sends.
A counted budget (tokens, FLOPs) is kept by the job itself even with a controller: rank 0 counts
them exactly, at every step, while the controller sees them half a second or more late (a job
faster than the exchange spent a 3000-token budget 1.8 times over before the controller's stop
arrived). At each sync step it places the stop at the last boundary its count forecasts inside
the budget, and tells the controller (a `budget_stop` event, whose id is the stop's).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any

from trainwarden.adapters.core.channel import Channel, ChannelDown, ChannelRefused
from trainwarden.adapters.core.probes import MemoryProbe
from trainwarden.adapters.core.rank_sync import LAG_SYNCS, RankSync
from trainwarden.controller.budget_end import COUNT_WINDOW, ENV_BUDGET_END, BudgetEnd, steps_inside
from trainwarden.controller.protocol import (
    EVENT_BUDGET_STOP,
    EXCHANGE_INTERVAL_S,
    KNOB_STOP,
    MAX_EVENTS_PER_EXCHANGE,
    Action,
    AdapterEvent,
    JobShape,
    Outcome,
    RankMemory,
    StepRecord,
)

log = logging.getLogger("trainwarden.agent")

#: Telemetry kept while the controller is unreachable (oldest dropped first).
MAX_QUEUED_RECORDS = 10_000
#: Records per request: keeps a request far below the server's body limit.
MAX_RECORDS_PER_EXCHANGE = 500
#: Step records queued that send an exchange at once, whatever the interval the controller asked
#: for: a fast job (100 steps a second) never queues faster than its exchanges carry records off.
WAKE_ON_RECORDS = MAX_RECORDS_PER_EXCHANGE // 2
MAX_BACKOFF_S = 5.0
#: A peak this much above the one the controller last heard of wakes the exchange thread at once:
#: between two exchanges the controller allowed to be far apart (memory well below its low-water
#: mark), a surge is not left waiting for the next one.
WAKE_ON_PEAK_GROWTH = 1.1


class Agent:
    def __init__(
        self,
        shape: JobShape,
        channel: Channel | None,
        probe: MemoryProbe,
        rank: int = 0,
        world_size: int = 1,
        sync_every: int = 1,
        process_group: Any = None,
    ) -> None:
        self.shape = shape
        self.rank = rank
        self.world_size = world_size
        self.sync_every = max(1, sync_every)
        self.probe = probe
        self.channel = channel if rank == 0 else None
        self.process_group = process_group
        self._sync = RankSync(rank, world_size, process_group)
        # How far ahead a sync offers: what rank 0 offers reaches the other ranks LAG_SYNCS later.
        self._lookahead = self.sync_every * (1 + (LAG_SYNCS if world_size > 1 else 0))
        self._lock = threading.Lock()
        self._records: deque[StepRecord] = deque(maxlen=MAX_QUEUED_RECORDS)
        # What the adapter did on its own (an OOM retry): few, kept until the controller has them.
        self._events: deque[AdapterEvent] = deque(maxlen=MAX_QUEUED_RECORDS)
        self._outcomes: list[Outcome] = []
        # Actions whose outcome is not known when applied (a stop: adapters/core/stop.py reports it
        # once the job stopped, was ended, or trained on).
        self._held: set[str] = set()
        # The training step's memory peak (adapters/core/stop.py's training_step_begins starts it):
        # the largest peak of the steps since the last sync; None while no adapter marks steps.
        self._step_peak: int | None = None
        self._in_step = False
        self._inbox: dict[str, Action] = {}
        self._seen: set[str] = set()
        # Actions every rank received at a sync step whose step comes before the next sync
        # (the compute policy schedules its stop for the step nearest the budget's end): held
        # here, on every rank alike, and applied at exactly that step with no collective.
        self._scheduled: list[Action] = []
        # Rank 0's offer of the last sync, on its way to every rank (adapters/core/rank_sync.py):
        # neither in the inbox nor scheduled yet, but as good as applied.
        self._in_flight: list[Action] = []
        self._eval_loss: float | None = None
        self._cpu_at: float | None = time.process_time()  # at the previous step boundary (or start)
        # The job's latest step times: what an action due at a time (a wall-time stop) is placed by.
        self._step_times: deque[float] = deque(maxlen=4)
        self._wake = threading.Event()
        self._told_peak = 0  # the peak that last woke the exchange thread (rank 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.cpu_time_s = 0.0  # CPU time the exchange thread used (the benchmark reads it)
        self.dropped_records = 0  # step records the controller refused (400/413) and were dropped
        self.refused_batches = 0
        self._down_logged = False
        # The budget's end the job keeps by itself while it has no controller (rank 0 decides).
        self.budget_end = BudgetEnd.from_json(os.environ.get(ENV_BUDGET_END)) if self.channel else None
        self._first_time: float | None = None
        # (step, tokens so far) of the latest steps: the counted budget's forecast of a step's tokens.
        self._counts: deque[tuple[int, int]] = deque(maxlen=COUNT_WINDOW)
        self.stopped_by_agent = False
        self._stop_due = False  # a stop (ours or the controller's) reached the job
        if self.channel is not None:
            self._thread = threading.Thread(target=self._run, name="trainwarden-agent", daemon=True)
            self._thread.start()

    # ---- the step boundary (every rank) ----------------------------------------------------
    def on_step(
        self,
        step: int,
        loss: float | None,
        samples: int,
        tokens: int,
        step_time_s: float,
        lr: float | None,
        config: dict[str, Any],
        domain_loss: dict[str, float] | None = None,
    ) -> list[Action]:
        """Record step `step` (just finished); return the actions to apply before the next one."""
        # On a single rank too: the memory sample (~40 us, more under load) is paid only here.
        if step_time_s > 0:
            self._step_times.append(step_time_s)
        if self.channel is not None:
            self._keep_budget_end(step, tokens, step_time_s, config)
        cpu_now = time.process_time()  # ~1 us; the replay's load-free clock (StepRecord.cpu_time_s)
        cpu_time_s, self._cpu_at = (None if self._cpu_at is None else cpu_now - self._cpu_at), cpu_now
        is_sync = step % self.sync_every == 0
        due: list[Action] = []
        memory: tuple[RankMemory, ...] = ()
        if self._in_step and not is_sync:
            # The peak since this step began: the training step's alone.
            self._in_step = False
            self._step_peak = max(self._step_peak or 0, int(self.probe.peak()))  # type: ignore[attr-defined]
        if is_sync:
            # The probe's peak covers every step since its previous sample: no sampling between.
            used, peak = self.probe.sample()
            if self._in_step:
                # The same window as peak() would read (since this step began): one /proc read,
                # not two (~25 us of a step on a CPU).
                self._in_step = False
                self._step_peak = max(self._step_peak or 0, peak)
            if self._step_peak is not None:
                # Steps are marked (training_step_begins): their peaks only, not what ran between.
                peak, self._step_peak = max(self._step_peak, used), 0
            mine = RankMemory(
                self.rank,
                used,
                peak,
                self.probe.total_bytes,
                self.probe.device,
                self.shape.pids[self.rank] if self.rank < len(self.shape.pids) else 0,
            )
            offer = self._due(step + self._lookahead - 1) if self.rank == 0 else []
            if self.world_size > 1:
                memory, offered = self._sync.exchange(step, mine, offer)
                self._scheduled.extend(offered)
                # What rank 0 offered now reaches the ranks at the next sync (the first sync's at once).
                delivered = {a.id for a in offered}
                self._in_flight = [a for a in offer if a.id not in delivered]
            else:
                memory = (mine,)
                self._scheduled.extend(offer)
        if self._scheduled:
            due = [a for a in self._scheduled if a.step <= step + 1]
            self._scheduled = [a for a in self._scheduled if a.step > step + 1]
            # A stop applies now (every rank alike): the budget's end is kept, none of ours follows.
            self._stop_due = self._stop_due or any(a.kind == KNOB_STOP for a in due)
        if self.rank == 0:
            rec = StepRecord(
                step=step,
                time=time.time(),
                loss=loss,
                samples=samples,
                tokens=tokens,
                step_time_s=step_time_s,
                lr=lr,
                config=dict(config),
                memory=memory,
                domain_loss=dict(domain_loss or {}),
                eval_loss=self._eval_loss,
                cpu_time_s=cpu_time_s,
            )
            self._eval_loss = None
            with self._lock:
                self._records.append(rec)
                backlog = len(self._records) >= WAKE_ON_RECORDS
            if backlog:
                self._wake.set()
            # No wake-up: records go out with the next periodic exchange, batched; but a surge of
            # memory goes out at once.
            if memory:
                peak = max(m.peak_bytes for m in memory)
                if peak > self._told_peak * WAKE_ON_PEAK_GROWTH:
                    self._told_peak = peak
                    self._wake.set()
        return due

    def _keep_budget_end(self, step: int, tokens: int, step_time_s: float, config: dict[str, Any]) -> None:
        """Rank 0: queue the stop at the budget's end the job can keep by itself (module docstring):
        a counted one always, at the last boundary the count forecasts inside it; any other only
        while there is no controller, at the first boundary past it. It reaches every rank at a
        sync step like any action."""
        now = time.time()
        if self._first_time is None:
            self._first_time = now - max(0.0, step_time_s)
        self._counts.append((step, tokens))
        end = self.budget_end
        if end is None or self.stopped_by_agent or self._stop_due:
            return
        at, why = step, None
        counted = end.counted_tokens(self.shape.param_count)
        if counted is not None and step > 0:
            more, per_step = steps_inside(counted, self._counts)
            # Placed only where the next sync step can still reach it (a sync step offers what is
            # due within its lookahead); a later step's count places it then, with more to go on.
            next_sync = -(-step // self.sync_every) * self.sync_every
            if step + more < next_sync + self._lookahead:
                at = step + more
                name = "tokens" if end.tokens is not None and counted == end.tokens else "flops"
                why = (
                    f"the {name} budget is spent at {counted:,.0f} tokens: {tokens:,} counted after step "
                    f"{step}, ~{per_step:,.0f} a step, so step {at} is the last inside it"
                )
        if why is None and not self.connected:
            why = end.spent(now - self._first_time, tokens, self.shape.param_count, self.world_size)
        if why is None:
            return
        with self._lock:
            sooner = [
                a
                for a in (*self._scheduled, *self._in_flight, *self._inbox.values())
                if a.kind == KNOB_STOP and a.step <= at + 1
            ]
            if sooner:
                return  # the controller's stop comes first: it ends the job
            # A later stop of the controller's is superseded (the controller drops it on our event).
            for a in [a for a in self._inbox.values() if a.kind == KNOB_STOP]:
                del self._inbox[a.id]
        self.stopped_by_agent = True
        if self.connected:
            log.warning("trainwarden: %s: the job stops there (counted by the job itself)", why)
        else:
            log.error(
                "trainwarden: no controller, and %s: the agent stops the job itself at step %d", why, at + 1
            )
        stop = Action(
            kind=KNOB_STOP,
            params={"cause": "budget", "by": "agent"},
            reason=f"{why}; the agent kept the budget's end"
            + ("" if self.connected else ", with no controller"),
            step=at + 1,
            policy="agent",
        )
        event = AdapterEvent(
            kind=EVENT_BUDGET_STOP,
            step=at,
            changes=((KNOB_STOP, False, True),),
            config={k: v for k, v in config.items() if isinstance(v, (str, int, float, bool)) or v is None},
            reason=stop.reason,
            duration_s=0.0,
            id=stop.id,
        )
        with self._lock:
            self._seen.add(stop.id)
            self._inbox[stop.id] = stop
            self._events.append(event)

    def report_eval(self, loss: float) -> None:
        """A validation loss the job measured: sent with the next step's record (rank 0)."""
        if self.rank == 0:
            self._eval_loss = float(loss)

    def hold(self, action_id: str) -> None:
        """Do not send the outcome `apply` gives for this action; `release` then `report` the real one."""
        self._held.add(action_id)

    def release(self, action_id: str) -> None:
        self._held.discard(action_id)

    def step_begins(self) -> None:
        """A training step starts now (its data is loaded): what was allocated since the last
        step (an evaluation pass, a checkpoint, data loading) is not its peak."""
        reset = getattr(self.probe, "reset_peak", None)
        if reset is None or not hasattr(self.probe, "peak"):
            return
        reset()
        self._in_step = True
        if self._step_peak is None:
            self._step_peak = 0

    def report(self, outcome: Outcome) -> None:
        """An action's outcome (rank 0 reports; other ranks applied the same action too)."""
        if self.rank != 0 or outcome.action_id in self._held:
            return
        with self._lock:
            self._outcomes.append(outcome)
        self._wake.set()

    def report_event(self, event: AdapterEvent) -> None:
        """Something the adapter did by itself (an OOM retry one rung down): rank 0 sends it at
        once, for the decision log. Every rank did the same; only rank 0 reports."""
        if self.rank != 0:
            return
        with self._lock:
            self._events.append(event)
        self._wake.set()

    def _due(self, last: int) -> list[Action]:
        """Actions to apply by the step after `last` (rank 0, at a sync step). One with
        params["at_time"] (a Unix time: the compute policy's wall-time stop) is placed here, by the
        job's own clock and its latest step times, at the step boundary nearest that time, once
        that boundary comes within this sync's lookahead: the controller's forecast, made a second or
        more ahead, cannot see the job slow down in between."""
        step = last - self._lookahead + 1  # the step that just ended
        step_s = sum(self._step_times) / len(self._step_times) if self._step_times else 0.0
        due = []
        with self._lock:
            for a in list(self._inbox.values()):
                at = a.params.get("at_time")
                if isinstance(at, (int, float)) and not isinstance(at, bool) and step_s > 0:
                    nearest = step + max(0, round((at - time.time()) / step_s))
                    if nearest > last:
                        continue  # a later sync step places it
                    a = dataclasses.replace(a, step=nearest + 1)
                elif a.step > last + 1:
                    continue
                due.append(a)
                del self._inbox[a.id]
        return sorted(due, key=lambda a: a.step)

    # ---- the exchange thread (rank 0) ------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.2
        t0 = time.thread_time()
        while not self._stop.is_set():
            try:
                if not self.connected:
                    self._hello()
                self._exchange_once(finished=False)
                backoff = 0.2
                if self._down_logged:
                    log.warning("trainwarden: controller reachable again")
                    self._down_logged = False
            except ChannelDown as exc:
                self.connected = False
                if not self._down_logged:
                    end = self.budget_end
                    log.warning(
                        "trainwarden: %s; training goes on with the current configuration, %s",
                        exc,
                        "WITHOUT a controller: no memory protection; the job stops itself at the budget's "
                        f"end ({', '.join(f'{k} {v:g}' for k, v in end.to_json().items())})"
                        if end
                        else "WITHOUT a controller and with no budget end known to the job",
                    )
                    self._down_logged = True
                self._stop.wait(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except Exception:  # a bug here must never reach the training loop
                log.exception("trainwarden agent error; retrying")
                self._stop.wait(MAX_BACKOFF_S)
            self.cpu_time_s = time.thread_time() - t0
            # How often: the controller says (its policies' watch, within its bounds), records
            # are batched, and an outcome, an event or a memory surge wakes the thread at once.
            # Each exchange costs ~1 ms of CPU in the job and ~2 ms in the sidecar.
            self._wake.wait(getattr(self.channel, "next_exchange_s", EXCHANGE_INTERVAL_S))
            self._wake.clear()

    def _hello(self) -> None:
        assert self.channel is not None
        ack = self.channel.hello(self.shape)
        end = BudgetEnd.from_json(ack.get("budget_end")) if isinstance(ack, dict) else None
        if end is not None:
            self.budget_end = end
        self.connected = True

    def _exchange_once(self, finished: bool) -> None:
        assert self.channel is not None
        with self._lock:
            records = [
                self._records.popleft() for _ in range(min(len(self._records), MAX_RECORDS_PER_EXCHANGE))
            ]
            outcomes, self._outcomes = self._outcomes, []
            events = [self._events.popleft() for _ in range(min(len(self._events), MAX_EVENTS_PER_EXCHANGE))]
        done = finished and not self._records and not self._events
        try:
            if events:
                actions = self.channel.exchange(records, outcomes, done, events=events)
            else:  # a channel written before events (the protocol's optional field) works as it did
                actions = self.channel.exchange(records, outcomes, done)
        except ChannelRefused as exc:
            # The controller refused what the batch says (a cap, a malformed field): the same batch
            # can never pass, and retrying it would stall all telemetry behind it. Drop it, say so.
            self.dropped_records += len(records)
            self.refused_batches += 1
            say = log.warning if self.refused_batches == 1 else log.debug  # once, not per exchange
            say(
                "trainwarden: the controller refused a batch (%d step record(s), %d outcome(s), "
                "%d event(s)) and it was dropped; %d batch(es) refused so far: %s",
                len(records),
                len(outcomes),
                len(events),
                self.refused_batches,
                exc,
            )
            return
        except ChannelDown:
            with self._lock:  # put them back, oldest first; the controller dedups by step and id
                self._records.extendleft(reversed(records))
                self._outcomes[:0] = outcomes
                self._events.extendleft(reversed(events))
            raise
        with self._lock:
            for a in actions:
                if a.id not in self._seen:
                    self._seen.add(a.id)
                    self._inbox[a.id] = a

    def close(self, timeout_s: float = 3.0) -> None:
        """Flush what is queued and tell the controller the job is done; bounded by `timeout_s`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                # Stuck in a request to a hung controller: flushing would hang as long again.
                log.warning(
                    "trainwarden: controller not answering; %d telemetry records not sent", len(self._records)
                )
                return
        if self.channel is None:
            return
        deadline = time.monotonic() + timeout_s
        if hasattr(self.channel, "timeout_s"):
            self.channel.timeout_s = min(self.channel.timeout_s, timeout_s)
        # A process closing at exit after an unhandled exception (a peer rank's node lost, a
        # crash) did not finish the job: its telemetry is flushed, but the controller must go on
        # expecting the job (a torchrun elastic restart reconnects) and say when it is missing.
        finished = not crashing()
        try:
            if not self.connected:
                self._hello()
            while time.monotonic() < deadline:
                self._exchange_once(finished=finished)
                with self._lock:
                    if not self._records and not self._events:
                        break
        except ChannelDown as exc:
            log.warning("trainwarden: could not flush telemetry at exit: %s", exc)
        finally:
            self.channel.close()


def crashing() -> bool:
    """True at interpreter exit after an unhandled exception: Python sets `sys.last_value` (and
    `sys.last_exc` from 3.12) when it prints one, before the atexit handlers run."""
    return getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None
