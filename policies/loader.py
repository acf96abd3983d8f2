"""Strict loading of a budget file: YAML in, `PolicyFile` out, or every problem at once.

The YAML is composed into nodes (never constructed into objects) by a SafeLoader subclass
that knows only plain values: YAML 1.2 core scalars (so `off` and `no` stay text and `3e18`
is a number), mappings and lists. Anything else (a `!!python/...` tag, an alias, a
duplicate key, a file over 1 MiB or nested deeper than 32) is refused with its line.
Every problem names the file, the line, the key and the fix; all the problems of a file
are collected in one pass and raised together as a `PolicyFileError`.

Policy parameters are checked against the kind's frozen `Params` dataclass: the type of
each field, its `valid` range and `choices` (see `trainwarden.policies.base.param`), then
the dataclass's own `check()` for rules that span fields. By convention an `int` field
whose name ends in `_bytes` also takes a size (`2GiB`) and a `float` field whose name ends
in `_s` also takes a duration (`10m`); a field's metadata may say so explicitly with
`"unit": "bytes" | "duration" | "count"`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import re
import stat
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from trainwarden.controller.schema import (
    STOP_MODES,
    Budget,
    ControllerSettings,
    Cost,
    Objective,
    PolicyFile,
    PolicySpec,
    Tuned,
)
from trainwarden.policies import units

if typing.TYPE_CHECKING:
    from trainwarden.policies.base import PolicyKind

#: Largest budget file read; a real one is a few hundred bytes.
MAX_FILE_BYTES = 1 << 20
#: Deepest nesting of mappings and lists; a real file needs four.
MAX_DEPTH = 32
#: Most values (scalars, lists, mappings) in a file; a real file has a few dozen.
MAX_NODES = 10_000
#: The only file format version this trainwarden reads.
FILE_VERSION = 1

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ = _TAG + "map", _TAG + "seq"
_SCALAR_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL})
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

_TOP_KEYS = ("version", "budget", "controller", "policies", "objective", "tuned")
_BUDGET_KEYS = ("device_memory", "wall_time", "tokens", "flops", "cost")
_COST_KEYS = ("max", "per_device_hour")
_CONTROLLER_KEYS = (
    "sync_every",
    "decide_interval_s",
    "stale_after_s",
    "stop",
    "stop_grace_steps",
    "checkpoint_on_stop",
)
_POLICY_KEYS = ("kind", "name")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a budget file, where it is and how to fix it."""

    file: str
    line: int
    """1-based; 0 when the problem is the file as a whole (not found, unreadable)."""
    key: str
    """Dotted path of the key (`budget.device_memory`, `policies[1].high_water`); may be empty."""
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line > 0 else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class PolicyFileError(ValueError):
    """A budget file was refused; `problems` holds every problem found, in line order."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --- YAML: plain values only ------------------------------------------------------------


class _Refused(Exception):
    """Raised while composing, for what is refused outright (alias, nesting)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _PlainLoader(yaml.SafeLoader):
    """A SafeLoader that composes nodes only: YAML 1.2 core scalars, no aliases, bounded depth."""

    # Replace YAML 1.1's implicit types (yes/no/on/off booleans, sexagesimal ints,
    # timestamps, merge keys) with the YAML 1.2 core schema's.
    yaml_implicit_resolvers: typing.ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {}

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if self.check_event(AliasEvent):
            event = self.peek_event()
            raise _Refused(
                event.start_mark.line + 1,
                f"alias '*{event.anchor}' is not allowed: a policy file has no anchors or aliases; "
                "write the value out in full",
            )
        self._depth += 1
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Refused(
                self.peek_event().start_mark.line + 1,
                f"more than {MAX_NODES} values; a policy file needs only a few dozen",
            )
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(
                    mark.line + 1, f"nested deeper than {MAX_DEPTH} levels; a policy file needs only a few"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_PlainLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_PlainLoader.add_implicit_resolver(_NULL, re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""])
_PlainLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+(?:_[0-9]+)*|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_PlainLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:_[0-9]+)*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:56] + "...")


#: Largest whole number a file may write: any larger does not fit a float.
_MAX_ABS_INT = 2**1000


