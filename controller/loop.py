"""The control loop: observe -> decide -> act, level-based and idempotent.

The Controller is transport-free: the HTTP server (a sidecar process) and the embedded
in-process channel both call `hello` and `exchange`. Each exchange folds the job's
telemetry into the state, records outcomes, and (at most every `decide_interval_s`) asks
every policy for actions on a frozen snapshot. An action stays pending, and is re-sent on
every exchange, until the job answers it: a lost response costs nothing, and the agent
ignores an action id it has already seen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainwarden.controller.backoff import BACKOFF_BASE_S as BACKOFF_BASE_S
from trainwarden.controller.backoff import BACKOFF_MAX_S as BACKOFF_MAX_S
from trainwarden.controller.backoff import DISABLED_FOR_S as DISABLED_FOR_S
from trainwarden.controller.backoff import MAX_FAILURES as MAX_FAILURES
from trainwarden.controller.backoff import KindBackoff
from trainwarden.controller.budget_end import BudgetEnd
from trainwarden.controller.identity import pid_namespace
from trainwarden.controller.protocol import (
    EVENT_BUDGET_STOP,
    EXCHANGE_INTERVAL_S,
    KNOB_DOMAIN_WEIGHTS,
    KNOB_MICRO_BATCH,
    KNOB_OFFLOAD_OPTIMIZER,
    KNOB_OFFLOAD_PARAM,
    KNOB_PRECISION,
    KNOB_STOP,
    KNOB_ZERO_STAGE,
    Action,
    AdapterEvent,
    JobShape,
    Outcome,
    ProtocolError,
    StepRecord,
    domain_weights_problem,
    dumps,
)
from trainwarden.controller.rundir import ensure_private_dir, write_private
from trainwarden.controller.runlog import DECISIONS_FILE, TELEMETRY_FILE, JsonlWriter, read_jsonl
from trainwarden.controller.schema import Budget, ControllerSettings, PolicyFile
from trainwarden.controller.snapshot import Snapshot
from trainwarden.controller.sources import MemorySource
from trainwarden.controller.staleness import RankWatch
from trainwarden.controller.state import JobState
from trainwarden.controller.summary import budget_report as budget_report
from trainwarden.controller.summary import status_of, summary_of
from trainwarden.controller.summary import stop_report as stop_report
from trainwarden.policies.base import PolicyKind

log = logging.getLogger(__name__)


class BudgetSpentError(ProtocolError):
    """A job starts with a budget already spent: the message names the budget and the fix. (A
    ProtocolError, so a sidecar refuses the job's hello with it instead of failing inside.)"""


#: A job whose pids this controller can see is lost once they are all gone and it has been silent
#: this long; one whose pids it cannot see (another pid namespace: a pod, a container) once its
#: heartbeat (an exchange every 0.5-5 s, retried at most every 5 s) has been silent this long.
PIDS_GONE_SILENCE_S = 1.0
HEARTBEAT_LOST_S = 30.0
#: Most steps a record may run ahead of the last one of the same job start: a record far beyond
#: (a corrupt counter) would make every real step after it look like a resend.
MAX_STEP_JUMP = 10**6
#: The `policy` of a decision line the adapter took by itself (an adapter event, e.g. an OOM retry).
ADAPTER_POLICY = "adapter"
#: A rank whose telemetry (its memory sample, carried in rank 0's records at sync steps) is
#: missing `controller.stale_after_s`, and STALE_STEPS of its sync intervals at the job's step
#: time, is said lost: a node gone (its job killed, its host down) stops the collectives, so every
#: rank falls silent. An engine switch in flight (a new DeepSpeed engine: seconds to minutes, no
#: step meanwhile) adds SWITCH_GRACE_S: measured, a ZeRO 0 -> 1 switch of a tiny model on two
#: loaded cores took 8 s with no telemetry.
STALE_STEPS = 20
SWITCH_GRACE_S = 120.0
_REBUILDS = frozenset({KNOB_ZERO_STAGE, KNOB_PRECISION, KNOB_OFFLOAD_OPTIMIZER, KNOB_OFFLOAD_PARAM})


@dataclass(frozen=True)
class Decision:
    """An action the controller issued, and when."""

    action: Action
    decided_at: float
    decided_step: int


@dataclass(frozen=True)
class ControllerView:
    """What the exporter reads at scrape time."""

    run_id: str
    snapshot: Snapshot
    connected: bool
    lr: float | None
    domain_loss: dict[str, float]
    actions_total: dict[tuple[str, str], int]
    telemetry_age_s: float | None


class Controller:
    """One run's controller. Thread-safe: every public method takes the lock."""

    def __init__(
        self,
        run_dir: Path,
        run_id: str,
        policy_file: PolicyFile | None = None,
        policies: list[PolicyKind] | None = None,
        sources: list[MemorySource] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from trainwarden.policies.loader import build_policies

        self.run_dir = ensure_private_dir(Path(run_dir))
        self.run_id = run_id
        self.policy_file = policy_file
        self.budget = policy_file.budget if policy_file else Budget()
        self.settings = policy_file.controller if policy_file else ControllerSettings()
        self.policies = (
            policies if policies is not None else (build_policies(policy_file) if policy_file else [])
        )
        self.sources = sources or []
        self.clock = clock
        self.state = JobState(budget=self.budget)
        self.started_at = clock()
        self.last_seen: float | None = None
        self._lock = threading.RLock()
        self._pending: dict[str, Decision] = {}
        self._last_decide = float("-inf")
        # How soon the policies need fresher telemetry (their `watch_s`, at the last decision).
        self._watch_s = EXCHANGE_INTERVAL_S
        self._observed: dict[int, int] = {}
        self._rejected: set[tuple[str, str]] = set()
        self._backoff = KindBackoff(log)
        self._all_policies = list(self.policies)
        """Every policy of the file; `policies` is those that fit the job that said hello last."""
        self._jumps_refused = 0
        #: Ids of adapter events already logged (the agent resends until an exchange succeeds).
        self._events_seen: set[str] = set()
        self.actions_total: Counter[tuple[str, str]] = Counter()
        self.last_decision: dict[str, Any] | None = None
        self.exit_code: int | None = None
        #: The stop decision that ended the run (its log line), for the summary.
        self.stop_decision: dict[str, Any] | None = None
        self.job_lost = False
        #: What the user must know about this run once (a policy that can do nothing for the job):
        #: shown on the status line and in summary.json.
        self.notices: list[str] = []
        #: This job answered a stop (applied or ignored): no second one.
        self._stop_answered = False
        self._watch = RankWatch(log)
        self._recover()
        self.decisions = JsonlWriter(self.run_dir / DECISIONS_FILE)
        self.telemetry = JsonlWriter(self.run_dir / TELEMETRY_FILE)

    def _recover(self) -> None:
        """Pick a run up from its logs: a controller restarted on the same run directory (after a
        crash, or a rescheduled sidecar) continues where the last one stopped. Actions that were
        pending are not re-issued: the job may have applied them, and its telemetry will say."""
        steps = decisions = 0
        tpath, dpath = self.run_dir / TELEMETRY_FILE, self.run_dir / DECISIONS_FILE
        if tpath.exists():
            for rec in read_jsonl(tpath):
                try:
                    if rec.get("event") == "hello":
                        shape = JobShape.from_json(rec.get("shape"))
                        if self.state.shape is not None and not same_job(self.state.shape, shape):
                            self.state.new_incarnation()
                        self.state.shape = shape
                    elif rec.get("event") == "step":
                        self.state.ingest(StepRecord.from_json(rec))
                        steps += 1
                except ProtocolError:
                    continue  # a line from another version, or damaged: skip it
        if dpath.exists():
            for d in read_jsonl(dpath):
                kind, outcome = d.get("kind"), d.get("outcome")
                if not isinstance(kind, str) or not isinstance(outcome, str):
                    continue
                self.actions_total[(kind, outcome)] += 1
                if d.get("policy") == ADAPTER_POLICY and isinstance(d.get("id"), str):
                    self._events_seen.add(d["id"])
                if outcome == "applied" and isinstance(d.get("step"), int):
                    self.state.last_action_step[kind] = d["step"]
                if kind == KNOB_STOP and outcome in ("applied", "noop", "ignored"):
                    self.stop_decision = d
                self.last_decision = d
                decisions += 1
        if steps or decisions:
            log.info(
                "picked up run %s from %s: step %d, %d decisions",
                self.run_id,
                self.run_dir,
                self.state.step,
                decisions,
            )

    def pids_visible(self) -> bool:
        """Whether the job's pids name its processes here: the same pid namespace on the same boot.
        (A pod without a shared process namespace sees other processes under the same numbers.)"""
        shape = self.state.shape
        return shape is not None and bool(shape.pid_namespace) and shape.pid_namespace == pid_namespace()

    def check_job(self) -> bool:
        """False once the job is gone without saying it finished (killed, or crashed); said once in
        the log. Where its pids are visible (same pid namespace), once they are all gone and it has
        been silent for a moment; elsewhere, once its heartbeat (the agent's exchanges, every half
        second) has been silent for HEARTBEAT_LOST_S. A live job is never declared lost for being
        in another pid namespace."""
        import psutil

        shape = self.state.shape
        with self._lock:
            if shape is None or self.state.finished or self.job_lost:
                return not self.job_lost
            silent = self.clock() - (self.last_seen if self.last_seen is not None else self.started_at)
            if self.pids_visible():
                if silent < PIDS_GONE_SILENCE_S or any(psutil.pid_exists(pid) for pid in shape.pids):
                    return True
                why = f"the job's processes ({', '.join(map(str, shape.pids))}) are gone"
            else:
                if silent < HEARTBEAT_LOST_S:
                    return True
                why = f"the job has sent nothing for {silent:.0f} s (its pids are in another pid namespace)"
            self.job_lost = True
        log.error("%s and it never said it finished: killed or crashed at step %d", why, self.state.step)
        return False

    def check_telemetry(self) -> tuple[int, ...]:
        """The ranks whose telemetry is missing past the staleness limit (a node lost, or the job
        hung in a collective); said once per gap in the log, with summary.json written then. The
        sidecar's loop calls this every second; every exchange does too."""
        with self._lock:
            self._check_telemetry(self.clock())
            return self.stale_ranks

    def stale_after_s(self) -> float:
        """How long a rank may stay silent: the file's `stale_after_s`, or STALE_STEPS sync
        intervals at the job's step time if longer, plus SWITCH_GRACE_S while an engine switch
        is pending (sent, not yet answered)."""
        shape, step_time = self.state.shape, self.state.step_time_s or 0.0
        sync = shape.sync_every if shape else 1
        limit = max(self.settings.stale_after_s, STALE_STEPS * sync * step_time)
        if any(d.action.kind in _REBUILDS for d in self._pending.values()):
            limit += SWITCH_GRACE_S
        return limit

    @property
    def stale_ranks(self) -> tuple[int, ...]:
        """Ranks now silent past the staleness limit (empty: every rank reports)."""
        return self._watch.stale_ranks

    @property
    def telemetry_gaps(self) -> list[dict[str, Any]]:
        """Every gap seen this run (ranks, last step before it, seconds, step telemetry resumed at)."""
        return self._watch.gaps

    def _check_telemetry(self, now: float) -> None:
        shape = self.state.shape
        if shape is None or self.state.finished:
            return
        if self._watch.update(shape.world_size, now, self.stale_after_s, self.state.step):
            self._write_summary(self._summary(now))

    # ---- the channel's two calls -------------------------------------------------------
    def check_start(self, shape: JobShape, new_job: bool = False) -> None:
        """Raise BudgetSpentError when `shape`'s job would start with a budget already spent: the
        run directory holds a run that spent it (a new job, not the same one reconnecting: its pids
        differ, or `new_job`, which an adapter says at attach), or a token or FLOP budget is smaller
        than one optimizer step of this job."""
        with self._lock:
            fix_dir = (
                f"start the job with a new run directory (this one, {self.run_dir}, holds a run that "
                "spent it), or raise the budget in the policy file"
            )
            old = self.state.shape
            same = not new_job and old is not None and same_job(old, shape)
            if self.state.step >= 0 and not same:
                for b in self.state.budgets(self.budget):
                    if b.fraction >= 1.0:
                        raise BudgetSpentError(
                            f"the {b.name} budget is already spent: {b.spent:.4g} of {b.limit:.4g} {b.unit} "
                            f"by step {self.state.step} of an earlier job; {fix_dir}"
                        )
            per_step = shape.global_batch_size * shape.tokens_per_sample
            flops_step = 6.0 * shape.param_count * per_step
            if self.budget.tokens is not None and per_step > self.budget.tokens:
                raise BudgetSpentError(
                    f"the tokens budget ({self.budget.tokens:,}) is smaller than one optimizer step of this "
                    f"job ({shape.global_batch_size} samples x {shape.tokens_per_sample} tokens = "
                    f"{per_step:,}): "
                    "raise budget.tokens in the policy file, or make the global batch smaller"
                )
            if self.budget.flops is not None and flops_step > self.budget.flops:
                raise BudgetSpentError(
                    f"the flops budget ({self.budget.flops:.3g}) is smaller than one optimizer step of this "
                    f"job (6 x {shape.param_count:,} parameters x {per_step:,} tokens = {flops_step:.3g}): "
                    "raise budget.flops in the policy file"
                )

    def hello(self, shape: JobShape) -> dict[str, Any]:
        with self._lock:
            try:
                self.check_start(shape)
            except BudgetSpentError as exc:
                log.error("refusing job %s: %s", shape.run_id, exc)
                raise
            old = self.state.shape
            reconnect = old is not None and same_job(old, shape)
            if old is not None and not reconnect:
                self._new_incarnation(old)
            self.state.shape = shape
            self.last_seen = self.clock()
            # A job saying hello is running, whatever its last incarnation did (torchrun's elastic
            # restart brings the same run back with new processes).
            self.state.finished = False
            self.job_lost = False
            self.telemetry.write({"event": "hello", "time": self.last_seen, "shape": shape.to_json()})
            if self.pids_visible():  # elsewhere the numbers are other processes'
                for src in self.sources:
                    src.watch(shape.pids)
            self._check_policies(shape)
            if not reconnect:
                self._check_knobs(shape)
                self._stop_answered = False
            log.info(
                "job %s %s: adapter %s, %d rank(s), %.1fM params, knobs %s",
                shape.run_id,
                "reconnected" if reconnect else ("started again" if old is not None else "connected"),
                shape.adapter,
                shape.world_size,
                shape.param_count / 1e6,
                ", ".join(k.name for k in shape.knobs),
            )
            ack: dict[str, Any] = {
                "run_id": self.run_id,
                "policies": [p.name for p in self.policies],
                "sync_every": self.settings.sync_every,
            }
            end = BudgetEnd.of_policy(self.policy_file)
            if end is not None:  # the job keeps it by itself if this controller goes away
                ack["budget_end"] = end.to_json()
            return ack

    def exchange(
        self,
        records: list[StepRecord],
        outcomes: list[Outcome],
        finished: bool = False,
        events: Sequence[AdapterEvent] = (),
    ) -> list[Action]:
        with self._lock:
            now = self.clock()
            self.last_seen = now
            lines = []
            for rec in records:
                if self.state.step >= 0 and rec.step > self.state.step + MAX_STEP_JUMP:
                    self._refuse_jump(rec.step)
                    continue
                if rec.step > self.state.step:
                    lines.append({"event": "step", **rec.to_json()})
                    if rec.step == 1:
                        self._check_first_step(rec)
                self.state.ingest(rec)
                # Freshness counts every record, a resent or replayed one too (a job restarted
                # from a checkpoint reports steps the controller has seen): the ranks are alive.
                for m in rec.memory:
                    self._watch.seen(m.rank, now, rec.step)
            self.telemetry.write_many(lines)  # one write and flush an exchange
            for event in events:  # first: a budget_stop's outcome may come in the same message
                self._record_event(event, now)
            for out in outcomes:
                self._record_outcome(out, now)
            if finished:
                self.state.finished = True
            self._check_telemetry(now)
            if not finished and now - self._last_decide >= self.settings.decide_interval_s:
                self._last_decide = now
                self._decide(now)
            return [d.action for d in self._pending.values()]

    @property
    def next_exchange_s(self) -> float:
        """When the job should exchange next (the reply's `next_exchange_s`): every
        EXCHANGE_INTERVAL_S while an action is pending (its outcome, and the next action after it,
        are waited on) or a policy watches closely; else as late as the soonest policy needs
        (`watch_s`), at most `max_exchange_interval_s`. Fewer exchanges when nothing is near a
        threshold is CPU the agent's thread and the sidecar no longer take from training."""
        with self._lock:
            if self._pending or self.state.shape is None:
                return EXCHANGE_INTERVAL_S
            return max(EXCHANGE_INTERVAL_S, min(self._watch_s, self.settings.max_exchange_interval_s))

    def _new_incarnation(self, old: JobShape) -> None:
        """A new start of the job said hello: its steps are its own (state.new_incarnation); the
        previous start's unanswered actions end, and kinds disabled by its failures may be tried."""
        self._end_pending("the job started again before applying it")
        self._backoff.reset()
        log.info(
            "a new start of the job (previous: %s, at step %d): its steps count from its own first record",
            old.incarnation or "pids " + ",".join(map(str, old.pids)),
            self.state.step,
        )
        self.state.new_incarnation()
        self._last_decide = float("-inf")
        self._watch_s = EXCHANGE_INTERVAL_S

    def _end_pending(self, why: str) -> None:
        """Each pending action becomes an `unanswered` line of the decision log, saying `why`."""
        for decision in list(self._pending.values()):
            self._log_decision(
                decision.action,
                decision.decided_step,
                decision.decided_at,
                "unanswered",
                self.state.step,
                0.0,
                why,
            )
        self._pending.clear()

    def _refuse_jump(self, step: int) -> None:
        self._jumps_refused += 1
        if self._jumps_refused == 1 or self._jumps_refused % 1000 == 0:
            log.warning(
                "left out a record of step %d: more than %d steps past the job's last step %d (a corrupt "
                "step counter?); %d such record(s) so far. A job that restarts says hello again",
                step,
                MAX_STEP_JUMP,
                self.state.step,
                self._jumps_refused,
            )

    # ---- observe -> decide -> act -------------------------------------------------------
    def observe(self) -> Snapshot:
        with self._lock:
            self._poll_sources()
            return self.state.snapshot(
                self.budget, frozenset(d.action.kind for d in self._pending.values()), self._observed
            )

    def _poll_sources(self) -> None:
        shape = self.state.shape
        if not shape or not self.pids_visible():
            return
        observed: dict[int, int] = {}
        device = shape.device.split(":")[0]
        for src in self.sources:
            if src.device != device:
                continue  # RSS is not device memory on a GPU job
            for rank, pid in enumerate(shape.pids):
                used = src.used_bytes(pid)
                if used is not None:
                    observed[rank] = max(observed.get(rank, 0), used)
        self._observed = observed

    def _decide(self, now: float) -> None:
        if self.state.shape is None or self.state.step < 0:
            return
        snap = self.observe()
        watch = math.inf
        for policy in self.policies:
            try:
                watch = min(watch, float(policy.watch_s(snap, self.budget)))
            except Exception:  # a bug there costs CPU, never a late decision: watched closely
                log.exception("policy %s failed to say how soon it decides; watching it closely", policy.name)
                watch = 0.0
            try:
                actions = policy.decide(snap, self.budget)
            except Exception:  # a policy bug must not take the controller down
                log.exception("policy %s failed to decide; skipping it this round", policy.name)
                watch = 0.0
                continue
            for action in actions:
                self._issue(action, policy.name, snap, now)
        self._watch_s = watch if watch == watch else 0.0  # a NaN from a policy: watch closely

    def _issue(self, action: Action, policy: str, snap: Snapshot, now: float) -> None:
        action = Action(
            kind=action.kind,
            params=action.params,
            reason=action.reason,
            step=max(action.step, snap.step + 1),
            policy=policy,
            id=action.id,
        )
        if action.kind == KNOB_STOP and self._stop_answered:
            return  # stopped, or the stop was ignored: once is the answer (telemetry may lag it)
        if action.kind == KNOB_STOP:
            # What the stop does to a job that does not read should_stop (adapters/stop.py): in the
            # action, so every rank reads the same rule.
            s = self.settings
            rule = {"on_stop": s.stop, "grace_steps": s.stop_grace_steps, "checkpoint": s.checkpoint_on_stop}
            action = dataclasses.replace(action, params={**rule, **action.params})
        if action.kind in snap.pending:
            return  # level-based: the pending action already asks for this knob
        if self._backoff.waiting(action.kind, now):
            return  # backing off after failures: no retry storm
        problem = self._cannot_carry(action, snap)
        if problem:
            # A policy will ask again every round; one line per distinct request is enough.
            key = (action.kind, repr(sorted(action.params.items())))
            if key not in self._rejected:
                self._rejected.add(key)
                self._log_decision(action, snap.step, now, "rejected", snap.step, 0.0, problem)
            return
        self._pending[action.id] = Decision(action, now, snap.step)
        log.info("step %d: %s %s (%s)", snap.step, action.kind, action.params, action.reason)

    def _check_policies(self, shape: JobShape) -> None:
        """A policy that does not fit the job that connected (a data policy naming domains the job
        lacks) is said once, with the file, line and fix, and left out for this run."""
        keep = []
        for policy in self._all_policies:
            check = getattr(policy, "check_job", None)
            problems = list(check(shape)) if callable(check) else []
            if not problems:
                keep.append(policy)
                continue
            specs = self.policy_file.policies if self.policy_file else ()
            spec = next((s for s in specs if s.name == policy.name), None)
            where = f"{self.policy_file.path}:{spec.line}: " if self.policy_file and spec else ""
            for problem in problems:
                log.error("%spolicy %r %s; the policy is off for this run", where, policy.name, problem)
        self.policies = keep

    def _check_first_step(self, rec: StepRecord) -> None:
        """Tokens counted from the batch (a zero-line attach) are known only after the first step:
        a token budget smaller than that step is refused then, said as at attach (the compute policy
        stops the job, its budget being spent)."""
        if self.budget.tokens is not None and rec.tokens > self.budget.tokens:
            reason = (
                f"the tokens budget ({self.budget.tokens:,}) is smaller than one optimizer step of this job "
                f"({rec.tokens:,} tokens counted in its first step): raise the budget in the policy file"
            )
            log.error("refusing the run: %s", reason)
            self.notices.append(reason)

    def _check_knobs(self, shape: JobShape) -> None:
        """A policy none of whose knobs the job can carry (the memory policy under the HF Trainer,
        which cannot change its micro-batch mid-run) would do nothing, silently: said once at
        connect, in the log, on the status line (`notices`) and in decisions.jsonl (outcome
        `unsupported`, with the reason)."""
        have = {k.name for k in shape.knobs}
        for policy in self.policies:
            wants = set(getattr(policy, "knobs", ()) or ())
            if not wants or wants & have:
                continue
            reason = (
                f"policy {policy.name!r} can do nothing for this job: it acts through "
                f"{', '.join(sorted(wants))}, and the {shape.adapter} adapter carries only "
                f"{', '.join(sorted(have)) or 'no knob'}"
                + (
                    " (the HF Trainer cannot switch those mid-run: docs/hf.md)"
                    if shape.adapter == "hf-trainer"
                    else ""
                )
            )
            log.warning("%s", reason)
            self.notices.append(reason)
            act = Action(
                kind=KNOB_MICRO_BATCH if KNOB_MICRO_BATCH in wants else sorted(wants)[0],
                params={},
                reason=reason,
                step=max(0, self.state.step),
                policy=policy.name,
            )
            self._log_decision(
                act, self.state.step, self.clock(), "unsupported", self.state.step, 0.0, reason
            )

    def _cannot_carry(self, action: Action, snap: Snapshot) -> str | None:
        """Never send what the adapter cannot carry; say why instead."""
        spec = snap.knobs.get(action.kind)
        if spec is None:
            return (
                f"the job's adapter has no knob {action.kind!r} (it has: {', '.join(snap.knobs) or 'none'})"
            )
        if action.kind == KNOB_DOMAIN_WEIGHTS and not spec.accepts(action.params.get("value")):
            names = spec.value if isinstance(spec.value, dict) else None
            return domain_weights_problem(action.params.get("value"), names)
        if action.kind != KNOB_STOP and not spec.accepts(action.params.get("value")):
            return f"the adapter does not accept {action.kind}={action.params.get('value')!r}"
        return None

    def _record_outcome(self, out: Outcome, now: float) -> None:
        decision = self._pending.pop(out.action_id, None)
        if decision is None:
            return  # already recorded (the agent re-sends until acknowledged)
        act = decision.action
        if (
            act.kind == KNOB_STOP
            and out.outcome in ("applied", "noop", "ignored")
            and not (out.outcome == "noop" and self.stop_decision is not None)
        ):  # a second stop (the agent's and ours) is a noop: the first one's line stands
            self.stop_decision = {
                "step": out.step,
                "reason": act.reason,
                "params": dict(act.params),
                "outcome": out.outcome,
                "detail": out.detail,
            }
            self._stop_answered = True
            if out.outcome == "ignored":
                log.error("the job ignored the stop at step %d and trains on outside its budget", out.step)
        if out.outcome == "applied":
            # How far ahead the compute policy must decide (an action scheduled for a later
            # step is held until then, and says nothing about the lag).
            if act.step <= decision.decided_step + 1:
                self.state.note_lag(out.step - decision.decided_step)
            self.state.last_action_step[act.kind] = out.step
            if act.kind == KNOB_MICRO_BATCH or act.kind in self.state.config:
                self.state.config[act.kind] = act.params.get("value", True)
        self._log_decision(
            act, decision.decided_step, decision.decided_at, out.outcome, out.step, out.duration_s, out.detail
        )
        if out.outcome != "ignored":  # not a failed switch: nothing to retry
            self._backoff.record(act.kind, out.outcome, now)

    def _record_event(self, event: AdapterEvent, now: float) -> None:
        """What the adapter did by itself (an OOM retry): one decision line (policy `adapter`,
        outcome `applied`), counted in actions_total; the job's configuration is now the event's."""
        if event.id in self._events_seen:
            return
        self._events_seen.add(event.id)
        if event.kind == EVENT_BUDGET_STOP:
            # The agent placed the stop at a counted budget's end itself: a decision of the agent's,
            # pending like one of ours (its outcome comes once the job stopped or was ended).
            self._pending.setdefault(
                event.id,
                Decision(
                    Action(
                        kind=KNOB_STOP,
                        params={"cause": "budget", "by": "agent"},
                        reason=event.reason,
                        step=event.step + 1,
                        policy="agent",
                        id=event.id,
                    ),
                    now,
                    self.state.step,
                ),
            )
            for other in [
                d for i, d in self._pending.items() if d.action.kind == KNOB_STOP and i != event.id
            ]:
                del self._pending[other.action.id]
                self._log_decision(
                    other.action,
                    other.decided_step,
                    other.decided_at,
                    "unanswered",
                    self.state.step,
                    0.0,
                    f"superseded: the job placed the stop itself, after step {event.step} ({event.reason})",
                )
            log.info("the job placed its stop itself: %s", event.reason)
            return
        self.state.take_event(event)
        act = Action(
            kind=event.kind,
            params=event.params(),
            reason=event.reason,
            step=event.step,
            policy=ADAPTER_POLICY,
            id=event.id,
        )
        changes = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in event.changes)
        self._log_decision(act, event.step, now, "applied", event.step, event.duration_s, changes)

    def _log_decision(
        self,
        act: Action,
        decided_step: int,
        decided_at: float,
        outcome: str,
        step: int,
        duration_s: float,
        detail: str,
    ) -> None:
        rec = {
            "time": decided_at,
            "decided_step": decided_step,
            "step": step,
            "id": act.id,
            "policy": act.policy,
            "kind": act.kind,
            "params": dict(act.params),
            "reason": act.reason,
            "outcome": outcome,
            "duration_s": round(duration_s, 6),
            "detail": detail,
        }
        self.decisions.write(rec)
        self.actions_total[(act.kind, outcome)] += 1
        self.last_decision = rec
        log.info(
            "step %d: %s %s -> %s%s",
            step,
            act.kind,
            dict(act.params),
            outcome,
            f" ({detail})" if detail else "",
        )

    # ---- what the CLI, status line and exporter read --------------------------------------
    def view(self) -> ControllerView:
        """A consistent copy of what the exporter needs, taken under the lock."""
        with self._lock:
            return ControllerView(
                run_id=self.run_id,
                snapshot=self.state.snapshot(self.budget, frozenset(), self._observed),
                connected=self.state.shape is not None,
                lr=self.state.lr,
                domain_loss=dict(self.state.domain_loss),
                actions_total=dict(self.actions_total),
                telemetry_age_s=None if self.last_seen is None else self.clock() - self.last_seen,
            )

    def status(self) -> dict[str, Any]:
        with self._lock:
            return status_of(self)

    def _summary(self, now: float) -> dict[str, Any]:
        return summary_of(self, now)

    def _write_summary(self, summary: dict[str, Any]) -> None:
        try:
            write_private(self.run_dir / "summary.json", dumps(summary, indent=2, default=str))
        except OSError as exc:
            log.error("cannot write summary.json: %s", exc)

    def close(self) -> dict[str, Any]:
        """Record unanswered actions, write summary.json, close the logs; returns the summary."""
        with self._lock:
            now = self.clock()
            self._end_pending("the job ended before applying it")
            summary = self._summary(now)
            self._write_summary(summary)
            self.decisions.close()
            self.telemetry.close()
            for src in self.sources:
                src.close()
            return summary


def same_job(old: JobShape, new: JobShape) -> bool:
    """Whether a hello is the same start of the job saying hello again (a reconnect): the same
    incarnation, or (an agent that sends none) the same pids."""
    if old.incarnation and new.incarnation:
        return old.incarnation == new.incarnation
    return set(old.pids) == set(new.pids)
