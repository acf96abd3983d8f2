"""Strict YAML: composing a file into nodes that hold only plain values, the limits (size, depth,
nodes), and reading checked values from nodes with every problem collected (`Problem`,
`PolicyFileError`) with its line.
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

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


def _shown(node: Node, value: Any) -> str:
    """A value as the file wrote it: `2`, `'3TiB'`, `'off'`."""
    if isinstance(node, ScalarNode):
        return _short(node.value) if node.tag == _STR else node.value[:60]
    return repr(value)