def _scalar(node: ScalarNode) -> Any:
    """The Python value of a plain scalar node; ValueError when its explicit tag does not fit."""
    text, tag = node.value, node.tag
    if tag == _STR:
        return text
    if tag == _NULL:
        if text not in ("", "~", "null", "Null", "NULL"):
            raise ValueError(f"{_short(text)} is not null")
        return None
    if tag == _BOOL:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{_short(text)} is not true or false")
        return text.lower() == "true"
    if tag == _INT:
        clean = text.replace("_", "")
        try:
            value = None
            for prefix, base in (("0o", 8), ("0x", 16)):
                if clean.startswith(prefix):
                    value = int(clean[2:], base)
            if value is None:
                value = int(clean)
        except ValueError:
            raise ValueError(f"{_short(text)} is not a whole number") from None
        if abs(value) > _MAX_ABS_INT:
            raise ValueError(f"{_short(text)} is too large a number")
        return value
    if tag == _FLOAT:
        clean = text.replace("_", "").lower()
        special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
        try:
            return special[clean] if clean in special else float(clean)
        except ValueError:
            raise ValueError(f"{_short(text)} is not a number") from None
    raise ValueError(f"tag {_show_tag(tag)} is not allowed")


def _show_tag(tag: str) -> str:
    return "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag


# --- collecting problems ------------------------------------------------------------------


class _Bad:
    """Marks a value that could not be read; its problem is already recorded."""

    def __repr__(self) -> str:
        return "<bad>"


_BAD: Any = _Bad()


@dataclass
class _Ctx:
    file: str
    problems: list[Problem] = field(default_factory=list)
    bad_nodes: set[int] = field(default_factory=set)
    """Nodes already reported (bad tag): readers skip them without a second message."""

    def add(self, where: Node | int | None, key: str, message: str) -> Any:
        key = key if len(key) <= 120 else key[:117] + "..."
        line = where if isinstance(where, int) else (where.start_mark.line + 1 if where is not None else 0)
        self.problems.append(Problem(self.file, line, key, message))
        return _BAD

    def probe(self) -> _Ctx:
        """A context for trying a conversion without reporting its problems."""
        return _Ctx(self.file, [], self.bad_nodes)


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_SCALAR_WORDS = {_INT: "the whole number", _FLOAT: "the number", _BOOL: "the boolean", _STR: "the text"}


