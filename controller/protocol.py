"""The channel's wire format: versioned JSON between the agent (in the job) and the controller.

Everything that crosses the process boundary is defined here, in plain Python, so the
controller needs no torch and the agent no HTTP server. Decoding is strict: a message that
is not what this version expects raises ProtocolError naming the field, and the server
answers it with a 4xx instead of crashing.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trainwarden.controller.identity import pid_namespace

PROTOCOL_VERSION = 1
#: Largest request body the controller reads; a telemetry batch is a few KiB.
MAX_BODY_BYTES = 1 << 20

# Environment variables `trainwarden run` sets for the job.
ENV_ENDPOINT = "TRAINWARDEN_ENDPOINT"
ENV_TOKEN = "TRAINWARDEN_TOKEN"
ENV_TOKEN_FILE = "TRAINWARDEN_TOKEN_FILE"
ENV_RUN_ID = "TRAINWARDEN_RUN_ID"
ENV_RUN_DIR = "TRAINWARDEN_RUN_DIR"
ENV_POLICY = "TRAINWARDEN_POLICY"
ENV_DISABLE = "TRAINWARDEN_DISABLE"
ENV_SYNC_EVERY = "TRAINWARDEN_SYNC_EVERY"
#: `trainwarden run --attach`: the job's `deepspeed.initialize` returns trainwarden's handle
#: (an import hook installed by a sitecustomize on the job's PYTHONPATH; adapters/attach_hook.py).
ENV_ATTACH = "TRAINWARDEN_ATTACH"

#: Knob names the adapters may report. Each is set by an Action whose kind is the knob name
#: and whose params are {"value": ...}; `stop` takes no value.
KNOB_MICRO_BATCH = "micro_batch_size"
KNOB_LR_MULTIPLIER = "lr_multiplier"
KNOB_STOP = "stop"
# The DeepSpeed adapter's engine knobs (adapters/deepspeed.py): each change builds a new engine.
KNOB_ZERO_STAGE = "zero_stage"
KNOB_PRECISION = "precision"
KNOB_OFFLOAD_OPTIMIZER = "offload_optimizer"
KNOB_OFFLOAD_PARAM = "offload_param"
#: Recompute activations in the backward pass (bool); offered only by models that can switch it.
KNOB_ACTIVATION_CHECKPOINTING = "activation_checkpointing"
# The data mixture's knobs (adapters/data.py). `domain_weights` is a mapping domain -> weight
# (non-negative, positive sum; the adapter normalises); its action may also carry
# params["state"], the data policy's bandit state, which the job keeps (in its checkpoint too)
# and reports back under config["data_state"]: that is what keeps the policy pure and resumable.
KNOB_DOMAIN_WEIGHTS = "domain_weights"
#: Fraction (0-1] of each domain's examples, easiest first by difficulty, the sampler draws from.
KNOB_CURRICULUM_LEVEL = "curriculum_level"
#: Most of the examples (a fraction) the mixture may leave out because they stopped teaching.
KNOB_PRUNE_FRACTION = "prune_fraction"
#: Configuration keys (not knobs) the mixture reports: the policy's state, the fraction pruned now.
CONFIG_DATA_STATE = "data_state"
CONFIG_PRUNED_FRACTION = "pruned_fraction"
#: Counts changes of which examples each domain draws from (curriculum level, pruned set): a
#: domain's loss before and after such a change is of other examples, so no learnability signal.
CONFIG_DATA_VERSION = "data_version"
#: Most domains a mixture may have (a message stays far below the body limit). Also the most
#: domains a run tracks: each is a Prometheus series, and a job naming a new domain per step
#: would otherwise grow the controller and every scrape without bound.
MAX_DOMAINS = 256
#: Most ranks a record may report memory for, and the largest rank number: each is a series.
MAX_RANKS = 4096
#: Most keys a reported configuration and most knobs a job shape may have (each key a series).
MAX_CONFIG_KEYS = 128
MAX_KNOBS = 64
#: Largest optimizer step a message may carry: a million steps a day for 2700 years. A record
#: past it (2**63-1) would make every real step after it look like a resend.
MAX_STEP = 10**12
#: Longest run id, and nesting a reported configuration may have.
MAX_RUN_ID_CHARS = 128
MAX_CONFIG_DEPTH = 8
#: How a float that is not finite is written, so that what trainwarden writes is strict JSON
#: (RFC 8259 has no NaN); readers take these strings, and the bare literals older agents send.
NONFINITE_TEXT = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def domain_weights_problem(value: Any, names: Any = None) -> str | None:
    """Why `value` is not a valid `domain_weights` value (None when it is): a mapping of known
    domain names (`names`, when given) to finite non-negative numbers with a positive sum."""
    if not isinstance(value, Mapping):
        return f"domain_weights must be a mapping of domain name to weight, got {type(value).__name__}"
    if not value:
        return "domain_weights is empty; give a weight for at least one domain"
    if len(value) > MAX_DOMAINS:
        return f"domain_weights has {len(value)} domains, more than the {MAX_DOMAINS} a mixture may have"
    known = list(names) if names is not None else None
    for k, w in value.items():
        if not isinstance(k, str):
            return f"domain_weights keys must be domain names (text), got {k!r}"
        if known is not None and k not in known:
            return f"unknown domain {k!r} in domain_weights; the job's domains are: {', '.join(known)}"
        if not _is_number(w) or not w >= 0 or w == float("inf"):
            return f"domain_weights[{k!r}] must be a finite number >= 0, got {w!r}"
    if not sum(value.values()) > 0:
        return "domain_weights must have a positive sum (at least one domain with weight > 0)"
    return None


#: Integers on the wire are 64-bit: Python's json reads any number of digits exactly, and
#: float() of an integer past 1.8e308 raises OverflowError.
_INT_LIMIT = 2**63
_MISSING_REAL = object()


def _is_number(v: Any) -> bool:
    """A JSON number: int or float, and not a bool (which Python counts as an int)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return -_INT_LIMIT <= v < _INT_LIMIT
    return isinstance(v, float)


