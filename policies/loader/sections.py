"""The sections of a budget file: version, budget, controller, policies (kinds, names, the knobs
they share), objective and tuned, each read into its `controller.schema` dataclass.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
from trainwarden.policies.loader.convert import _build_dataclass
from trainwarden.policies.loader.nodes import (
    _BAD,
    _STR,
    FILE_VERSION,
    _check_keys,
    _choice,
    _Ctx,
    _describe,
    _is_null,
    _line,
    _mapping,
    _number,
    _scalar,
    _unit_value,
    _unknown,
)

if typing.TYPE_CHECKING:
    from trainwarden.policies.base import PolicyKind

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

_TOP_KEYS = ("version", "budget", "controller", "policies", "objective", "tuned")
_BUDGET_KEYS = ("device_memory", "wall_time", "tokens", "flops", "cost")
_COST_KEYS = ("max", "per_device_hour")
_CONTROLLER_KEYS = (
    "sync_every",
    "decide_interval_s",
    "max_exchange_interval_s",
    "stale_after_s",
    "stop",
    "stop_grace_steps",
    "checkpoint_on_stop",
)
_POLICY_KEYS = ("kind", "name")


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
    for key in ("decide_interval_s", "max_exchange_interval_s", "stale_after_s"):
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