def _describe(node: Node) -> str:
    """How a value reads in a message: `the text 'abc'`, `a list`, `the boolean true`."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "an empty value"
    value = node.value if len(node.value) <= 40 else node.value[:37] + "..."
    shown = repr(value) if node.tag == _STR else value
    return f"{_SCALAR_WORDS.get(node.tag, 'the value')} {shown}"


def _check_tree(ctx: _Ctx, node: Node, path: str) -> None:
    """Report every non-plain tag, unreadable scalar, non-scalar key and duplicate key."""
    if isinstance(node, ScalarNode):
        if node.tag not in _SCALAR_TAGS:
            ctx.add(node, path, _tag_message(node.tag))
            ctx.bad_nodes.add(id(node))
            return
        try:
            _scalar(node)
        except ValueError as e:
            tag = _show_tag(node.tag)
            ctx.add(node, path, f"{e}, yet it is tagged {tag}; remove the tag or fix the value")
            ctx.bad_nodes.add(id(node))
        return
    expected = _MAP if isinstance(node, MappingNode) else _SEQ
    if node.tag != expected:
        ctx.add(node, path, _tag_message(node.tag))
        ctx.bad_nodes.add(id(node))
        return
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _check_tree(ctx, item, f"{path}[{i}]")
        return
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            ctx.add(key_node, path, f"a key must be a plain word, not {_describe(key_node)}")
            ctx.bad_nodes.add(id(key_node))
            continue
        key = key_node.value
        if key in seen:
            ctx.add(
                key_node,
                _join(path, key),
                f"key {key!r} appears twice (lines {seen[key]} and {_line(key_node)}); keep one",
            )
        else:
            seen[key] = _line(key_node)
        _check_tree(ctx, key_node, _join(path, key))
        _check_tree(ctx, value_node, _join(path, key))


def _tag_message(tag: str) -> str:
    return (
        f"tag {_show_tag(tag)} is not allowed: a policy file holds only plain values "
        "(numbers, text, true/false, lists, mappings) and nothing in it is ever executed"
    )


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _mapping(ctx: _Ctx, node: Node, path: str, what: str) -> dict[str, tuple[ScalarNode, Node]] | None:
    """The entries of a mapping node, first occurrence of each key; None (reported) otherwise."""
    if id(node) in ctx.bad_nodes:
        return None
    if not isinstance(node, MappingNode):
        ctx.add(node, path, f"{what} must be a mapping of `key: value` lines, got {_describe(node)}")
        return None
    entries: dict[str, tuple[ScalarNode, Node]] = {}
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode) and key_node.value not in entries:
            entries[key_node.value] = (key_node, value_node)
    return entries


def _unknown(word: str, what: str, valid: Iterable[str], listed_as: str, of: str = "") -> str:
    """`unknown key 'budgt'; did you mean 'budget'? Valid keys: version, budget, ...`."""
    valid = list(valid)
    listing = f"{listed_as}: {', '.join(valid) if valid else '(none)'}"
    unknown = f"unknown {what} {_short(word)}{of}"
    guess = _closest(word, valid)
    if guess is None:
        return f"{unknown}; {listing}"
    return f"{unknown}; did you mean {guess!r}? {listing[0].upper()}{listing[1:]}"


def _closest(word: str, choices: Sequence[str]) -> str | None:
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def _check_keys(
    ctx: _Ctx, entries: dict[str, tuple[ScalarNode, Node]], valid: Sequence[str], path: str, what: str
) -> None:
    for key, (key_node, _) in entries.items():
        if key not in valid:
            ctx.add(key_node, _join(path, key), _unknown(key, what, valid, "valid keys"))


# --- reading values -----------------------------------------------------------------------


def _plain(ctx: _Ctx, node: Node) -> Any:
    """A node as plain Python data (str, int, float, bool, None, list, dict)."""
    if id(node) in ctx.bad_nodes:
        return _BAD
    if isinstance(node, ScalarNode):
        return _scalar(node)
    if isinstance(node, SequenceNode):
        items = [_plain(ctx, item) for item in node.value]
        return _BAD if any(item is _BAD for item in items) else items
    result = {k.value: _plain(ctx, v) for k, v in node.value}
    return _BAD if any(v is _BAD for v in result.values()) else result


def _unit_value(ctx: _Ctx, node: Node, path: str, parse: Callable[[Any], Any], what: str) -> Any:
    """Parse a scalar with one of the `units` parsers; its ValueError becomes a problem."""
    if id(node) in ctx.bad_nodes:
        return _BAD
    if not isinstance(node, ScalarNode) or node.tag == _NULL:
        return ctx.add(node, path, f"expected {what}, got {_describe(node)}")
    try:
        return parse(_scalar(node))
    except ValueError as e:
        return ctx.add(node, path, str(e))


def _number(ctx: _Ctx, node: Node, path: str, *, integer: bool, minimum: float, above: bool) -> Any:
    """An int (or, unless `integer`, a float) >= minimum (> minimum when `above`)."""
    if id(node) in ctx.bad_nodes:
        return _BAD
    value = _scalar(node) if isinstance(node, ScalarNode) else None
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        what = "a whole number" if integer else "a number"
        return ctx.add(node, path, f"expected {what}, got {_describe(node)}")
    if not math.isfinite(value) or value < minimum or (above and value == minimum) or value > 2**63 - 1:
        bound = f"greater than {minimum:g}" if above else f"at least {minimum:g}"
        return ctx.add(node, path, f"{_shown(node, value)} is out of range: it must be {bound} and finite")
    return value if integer else float(value)


def _choice(ctx: _Ctx, node: Node, path: str, choices: Sequence[str], meaning: str) -> Any:
    """One of `choices` (a word), or a problem naming them."""
    if id(node) in ctx.bad_nodes:
        return _BAD
    value = _scalar(node) if isinstance(node, ScalarNode) else None
    if isinstance(value, str) and value in choices:
        return value
    near = _closest(str(value), choices) if isinstance(value, str) else None
    return ctx.add(
        node,
        path,
        f"{_describe(node)} is not one of {', '.join(choices)} ({meaning})"
        + (f"; did you mean {near!r}?" if near else ""),
    )


# --- the sections -------------------------------------------------------------------------


def _read_version(ctx: _Ctx, entries: dict[str, tuple[ScalarNode, Node]], root: Node) -> int:
    if "version" not in entries:
        ctx.add(root, "version", f"missing; put `version: {FILE_VERSION}` at the top of the file")
        return FILE_VERSION
    node = entries["version"][1]
    if id(node) in ctx.bad_nodes:
        return FILE_VERSION
    value = _scalar(node) if isinstance(node, ScalarNode) else None
    if isinstance(value, bool) or not isinstance(value, int):
        ctx.add(node, "version", f"must be the number {FILE_VERSION}, got {_describe(node)}")
    elif value != FILE_VERSION:
        ctx.add(
            node,
            "version",
            f"{value} is not supported; this trainwarden reads version {FILE_VERSION}: "
            f"write `version: {FILE_VERSION}`",
        )
    return FILE_VERSION


def _read_budget(ctx: _Ctx, node: Node | None, root: Node) -> Budget:
    if node is None:
        ctx.add(root, "budget", "missing; add a `budget:` section (it may be empty: `budget: {}`)")
        return Budget()
    if _is_null(node):
        return Budget()
    entries = _mapping(ctx, node, "budget", "budget")
    if entries is None:
        return Budget()
    _check_keys(ctx, entries, _BUDGET_KEYS, "budget", "budget key")
    values: dict[str, Any] = {}
    readers: dict[str, tuple[str, Callable[[Any], Any], str]] = {
        "device_memory": (
            "device_memory",
            units.parse_memory_cap,
            "a size like 24GiB or a fraction like 0.9",
        ),
        "wall_time": ("wall_time_s", units.parse_duration, "a duration like 90m"),
        "tokens": ("tokens", units.parse_count, "a count like 50M"),
        "flops": ("flops", units.parse_float_quantity, "a number like 3e18"),
    }
    for key, (attr, parse, what) in readers.items():
        if key in entries and not _is_null(entries[key][1]):
            values[attr] = _unit_value(ctx, entries[key][1], f"budget.{key}", parse, what)
    if "cost" in entries and not _is_null(entries["cost"][1]):
        values["cost"] = _read_cost(ctx, entries["cost"][1])
    return Budget(**{k: v for k, v in values.items() if v is not _BAD})


def _read_cost(ctx: _Ctx, node: Node) -> Cost | Any:
    entries = _mapping(ctx, node, "budget.cost", "budget.cost")
    if entries is None:
        return _BAD
    _check_keys(ctx, entries, _COST_KEYS, "budget.cost", "cost key")
    values: dict[str, float] = {}
    for key in _COST_KEYS:
        if key not in entries:
            ctx.add(node, f"budget.cost.{key}", "missing; a cost budget needs `max` and `per_device_hour`")
            continue
        value = _number(ctx, entries[key][1], f"budget.cost.{key}", integer=False, minimum=0, above=True)
        if value is not _BAD:
            values[key] = value
    return Cost(**values) if len(values) == len(_COST_KEYS) else _BAD


def _read_controller(ctx: _Ctx, node: Node | None) -> ControllerSettings:
    if node is None or _is_null(node):
        return ControllerSettings()
    entries = _mapping(ctx, node, "controller", "controller")
    if entries is None:
        return ControllerSettings()
    _check_keys(ctx, entries, _CONTROLLER_KEYS, "controller", "controller key")
    values: dict[str, Any] = {}
    if "sync_every" in entries:
        path = "controller.sync_every"
        values["sync_every"] = _number(
            ctx, entries["sync_every"][1], path, integer=True, minimum=1, above=False
        )
    for key in ("decide_interval_s", "stale_after_s"):
        if key not in entries:
            continue
        node = entries[key][1]
        path = f"controller.{key}"
        if isinstance(node, ScalarNode) and node.tag == _STR:
            values[key] = _unit_value(ctx, node, path, units.parse_duration, "a duration")
        else:
            values[key] = _number(ctx, node, path, integer=False, minimum=0, above=True)
    if "stop_grace_steps" in entries:
        values["stop_grace_steps"] = _number(
            ctx,
            entries["stop_grace_steps"][1],
            "controller.stop_grace_steps",
            integer=True,
            minimum=0,
            above=False,
        )
    for key, choices, meaning in (
        ("stop", STOP_MODES, "what a stop does to a job that does not read should_stop"),
        ("checkpoint_on_stop", ("auto", "always", "never"), "whether trainwarden saves before it ends a job"),
    ):
        if key in entries:
            values[key] = _choice(ctx, entries[key][1], f"controller.{key}", choices, meaning)
    return ControllerSettings(**{k: v for k, v in values.items() if v is not _BAD})


# --- policies -----------------------------------------------------------------------------


@dataclass
class _Kinds:
    """The registry of policy kinds, imported on first use (a file without policies needs none)."""

    _kinds: dict[str, type[PolicyKind]] | None = None

    def get(self) -> dict[str, type[PolicyKind]]:
        if self._kinds is None:
            from trainwarden.policies import base

            self._kinds = base.kinds()
        return self._kinds


def _read_policies(ctx: _Ctx, node: Node | None) -> tuple[PolicySpec, ...]:
    if node is None or _is_null(node) or id(node) in ctx.bad_nodes:
        return ()
    if not isinstance(node, SequenceNode):
        message = f"must be a list of policies (lines starting `- kind: ...`), got {_describe(node)}"
        ctx.add(node, "policies", message)
        return ()
    registry = _Kinds()
    specs: list[tuple[str, PolicySpec]] = []
    for i, item in enumerate(node.value):
        spec = _read_policy(ctx, item, f"policies[{i}]", registry)
        if spec is not None:
            specs.append((f"policies[{i}]", spec))
    _check_names_and_knobs(ctx, specs, registry)
    return tuple(spec for _, spec in specs)


def _read_policy(ctx: _Ctx, node: Node, path: str, registry: _Kinds) -> PolicySpec | None:
    entries = _mapping(ctx, node, path, "a policy")
    if entries is None:
        return None
    kind_cls = _read_kind(ctx, entries, node, path, registry)
    name = _read_name(ctx, entries, path)
    if kind_cls is None:
        return None
    params = _build_dataclass(
        ctx, kind_cls.Params, entries, path, _line(node), f"kind {kind_cls.kind!r}", reserved=_POLICY_KEYS
    )
    if name is None or params is _BAD:
        return None
    return PolicySpec(name=name or kind_cls.kind, kind=kind_cls.kind, params=params, line=_line(node))


def _read_kind(
    ctx: _Ctx, entries: dict[str, tuple[ScalarNode, Node]], node: Node, path: str, registry: _Kinds
) -> type[PolicyKind] | None:
    if "kind" not in entries:
        known = ", ".join(sorted(registry.get()))
        ctx.add(node, f"{path}.kind", f"missing; every policy needs `kind:`, one of: {known}")
        return None
    kind_node = entries["kind"][1]
    if id(kind_node) in ctx.bad_nodes:
        return None
    if not isinstance(kind_node, ScalarNode) or kind_node.tag != _STR:
        ctx.add(kind_node, f"{path}.kind", f"must be the name of a policy kind, got {_describe(kind_node)}")
        return None
    kinds = registry.get()
    kind = kind_node.value
    if kind not in kinds:
        ctx.add(kind_node, f"{path}.kind", _unknown(kind, "policy kind", sorted(kinds), "known kinds"))
        return None
    return kinds[kind]


def _read_name(ctx: _Ctx, entries: dict[str, tuple[ScalarNode, Node]], path: str) -> str | None:
    """The policy's name; '' when not given (the kind is the name), None when invalid."""
    if "name" not in entries:
        return ""
    node = entries["name"][1]
    if id(node) in ctx.bad_nodes:
        return None
    if not isinstance(node, ScalarNode) or node.tag != _STR or not _NAME.match(node.value):
        ctx.add(
            node,
            f"{path}.name",
            f"must be a word of letters, digits, '_', '-' or '.', got {_describe(node)}",
        )
        return None
    return node.value


