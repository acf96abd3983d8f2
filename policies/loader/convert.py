"""A policy's parameters: a node converted into the kind's frozen `Params` dataclass, field by
field, by its type hints, `valid` ranges, `choices` and units (sizes, durations, counts).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from yaml.nodes import Node, ScalarNode, SequenceNode

from trainwarden.policies import units
from trainwarden.policies.loader.nodes import (
    _BAD,
    _STR,
    _Ctx,
    _describe,
    _is_null,
    _join,
    _line,
    _mapping,
    _plain,
    _scalar,
    _shown,
    _unknown,
)

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
