"""The channel's wire format: every message round-trips, every malformed one names its field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    KNOB_MICRO_BATCH,
    KNOB_STOP,
    OUTCOMES,
    PROTOCOL_VERSION,
    Action,
    AdapterEvent,
    JobShape,
    KnobSpec,
    Outcome,
    ProtocolError,
    RankMemory,
    StepRecord,
    check_version,
    events_of,
    exchange_message,
    hello_message,
)

GiB = 2**30


def wire(obj: dict[str, Any]) -> Any:
    """What the other side decodes: the message through real JSON text."""
    return json.loads(json.dumps(obj))


def rank_memory(rank: int = 0) -> RankMemory:
    return RankMemory(
        rank=rank,
        used_bytes=30 * GiB + rank,
        peak_bytes=41 * GiB,
        total_bytes=80 * GiB,
        device=f"cuda:{rank}",
        pid=4100 + rank,
    )


def step_record(**over: Any) -> StepRecord:
    fields: dict[str, Any] = {
        "step": 12,
        "time": 1_700_000_012.5,
        "loss": 2.375,
        "samples": 12 * 64,
        "tokens": 12 * 64 * 2048,
        "step_time_s": 0.81,
        "lr": 3e-4,
        "config": {KNOB_MICRO_BATCH: 8, KNOB_LR_MULTIPLIER: 1.0, "precision": "bf16"},
        "memory": (rank_memory(0), rank_memory(1)),
        "domain_loss": {"web": 2.5, "code": 1.75},
    }
    fields.update(over)
    return StepRecord(**fields)


def job_shape() -> JobShape:
    return JobShape(
        run_id="run-7",
        adapter="deepspeed",
        world_size=2,
        param_count=1_300_000_000,
        global_batch_size=64,
        tokens_per_sample=2048,
        knobs=(
            KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8)),
            KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=1.0),
            KnobSpec(KNOB_STOP, False),
        ),
        pids=(4100, 4101),
        device="cuda:0",
        device_total_bytes=80 * GiB,
        sync_every=4,
    )


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Action(kind=KNOB_MICRO_BATCH, params={"value": 4}, reason="peak above high water", step=13),
        Action(kind=KNOB_STOP, params={}, reason="budget spent", step=99, policy="compute", id="abc-1"),
        Outcome(action_id="abc-1", outcome="applied", step=13, duration_s=0.125, detail="engine rebuilt"),
        Outcome(action_id="abc-2", outcome="rolled_back", step=14, duration_s=2.0),
        rank_memory(3),
        step_record(),
        step_record(loss=None, lr=None, memory=(), domain_loss={}),
        KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8)),
        KnobSpec(KNOB_LR_MULTIPLIER, 0.5, minimum=0.0, maximum=1.0),
        KnobSpec(KNOB_STOP, False),
        job_shape(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_round_trips(msg: Any) -> None:
    back = type(msg).from_json(wire(msg.to_json()))
    assert back == msg
    assert back.to_json() == msg.to_json()


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_every_outcome_value_is_accepted(outcome: str) -> None:
    out = Outcome("a-1", outcome, 3, 0.0)
    assert Outcome.from_json(wire(out.to_json())).outcome == outcome


def test_action_ids_are_unique_and_kept() -> None:
    a, b = (Action(kind=KNOB_STOP, params={}, reason="r", step=1) for _ in range(2))
    assert a.id != b.id
    assert Action.from_json(wire(a.to_json())).id == a.id


def test_hello_and_exchange_messages_decode_after_the_version_check() -> None:
    shape = job_shape()
    hello = check_version(wire(hello_message(shape)))
    assert hello["v"] == PROTOCOL_VERSION
    assert JobShape.from_json(hello["shape"]) == shape

    rec = step_record()
    out = Outcome("x-1", "noop", 12, 0.0)
    body = check_version(wire(exchange_message([rec], [out], finished=True)))
    assert [StepRecord.from_json(r) for r in body["records"]] == [rec]
    assert [Outcome.from_json(o) for o in body["outcomes"]] == [out]
    assert body["finished"] is True


def test_optional_fields_default_when_absent() -> None:
    d = Action(kind=KNOB_STOP, params={}, reason="r", step=1).to_json()
    del d["policy"]
    assert Action.from_json(d).policy == ""
    d = Outcome("a", "applied", 1, 0.5).to_json()
    del d["detail"]
    assert Outcome.from_json(d).detail == ""
    d = step_record().to_json()
    del d["domain_loss"]
    assert StepRecord.from_json(d).domain_loss == {}
    d = KnobSpec("k", 1).to_json()
    del d["choices"]
    assert KnobSpec.from_json(d).choices == ()


def test_integer_numbers_are_accepted_where_a_float_is_expected() -> None:
    d = step_record().to_json()
    d.update(time=1_700_000_000, step_time_s=1, loss=3, lr=0)
    rec = StepRecord.from_json(d)
    assert (rec.time, rec.step_time_s, rec.loss, rec.lr) == (1_700_000_000.0, 1.0, 3.0, 0.0)
    assert isinstance(rec.loss, float)
    out = Outcome.from_json({"action_id": "a", "outcome": "applied", "step": 1, "duration_s": 2})
    assert out.duration_s == 2.0 and isinstance(out.duration_s, float)


# --- malformed input: ProtocolError naming the field -------------------------------------------


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    d = copy.deepcopy(d)
    del d[key]
    return d


def _with(d: dict[str, Any], **over: Any) -> dict[str, Any]:
    d = copy.deepcopy(d)
    d.update(over)
    return d


ACTION = Action(kind=KNOB_MICRO_BATCH, params={"value": 4}, reason="r", step=5, id="a-1").to_json()
OUTCOME = Outcome("a-1", "applied", 5, 0.5).to_json()
MEMORY = rank_memory().to_json()
RECORD = step_record().to_json()
KNOB = KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8)).to_json()
SHAPE = job_shape().to_json()


@pytest.mark.parametrize(
    ("decode", "obj", "fragment"),
    [
        # missing fields
        (Action.from_json, _without(ACTION, "kind"), "action.kind is missing"),
        (Action.from_json, _without(ACTION, "id"), "action.id is missing"),
        (Outcome.from_json, _without(OUTCOME, "action_id"), "outcome.action_id is missing"),
        (Outcome.from_json, _without(OUTCOME, "duration_s"), "outcome.duration_s is missing"),
        (RankMemory.from_json, _without(MEMORY, "pid"), "memory.pid is missing"),
        (StepRecord.from_json, _without(RECORD, "step"), "record.step is missing"),
        (StepRecord.from_json, _without(RECORD, "memory"), "record.memory is missing"),
        (KnobSpec.from_json, _without(KNOB, "name"), "knob.name is missing"),
        (JobShape.from_json, _without(SHAPE, "world_size"), "shape.world_size is missing"),
        (JobShape.from_json, _without(SHAPE, "knobs"), "shape.knobs is missing"),
        # wrong types
        (Action.from_json, _with(ACTION, step="5"), "action.step must be int, got str"),
        (Action.from_json, _with(ACTION, step=5.5), "action.step must be int, got float"),
        (Action.from_json, _with(ACTION, params=[1]), "action.params must be dict, got list"),
        (Action.from_json, _with(ACTION, kind=None), "action.kind must be str, got NoneType"),
        (Outcome.from_json, _with(OUTCOME, duration_s="0.5"), "outcome.duration_s must be int/float"),
        (Outcome.from_json, _with(OUTCOME, step=None), "outcome.step must be int"),
        (RankMemory.from_json, _with(MEMORY, peak_bytes=1.5e9), "memory.peak_bytes must be int, got float"),
        (RankMemory.from_json, _with(MEMORY, device=0), "memory.device must be str, got int"),
        (StepRecord.from_json, _with(RECORD, memory={}), "record.memory must be list, got dict"),
        (StepRecord.from_json, _with(RECORD, config=[]), "record.config must be dict, got list"),
        (StepRecord.from_json, _with(RECORD, loss="2.3"), "record.loss must be a number or null"),
        (StepRecord.from_json, _with(RECORD, lr=[0.1]), "record.lr must be a number or null"),
        (StepRecord.from_json, _with(RECORD, domain_loss={"web": "2"}), "record.domain_loss['web']"),
        (StepRecord.from_json, _with(RECORD, domain_loss=[1]), "record.domain_loss must be dict"),
        (StepRecord.from_json, _with(RECORD, memory=[_without(MEMORY, "rank")]), "memory.rank is missing"),
        (StepRecord.from_json, _with(RECORD, memory=[7]), "memory must be a JSON object, got int"),
        (KnobSpec.from_json, _with(KNOB, choices="1,2"), "knob.choices must be list, got str"),
        (JobShape.from_json, _with(SHAPE, knobs=[{"value": 1}]), "knob.name is missing"),
        (JobShape.from_json, _with(SHAPE, pids=4100), "shape.pids must be list, got int"),
        # a boolean is not a number on the wire
        (Action.from_json, _with(ACTION, step=True), "action.step must be a number, got a boolean"),
        (Outcome.from_json, _with(OUTCOME, duration_s=False), "outcome.duration_s must be a number"),
        (RankMemory.from_json, _with(MEMORY, used_bytes=True), "memory.used_bytes must be a number"),
        (StepRecord.from_json, _with(RECORD, time=True), "record.time must be a number, got a boolean"),
        (JobShape.from_json, _with(SHAPE, world_size=True), "shape.world_size must be a number"),
        # bad enumerations and shapes
        (Outcome.from_json, _with(OUTCOME, outcome="done"), "outcome.outcome must be one of applied"),
        (Outcome.from_json, _with(OUTCOME, outcome=1), "outcome.outcome must be str"),
        (Action.from_json, [ACTION], "action must be a JSON object, got list"),
        (Outcome.from_json, "applied", "outcome must be a JSON object, got str"),
        (StepRecord.from_json, None, "record must be a JSON object, got NoneType"),
        (JobShape.from_json, 3, "shape must be a JSON object, got int"),
    ],
)
def test_malformed_input_raises_protocol_error_naming_the_field(decode: Any, obj: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(obj)
    assert fragment in str(e.value)


def test_bad_outcome_lists_the_valid_ones() -> None:
    with pytest.raises(ProtocolError, match="'done'") as e:
        Outcome.from_json(_with(OUTCOME, outcome="done"))
    for name in OUTCOMES:
        assert name in str(e.value)


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


# Found while writing these tests: `_get` refuses a boolean where a number is expected ("bool
# is an int in Python; on the wire it is not"), but StepRecord's optional numbers (loss, lr,
# per-domain loss) and the version check use a bare isinstance/== and let `true` through as 1.
@pytest.mark.parametrize(
    ("decode", "obj", "fragment"),
    [
        (StepRecord.from_json, _with(RECORD, loss=True), "record.loss"),
        (StepRecord.from_json, _with(RECORD, lr=False), "record.lr"),
        (StepRecord.from_json, _with(RECORD, domain_loss={"web": True}), "record.domain_loss['web']"),
        (check_version, {"v": True}, "version"),
    ],
    ids=["loss", "lr", "domain_loss", "version"],
)
def test_a_boolean_is_not_a_number_anywhere(decode: Any, obj: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(obj)
    assert fragment in str(e.value)


# Found while writing these tests: a knob's minimum/maximum and the shape's pids are taken
# without a type check. A hello with `"minimum": "1"` is accepted, and later every decision
# on that knob dies in KnobSpec.accepts with a TypeError (str < int); `"pids": ["a"]` makes
# ProcfsSource.watch raise TypeError inside Controller.hello (a 500, not a 400).
@pytest.mark.parametrize(
    ("decode", "obj", "fragment"),
    [
        (KnobSpec.from_json, _with(KNOB, minimum="1"), "knob.minimum"),
        (KnobSpec.from_json, _with(KNOB, maximum=[8]), "knob.maximum"),
        (KnobSpec.from_json, _with(KNOB, minimum=True), "knob.minimum"),
        (JobShape.from_json, _with(SHAPE, pids=["4100"]), "shape.pids"),
    ],
    ids=["minimum-str", "maximum-list", "minimum-bool", "pids-str"],
)
def test_knob_bounds_and_pids_are_type_checked(decode: Any, obj: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(obj)
    assert fragment in str(e.value)


def test_null_bounds_are_fine() -> None:
    knob = KnobSpec.from_json(_with(KNOB, minimum=None, maximum=None))
    assert knob.minimum is None and knob.maximum is None


# --- the version check -------------------------------------------------------------------------


def test_check_version_accepts_this_version() -> None:
    msg = {"v": PROTOCOL_VERSION, "records": []}
    assert check_version(msg) is msg


@pytest.mark.parametrize("v", [PROTOCOL_VERSION + 1, 0, "1", None])
def test_check_version_refuses_another_version_and_says_what_to_do(v: Any) -> None:
    with pytest.raises(ProtocolError) as e:
        check_version({"v": v})
    msg = str(e.value)
    assert f"message version {v!r} is not supported" in msg
    assert f"v{PROTOCOL_VERSION}" in msg
    assert "same trainwarden version" in msg


def test_check_version_refuses_a_missing_version_and_a_non_object() -> None:
    with pytest.raises(ProtocolError, match="version None"):
        check_version({"records": []})
    with pytest.raises(ProtocolError, match="message must be a JSON object, got list"):
        check_version([PROTOCOL_VERSION])


# --- KnobSpec.accepts ---------------------------------------------------------------------------


def test_accepts_with_choices() -> None:
    knob = KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8))
    assert all(knob.accepts(v) for v in (1, 2, 4, 8))
    assert not knob.accepts(3)
    assert not knob.accepts(16)
    assert not knob.accepts("4")
    assert not knob.accepts(None)
    strings = KnobSpec("precision", "bf16", choices=("bf16", "fp16", "fp32"))
    assert strings.accepts("fp16")
    assert not strings.accepts("int8")


def test_accepts_with_minimum_and_maximum() -> None:
    knob = KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=1.0)
    assert knob.accepts(0.0) and knob.accepts(0.5) and knob.accepts(1.0) and knob.accepts(1)
    assert not knob.accepts(-0.01)
    assert not knob.accepts(1.01)
    assert not knob.accepts("0.5")
    assert not knob.accepts(None)
    assert not knob.accepts(True), "a boolean is not a number"
    lower_only = KnobSpec(KNOB_MICRO_BATCH, 4, minimum=1)
    assert lower_only.accepts(1_000_000)
    assert not lower_only.accepts(0)
    upper_only = KnobSpec(KNOB_MICRO_BATCH, 4, maximum=16)
    assert upper_only.accepts(-3)
    assert not upper_only.accepts(17)


def test_accepts_for_a_boolean_knob() -> None:
    knob = KnobSpec("activation_checkpointing", False)
    assert knob.accepts(True)
    assert knob.accepts(False)
    assert not knob.accepts("true")
    assert not knob.accepts(None)


def test_accepts_for_a_string_knob_without_choices() -> None:
    knob = KnobSpec("precision", "bf16")
    assert knob.accepts("fp16")
    assert not knob.accepts(None)


# Found while writing these tests: a number never reaches the type check, so a boolean or
# string knob without choices accepts any number (the controller would send {"value": 7} to an
# on/off switch).
def test_a_boolean_or_string_knob_refuses_numbers() -> None:
    switch = KnobSpec("activation_checkpointing", False)
    assert not switch.accepts(1)
    assert not switch.accepts(0.5)
    assert not KnobSpec("precision", "bf16").accepts(16)


# --- adapter events (what the job did on its own: an OOM retry) ------------------------------------


def oom_event(**over: Any) -> AdapterEvent:
    fields: dict[str, Any] = {
        "kind": "oom_retry",
        "step": 41,
        "changes": (("micro_batch_size", 8, 4),),
        "config": {KNOB_MICRO_BATCH: 4, "gradient_accumulation_steps": 4, "zero_stage": 2},
        "reason": "OutOfMemoryError in backward at step 42 (micro-step 2): CUDA out of memory",
        "duration_s": 1.25,
        "id": "ev-1",
    }
    fields.update(over)
    return AdapterEvent(**fields)


EVENT = oom_event().to_json()


def test_an_adapter_event_round_trips_and_rides_in_the_exchange() -> None:
    ev = oom_event(changes=(("zero_stage", 1, 2), ("offload_optimizer", False, True), ("x", None, "t")))
    assert AdapterEvent.from_json(wire(ev.to_json())) == ev
    assert ev.params() == {"zero_stage": 2, "offload_optimizer": True, "x": "t"}
    body = check_version(wire(exchange_message([], [], events=[ev, oom_event()])))
    assert events_of(body) == [ev, oom_event()]
    # Optional in v1: a message without events carries none, and one is not written without any.
    plain = check_version(wire(exchange_message([step_record()], [])))
    assert "events" not in plain and events_of(plain) == []
    assert (
        AdapterEvent("oom_retry", 1, (), {}, "r", 0.0).id != AdapterEvent("oom_retry", 1, (), {}, "r", 0.0).id
    )


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        (_without(EVENT, "kind"), "event.kind is missing"),
        (_with(EVENT, kind="reboot"), "event.kind must be one of oom_retry, budget_stop, got 'reboot'"),
        (_with(EVENT, kind=["oom_retry"]), "event.kind must be str"),
        (_with(EVENT, step=True), "event.step must be a number, got a boolean"),
        (_with(EVENT, step=-1), "event.step must be >= 0"),
        (_with(EVENT, step=2**63), "event.step is out of range"),
        (_with(EVENT, step=1.5), "event.step must be int"),
        (_with(EVENT, duration_s=float("nan")), "event.duration_s must be a finite number"),
        (_with(EVENT, duration_s=float("inf")), "event.duration_s must be a finite number"),
        (_with(EVENT, duration_s=-1), "event.duration_s must be a finite number >= 0"),
        (_with(EVENT, duration_s="1"), "event.duration_s must be int/float"),
        (_with(EVENT, reason=None), "event.reason must be str"),
        (_with(EVENT, reason="x" * 5000), "event.reason is longer than 4096"),
        (_with(EVENT, id=""), "event.id must be 1 to 128 characters"),
        (_with(EVENT, id="i" * 129), "event.id must be 1 to 128 characters"),
        (_with(EVENT, id=7), "event.id must be str"),
        (_with(EVENT, config=[1]), "event.config must be dict"),
        (_with(EVENT, changes={"micro_batch_size": 4}), "event.changes must be list"),
        (_with(EVENT, changes=[["micro_batch_size", 8, 4]]), "event.changes[0] must be a JSON object"),
        (_with(EVENT, changes=[{"from": 8, "to": 4}]), "event.changes[0].knob is missing"),
        (_with(EVENT, changes=[{"knob": "m", "from": [8], "to": 4}]), "event.changes[0].from must be a JSON"),
        (_with(EVENT, changes=[{"knob": "m", "from": 8, "to": {"v": 4}}]), "event.changes[0].to must be"),
        (_with(EVENT, changes=[{"knob": "m", "from": 8, "to": float("nan")}]), "event.changes[0].to"),
        (_with(EVENT, changes=[{"knob": "m", "from": 2**70, "to": 1}]), "event.changes[0].from"),
        (_with(EVENT, changes=[{"knob": "m", "from": 1, "to": 2}] * 17), "more than 16"),
        ("oom_retry", "event must be a JSON object, got str"),
    ],
)
def test_a_malformed_event_is_refused_naming_the_field(obj: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as e:
        AdapterEvent.from_json(wire(obj) if not isinstance(obj, str) else obj)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    ("events", "fragment"),
    [
        ({"e": EVENT}, "message.events must be a list, got dict"),
        ("[]", "message.events must be a list, got str"),
        ([EVENT] * 65, "one exchange carries at most 64"),
        ([EVENT, None], "event must be a JSON object, got NoneType"),
    ],
)
def test_a_malformed_events_list_is_refused(events: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError) as e:
        events_of({"v": PROTOCOL_VERSION, "records": [], "events": events})
    assert fragment in str(e.value)