def _check_names_and_knobs(ctx: _Ctx, specs: Sequence[tuple[str, PolicySpec]], registry: _Kinds) -> None:
    """Each name once per file; each knob owned by one policy (one message per pair of policies)."""
    by_name: dict[str, PolicySpec] = {}
    owner: dict[str, PolicySpec] = {}
    for path, spec in specs:
        knobs = sorted(getattr(registry.get()[spec.kind], "knobs", frozenset()))
        shared: dict[int, list[str]] = {}
        others: dict[int, PolicySpec] = {}
        for knob in knobs:
            if knob in owner:
                other = owner[knob]
                shared.setdefault(id(other), []).append(knob)
                others[id(other)] = other
            else:
                owner[knob] = spec
        same_kind_reported = False
        for key, knob_list in shared.items():
            other = others[key]
            if other.kind == spec.kind:
                same_kind_reported |= other.name == spec.name
                message = (
                    f"policy kind {spec.kind!r} is used twice (lines {other.line} and {spec.line}) and both "
                    f"would set its {_knob_words(knob_list)}; keep one of them"
                )
            else:
                verb = "is" if len(knob_list) == 1 else "are"
                message = (
                    f"{_knob_words(knob_list)} {verb} owned by both policies {other.name!r} "
                    f"(line {other.line}) and {spec.name!r} (line {spec.line}); give each knob to one policy"
                )
            ctx.add(spec.line, path, message)
        if spec.name in by_name and not same_kind_reported:
            first = by_name[spec.name]
            hint = " (a policy without `name:` is named after its kind)" if spec.name == spec.kind else ""
            ctx.add(
                spec.line,
                f"{path}.name",
                f"policy name {spec.name!r} is used twice (lines {first.line} and {spec.line}){hint}; "
                "give each policy its own `name:`",
            )
        by_name.setdefault(spec.name, spec)