class ProtocolError(ValueError):
    """A message on the channel is malformed; the message says which field and why."""


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float as its NONFINITE_TEXT string (a copy where needed)."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if obj != obj else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """JSON as RFC 8259 has it (no bare NaN or Infinity): what the channel and the run logs write."""
    kw.setdefault("separators", (",", ":"))
    try:
        # Most messages hold no non-finite float: encode as is, and walk the object (`strict`, a
        # copy in Python: a fifth of the sidecar's CPU per step record) only when the encoder
        # refuses one.
        return json.dumps(obj, allow_nan=False, **kw)
    except ValueError:
        return json.dumps(strict(obj), allow_nan=False, **kw)


def clean_text(text: str) -> str:
    """`text` encodable as UTF-8: a lone surrogate (valid in a JSON string, not in UTF-8, and fatal to
    a Prometheus scrape) becomes its escape, \\udXXX."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_value(value: Any, where: str, depth: int = 0) -> Any:
    """A JSON value from a job, made safe to keep, log and export: text encodable, integers in 64
    bits (ProtocolError naming `where` otherwise), nesting bounded."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        if not -_INT_LIMIT <= value < _INT_LIMIT:
            raise ProtocolError(f"{where} is out of range: a 64-bit integer")
        return value
    if depth >= MAX_CONFIG_DEPTH:
        raise ProtocolError(f"{where} is nested deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(value, dict):
        return {clean_text(str(k)): clean_value(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise ProtocolError(f"{where} is not a JSON value")


def _config(d: dict[str, Any], key: str, what: str) -> dict[str, Any]:
    """A reported configuration: at most MAX_CONFIG_KEYS keys, cleaned, domain weights bounded."""
    config = _get(d, key, dict, what)
    if len(config) > MAX_CONFIG_KEYS:
        raise ProtocolError(
            f"{what}.{key} has {len(config)} keys; a configuration may have at most {MAX_CONFIG_KEYS}"
        )
    weights = config.get(KNOB_DOMAIN_WEIGHTS)
    if isinstance(weights, dict) and len(weights) > MAX_DOMAINS:
        raise ProtocolError(
            f"{what}.{key}.{KNOB_DOMAIN_WEIGHTS} has {len(weights)} domains; "
            f"a mixture may have at most {MAX_DOMAINS}"
        )
    return clean_value(config, f"{what}.{key}")


def _step(d: dict[str, Any], key: str, what: str, lowest: int = 0) -> int:
    step = _get(d, key, int, what)
    if not lowest <= step <= MAX_STEP:
        raise ProtocolError(
            f"{what}.{key} must be >= {lowest} and at most {MAX_STEP:.0e}, got {step}: not an optimizer "
            "step (report the job's own step counter)"
        )
    return step


def _real(d: dict[str, Any], key: str, what: str, default: Any = _MISSING_REAL, name: str = "") -> Any:
    """A float field: a JSON number, or one of NONFINITE_TEXT's strings (strict JSON's NaN)."""
    name = name or f"{what}.{key}"
    if key not in d:
        if default is _MISSING_REAL:
            raise ProtocolError(f"{name} is missing")
        return default
    v = d[key]
    if v is None and default is None:
        return None
    if isinstance(v, str) and v in NONFINITE_TEXT:
        return NONFINITE_TEXT[v]
    if isinstance(v, bool) and default is not None:
        raise ProtocolError(f"{name} must be a number, got a boolean")
    if not _is_number(v):
        if default is None:
            raise ProtocolError(f"{name} must be a number or null")
        raise ProtocolError(f"{name} must be int/float, got {type(v).__name__}")
    return float(v)


_ids = itertools.count(1)


def new_action_id() -> str:
    return f"{os.getpid():x}-{next(_ids)}"


@dataclass(frozen=True)
class Action:
    """One decision: set `kind` (a knob, or `stop`) with `params`, not before `step`.

    Level-based: an action carries the desired value, not a delta, so applying it twice
    is the same as applying it once.
    """

    kind: str
    params: Mapping[str, Any]
    reason: str
    step: int
    policy: str = ""
    id: str = field(default_factory=new_action_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "params": dict(self.params),
            "reason": self.reason,
            "step": self.step,
            "policy": self.policy,
        }

    @staticmethod
    def from_json(obj: Any) -> Action:
        d = _require_dict(obj, "action")
        return Action(
            id=_get(d, "id", str, "action"),
            kind=_get(d, "kind", str, "action"),
            params=_get(d, "params", dict, "action"),
            reason=_get(d, "reason", str, "action"),
            step=_step(d, "step", "action"),
            policy=_get(d, "policy", str, "action", default=""),
        )


#: Outcome of an action, as reported back by the agent. `ignored`: a stop the job did not obey
#: (it went on training past it and the policy file's `controller.stop` says `cooperative`).
OUTCOMES = ("applied", "noop", "rejected", "rolled_back", "ignored")


@dataclass(frozen=True)
class Outcome:
    """What happened to an action in the job: when, how, how long it took."""

    action_id: str
    outcome: str
    step: int
    duration_s: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "action_id": self.action_id,
            "outcome": self.outcome,
            "step": self.step,
            "duration_s": self.duration_s,
            "detail": self.detail,
        }

    @staticmethod
    def from_json(obj: Any) -> Outcome:
        d = _require_dict(obj, "outcome")
        outcome = _get(d, "outcome", str, "outcome")
        if outcome not in OUTCOMES:
            raise ProtocolError(f"outcome.outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        return Outcome(
            action_id=_get(d, "action_id", str, "outcome"),
            outcome=outcome,
            step=_step(d, "step", "outcome", lowest=-1),
            duration_s=_real(d, "duration_s", "outcome"),
            detail=_get(d, "detail", str, "outcome", default=""),
        )


#: Kinds of adapter-initiated events. `oom_retry`: an optimizer step ran out of memory and the
#: adapter moved one rung down the OOM ladder by itself to train the step again (the DeepSpeed
#: adapter, adapters/ds_oom.py); no controller action asked for it.
EVENT_KINDS = ("oom_retry", "budget_stop")
#: The agent placed the stop at a counted budget's end itself (adapters/agent.py): the event's id is
#: the stop action's, whose outcome follows like any other's.
EVENT_BUDGET_STOP = "budget_stop"
#: Events one exchange may carry (an OOM retry is rare; a job in an OOM loop stops at the ladder's
#: bottom after a handful).
MAX_EVENTS_PER_EXCHANGE = 64
#: Longest reason an event may carry (the error's first line and the rung, in words).
MAX_EVENT_REASON_CHARS = 4096
#: Largest changes list an event may carry (there are a handful of knobs).
MAX_EVENT_CHANGES = 16
#: Longest event id (the controller remembers the ids it has logged, to ignore a resend).
MAX_EVENT_ID_CHARS = 128


@dataclass(frozen=True)
class AdapterEvent:
    """Something the adapter did on its own, at step boundary `step` (the configuration applies from
    step + 1): `kind` (one of EVENT_KINDS), `changes` as (knob, old, new) with JSON scalar values,
    `config` the configuration after it, `reason` in words (for an OOM: where, the error's first line,
    the rung), `duration_s` what it took. The controller writes it to decisions.jsonl like a decision
    (policy `adapter`, outcome `applied`), counts it in trainwarden_actions_total and takes `config`.
    Sent in the exchange message's optional `events` list (protocol v1: a message without it carries
    none; an id seen before is ignored, so the agent may resend)."""

    kind: str
    step: int
    changes: tuple[tuple[str, Any, Any], ...]
    config: Mapping[str, Any]
    reason: str
    duration_s: float
    id: str = field(default_factory=new_action_id)

    def params(self) -> dict[str, Any]:
        """The new value of every knob it changed (what a decision line's `params` holds)."""
        return {k: new for k, _, new in self.changes}

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "step": self.step,
            "changes": [{"knob": k, "from": a, "to": b} for k, a, b in self.changes],
            "config": dict(self.config),
            "reason": self.reason,
            "duration_s": self.duration_s,
        }

    @staticmethod
    def from_json(obj: Any) -> AdapterEvent:
        d = _require_dict(obj, "event")
        kind = _get(d, "kind", str, "event")
        if kind not in EVENT_KINDS:
            raise ProtocolError(f"event.kind must be one of {', '.join(EVENT_KINDS)}, got {kind!r}")
        step = _step(d, "step", "event")
        duration = _real(d, "duration_s", "event")
        if not math.isfinite(duration) or duration < 0:
            raise ProtocolError(f"event.duration_s must be a finite number >= 0, got {duration!r}")
        reason = _get(d, "reason", str, "event")
        if len(reason) > MAX_EVENT_REASON_CHARS:
            raise ProtocolError(f"event.reason is longer than {MAX_EVENT_REASON_CHARS} characters")
        items = _get(d, "changes", list, "event")
        if len(items) > MAX_EVENT_CHANGES:
            raise ProtocolError(f"event.changes has {len(items)} entries, more than {MAX_EVENT_CHANGES}")
        changes = []
        for i, c in enumerate(items):
            c = _require_dict(c, f"event.changes[{i}]")
            knob = _get(c, "knob", str, f"event.changes[{i}]")
            old, new = c.get("from"), c.get("to")
            for key, v in (("from", old), ("to", new)):
                if not _is_scalar(v):
                    raise ProtocolError(
                        f"event.changes[{i}].{key} must be a JSON scalar (text, number, boolean or null)"
                    )
            changes.append((knob, clean_value(old, "event.changes"), clean_value(new, "event.changes")))
        event_id = _get(d, "id", str, "event")
        if not 0 < len(event_id) <= MAX_EVENT_ID_CHARS:
            raise ProtocolError(f"event.id must be 1 to {MAX_EVENT_ID_CHARS} characters")
        return AdapterEvent(
            id=event_id,
            kind=kind,
            step=step,
            changes=tuple(changes),
            config=_config(d, "config", "event"),
            reason=reason,
            duration_s=duration,
        )


