"""Strict loading of budget files: a good file becomes dataclasses, a bad one names line and fix."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainwarden.controller.protocol import KNOB_LR_MULTIPLIER, KNOB_MICRO_BATCH, Action
from trainwarden.controller.snapshot import Snapshot
from trainwarden.policies import base
from trainwarden.policies.base import PolicyKind, Range, param
from trainwarden.policies.loader import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    PolicyFileError,
    Problem,
    build_policies,
    load_policy_file,
    load_policy_text,
)
from trainwarden.policies.schema import Budget, ControllerSettings, Cost, MemoryCap, PolicyFile
from trainwarden.policies.validate import validate_main

if typing.TYPE_CHECKING:
    from decimal import Decimal as Rate

EXAMPLES = Path(__file__).resolve().parent.parent / "policies" / "examples"
GiB = 2**30


# --- two small policy kinds, registered only while a test runs --------------------------------


@dataclass(frozen=True)
class KnobAParams:
    high_water: float = param(0.9, valid=Range(0.5, 0.99), doc="Upper mark.")
    low_water: float = param(0.6, valid=Range(0.05, 0.95), doc="Lower mark.")
    patience: int = param(3, valid=Range(1, 100), doc="Steps to wait.")
    step_up: bool = param(True, doc="Step back up.")
    shape: str = param("linear", choices=("linear", "1-sqrt"), doc="Decay shape.")
    headroom_bytes: int = param(GiB, valid=Range(0, 2**40), doc="Room to keep free.")
    cooldown_s: float = param(60.0, valid=Range(0, 86400), doc="Wait after a change.")
    rungs: tuple[int, ...] = param((1, 2, 4), valid=Range(1, 1024), doc="Micro-batch sizes.")
    limit: float | None = param(None, doc="Optional limit.")

    def check(self) -> list[str]:
        if self.low_water >= self.high_water:
            return [f"low_water ({self.low_water}) must be below high_water ({self.high_water})"]
        return []


class KnobA(PolicyKind):
    kind = "test_knob_a"
    Params = KnobAParams
    knobs = frozenset({KNOB_MICRO_BATCH})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        return []


@dataclass(frozen=True)
class KnobBParams:
    rate: float = param(0.1, valid=Range(0.0, 1.0), doc="A rate.")


class KnobB(PolicyKind):
    kind = "test_knob_b"
    Params = KnobBParams
    knobs = frozenset({KNOB_MICRO_BATCH, KNOB_LR_MULTIPLIER})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        return []


@dataclass(frozen=True)
class KnobCParams:
    pass


class KnobC(PolicyKind):
    kind = "test_knob_c"
    Params = KnobCParams
    knobs = frozenset()

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        return []


@pytest.fixture(autouse=True)
def test_kinds() -> Iterator[None]:
    """Register the test kinds for one test, and take them out again after it."""
    added = []
    for cls in (KnobA, KnobB, KnobC):
        if cls.kind not in base.KINDS:
            base.register(cls)
            added.append(cls.kind)
    yield
    for kind in added:
        base.KINDS.pop(kind, None)


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> list[Problem]:
    path = write(tmp_path, text)
    with pytest.raises(PolicyFileError) as e:
        load_policy_file(path)
    assert e.value.problems, "a refused file has at least one problem"
    assert str(e.value) == "\n".join(str(p) for p in e.value.problems)
    return e.value.problems


# --- a good file ------------------------------------------------------------------------------

GOOD = """\
# A full budget file: every section, every unit.
version: 1
budget:
  device_memory: 24GiB
  wall_time: 1h30m
  tokens: 50M
  flops: 3e18
  cost: {max: 100, per_device_hour: 2.5}
controller:
  sync_every: 4
  decide_interval_s: 0.5
policies:
  - kind: test_knob_a
    name: fit
    high_water: 0.85
    low_water: 0.5
    patience: 10
    step_up: false
    shape: 1-sqrt
    headroom_bytes: 2GiB
    cooldown_s: 10m
    rungs: [1, 2, 8]
    limit: 3
  - kind: test_knob_b
    name: lr
    rate: 0