def _knob_words(knobs: Sequence[str]) -> str:
    """`knob 'a'`, `knobs 'a' and 'b'`, `knobs 'a', 'b' and 'c'`."""
    quoted = [repr(k) for k in knobs]
    if len(quoted) == 1:
        return f"knob {quoted[0]}"
    return f"knobs {', '.join(quoted[:-1])} and {quoted[-1]}"


# --- typed parameters ---------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve at run time: fall back to defaults
        return {}


def _field_type(f: dataclasses.Field[Any], hints: dict[str, Any]) -> Any:
    if f.name in hints:
        return hints[f.name]
    if f.default is not dataclasses.MISSING and f.default is not None:
        return type(f.default)
    return Any


def _field_unit(f: dataclasses.Field[Any], hint: Any) -> str | None:
    unit = f.metadata.get("unit")
    if unit:
        return str(unit)
    if hint is int and f.name.endswith("_bytes"):
        return "bytes"
    if hint is float and (f.name.endswith("_s") or f.name.endswith("_seconds")):
        return "duration"
    return None


def _build_dataclass(
    ctx: _Ctx,
    cls: type,
    entries: dict[str, tuple[ScalarNode, Node]],
    path: str,
    line: int,
    owner: str,
    reserved: Sequence[str] = (),
) -> Any:
    """An instance of the frozen dataclass `cls` from mapping entries; _BAD when any is wrong.

    `reserved` keys (a policy's `kind` and `name`) are skipped; `owner` names `cls` in messages.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _type_hints(cls)
    values: dict[str, Any] = {}
    ok = True
    for key, (key_node, value_node) in entries.items():
        if key in reserved and key not in fields:
            continue
        if key not in fields:
            message = _unknown(key, "parameter", fields, f"parameters of {owner}", of=f" for {owner}")
            ctx.add(key_node, _join(path, key), message)
            ok = False
            continue
        f = fields[key]
        hint = _field_type(f, hints)
        meta = _Meta(f.metadata.get("valid"), tuple(f.metadata.get("choices", ())), _field_unit(f, hint))
        value = _convert(ctx, value_node, hint, _join(path, key), meta)
        if value is _BAD:
            ok = False
        else:
            values[key] = value
    for name, f in fields.items():
        if (
            name not in values
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            ok = False
            ctx.add(line, _join(path, name), f"missing; {owner} needs `{name}:`")
    if not ok:
        return _BAD
    try:
        instance = cls(**values)
    except (TypeError, ValueError) as e:
        return ctx.add(line, path, str(e))
    check = getattr(instance, "check", None)
    if callable(check):
        messages = list(check())
        for message in messages:
            # A (key, message) pair is reported at that key's own line (a bad entry of a mapping).
            if isinstance(message, tuple) and message[0] in entries:
                key, text = message
                ctx.add(entries[key][0], _join(path, key), text)
            else:
                ctx.add(line, path, message)
        if messages:
            return _BAD
    return instance


@dataclass(frozen=True)
class _Meta:
    """What a field's metadata asks of its values (applied to each element of a list)."""

    valid: Any = None
    choices: tuple[Any, ...] = ()
    unit: str | None = None


