"""Every benchmark under bench/ still names trainwarden modules and names that exist.

The benchmarks are not part of the test run (they take minutes and print figures), so a module
moved or a class renamed would leave them broken until someone runs one: this reads each
script's imports (inside functions too) and resolves every `trainwarden.*` name it takes,
without running the benchmark. (Issue 16's layout left three of them importing old names.)
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from helpers import REPO

BENCHES = sorted((REPO / "bench").glob("*.py"))


def trainwarden_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) of every `import trainwarden...` / `from trainwarden... import`."""
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainwarden"):
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.startswith("trainwarden")]
    return out


def test_there_are_benchmarks_and_they_import_trainwarden() -> None:
    assert len(BENCHES) >= 5 and sum(len(trainwarden_imports(p)) for p in BENCHES) >= 10


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: p.name)
def test_every_trainwarden_name_a_benchmark_imports_exists(path: Path) -> None:
    missing = []
    for line, module, name in trainwarden_imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"bench/{path.name}:{line}: module {module} ({exc})")
            continue
        if name is None or hasattr(mod, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            missing.append(f"bench/{path.name}:{line}: {module} has no {name}")
    assert not missing, "benchmarks import names that no longer exist (follow the move):\n" + "\n".join(
        missing
    )
