"""Hostile and broken budget files: every outcome is a PolicyFile or a clear PolicyFileError.

Property-based (hypothesis): generated documents close to real ones, and the example files
with random damage, go through `load_policy_text`. Whatever comes in, the loader answers
with a `PolicyFile` or a `PolicyFileError` whose every problem names a line and says what is
wrong, quickly, and never runs anything. Objects-constructing tags, huge and deeply nested
documents and alias bombs are tried one by one below.

Under `CI=true` the examples are derandomized (the same inputs on every run); elsewhere each
run explores new ones. No example database is kept (hypothesis's own caches go to
.hypothesis/, which carries its own .gitignore).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import signal
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from trainwarden.policies import base
from trainwarden.policies.loader import MAX_DEPTH, MAX_FILE_BYTES, PolicyFileError, load_policy_file
from trainwarden.policies.loader import load_policy_text as _load_policy_text
from trainwarden.policies.schema import Budget, ControllerSettings, Cost, MemoryCap, PolicyFile

EXAMPLES = Path(__file__).resolve().parent.parent / "policies" / "examples"
EXAMPLE_TEXTS = [p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.yaml"))]
NAME = "fuzz.yaml"

CI = os.environ.get("CI", "").lower() == "true"


def fuzz_settings(examples: int) -> settings:
    """Sized so the whole module runs in well under 30 s on two shared cores."""
    return settings(
        max_examples=examples,
        deadline=None,  # each test bounds its own time per load, with a clear message
        derandomize=CI,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- the property every outcome must have ---------------------------------------------------


class TooSlow(BaseException):
    """Raised by SIGPROF inside the loader; a BaseException so no `except Exception` eats it."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Fail (not hang) when the block uses more than `seconds` of CPU.

    CPU time (ITIMER_PROF), not wall time: the loader only computes, and CPU time does not
    grow when other jobs share the machine's cores, so the bound is not flaky under load."""

    def expire(signum: int, frame: Any) -> None:
        # Raised inside a gc callback (hypothesis installs one) the exception is swallowed as
        # "unraisable": fire again soon, until it lands in the loader's own frames.
        signal.setitimer(signal.ITIMER_PROF, 0.02)
        raise TooSlow(f"{what} took more than {seconds} s of CPU")

    old = signal.signal(signal.SIGPROF, expire)
    collecting = gc.isenabled()
    gc.disable()  # no gc callbacks inside the block, so the signal lands in the loader
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
        if collecting:
            gc.enable()


def whole_file(message: str) -> bool:
    """Problems about the file as a whole, the only ones that may have line 0."""
    return "over the 1 MiB" in message


def load(text: str, limit_s: float = 1.0) -> PolicyFile | PolicyFileError:
    """Load `text`; return the PolicyFile or the PolicyFileError after checking its problems.

    Any other exception propagates and fails the test: that is the property."""
    started = time.process_time()
    try:
        with time_limit(limit_s, f"loading a {len(text)}-character document"):
            try:
                pf = _load_policy_text(text, NAME)
            except PolicyFileError as e:
                err = e
            else:
                err = None
    except TooSlow as e:
        pytest.fail(str(e))
    assert time.process_time() - started < limit_s
    if err is None:
        assert isinstance(pf, PolicyFile)
        check_usable(pf)
        return pf
    check_error(err, text)
    return err


def check_error(err: PolicyFileError, text: str) -> None:
    assert err.problems, "a refused file has at least one problem"
    # The YAML reader counts \r, \x85, \u2028 and \u2029 as line breaks too: splitlines() agrees.
    last_line = max(len(text.splitlines()), 1)
    for p in err.problems:
        shown = str(p)
        assert isinstance(p.line, int) and not isinstance(p.line, bool)
        assert p.file == NAME
        assert isinstance(p.message, str) and p.message.strip(), f"empty message: {shown!r}"
        if p.line == 0:
            assert whole_file(p.message), f"a problem without a line is not about the whole file: {shown!r}"
        else:
            assert 1 <= p.line <= last_line + 1, f"line {p.line} of a {last_line}-line file: {shown!r}"
            assert shown.startswith(f"{NAME}:{p.line}: "), shown
    assert str(err) == "\n".join(str(p) for p in err.problems)
    assert [p.line for p in err.problems] == sorted(p.line for p in err.problems)


def _fits_int64(n: int) -> bool:
    return -(2**63) <= n < 2**63