def _convert(ctx: _Ctx, node: Node, hint: Any, path: str, meta: _Meta) -> Any:
    """The value of `node` as the type `hint`; _BAD (reported) when it is not one."""
    if id(node) in ctx.bad_nodes:
        return _BAD
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return _check_meta(ctx, node, path, meta, _plain(ctx, node))
    if origin is typing.Union or origin is types.UnionType:
        return _convert_union(ctx, node, args, path, meta)
    if origin is typing.Literal:
        return _convert_scalar(ctx, node, object, path, _Meta(meta.valid, args, meta.unit))
    if origin in (tuple, list, collections.abc.Sequence):
        return _convert_sequence(ctx, node, hint, path, meta)
    if origin in (dict, collections.abc.Mapping):
        return _convert_mapping(ctx, node, args, path, meta)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        entries = _mapping(ctx, node, path, path)
        if entries is None:
            return _BAD
        return _build_dataclass(ctx, hint, entries, path, _line(node), hint.__name__)
    if hint in (bool, int, float, str):
        return _convert_scalar(ctx, node, hint, path, meta)
    return _check_meta(ctx, node, path, meta, _plain(ctx, node))


def _convert_union(ctx: _Ctx, node: Node, args: tuple[Any, ...], path: str, meta: _Meta) -> Any:
    arms = [a for a in args if a is not type(None)]
    if _is_null(node) and len(arms) < len(args):
        return None
    if len(arms) == 1:
        return _convert(ctx, node, arms[0], path, meta)
    for arm in arms:
        probe = ctx.probe()
        value = _convert(probe, node, arm, path, meta)
        if not probe.problems:
            return value
    names = " or ".join(getattr(a, "__name__", str(a)) for a in arms)
    return ctx.add(node, path, f"expected {names}, got {_describe(node)}")


_UNIT_HINTS = {"bytes": " or a size like 2GiB", "duration": " or a duration like 10m", "count": " or 50M"}
_TYPE_WORDS = {
    bool: "true or false",
    int: "a whole number (like 8)",
    float: "a number (like 0.5)",
    str: "text",
    object: "a value",
}


