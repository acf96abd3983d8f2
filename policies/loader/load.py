"""The entry points: `load_policy_file`, `load_policy_text`, `load_plain`, and `build_policies`
(one instance of each policy of a loaded file).
"""

from __future__ import annotations

import os
import stat
import typing
from typing import Any

from trainwarden.controller.schema import (
    PolicyFile,
)
from trainwarden.policies import units
from trainwarden.policies.loader.nodes import (
    MAX_FILE_BYTES,
    PolicyFileError,
    Problem,
    _check_tree,
    _compose,
    _Ctx,
    _plain,
)
from trainwarden.policies.loader.sections import _read_file

if typing.TYPE_CHECKING:
    from trainwarden.policies.base import PolicyKind

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
