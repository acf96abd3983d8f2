"""The layers, checked statically: what each package may not import (imports inside functions too).

- controller/ (the sidecar): no torch or training framework, nothing from trainwarden.adapters;
- policies/ (pure decisions, the budget file): no torch or training framework, nothing from
  trainwarden.adapters;
- adapters/ (inside the job): nothing from trainwarden.policies; what they share with the
  policies is the contract, in the controller (protocol, snapshot, schema).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from helpers import REPO

#: Training frameworks the sidecar and the policies must run without.
FRAMEWORKS = ("torch", "deepspeed", "accelerate", "transformers")
#: package folder -> import prefixes it may not use.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "controller": (*FRAMEWORKS, "trainwarden.adapters"),
    "policies": (*FRAMEWORKS, "trainwarden.adapters"),
    "adapters": ("trainwarden.policies",),
}


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    module: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.module} ({self.rule})"


def _package_of(root: Path, path: Path) -> list[str]:
    """The dotted package a file's relative imports start from: controller/report/run.py ->
    trainwarden.controller.report."""
    return ["trainwarden", *path.relative_to(root).parent.parts]


def imported_modules(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(root, path)
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from trainwarden import adapters` names the package in the alias.
            out.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
            out.append((node.lineno, module))
    return out


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(root: Path) -> list[Violation]:
    found: set[Violation] = set()
    for folder, banned in FORBIDDEN.items():
        for path in sorted((root / folder).rglob("*.py")):
            for line, module in imported_modules(root, path):
                for prefix in banned:
                    if _matches(module, prefix):
                        rule = f"{folder}/ may not import {prefix}"
                        found.add(Violation(path.relative_to(root), line, prefix, rule))
    return sorted(found, key=lambda v: (str(v.path), v.line))


def test_the_layers_hold() -> None:
    found = violations(REPO)
    assert not found, "layering violations (see tests/test_layers.py for the rules):\n" + "\n".join(
        map(str, found)
    )


def test_a_violation_names_the_file_and_line(tmp_path: Path) -> None:
    for folder in FORBIDDEN:
        (tmp_path / folder).mkdir()
    (tmp_path / "controller" / "ok.py").write_text("import json\nfrom trainwarden.policies import base\n")
    (tmp_path / "controller" / "sub").mkdir()
    (tmp_path / "controller" / "sub" / "late.py").write_text(
        '"""Doc."""\n\n\ndef f():\n    import torch.nn\n    return torch\n'
    )
    (tmp_path / "policies" / "rel.py").write_text("from ..adapters import pytorch\n")
    (tmp_path / "adapters" / "pkg.py").write_text("from trainwarden import policies\n")
    (tmp_path / "adapters" / "fine.py").write_text("from trainwarden.controller.schema import Budget\n")
    found = [str(v) for v in violations(tmp_path)]
    assert found == [
        "adapters/pkg.py:1: imports trainwarden.policies (adapters/ may not import trainwarden.policies)",
        "controller/sub/late.py:5: imports torch (controller/ may not import torch)",
        "policies/rel.py:1: imports trainwarden.adapters (policies/ may not import trainwarden.adapters)",
    ]