def _convert_scalar(ctx: _Ctx, node: Node, hint: type, path: str, meta: _Meta) -> Any:
    value = _scalar(node) if isinstance(node, ScalarNode) else _BAD
    if meta.unit and isinstance(node, ScalarNode) and node.tag == _STR:
        parse = {"bytes": units.parse_bytes, "duration": units.parse_duration, "count": units.parse_count}
        if meta.unit in parse:
            try:
                value = parse[meta.unit](value)
            except ValueError as e:
                return ctx.add(node, path, str(e))
            return _check_meta(ctx, node, path, meta, hint(value) if hint in (int, float) else value)
    ok = value is not _BAD and (
        hint is object
        or (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (hint is str and isinstance(value, str))
    )
    if not ok:
        unit_hint = _UNIT_HINTS.get(meta.unit or "", "")
        return ctx.add(node, path, f"expected {_TYPE_WORDS[hint]}{unit_hint}, got {_describe(node)}")
    if hint is float:
        value = float(value)
        if math.isnan(value):
            return ctx.add(node, path, "expected a number, got .nan")
    return _check_meta(ctx, node, path, meta, value)


def _check_meta(ctx: _Ctx, node: Node, path: str, meta: _Meta, value: Any) -> Any:
    """Check `value` (read from `node`) against the field's choices and valid range."""
    if value is _BAD:
        return _BAD
    shown = _shown(node, value)
    if meta.choices and value not in meta.choices:
        choices = ", ".join(repr(c) for c in meta.choices)
        return ctx.add(node, path, f"{shown} is not one of the choices: {choices}")
    valid = meta.valid
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if valid is not None and is_number and not valid.contains(value):
        return ctx.add(node, path, f"{shown} is outside the valid range: {_describe_range(valid)}")
    return value


def _shown(node: Node, value: Any) -> str:
    """A value as the file wrote it: `2`, `'3TiB'`, `'off'`."""
    if isinstance(node, ScalarNode):
        return _short(node.value) if node.tag == _STR else node.value[:60]
    return repr(value)


def _describe_range(valid: Any) -> str:
    low, high = valid.low, valid.high
    if math.isinf(high) and math.isinf(low):
        return "any number"
    if math.isinf(high):
        return f"at least {low:g}"
    if math.isinf(low):
        return f"at most {high:g}"
    return f"{low:g} to {high:g}"


def _convert_sequence(ctx: _Ctx, node: Node, hint: Any, path: str, meta: _Meta) -> Any:
    if not isinstance(node, SequenceNode):
        return ctx.add(node, path, f"expected a list (like [a, b]), got {_describe(node)}")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    items = node.value
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(items) != len(args):
            return ctx.add(node, path, f"expected a list of {len(args)} values, got {len(items)}")
        types_ = list(args)
    else:
        types_ = [args[0] if args else Any] * len(items)
    values = [
        _convert(ctx, item, t, f"{path}[{i}]", meta)
        for i, (item, t) in enumerate(zip(items, types_, strict=True))
    ]
    if any(v is _BAD for v in values):
        return _BAD
    return list(values) if origin is list else tuple(values)


def _convert_mapping(ctx: _Ctx, node: Node, args: tuple[Any, ...], path: str, meta: _Meta) -> Any:
    entries = _mapping(ctx, node, path, path)
    if entries is None:
        return _BAD
    key_type, value_type = args if len(args) == 2 else (str, Any)
    result: dict[Any, Any] = {}
    for key, (key_node, value_node) in entries.items():
        if key_type is not str:
            key_value = _convert(ctx, key_node, key_type, _join(path, key), _Meta())
        else:
            key_value = key
        value = _convert(ctx, value_node, value_type, _join(path, key), meta)
        if key_value is _BAD or value is _BAD:
            return _BAD
        result[key_value] = value
    return result


# --- entry points -------------------------------------------------------------------------


def load_policy_text(text: str, path: str = "<string>") -> PolicyFile:
    """The budget file in `text`; `path` only names it in messages. Raises PolicyFileError."""
    ctx = _Ctx(path)
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_FILE_BYTES:
        ctx.add(0, "", f"file is {units.format_bytes(size)}, over the 1 MiB a policy file may have")
        raise PolicyFileError(ctx.problems)
    root = _compose(ctx, text)
    if root is None:
        raise PolicyFileError(ctx.problems)
    _check_tree(ctx, root, "")
    pf = _read_file(ctx, root, path)
    if ctx.problems:
        raise PolicyFileError(sorted(ctx.problems, key=lambda p: p.line))
    assert pf is not None
    return pf


def load_plain(text: str, path: str = "<string>") -> dict[str, Any]:
    """A valid file as plain data (read as the loader reads it: YAML 1.2 scalars), for tools that
    write a changed copy of it (`trainwarden tune`). Raises PolicyFileError for an invalid file."""
    load_policy_text(text, path)
    ctx = _Ctx(path)
    root = _compose(ctx, text)
    assert root is not None
    return dict(_plain(ctx, root))


def _compose(ctx: _Ctx, text: str) -> Node | None:
    """The root node, or None with the problem recorded."""
    try:
        root = yaml.compose(text, Loader=_PlainLoader)
    except _Refused as e:
        ctx.add(e.line, "", e.message)
        return None
    except yaml.reader.ReaderError as e:
        line = len((text[: e.position] + "x").splitlines())
        char = e.character if isinstance(e.character, str) else chr(e.character)
        ctx.add(line, "", f"the character U+{ord(char):04X} is not allowed in a YAML file; remove it")
        return None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        # An error at the end of the stream is reported on the last line that exists.
        last = len(text.splitlines())
        line = min(mark.line + 1, max(last, 1)) if mark is not None else 0
        ctx.add(line, "", _syntax_message(e))
        return None
    except yaml.YAMLError as e:
        ctx.add(0, "", f"not valid YAML: {e}")
        return None
    if root is None:
        needs = f"`version: {FILE_VERSION}` and `budget:`"
        ctx.add(1, "", f"the file is empty; a policy file needs at least {needs}")
    return root


def _syntax_message(e: yaml.MarkedYAMLError) -> str:
    if e.problem and "expected a single document" in (e.context or ""):
        return "more than one YAML document (a second `---`); a policy file is one document"
    what = " ".join(part for part in (e.context, e.problem) if part)
    return f"YAML syntax error: {what or e}; check indentation, colons and quotes"


def _read_file(ctx: _Ctx, root: Node, path: str) -> PolicyFile | None:
    if id(root) in ctx.bad_nodes:
        return None
    if not isinstance(root, MappingNode):
        keys = ", ".join(_TOP_KEYS[:4])  # the optional objective and tuned sections are for `tune`
        ctx.add(root, "", f"the file must be a mapping with the keys {keys}; got {_describe(root)}")
        return None
    entries = _mapping(ctx, root, "", "the file")
    assert entries is not None
    _check_keys(ctx, entries, _TOP_KEYS, "", "key")
    version = _read_version(ctx, entries, root)
    budget = _read_budget(ctx, entries["budget"][1] if "budget" in entries else None, root)
    controller = _read_controller(ctx, entries["controller"][1] if "controller" in entries else None)
    policies = _read_policies(ctx, entries["policies"][1] if "policies" in entries else None)
    objective = _read_section(ctx, entries, "objective", Objective, "objective")
    tuned = _read_section(ctx, entries, "tuned", Tuned, "the tuned section")
    return PolicyFile(
        path=path,
        version=version,
        budget=budget,
        controller=controller,
        policies=policies,
        objective=objective,
        tuned=tuned,
    )


def _read_section(
    ctx: _Ctx, entries: dict[str, tuple[ScalarNode, Node]], key: str, cls: type, owner: str
) -> Any:
    """An optional top-level section read into its frozen dataclass (None when absent or wrong)."""
    if key not in entries or _is_null(entries[key][1]):
        return None
    node = entries[key][1]
    fields = _mapping(ctx, node, key, key)
    if fields is None:
        return None
    value = _build_dataclass(ctx, cls, fields, key, _line(node), owner)
    return None if value is _BAD else value


def load_policy_file(path: str | os.PathLike[str]) -> PolicyFile:
    """The budget file at `path`. Raises PolicyFileError (also for a missing or unreadable file)."""
    name = os.fspath(path)

    def refuse(message: str) -> PolicyFileError:
        return PolicyFileError([Problem(name, 0, "", message)])

    try:
        st = os.stat(name)
        size = st.st_size
        if os.path.isdir(name):
            raise refuse("is a directory, not a policy file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would be waited on, or read for ever
            raise refuse("is not a regular file (a FIFO, socket or device): save the policy as a file")
        if size > MAX_FILE_BYTES:
            raise refuse(f"file is {units.format_bytes(size)}, over the 1 MiB a policy file may have")
        with open(name, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise refuse("file not found") from None
    except PermissionError:
        raise refuse("cannot read the file: permission denied") from None
    except OSError as e:
        raise refuse(f"cannot read the file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise refuse("file is over the 1 MiB a policy file may have")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyFileError([Problem(name, line, "", "not UTF-8 text; save the file as UTF-8")]) from None
    return load_policy_text(text, name)


def build_policies(pf: PolicyFile) -> list[PolicyKind]:
    """One instance of each policy of the file, in file order."""
    if not pf.policies:
        return []
    from trainwarden.policies import base

    registry = base.kinds()
    return [registry[spec.kind](spec.name, spec.params) for spec in pf.policies]