def check_usable(pf: PolicyFile) -> None:
    """What a file is allowed to say must be usable by the controller: every number finite and
    convertible to a float, every count positive and within 64 bits."""
    assert pf.version == 1
    b = pf.budget
    if b.device_memory is not None:
        cap = b.device_memory
        assert (cap.bytes is None) != (cap.fraction is None)
        if cap.bytes is not None:
            assert cap.bytes > 0 and _fits_int64(cap.bytes), cap
        else:
            assert cap.fraction is not None and 0 < cap.fraction <= 1, cap
    for name in ("wall_time_s", "flops"):
        value = getattr(b, name)
        if value is not None:
            assert math.isfinite(value) and value > 0, f"budget.{name} = {value!r}"
    if b.tokens is not None:
        assert b.tokens > 0 and _fits_int64(b.tokens), f"budget.tokens = {b.tokens!r}"
        assert math.isfinite(float(b.tokens))
    if b.cost is not None:
        for value in (b.cost.max, b.cost.per_device_hour):
            assert math.isfinite(value) and value > 0, f"budget.cost = {b.cost!r}"
    c = pf.controller
    assert c.sync_every >= 1 and _fits_int64(c.sync_every), f"controller.sync_every = {c.sync_every!r}"
    assert math.isfinite(c.decide_interval_s) and c.decide_interval_s > 0, c
    kinds = base.kinds()
    for spec in pf.policies:
        assert isinstance(spec.params, kinds[spec.kind].Params)
        assert spec.line >= 1


# --- generated documents ----------------------------------------------------------------------


class _NoAliasDumper(yaml.SafeDumper):
    """safe_dump writes an anchor and alias for an object used twice; a generated document
    must not contain one by accident (aliases are tried on purpose elsewhere)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(doc: Any, flow: bool | None, unicode: bool) -> str:
    return yaml.dump(
        doc, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=flow, allow_unicode=unicode
    )


BINARY = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
DECIMAL = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
COUNTS = {"k": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}

junk_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, 10**400, -(10**400), 16**300]),  # past int64, past a float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            "off",
            "yes",
            "~",
            "null",
            ".nan",
            "-.inf",
            "0x1F",
            "0o17",
            "1_000",
            "24 GiB",
            "24G",
            "24GB2",
            "-1GiB",
            "1h30",
            "30m1h",
            "1e999999999",
            "1e-999999999",
            "9" * 60,
            "1e400",
            "0x" + "f" * 300,
            "0",
            "-0",
            "é",
            "\u2028",
        ]
    ),
)
junk = st.recursive(
    junk_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def valid_memory_cap(draw: st.DrawFn) -> tuple[Any, MemoryCap]:
    if draw(st.booleans()):
        n = draw(st.integers(1, 4096))
        unit, factor = draw(st.sampled_from(sorted({**BINARY, **DECIMAL}.items())))
        return f"{n}{unit}", MemoryCap(bytes=n * factor)
    fraction = draw(st.floats(min_value=1e-6, max_value=1.0))
    return fraction, MemoryCap(fraction=fraction)


@st.composite
def valid_duration(draw: st.DrawFn) -> tuple[Any, float]:
    how = draw(st.sampled_from(["unit", "hm", "number"]))
    if how == "unit":
        n = draw(st.integers(1, 10_000))
        unit, factor = draw(st.sampled_from(sorted(DURATIONS.items())))
        return f"{n}{unit}", float(n * factor)
    if how == "hm":
        h, m = draw(st.integers(1, 48)), draw(st.integers(1, 59))
        return f"{h}h{m}m", float(h * 3600 + m * 60)
    seconds = draw(st.floats(min_value=0.001, max_value=1e7))
    return seconds, seconds


@st.composite
def valid_count(draw: st.DrawFn) -> tuple[Any, int]:
    if draw(st.booleans()):
        n = draw(st.integers(1, 10**15))
        return n, n
    n = draw(st.integers(1, 999))
    suffix, factor = draw(st.sampled_from(sorted(COUNTS.items())))
    return f"{n}{suffix}", n * factor


@st.composite
def valid_flops(draw: st.DrawFn) -> tuple[Any, float]:
    mantissa, exponent = draw(st.integers(1, 9)), draw(st.integers(10, 24))
    return f"{mantissa}e{exponent}", float(f"{mantissa}e{exponent}")


positive = st.floats(min_value=0.01, max_value=1e9)


@st.composite
def valid_budget(draw: st.DrawFn) -> tuple[dict[str, Any], Budget]:
    doc: dict[str, Any] = {}
    want: dict[str, Any] = {}
    for key, attr, strategy in (
        ("device_memory", "device_memory", valid_memory_cap()),
        ("wall_time", "wall_time_s", valid_duration()),
        ("tokens", "tokens", valid_count()),
        ("flops", "flops", valid_flops()),
    ):
        if draw(st.booleans()):
            doc[key], want[attr] = draw(strategy)
    if draw(st.booleans()):
        top, price = draw(positive), draw(positive)
        doc["cost"] = {"max": top, "per_device_hour": price}
        want["cost"] = Cost(max=top, per_device_hour=price)
    return doc, Budget(**want)


@st.composite
def valid_controller(draw: st.DrawFn) -> tuple[dict[str, Any], ControllerSettings]:
    doc: dict[str, Any] = {}
    want: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["sync_every"] = want["sync_every"] = draw(st.integers(1, 10_000))
    if draw(st.booleans()):
        doc["decide_interval_s"], want["decide_interval_s"] = draw(valid_duration())
    return doc, ControllerSettings(**want)


def _fields(params: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(params)
    return [(f, hints.get(f.name, Any)) for f in dataclasses.fields(params) if f.init]


def valid_value(f: dataclasses.Field[Any], hint: Any) -> st.SearchStrategy[Any]:
    """A value the field accepts: inside its valid range, one of its choices."""
    choices = f.metadata.get("choices") or ()
    valid = f.metadata.get("valid")
    if choices:
        return st.sampled_from(list(choices))
    if hint is bool:
        return st.booleans()
    if hint is int:
        low = int(max(valid.low, -(10**9))) if valid else -(10**9)
        high = int(min(valid.high, 10**9)) if valid else 10**9
        return st.integers(low, high)
    if hint is float:
        low = max(valid.low, -1e9) if valid else -1e9
        high = min(valid.high, 1e9) if valid else 1e9
        return st.floats(min_value=low, max_value=high)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1 and arms[0] in (bool, int, float, str):
            return st.none() | valid_value(f, arms[0])
    return st.just(f.default)


def near_value(f: dataclasses.Field[Any], hint: Any) -> st.SearchStrategy[Any]:
    """A value around the field's valid range: just inside, just outside, or the wrong type."""
    valid = f.metadata.get("valid")
    around: list[st.SearchStrategy[Any]] = [valid_value(f, hint), junk]
    if valid is not None and math.isfinite(valid.low) and math.isfinite(valid.high):
        span = max(valid.high - valid.low, 1.0)
        around.append(st.floats(min_value=valid.low - span, max_value=valid.high + span))
        around.append(st.integers(int(valid.low - span), int(valid.high + span)))
        around.append(st.sampled_from([valid.low, valid.high, -valid.high, valid.high * 1000]))
    if f.name.endswith("_bytes"):
        around.append(st.sampled_from(["2GiB", "2G", "2 GiB", "-2GiB"]))
    if f.name.endswith("_s"):
        around.append(st.sampled_from(["10m", "-10m", "1h30m", "10"]))
    return st.one_of(around)