def _is_scalar(v: Any) -> bool:
    """A JSON scalar this protocol carries: text, a finite number in range, a boolean, null."""
    if v is None or isinstance(v, (str, bool)):
        return True
    return _is_number(v) and (not isinstance(v, float) or math.isfinite(v))


@dataclass(frozen=True)
class RankMemory:
    """One rank's memory at a sync point: used now, peak since the previous sync, device total."""

    rank: int
    used_bytes: int
    peak_bytes: int
    total_bytes: int
    device: str
    pid: int
    step: int | None = None
    """The step it was measured at when that is earlier than its record's: another rank's memory
    reaches rank 0 one sync late (adapters/core/rank_sync.py). None: at the record's step."""

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "used_bytes": self.used_bytes,
            "peak_bytes": self.peak_bytes,
            "total_bytes": self.total_bytes,
            "device": self.device,
            "pid": self.pid,
            **({} if self.step is None else {"step": self.step}),
        }

    @staticmethod
    def from_json(obj: Any) -> RankMemory:
        d = _require_dict(obj, "memory")
        rank = _get(d, "rank", int, "memory")
        if not 0 <= rank < MAX_RANKS:
            raise ProtocolError(f"memory.rank = {rank} is not a rank (0 to {MAX_RANKS - 1})")
        return RankMemory(
            rank=rank,
            used_bytes=_get(d, "used_bytes", int, "memory"),
            peak_bytes=_get(d, "peak_bytes", int, "memory"),
            total_bytes=_get(d, "total_bytes", int, "memory"),
            device=_get(d, "device", str, "memory"),
            pid=_get(d, "pid", int, "memory"),
            step=_get(d, "step", int, "memory", default=None),
        )


