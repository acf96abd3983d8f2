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

What lives where:
- nodes.py: strict YAML (plain values only, the limits) and checked reads from nodes, every
  problem collected with its line (`Problem`, `PolicyFileError`);
- sections.py: the file's sections (version, budget, controller, policies, objective, tuned);
- convert.py: a policy's parameters into its kind's frozen `Params` dataclass;
- load.py: the entry points (`load_policy_file`, `load_policy_text`, `load_plain`, `build_policies`).
"""

from trainwarden.policies.loader.load import build_policies, load_plain, load_policy_file, load_policy_text
from trainwarden.policies.loader.nodes import (
    FILE_VERSION,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_NODES,
    PolicyFileError,
    Problem,
)

__all__ = [
    "FILE_VERSION",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "PolicyFileError",
    "Problem",
    "build_policies",
    "load_plain",
    "load_policy_file",
    "load_policy_text",
]