@st.composite
def valid_policies(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[str, str, Any]]]:
    """Policies whose kinds own disjoint knobs, each with valid parameters."""
    registry = base.kinds()
    order = draw(st.permutations(sorted(registry)))
    owned: set[str] = set()
    doc: list[dict[str, Any]] = []
    want: list[tuple[str, str, Any]] = []
    for kind in order[: draw(st.integers(0, len(order)))]:
        cls = registry[kind]
        if owned & set(cls.knobs):
            continue
        owned |= set(cls.knobs)
        item: dict[str, Any] = {"kind": kind}
        name = kind
        if draw(st.booleans()):
            name = draw(st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True))
            assume(name not in {w[0] for w in want})
            item["name"] = name
        values = {}
        for f, hint in _fields(cls.Params):
            if draw(st.booleans()):
                values[f.name] = item[f.name] = draw(valid_value(f, hint))
        params = cls.Params(**values)
        check = getattr(params, "check", None)
        assume(not (callable(check) and check()))
        doc.append(item)
        want.append((name, kind, params))
    return doc, want


@st.composite
def near_policy(draw: st.DrawFn) -> Any:
    registry = base.kinds()
    if draw(st.integers(0, 9)) == 0:
        return draw(junk)
    kind = draw(st.sampled_from(sorted(registry)) | st.sampled_from(["Memory", "memry", "", "data"]))
    item: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        item["kind"] = kind
    if draw(st.booleans()):
        item["name"] = draw(st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True) | junk_scalar)
    cls = registry.get(kind)
    if cls is not None:
        for f, hint in _fields(cls.Params):
            if draw(st.booleans()):
                item[f.name] = draw(near_value(f, hint))
    for key, value in draw(st.dictionaries(st.text(max_size=10), junk, max_size=2)).items():
        item.setdefault(key, value)
    return item


