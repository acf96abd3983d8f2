"""`trainwarden validate P.yaml ...`: load each budget file strictly and say what is wrong.

Prints `OK  path (N policies: kind, kind)` on stdout for a good file and each problem on
its own line on stderr for a bad one; never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from trainwarden.controller.schema import PolicyFile
from trainwarden.policies.loader import PolicyFileError, Problem, build_policies, load_policy_file


def describe(pf: PolicyFile) -> str:
    """`3 policies: memory, compute, data` (`0 policies` for none)."""
    n = len(pf.policies)
    noun = "policy" if n == 1 else "policies"
    kinds = ", ".join(spec.kind for spec in pf.policies)
    return f"{n} {noun}: {kinds}" if kinds else f"{n} {noun}"


def validate_file(path: str) -> tuple[PolicyFile | None, list[Problem]]:
    """The file at `path` and its problems: (file, []) when good, (None, problems) when not."""
    try:
        pf = load_policy_file(path)
    except PolicyFileError as e:
        return None, e.problems
    try:
        build_policies(pf)
    except Exception as e:  # a policy kind that cannot be built from valid params is a bug: say so
        return None, [Problem(path, 0, "policies", f"a policy could not be built: {type(e).__name__}: {e}")]
    return pf, []


def validate_main(paths: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate each file; 0 when every file is good, 1 when any is not, 2 when none was given."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not paths:
        print("trainwarden validate: give one or more policy files: trainwarden validate job.yaml", file=err)
        return 2
    status = 0
    for path in paths:
        try:
            pf, problems = validate_file(path)
        except Exception as e:  # never a traceback from `validate`
            pf, problems = None, [Problem(path, 0, "", f"internal error: {type(e).__name__}: {e}")]
        if pf is None:
            status = 1
            for problem in problems:
                print(problem, file=err)
        else:
            print(f"OK  {path} ({describe(pf)})", file=out)
    return status