"""


def test_a_full_file_round_trips_into_the_dataclasses(tmp_path: Path) -> None:
    # Two kinds that share a knob cannot be in one file: load them in two.
    text = GOOD.replace("  - kind: test_knob_b\n    name: lr\n    rate: 0\n", "")
    path = write(tmp_path, text)
    pf = load_policy_file(path)
    assert pf == PolicyFile(
        path=str(path),
        version=1,
        budget=Budget(
            device_memory=MemoryCap(bytes=24 * GiB),
            wall_time_s=5400.0,
            tokens=50_000_000,
            flops=3e18,
            cost=Cost(max=100.0, per_device_hour=2.5),
        ),
        controller=ControllerSettings(sync_every=4, decide_interval_s=0.5),
        policies=pf.policies,
    )
    (spec,) = pf.policies
    assert (spec.name, spec.kind, spec.line) == ("fit", "test_knob_a", 13)
    assert spec.params == KnobAParams(
        high_water=0.85,
        low_water=0.5,
        patience=10,
        step_up=False,
        shape="1-sqrt",
        headroom_bytes=2 * GiB,
        cooldown_s=600.0,
        rungs=(1, 2, 8),
        limit=3.0,
    )
    assert isinstance(pf.budget.cost.max, float)  # type: ignore[union-attr]
    assert isinstance(spec.params.limit, float)
    policies = build_policies(pf)
    assert [type(p) for p in policies] == [KnobA]
    assert policies[0].name == "fit" and policies[0].params is spec.params


def test_defaults_fill_what_the_file_leaves_out() -> None:
    pf = load_policy_text("version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n")
    assert pf.path == "<string>"
    assert pf.budget == Budget()
    assert pf.controller == ControllerSettings()
    (spec,) = pf.policies
    assert spec.name == "test_knob_a"
    assert spec.params == KnobAParams()


def test_fractions_and_yaml_1_2_scalars() -> None:
    text = (
        "version: 1\n"
        "budget:\n  device_memory: 0.9\n  tokens: 2e9\n  flops: 5P\n  wall_time: 45\n"
        "controller: {decide_interval_s: 250ms}\n"
        "policies: []\n"
    )
    pf = load_policy_text(text)
    assert pf.budget.device_memory == MemoryCap(fraction=0.9)
    assert pf.budget.tokens == 2_000_000_000 and isinstance(pf.budget.tokens, int)
    assert pf.budget.flops == 5e15
    assert pf.budget.wall_time_s == 45.0
    assert pf.controller.decide_interval_s == 0.25
    assert pf.policies == ()


def test_empty_sections_mean_nothing_set() -> None:
    pf = load_policy_text("version: 1\nbudget:\ncontroller:\npolicies:\n")
    assert (pf.budget, pf.controller, pf.policies) == (Budget(), ControllerSettings(), ())


def test_a_file_without_policies_needs_no_kinds() -> None:
    assert build_policies(load_policy_text("version: 1\nbudget: {tokens: 1k}\n")) == []


# --- bad files: each problem with its line and its fix ------------------------------------------

# (name, file text, line, key, message fragments)
BAD: list[tuple[str, str, int, str, list[str]]] = [
    (
        "unknown top key",
        "version: 1\nbudget: {}\ncontroler:\n  sync_every: 2\n",
        3,
        "controler",
        [
            "unknown key 'controler'; did you mean 'controller'? "
            "Valid keys: version, budget, controller, policies"
        ],
    ),
    (
        "unknown budget key",
        "version: 1\nbudget:\n  tokens: 5M\n  wall_tim: 1h\n",
        4,
        "budget.wall_tim",
        ["unknown budget key 'wall_tim'; did you mean 'wall_time'?", "device_memory, wall_time, tokens"],
    ),
    (
        "wrong version",
        "version: 2\nbudget: {}\n",
        1,
        "version",
        ["2 is not supported; this trainwarden reads version 1: write `version: 1`"],
    ),
    (
        "version as text",
        "version: '1'\nbudget: {}\n",
        1,
        "version",
        ["must be the number 1, got the text '1'"],
    ),
    ("missing version", "budget: {}\n", 1, "version", ["missing; put `version: 1` at the top of the file"]),
    ("missing budget", "version: 1\n", 1, "budget", ["missing; add a `budget:` section"]),
    (
        "size with a space",
        "version: 1\nbudget:\n  wall_time: 1h\n  device_memory: 24 GB\n",
        4,
        "budget.device_memory",
        ["'24 GB' is not a size; write 24GiB for bytes or 0.9 for a fraction of the device"],
    ),
    (
        "unknown size unit",
        "version: 1\nbudget:\n  device_memory: 24XB\n",
        3,
        "budget.device_memory",
        ["'24XB' has an unknown unit 'XB'"],
    ),
    (
        "fraction over 1",
        "version: 1\nbudget:\n  device_memory: 1.5\n",
        3,
        "budget.device_memory",
        ["1.5 has no unit, and a bare number is a fraction of the device in (0, 1]", "write 24GiB"],
    ),
    (
        "negative wall time",
        "version: 1\nbudget:\n  wall_time: -90m\n",
        3,
        "budget.wall_time",
        ["'-90m' is not a duration: it must be positive", "write 30s, 90m, 6h"],
    ),
    (
        "count with a lower-case m",
        "version: 1\nbudget:\n  tokens: 50m\n",
        3,
        "budget.tokens",
        ["'50m' has an unknown suffix 'm' (did you mean 50M?)"],
    ),
    (
        "cost without a price",
        "version: 1\nbudget:\n  cost:\n    max: 100\n",
        4,
        "budget.cost.per_device_hour",
        ["missing; a cost budget needs `max` and `per_device_hour`"],
    ),
    (
        "controller sync_every 0",
        "version: 1\nbudget: {}\ncontroller:\n  sync_every: 0\n",
        4,
        "controller.sync_every",
        ["0 is out of range: it must be at least 1"],
    ),
    (
        "duplicate key",
        "version: 1\nbudget:\n  tokens: 5M\n  wall_time: 1h\n  tokens: 6M\n",
        5,
        "budget.tokens",
        ["key 'tokens' appears twice (lines 3 and 5)"],
    ),
    (
        "python object tag",
        "version: 1\nbudget:\n  tokens: !!python/object/apply:os.system ['true']\n",
        3,
        "budget.tokens",
        ["tag !!python/object/apply:os.system is not allowed", "nothing in it is ever executed"],
    ),
    (
        "custom tag",
        "version: 1\nbudget: !include other.yaml\n",
        2,
        "budget",
        ["tag !include is not allowed"],
    ),
    (
        "alias",
        "version: 1\nbudget: &b\n  tokens: 5M\ncontroller: *b\n",
        4,
        "",
        ["alias '*b' is not allowed: a policy file has no anchors or aliases; write the value out in full"],
    ),
    (
        "yaml syntax error",
        "version: 1\nbudget:\n  tokens: [5M, 6M\n",
        3,
        "",
        ["YAML syntax error", "expected ',' or ']'"],
    ),
    (
        "bad indentation",
        "version: 1\nbudget:\n  tokens: 5M\n wall_time: 1h\n",
        4,
        "",
        ["YAML syntax error"],
    ),
    (
        "two documents",
        "version: 1\nbudget: {}\n---\nversion: 1\n",
        3,
        "",
        ["more than one YAML document"],
    ),
    (
        "unknown policy kind",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_nob_a\n",
        4,
        "policies[0].kind",
        ["unknown policy kind 'test_nob_a'; did you mean 'test_knob_a'?", "Known kinds: ", "test_knob_b"],
    ),
    (
        "policy without kind",
        "version: 1\nbudget: {}\npolicies:\n  - name: x\n",
        4,
        "policies[0].kind",
        ["missing; every policy needs `kind:`, one of: ", "test_knob_a"],
    ),
    (
        "unknown param",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    hi_water: 0.8\n",
        5,
        "policies[0].hi_water",
        [
            "unknown parameter 'hi_water' for kind 'test_knob_a'; did you mean 'high_water'? "
            "Parameters of kind 'test_knob_a': high_water, low_water, patience"
        ],
    ),
    (
        "param out of range",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    high_water: 1.5\n",
        5,
        "policies[0].high_water",
        ["1.5 is outside the valid range: 0.5 to 0.99"],
    ),
    (
        "bool for an int param",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    patience: true\n",
        5,
        "policies[0].patience",
        ["expected a whole number (like 8), got the boolean true"],
    ),
    (
        "float for an int param",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    patience: 2.5\n",
        5,
        "policies[0].patience",
        ["expected a whole number (like 8), got the number 2.5"],
    ),
    (
        "yaml 1.1 yes is text",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    step_up: yes\n",
        5,
        "policies[0].step_up",
        ["expected true or false, got the text 'yes'"],
    ),
    (
        "not one of the choices",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    shape: off\n",
        5,
        "policies[0].shape",
        ["'off' is not one of the choices: 'linear', '1-sqrt'"],
    ),
    (
        "a list element out of range",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    rungs: [1, 2,\n      4096]\n",
        6,
        "policies[0].rungs[2]",
        ["4096 is outside the valid range: 1 to 1024"],
    ),
    (
        "bad size in a _bytes param",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    headroom_bytes: 2G\n",
        5,
        "policies[0].headroom_bytes",
        ["'2G' is ambiguous: write 2GiB (binary, 2^n) or 2GB (decimal, 10^n)"],
    ),
    (
        "cross-field check",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    low_water: 0.9\n    high_water: 0.8\n",
        4,
        "policies[0]",
        ["low_water (0.9) must be below high_water (0.8)"],
    ),
    (
        "two policies own one knob",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    name: a\n"
        "  - kind: test_knob_b\n    name: b\n",
        6,
        "policies[1]",
        [
            "knob 'micro_batch_size' is owned by both policies 'a' (line 4) and 'b' (line 6); "
            "give each knob to one policy"
        ],
    ),
    (
        "duplicate policy names",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_b\n    name: p\n"
        "  - kind: test_knob_c\n    name: p\n",
        6,
        "policies[1].name",
        ["policy name 'p' is used twice (lines 4 and 6); give each policy its own `name:`"],
    ),
    (
        "one kind twice without names",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_c\n  - kind: test_knob_c\n",
        5,
        "policies[1].name",
        ["policy name 'test_knob_c' is used twice (lines 4 and 5) (a policy without `name:` is named after"],
    ),
    (
        "one kind with knobs twice",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_b\n  - kind: test_knob_b\n",
        5,
        "policies[1]",
        [
            "policy kind 'test_knob_b' is used twice (lines 4 and 5) and both would set its "
            "knobs 'lr_multiplier' and 'micro_batch_size'; keep one of them"
        ],
    ),
    (
        "bad policy name",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_b\n    name: my policy\n",
        5,
        "policies[0].name",
        ["must be a word of letters, digits, '_', '-' or '.', got the text 'my policy'"],
    ),
    (
        "policies not a list",
        "version: 1\nbudget: {}\npolicies:\n  kind: test_knob_a\n",
        4,
        "policies",
        ["must be a list of policies (lines starting `- kind: ...`), got a mapping"],
    ),
    (
        "not a mapping at the top",
        "- version: 1\n- budget: {}\n",
        1,
        "",
        ["the file must be a mapping with the keys version, budget, controller, policies; got a list"],
    ),
    (
        "empty file",
        "# only a comment\n",
        1,
        "",
        ["the file is empty; a policy file needs at least `version: 1` and `budget:`"],
    ),
    (
        "deep nesting",
        "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n    rungs: " + "[" * 40 + "]" * 40 + "\n",
        5,
        "",
        [f"nested deeper than {MAX_DEPTH} levels"],
    ),
]


@pytest.mark.parametrize(("text", "line", "key", "fragments"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_bad_file_names_line_key_and_fix(
    tmp_path: Path, text: str, line: int, key: str, fragments: list[str]
) -> None:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, "\n".join(map(str, problems))
    (problem,) = problems
    assert (problem.file, problem.line, problem.key) == (str(tmp_path / "job.yaml"), line, key)
    for fragment in fragments:
        assert fragment in problem.message
    where = f"{tmp_path / 'job.yaml'}:{line}: "
    assert str(problem) == where + (f"{key}: " if key else "") + problem.message


def test_the_message_reads_file_line_key_message() -> None:
    with pytest.raises(PolicyFileError) as e:
        load_policy_text("version: 1\nbudget:\n  device_memory: 24 GB\n", "demo.yaml")
    assert str(e.value) == (
        "demo.yaml:3: budget.device_memory: '24 GB' is not a size; "
        "write 24GiB for bytes or 0.9 for a fraction of the device"
    )


def test_every_problem_of_a_file_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    text = (
        "version: 3\n"  # 1
        "budget:\n"  # 2
        "  device_memory: 40\n"  # 3
        "  wall_time: soon\n"  # 4
        "  tokens: -5M\n"  # 5
        "controller:\n"  # 6
        "  sync_every: fast\n"  # 7
        "policies:\n"  # 8
        "  - kind: test_knob_a\n"  # 9
        "    high_water: 2\n"  # 10
        "    patience: 0\n"  # 11
        "    colour: red\n"  # 12
        "extra: 1\n"  # 13
    )
    problems = problems_of(tmp_path, text)
    assert [(p.line, p.key) for p in problems] == [
        (1, "version"),
        (3, "budget.device_memory"),
        (4, "budget.wall_time"),
        (5, "budget.tokens"),
        (7, "controller.sync_every"),
        (10, "policies[0].high_water"),
        (11, "policies[0].patience"),
        (12, "policies[0].colour"),
        (13, "extra"),
    ]
    assert "expected a whole number, got the text 'fast'" in problems[4].message


def test_an_oversized_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("version: 1\nbudget: {}\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(PolicyFileError) as e:
        load_policy_file(path)
    (problem,) = e.value.problems
    assert problem.line == 0
    assert "over the 1 MiB a policy file may have" in problem.message
    assert str(problem).startswith(f"{path}: file is 1.0 MiB")
    with pytest.raises(PolicyFileError, match="over the 1 MiB"):
        load_policy_text(path.read_text(), str(path))


def test_nothing_in_a_file_is_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    text = f"version: 1\nbudget:\n  tokens: !!python/object/apply:os.system ['touch {marker}']\n"
    problems = problems_of(tmp_path, text)
    assert problems[0].line == 3
    assert not marker.exists()


def test_an_alias_bomb_is_refused_at_the_first_alias(tmp_path: Path) -> None:
    lines = ["version: 1", "budget: {}", "a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    problems = problems_of(tmp_path, "\n".join(lines) + "\n")
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [(4, "alias '*a' is not allowed")]


def test_problems_in_files_that_cannot_be_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyFileError) as e:
        load_policy_file(missing)
    assert [str(p) for p in e.value.problems] == [f"{missing}: file not found"]

    with pytest.raises(PolicyFileError) as e:
        load_policy_file(tmp_path)
    assert e.value.problems[0].message == "is a directory, not a policy file"

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"version: 1\nbudget: {}\n# caf\xe9\n")
    with pytest.raises(PolicyFileError) as e:
        load_policy_file(latin1)
    assert (e.value.problems[0].line, e.value.problems[0].message) == (
        3,
        "not UTF-8 text; save the file as UTF-8",
    )


def test_a_param_check_that_raises_in_the_constructor_becomes_a_problem() -> None:
    @dataclass(frozen=True)
    class StrictParams:
        n: int = param(1)

        def __post_init__(self) -> None:
            if self.n == 13:
                raise ValueError("n must not be 13")

    class Strict(PolicyKind):
        kind = "test_strict"
        Params = StrictParams
        knobs = frozenset({"test_only"})

        def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
            return []

    base.register(Strict)
    try:
        with pytest.raises(PolicyFileError) as e:
            load_policy_text(
                "version: 1\nbudget: {}\npolicies:\n  - kind: test_strict\n    n: 13\n", "s.yaml"
            )
        assert [str(p) for p in e.value.problems] == ["s.yaml:4: policies[0]: n must not be 13"]
    finally:
        base.KINDS.pop("test_strict")


@dataclass(frozen=True)
class UnresolvedParams:
    # `Rate` exists only for type checkers: typing.get_type_hints fails at run time.
    rate: Rate = param(0.5, valid=Range(0.0, 1.0))  # noqa: RUF009


class Unresolved(PolicyKind):
    kind = "test_unresolved"
    Params = UnresolvedParams
    knobs = frozenset({"test_only"})

    def decide(self, snapshot: Snapshot, budget: Budget) -> list[Action]:
        return []


def test_fields_without_resolvable_hints_use_the_default_type() -> None:
    with pytest.raises(NameError):
        typing.get_type_hints(UnresolvedParams)
    base.register(Unresolved)
    try:
        text = "version: 1\nbudget: {}\npolicies:\n  - kind: test_unresolved\n    rate: RATE\n"
        pf = load_policy_text(text.replace("RATE", "1"))
        assert pf.policies[0].params.rate == 1.0 and isinstance(pf.policies[0].params.rate, float)
        with pytest.raises(PolicyFileError, match=r"expected a number \(like 0.5\), got the text 'x'"):
            load_policy_text(text.replace("RATE", "x"))
        with pytest.raises(PolicyFileError, match="2 is outside the valid range: 0 to 1"):
            load_policy_text(text.replace("RATE", "2"))
    finally:
        base.KINDS.pop(Unresolved.kind)


# --- validate ---------------------------------------------------------------------------------


def test_validate_main_says_ok_for_good_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "version: 1\nbudget: {}\npolicies:\n  - kind: test_knob_a\n", "a.yaml")
    b = write(tmp_path, "version: 1\nbudget: {tokens: 5M}\n", "b.yaml")
    assert validate_main([str(a), str(b)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"OK  {a} (1 policy: test_knob_a)", f"OK  {b} (0 policies)"]
    assert err == ""


def test_validate_main_prints_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, "version: 1\nbudget: {}\n", "good.yaml")
    bad = write(tmp_path, "version: 1\nbudget:\n  device_memory: 24 GB\n  tokens: 5x\n", "bad.yaml")
    missing = tmp_path / "missing.yaml"
    assert validate_main([str(good), str(bad), str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"OK  {good} (0 policies)"]
    lines = err.splitlines()
    assert lines[0].startswith(f"{bad}:3: budget.device_memory: '24 GB' is not a size")
    assert lines[1].startswith(f"{bad}:4: budget.tokens: '5x' has an unknown suffix 'x'")
    assert lines[2] == f"{missing}: file not found"
    assert len(lines) == 3
    assert "Traceback" not in err


def test_validate_main_without_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_main([]) == 2
    assert "give one or more policy files" in capsys.readouterr().err


def test_validate_main_never_prints_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for text in ["", "\t\n", "[", "version: 1\nbudget: {}\npolicies: [1, [2], {kind: 3}]\n", "? [a]\n: 1\n"]:
        path = write(tmp_path, text, "odd.yaml")
        assert validate_main([str(path)]) == 1
        _, err = capsys.readouterr()
        assert err.startswith(f"{path}:") and "Traceback" not in err


# --- the shipped examples -----------------------------------------------------------------------


def test_every_example_policy_file_validates(capsys: pytest.CaptureFixture[str]) -> None:
    examples = sorted(EXAMPLES.glob("*.yaml"))
    if not examples:
        pytest.skip(f"no example policy files in {EXAMPLES} yet")
    assert validate_main([str(p) for p in examples]) == 0, capsys.readouterr().err
    for path in examples:
        pf = load_policy_file(path)
        assert len(build_policies(pf)) == len(pf.policies)