def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes junk."""
    return st.one_of(valid, valid, junk)


@st.composite
def near_document(draw: st.DrawFn) -> Any:
    """A dict close to a real budget file: every section present or not, valid or not."""
    if draw(st.integers(0, 19)) == 0:
        return draw(junk)
    doc: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        doc["version"] = draw(st.one_of(st.just(1), st.just(1), junk_scalar, st.just("1"), st.just(2)))
    if draw(st.integers(0, 9)) > 0:
        budget: Any = {}
        for key, strategy in (
            ("device_memory", valid_memory_cap().map(lambda t: t[0])),
            ("wall_time", valid_duration().map(lambda t: t[0])),
            ("tokens", valid_count().map(lambda t: t[0])),
            ("flops", valid_flops().map(lambda t: t[0])),
        ):
            if draw(st.booleans()):
                budget[key] = draw(maybe(strategy))
        if draw(st.booleans()):
            budget["cost"] = draw(
                maybe(st.fixed_dictionaries({"max": maybe(positive), "per_device_hour": maybe(positive)}))
            )
        for key, value in draw(st.dictionaries(st.text(max_size=10), junk, max_size=2)).items():
            budget.setdefault(key, value)
        doc["budget"] = draw(st.one_of(st.just(budget), st.just(budget), st.just(budget), junk))
    if draw(st.booleans()):
        doc["controller"] = draw(
            maybe(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "sync_every": maybe(st.integers(1, 1000)),
                        "decide_interval_s": maybe(valid_duration().map(lambda t: t[0])),
                    },
                )
            )
        )
    if draw(st.booleans()):
        doc["policies"] = draw(st.one_of(st.lists(near_policy(), max_size=4), junk))
    for key, value in draw(st.dictionaries(st.text(max_size=10), junk, max_size=2)).items():
        doc.setdefault(key, value)
    if draw(st.booleans()):
        items = list(doc.items())
        doc = dict(draw(st.permutations(items)))
    return doc


layout = st.tuples(st.sampled_from([None, False, True]), st.booleans())


@fuzz_settings(150)
@given(doc=near_document(), style=layout)
def test_generated_documents_load_or_are_refused_clearly(doc: Any, style: tuple[bool | None, bool]) -> None:
    load(dump(doc, *style))


@fuzz_settings(100)
@given(
    budget=valid_budget(),
    controller=valid_controller(),
    policies=valid_policies(),
    style=layout,
)
def test_generated_valid_documents_load_with_the_values_written(
    budget: tuple[dict[str, Any], Budget],
    controller: tuple[dict[str, Any], ControllerSettings],
    policies: tuple[list[dict[str, Any]], list[tuple[str, str, Any]]],
    style: tuple[bool | None, bool],
) -> None:
    doc: dict[str, Any] = {"version": 1, "budget": budget[0]}
    if controller[0]:
        doc["controller"] = controller[0]
    if policies[0]:
        doc["policies"] = policies[0]
    result = load(dump(doc, *style))
    assert isinstance(result, PolicyFile), str(result)
    assert result.budget == budget[1]
    assert result.controller == controller[1]
    assert [(s.name, s.kind, s.params) for s in result.policies] == policies[1]


# --- damaged example files ----------------------------------------------------------------------

MARKER = Path(tempfile.gettempdir()) / f"trainwarden-fuzz-executed-{os.getpid()}"

SNIPPETS = [
    "!!python/object:os.system ",
    f'!!python/object/apply:os.system ["touch {MARKER}"] ',
    f"!!python/object/apply:os.system\n  - touch {MARKER}\n",
    "!!python/name:os.system ",
    "!!python/module:os ",
    "!!binary aGVsbG8= ",
    "!!set ",
    "!foo ",
    "!<tag:yaml.org,2002:python/object/apply:os.system> ",
    "&a ",
    "*a",
    "&a [x, *a]",
    "<<: *a\n",
    "\t",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG !p! tag:yaml.org,2002:python/\n---\n",
    "? ",
    "- ",
    ": ",
    "|\n",
    ">-\n",
    "{",
    "}",
    "[",
    "]",
    "'",
    '"',
    "#",
    "\\",
    "\r",
    "\r\n",
    "\ufeff",
    "\u2028",
    "\x85",
    "\x00",
    "\x07",
    "1e999999999",
    "0x" + "f" * 40,
    "9" * 40,
    "9" * 400,
    "0x" + "f" * 300,
    ".nan",
    "-.inf",
    "GiB",
    "kind: memory\n",
    "high_water: 2\n",
]
CHARS = st.one_of(
    st.sampled_from(list(" \t\n\r:-[]{}#&*!|>'\"%@`,?.0123456789abcdefGMik")),
    st.characters(codec="utf-8"),
)


def _insert(draw: st.DrawFn, text: str) -> str:
    at = draw(st.integers(0, len(text)))
    return text[:at] + draw(CHARS | st.sampled_from(SNIPPETS)) + text[at:]


def _delete(draw: st.DrawFn, text: str) -> str:
    at = draw(st.integers(0, len(text)))
    return text[:at] + text[at + draw(st.integers(1, 20)) :]


def _replace(draw: st.DrawFn, text: str) -> str:
    at = draw(st.integers(0, max(len(text) - 1, 0)))
    return text[:at] + draw(CHARS) + text[at + 1 :]


def _lines_op(change: Callable[[st.DrawFn, list[str], int], None]) -> Callable[[st.DrawFn, str], str]:
    def op(draw: st.DrawFn, text: str) -> str:
        lines = text.split("\n")
        change(draw, lines, draw(st.integers(0, len(lines) - 1)))
        return "\n".join(lines)

    return op


def _duplicate_line(draw: st.DrawFn, lines: list[str], i: int) -> None:
    lines.insert(i, lines[i])


def _indent(draw: st.DrawFn, lines: list[str], i: int) -> None:
    lines[i] = draw(st.sampled_from([" ", "  ", "    ", "\t", " \t"])) + lines[i]


def _dedent(draw: st.DrawFn, lines: list[str], i: int) -> None:
    lines[i] = lines[i].lstrip(" ")


def _tag_a_value(draw: st.DrawFn, lines: list[str], i: int) -> None:
    if ": " in lines[i]:
        key, _, value = lines[i].partition(": ")
        lines[i] = f"{key}: {draw(st.sampled_from(SNIPPETS[:9]))}{value}"


def _swap_lines(draw: st.DrawFn, lines: list[str], i: int) -> None:
    j = draw(st.integers(0, len(lines) - 1))
    lines[i], lines[j] = lines[j], lines[i]


MUTATIONS = [
    _insert,
    _insert,
    _delete,
    _replace,
    _lines_op(_duplicate_line),
    _lines_op(_indent),
    _lines_op(_dedent),
    _lines_op(_tag_a_value),
    _lines_op(_swap_lines),
]


@st.composite
def damaged_example(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(EXAMPLE_TEXTS))
    for _ in range(draw(st.integers(1, 6))):
        text = draw(st.sampled_from(MUTATIONS))(draw, text)
    return text


def test_the_examples_are_there_to_damage() -> None:
    assert len(EXAMPLE_TEXTS) >= 2
    for text in EXAMPLE_TEXTS:
        assert isinstance(load(text), PolicyFile)


@fuzz_settings(300)
@given(text=damaged_example())
def test_damaged_example_files_load_or_are_refused_clearly_and_quickly(text: str) -> None:
    def executed(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"the loader ran a command: {args!r}")

    with mock.patch("os.system", executed), mock.patch("subprocess.Popen", executed):
        load(text, limit_s=1.0)
    assert not MARKER.exists(), "a tag in a policy file ran a command"


# --- tags that construct objects --------------------------------------------------------------

BASE = "version: 1\nbudget:\n  wall_time: 1h\n"


def _payload(marker: Path) -> dict[str, tuple[str, int, str]]:
    """name -> (document, line of the tag, the tag as the message shows it)."""
    touch = f"touch {marker}"
    return {
        "apply-os.system-in-a-value": (
            f'version: 1\nbudget:\n  tokens: !!python/object/apply:os.system ["{touch}"]\n',
            3,
            "!!python/object/apply:os.system",
        ),
        "apply-block-in-a-policy-param": (
            f"{BASE}policies:\n  - kind: memory\n    high_water: !!python/object/apply:os.system\n"
            f"      - {touch}\n",
            6,
            "!!python/object/apply:os.system",
        ),
        "apply-as-the-whole-file": (
            f'!!python/object/apply:os.system ["{touch}"]\n',
            1,
            "!!python/object/apply:os.system",
        ),
        "object-new-subprocess": (
            f'{BASE}controller: !!python/object/new:subprocess.check_output [[sh, -c, "{touch}"]]\n',
            4,
            "!!python/object/new:subprocess.check_output",
        ),
        "object-on-a-mapping": (
            f"{BASE}controller: !!python/object:os.system {{sync_every: 1}}\n",
            4,
            "!!python/object:os.system",
        ),
        "name-os.system": (f"{BASE}policies:\n  - !!python/name:os.system\n", 5, "!!python/name:os.system"),
        "module-os": ("version: 1\nbudget:\n  flops: !!python/module:os\n", 3, "!!python/module:os"),
        "tag-on-a-key": (f"{BASE}!!python/name:os.system : 1\n", 4, "!!python/name:os.system"),
        "verbatim-tag": (
            f"{BASE}controller:\n  sync_every: !<tag:yaml.org,2002:python/object/apply:os.system> "
            f'["{touch}"]\n',
            5,
            "!!python/object/apply:os.system",
        ),
        "tag-directive": (
            f"%TAG !py! tag:yaml.org,2002:python/\n---\n{BASE}policies: !py!object/apply:os.system "
            f'["{touch}"]\n',
            6,
            "!!python/object/apply:os.system",
        ),
        "binary": (f"{BASE}controller:\n  sync_every: !!binary aGVsbG8=\n", 5, "!!binary"),
        "set": (f"{BASE}policies: !!set {{a, b}}\n", 4, "!!set"),
        "omap": (f"{BASE}policies: !!omap [a: 1]\n", 4, "!!omap"),
        "timestamp": ("version: 1\nbudget:\n  wall_time: !!timestamp 2024-01-01\n", 3, "!!timestamp"),
        "custom-local-tag": (f"{BASE}policies:\n  - kind: !foo memory\n", 5, "!foo"),
        "custom-tag-on-a-mapping": (f"{BASE}controller: !Settings {{sync_every: 2}}\n", 4, "!Settings"),
    }


CASES = list(_payload(Path("/nonexistent")))


@pytest.mark.parametrize("case", CASES)
def test_tags_that_construct_objects_are_refused_and_nothing_runs(case: str, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    text, line, tag = _payload(marker)[case]
    path = tmp_path / "hostile.yaml"
    path.write_text(text, encoding="utf-8")
    for result in (load(text), _file_error(path)):
        assert isinstance(result, PolicyFileError), f"{case} was accepted"
        lines = {p.line for p in result.problems if f"tag {tag} is not allowed" in p.message}
        assert lines == {line}, "\n".join(str(p) for p in result.problems)
        assert any("nothing in it is ever executed" in p.message for p in result.problems)
    assert not marker.exists(), "a tag in a policy file ran a command"


def _file_error(path: Path) -> PolicyFileError:
    with pytest.raises(PolicyFileError) as e:
        load_policy_file(path)
    problems = [dataclasses.replace(p, file=NAME) for p in e.value.problems]
    return PolicyFileError(problems)


def test_the_loader_never_reaches_a_constructor() -> None:
    """Refused before construction: even with every YAML constructor rigged, nothing is called."""
    text, _, _ = _payload(Path("/nonexistent"))["apply-os.system-in-a-value"]

    def rigged(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a YAML constructor ran")

    with mock.patch.object(yaml.constructor.BaseConstructor, "construct_object", rigged):
        assert isinstance(load(text), PolicyFileError)


# --- huge and deep documents -----------------------------------------------------------------

HEAD = "version: 1\nbudget: {}\n"
QUICK_S = 2.0
HUGE_INT = "9" * 400
HUGE_HEX = "0x" + "f" * 4000


def _pad_to(text: str, size: int, filler: str = "#") -> str:
    return text + filler * (size - len(text.encode("utf-8")) - 1) + "\n"


def refused(text: str, limit_s: float = QUICK_S) -> PolicyFileError:
    result = load(text, limit_s=limit_s)
    assert isinstance(result, PolicyFileError), "accepted"
    for p in result.problems:
        assert len(str(p)) < 1000, f"a message of {len(str(p))} characters is not a clear message"
    return result


@pytest.mark.parametrize(
    "text",
    [
        HEAD + "#" * MAX_FILE_BYTES,
        HEAD + "é" * (MAX_FILE_BYTES // 2 + 1),  # fewer characters than bytes
        "[" + "1," * (MAX_FILE_BYTES // 2) + "1]",
    ],
    ids=["comment", "two-byte-characters", "flow-list"],
)
def test_a_document_over_1_mib_is_refused_at_once(text: str) -> None:
    (problem,) = refused(text, limit_s=0.5).problems
    assert problem.line == 0
    assert "over the 1 MiB a policy file may have" in problem.message


def test_a_document_just_under_1_mib_is_answered_quickly() -> None:
    result = load(_pad_to(HEAD, MAX_FILE_BYTES), limit_s=QUICK_S)
    assert isinstance(result, PolicyFile)


BIG = MAX_FILE_BYTES - 200


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        (f"version: 1\nbudget:\n  tokens: {'x' * BIG}\n", 3, "budget.tokens"),
        (f"version: 1\nbudget:\n  wall_time: '{'9' * BIG}'\n", 3, "budget.wall_time"),
        (f"version: 1\nbudget:\n  device_memory: {'1' * BIG}GiB\n", 3, "budget.device_memory"),
        (f"version: 1\nbudget: {{}}\ncontroller:\n  sync_every: {'9' * BIG}\n", 4, "controller.sync_every"),
        (f"version: 1\nbudget: {{}}\npolicies:\n  - kind: {'m' * BIG}\n", 4, "policies[0].kind"),
        (
            f"version: 1\nbudget: {{}}\npolicies:\n  - kind: compute\n    cooldown_shape: {'x' * BIG}\n",
            5,
            "policies[0].cooldown_shape",
        ),
        (f'version: 1\nbudget: {{}}\nextra: "{"x" * BIG}"\n', 3, "extra"),
        (f"version: 1\nbudget: {{}}\ncontroller:\n  sync_every: 0x{'f' * BIG}\n", 4, "controller.sync_every"),
        (f"version: 1\nbudget: {{}}\n? {'k' * BIG}\n: 1\n", 3, "kkkkkkkk"),
    ],
    ids=[
        "tokens",
        "wall_time",
        "device_memory",
        "sync_every",
        "kind",
        "choice",
        "unknown-key",
        "hex",
        "long-key",
    ],
)
def test_a_huge_value_just_under_1_mib_is_refused_quickly_with_a_short_message(
    text: str, line: int, key: str
) -> None:
    assert len(text.encode()) < MAX_FILE_BYTES
    problems = refused(text).problems
    assert len(problems) == 1 and problems[0].line == line and problems[0].key.startswith(key), problems


@pytest.mark.parametrize(
    "text",
    [
        HEAD + "policies:\n" + "  - x\n" * 100_000,
        HEAD + "policies: [" + "1, " * 100_000 + "1]\n",
        "[" + "1," * 100_000 + "1]\n",
        HEAD + "".join(f"k{i}: 1\n" for i in range(100_000)),
    ],
    ids=["block-list", "flow-list", "top-level-list", "100k-keys"],
)
def test_a_document_of_100k_items_is_refused_quickly(text: str) -> None:
    assert len(text.encode()) < MAX_FILE_BYTES
    problems = refused(text).problems
    assert len(problems) <= 100, f"{len(problems)} problems: a clear message names a few"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 10_000 + "]" * 10_000,
        "{a: " * 10_000 + "1" + "}" * 10_000,
        HEAD + "policies:\n" + "".join(" " * i + "a:\n" for i in range(1, 1400)),
        "- " * 10_000 + "x\n",
        HEAD + "controller: " + "[" * 10_000 + "]" * 10_000 + "\n",
    ],
    ids=["flow-lists", "flow-mappings", "block-mappings", "block-lists", "inside-a-section"],
)
def test_deep_nesting_is_refused_quickly(text: str) -> None:
    assert len(text.encode()) < MAX_FILE_BYTES
    (problem,) = refused(text).problems
    assert f"nested deeper than {MAX_DEPTH} levels" in problem.message
    assert problem.line >= 1


def test_a_billion_laughs_alias_bomb_is_refused_quickly() -> None:
    lines = [HEAD.rstrip("\n"), 'lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 10)}]" for i in range(1, 12)]
    lines += ["policies: *lol11"]
    problems = refused("\n".join(lines) + "\n", limit_s=0.5).problems
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [(4, "alias '*lol0' is not allowed")]


def test_an_alias_through_a_merge_key_is_refused() -> None:
    text = f"{HEAD}policies:\n  - &m {{kind: memory}}\n  - <<: *m\n    name: second\n"
    problems = refused(text, limit_s=0.5).problems
    assert [p.line for p in problems] == [5]
    assert "alias '*m' is not allowed" in problems[0].message


# --- found while fuzzing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("version: 1\nbudget:\n  tokens: '1e999999999'\n", 3),
        ("version: 1\nbudget:\n  flops: '1e999999999'\n", 3),
        ("version: 1\nbudget:\n  tokens: 1e999999999M\n", 3),
        ("version: 1\nbudget:\n  device_memory: 1e999999999GiB\n", 3),
        ("version: 1\nbudget:\n  wall_time: '1e9999999999999999999'\n", 3),
    ],
    ids=["tokens", "flops", "tokens-suffix", "device_memory", "wall_time"],
)
def test_a_number_too_large_for_a_decimal_is_a_problem_not_a_traceback(text: str, line: int) -> None:
    # units.py does Decimal arithmetic; decimal.Overflow / InvalidOperation are not ValueErrors.
    problems = refused(text, limit_s=0.5).problems
    assert [p.line for p in problems] == [line]
    assert "1e999999999" in problems[0].message and "write " in problems[0].message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (f"version: {HUGE_HEX}\nbudget: {{}}\n", 1),
        (f"version: 1\nbudget: {{}}\ncontroller:\n  sync_every: {HUGE_HEX}\n", 4),
        (f"version: 1\nbudget: {{}}\ncontroller:\n  decide_interval_s: {HUGE_INT}\n", 4),
        (f"version: 1\nbudget:\n  cost: {{max: {HUGE_INT}, per_device_hour: 1}}\n", 3),
        (f"version: 1\nbudget:\n  wall_time: {HUGE_INT}\n", 3),
        (f"version: 1\nbudget:\n  device_memory: {HUGE_INT}\n", 3),
        (f"version: 1\nbudget:\n  tokens: {HUGE_HEX}\n", 3),
        (f"{HEAD}policies:\n  - kind: memory\n    high_water: {HUGE_HEX}\n", 5),
        (f"{HEAD}policies:\n  - kind: compute\n    cooldown_fraction: {HUGE_INT}\n", 5),
        (f"{HEAD}policies:\n  - kind: compute\n    cooldown_fraction: 0o{'7' * 2000}\n", 5),
    ],
    ids=[
        "version",
        "sync_every",
        "decide_interval_s",
        "cost",
        "wall_time",
        "device_memory",
        "tokens",
        "high_water",
        "cooldown_fraction",
        "octal",
    ],
)
def test_a_whole_number_too_large_for_a_float_is_a_problem_not_a_traceback(text: str, line: int) -> None:
    # A plain YAML integer of 400 digits (or 4000 hex digits) is a Python int; float() of it
    # raises OverflowError, math.isnan() too, and str() of one over 4300 digits ValueError.
    problems = refused(text, limit_s=0.5).problems
    assert [p.line for p in problems] == [line]


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        # A 400-digit token budget: float() of it raises OverflowError in the controller.
        ("version: 1\nbudget:\n  tokens: '1e400'\n", 3, "budget.tokens"),
        ("version: 1\nbudget:\n  tokens: 1e30T\n", 3, "budget.tokens"),
        # 1e-400 FLOPs is 0.0 as a float: a budget spent before the first step.
        ("version: 1\nbudget:\n  flops: '1e-400'\n", 3, "budget.flops"),
        ("version: 1\nbudget:\n  cost: {max: .inf, per_device_hour: 2}\n", 3, "budget.cost.max"),
        (
            "version: 1\nbudget:\n  cost: {max: 100, per_device_hour: 1e400}\n",
            3,
            "budget.cost.per_device_hour",
        ),
        (
            "version: 1\nbudget: {}\ncontroller:\n  decide_interval_s: .inf\n",
            4,
            "controller.decide_interval_s",
        ),
        (
            "version: 1\nbudget: {}\ncontroller:\n  sync_every: 0x" + "f" * 40 + "\n",
            4,
            "controller.sync_every",
        ),
    ],
    ids=[
        "tokens-1e400",
        "tokens-1e30T",
        "flops-1e-400",
        "cost-max-inf",
        "cost-price-1e400",
        "decide-interval-inf",
        "sync-every-2^160",
    ],
)
def test_a_value_the_controller_cannot_use_is_refused(text: str, line: int, key: str) -> None:
    result = _try(text)
    assert isinstance(result, PolicyFileError), f"accepted: {result!r}"
    assert [(p.line, p.key) for p in result.problems] == [(line, key)]


def _try(text: str) -> PolicyFile | PolicyFileError:
    try:
        return _load_policy_text(text, NAME)
    except PolicyFileError as e:
        return e


def test_a_character_yaml_refuses_is_reported_on_its_line() -> None:
    # The YAML reader's error has a position, not a line; the loader reports it as line 0 with
    # "position 31" and the reader's own "in "<unicode string>"" on a second line.
    for char in ("\x00", "\x07", "\x1b", "\ud800"):
        result = load(f"version: 1\nbudget: {{}}\n# bad: {char}\n")
        assert isinstance(result, PolicyFileError)
        (problem,) = result.problems
        assert problem.line == 3, str(problem)
        assert "\n" not in problem.message, problem.message


def test_a_syntax_error_at_the_end_of_a_file_with_cr_line_endings_names_the_last_line() -> None:
    result = load("version: 1\rbudget: {}\rpolicies: [\r")
    assert isinstance(result, PolicyFileError)
    assert [p.line for p in result.problems] == [3]