@dataclass(frozen=True)
class StepRecord:
    """Telemetry of one optimizer step, as rank 0 reports it."""

    step: int
    time: float
    loss: float | None
    samples: int
    tokens: int
    step_time_s: float
    lr: float | None
    config: Mapping[str, Any]
    memory: tuple[RankMemory, ...]
    domain_loss: Mapping[str, float] = field(default_factory=dict)
    eval_loss: float | None = None
    """Validation loss the job measured since its previous record (`handle.report(eval_loss=)`);
    None when it measured none. What the compute policy's stopping rule prefers to training loss."""
    cpu_time_s: float | None = None
    """CPU seconds rank 0's process spent since the previous record (optional: older agents omit
    it, older controllers ignore it). Beside `step_time_s` it says what the machine's load did to
    the step: the replay times CPU jobs in these units (policies/tuning/replay/model.py)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "time": self.time,
            "loss": self.loss,
            "samples": self.samples,
            "tokens": self.tokens,
            "step_time_s": self.step_time_s,
            "lr": self.lr,
            "config": dict(self.config),
            "memory": [m.to_json() for m in self.memory],
            "domain_loss": dict(self.domain_loss),
            **({} if self.eval_loss is None else {"eval_loss": self.eval_loss}),
            **({} if self.cpu_time_s is None else {"cpu_time_s": self.cpu_time_s}),
        }

    @staticmethod
    def from_json(obj: Any) -> StepRecord:
        d = _require_dict(obj, "record")
        memory = _get(d, "memory", list, "record")
        if len(memory) > MAX_RANKS:
            raise ProtocolError(
                f"record.memory has {len(memory)} entries; a job has at most {MAX_RANKS} ranks"
            )
        domain_loss = _get(d, "domain_loss", dict, "record", default={})
        if len(domain_loss) > MAX_DOMAINS:
            raise ProtocolError(
                f"record.domain_loss has {len(domain_loss)} domains; a run tracks at most {MAX_DOMAINS}"
            )
        return StepRecord(
            step=_step(d, "step", "record"),
            time=_real(d, "time", "record"),
            loss=_real(d, "loss", "record", default=None),
            samples=_get(d, "samples", int, "record"),
            tokens=_get(d, "tokens", int, "record"),
            step_time_s=_real(d, "step_time_s", "record"),
            lr=_real(d, "lr", "record", default=None),
            config=_config(d, "config", "record"),
            memory=tuple(RankMemory.from_json(m) for m in memory),
            domain_loss={
                clean_text(k): _real(domain_loss, k, "", name=f"record.domain_loss[{k!r}]")
                for k in domain_loss
            },
            eval_loss=_real(d, "eval_loss", "record", default=None),
            cpu_time_s=_real(d, "cpu_time_s", "record", default=None),
        )


@dataclass(frozen=True)
class KnobSpec:
    """A knob an adapter can carry: its current value and what it accepts."""

    name: str
    value: Any
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "choices": list(self.choices),
            "minimum": self.minimum,
            "maximum": self.maximum,
        }

    @staticmethod
    def from_json(obj: Any) -> KnobSpec:
        d = _require_dict(obj, "knob")
        return KnobSpec(
            name=_get(d, "name", str, "knob"),
            value=clean_value(d.get("value"), "knob.value"),
            choices=tuple(clean_value(_get(d, "choices", list, "knob", default=[]), "knob.choices")),
            minimum=_optional_number(d, "minimum", "knob"),
            maximum=_optional_number(d, "maximum", "knob"),
        )

    def accepts(self, value: Any) -> bool:
        """Whether the adapter can carry `value` for this knob."""
        if self.name == KNOB_DOMAIN_WEIGHTS:
            names = self.value if isinstance(self.value, Mapping) else None
            return domain_weights_problem(value, names) is None
        if self.choices:
            return value in self.choices
        if not _is_number(value) or not _is_number(self.value):
            return type(value) is type(self.value)
        if self.minimum is not None and value < self.minimum:
            return False
        return not (self.maximum is not None and value > self.maximum)


@dataclass(frozen=True)
class JobShape:
    """What the agent tells the controller at connect."""

    run_id: str
    adapter: str
    world_size: int
    param_count: int
    global_batch_size: int
    tokens_per_sample: int
    knobs: tuple[KnobSpec, ...]
    pids: tuple[int, ...]
    device: str
    device_total_bytes: int
    sync_every: int
    incarnation: str = ""
    """Which start of the job this is: the agent makes a new one at each attach (a reconnect says
    hello with the same one). A new incarnation on a used run directory starts its own step
    sequence. Optional on the wire (none, from an older agent: a new set of pids is a new start)."""
    #: The pid namespace the pids are in (identity.pid_namespace(), taken where the shape is made:
    #: in the job); "" when unknown. The controller reads pids only in its own namespace.
    pid_namespace: str = field(default_factory=pid_namespace)

    def knob(self, name: str) -> KnobSpec | None:
        for k in self.knobs:
            if k.name == name:
                return k
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "adapter": self.adapter,
            "world_size": self.world_size,
            "param_count": self.param_count,
            "global_batch_size": self.global_batch_size,
            "tokens_per_sample": self.tokens_per_sample,
            "knobs": [k.to_json() for k in self.knobs],
            "pids": list(self.pids),
            "device": self.device,
            "device_total_bytes": self.device_total_bytes,
            "sync_every": self.sync_every,
            "incarnation": self.incarnation,
            "pid_namespace": self.pid_namespace,
        }

    @staticmethod
    def from_json(obj: Any) -> JobShape:
        d = _require_dict(obj, "shape")
        run_id = _get(d, "run_id", str, "shape")
        if not 0 < len(run_id) <= MAX_RUN_ID_CHARS or not run_id.isprintable():
            raise ProtocolError(
                f"shape.run_id must be 1 to {MAX_RUN_ID_CHARS} printable characters (no newline or "
                f"control character), got {run_id[:40]!r}"
            )
        knobs = _get(d, "knobs", list, "shape")
        if len(knobs) > MAX_KNOBS:
            raise ProtocolError(f"shape.knobs has {len(knobs)} knobs; a job may offer at most {MAX_KNOBS}")
        incarnation = _get(d, "incarnation", str, "shape", default="")
        if len(incarnation) > MAX_EVENT_ID_CHARS:
            raise ProtocolError(f"shape.incarnation is longer than {MAX_EVENT_ID_CHARS} characters")
        return JobShape(
            run_id=run_id,
            adapter=_get(d, "adapter", str, "shape"),
            world_size=_get(d, "world_size", int, "shape"),
            param_count=_get(d, "param_count", int, "shape"),
            global_batch_size=_get(d, "global_batch_size", int, "shape"),
            tokens_per_sample=_get(d, "tokens_per_sample", int, "shape"),
            knobs=tuple(KnobSpec.from_json(k) for k in knobs),
            pids=_int_list(d, "pids", "shape"),
            device=_get(d, "device", str, "shape"),
            device_total_bytes=_get(d, "device_total_bytes", int, "shape"),
            sync_every=_get(d, "sync_every", int, "shape"),
            incarnation=incarnation,
            pid_namespace=_get(d, "pid_namespace", str, "shape", default="")[:256],
        )


def hello_message(shape: JobShape) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "shape": shape.to_json()}


def exchange_message(
    records: list[StepRecord],
    outcomes: list[Outcome],
    finished: bool = False,
    events: list[AdapterEvent] | None = None,
) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "records": [r.to_json() for r in records],
        "outcomes": [o.to_json() for o in outcomes],
        "finished": finished,
    }
    if events:  # optional in v1: a message without it carries none
        msg["events"] = [e.to_json() for e in events]
    return msg


#: How often the job exchanges while the controller watches closely, and with a controller that
#: does not say (an exchange reply without `next_exchange_s`).
EXCHANGE_INTERVAL_S = 0.5
#: Longest interval the job takes from a reply's `next_exchange_s` (a controller's bound, or a
#: corrupt value, must not silence the job's heartbeat past the controller's liveness limits).
MAX_EXCHANGE_INTERVAL_S = 10.0


def next_exchange_of(reply: dict[str, Any]) -> float:
    """Seconds until the job's next exchange, from an exchange reply's optional `next_exchange_s`
    (the controller's policies say how soon they need fresher telemetry): within
    [EXCHANGE_INTERVAL_S, MAX_EXCHANGE_INTERVAL_S]; EXCHANGE_INTERVAL_S when absent or not a number."""
    value = reply.get("next_exchange_s")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return EXCHANGE_INTERVAL_S
    return min(MAX_EXCHANGE_INTERVAL_S, max(EXCHANGE_INTERVAL_S, float(value)))


def events_of(message: dict[str, Any]) -> list[AdapterEvent]:
    """The adapter events of an exchange message ([] when it has none), strictly decoded."""
    items = message.get("events", [])
    if not isinstance(items, list):
        raise ProtocolError(f"message.events must be a list, got {type(items).__name__}")
    if len(items) > MAX_EVENTS_PER_EXCHANGE:
        raise ProtocolError(
            f"message.events has {len(items)} events; one exchange carries at most {MAX_EVENTS_PER_EXCHANGE}"
        )
    return [AdapterEvent.from_json(e) for e in items]


def check_version(obj: Any) -> dict[str, Any]:
    d = _require_dict(obj, "message")
    v = d.get("v")
    if isinstance(v, bool) or v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"message version {v!r} is not supported; this controller speaks v{PROTOCOL_VERSION}: "
            "install the same trainwarden version in the job and the sidecar"
        )
    return d


def _optional_number(d: dict[str, Any], key: str, what: str) -> float | None:
    v = d.get(key)
    if v is not None and not _is_number(v):
        raise ProtocolError(f"{what}.{key} must be a number or null, got {type(v).__name__}")
    return v


def _int_list(d: dict[str, Any], key: str, what: str) -> tuple[int, ...]:
    items = _get(d, key, list, what)
    if len(items) > MAX_RANKS:
        raise ProtocolError(f"{what}.{key} has {len(items)} entries; a job has at most {MAX_RANKS} ranks")
    for i, v in enumerate(items):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProtocolError(f"{what}.{key}[{i}] must be int, got {type(v).__name__}")
    return tuple(items)


def _require_dict(obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


_MISSING = object()


def _get(d: dict[str, Any], key: str, typ: Any, what: str, default: Any = _MISSING) -> Any:
    if key not in d:
        if default is _MISSING:
            raise ProtocolError(f"{what}.{key} is missing")
        return default
    value = d[key]
    # bool is an int in Python; on the wire it is not.
    if isinstance(value, bool) and typ in (int, (int, float)):
        raise ProtocolError(f"{what}.{key} must be a number, got a boolean")
    if not isinstance(value, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ProtocolError(f"{what}.{key} must be {name}, got {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT_LIMIT <= value < _INT_LIMIT:
        raise ProtocolError(f"{what}.{key} is out of range: a 64-bit integer")
    if isinstance(value, str):
        return clean_text(value)
    return value
