"""The data knobs on the wire (controller/protocol.py): `domain_weights` is checked strictly."""

from __future__ import annotations

import json
import math

import pytest

from trainwarden.controller.protocol import (
    KNOB_DOMAIN_WEIGHTS,
    Action,
    KnobSpec,
    StepRecord,
    domain_weights_problem,
)

SPEC = KnobSpec(KNOB_DOMAIN_WEIGHTS, {"code": 0.5, "text": 0.5})


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([0.5, 0.5], "must be a mapping"),
        ({}, "is empty"),
        ({"code": 1, "prose": 1}, "unknown domain 'prose'"),
        ({"code": -0.1, "text": 1}, "finite number >= 0"),
        ({"code": math.nan}, "finite number >= 0"),
        ({"code": math.inf}, "finite number >= 0"),
        ({"code": True}, "finite number >= 0"),
        ({"code": "1"}, "finite number >= 0"),
        ({"code": 0, "text": 0}, "positive sum"),
    ],
)
def test_bad_domain_weights_are_refused_with_the_reason(value: object, words: str) -> None:
    problem = domain_weights_problem(value, ["code", "text"])
    assert problem is not None and words in problem
    assert not SPEC.accepts(value)


def test_good_domain_weights_cross_the_wire_unchanged() -> None:
    value = {"code": 0.25, "text": 0.75}
    assert domain_weights_problem(value, ["code", "text"]) is None and SPEC.accepts(value)
    assert SPEC.accepts({"code": 1})  # a domain left out gets 0
    a = Action(kind=KNOB_DOMAIN_WEIGHTS, params={"value": value, "state": {"step": 3}}, reason="r", step=4)
    back = Action.from_json(json.loads(json.dumps(a.to_json())))
    assert back == a
    spec = KnobSpec.from_json(json.loads(json.dumps(SPEC.to_json())))
    assert spec.value == SPEC.value and spec.accepts(value)


def test_a_record_s_config_carries_the_weights_and_policy_state() -> None:
    config = {KNOB_DOMAIN_WEIGHTS: {"code": 0.3, "text": 0.7}, "data_state": {"domain_weights": {"step": 8}}}
    rec = StepRecord(8, 1.0, 2.0, 16, 512, 0.1, 1e-3, config, (), {"code": 2.1, "text": 2.4})
    back = StepRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert back.config == config and back.domain_loss == {"code": 2.1, "text": 2.4}
