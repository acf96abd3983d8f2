"""The docs name only what exists: every repository path written in backticks in README.md,
docs/*.md and docs/design/*.md is in the repository, and every `trainwarden.x.y` dotted name in
them resolves (its module part by importlib's finders, a trailing name in that module's source).

Why: the architecture text once named files that no longer existed after a move; a reader
following a path into nothing loses the trust the rest of the page needs. Modules are resolved
without importing them (the parent packages' `__init__` would import torch and DeepSpeed), so
the test takes well under a second.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
from helpers import REPO

DOCS = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("docs/design/*.md")])
FILE_ENDINGS = (".py", ".md", ".yaml", ".json", ".sh")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"\btrainwarden(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
#: A token with one of these is a template (`runs/<id>/`, `$OUT/x.json`, `RUN_DIR/summary.json`:
#: a segment in capitals with no file ending is a name the reader fills in), not a path.
PLACEHOLDER = re.compile(r"[<>*$%{}]|(?:^|/)[A-Z][A-Z0-9_]+(?:/|$)|\.\.\.")


def _path_tokens(text: str) -> list[str]:
    """Tokens of inline code spans that look like repository paths: a `/` inside, and a file
    ending or a trailing `/` for a folder. URLs, absolute paths and templates are not paths."""
    found = []
    for span in SPAN.findall(FENCE.sub("", text)):
        for token in re.split(r"[\s=,;()]+", span):
            token = token.strip("'\"").rstrip(".:")
            if "/" not in token or "://" in token or token.startswith(("/", "~", "-")):
                continue
            if PLACEHOLDER.search(token):
                continue
            if token.endswith("/") or token.endswith(FILE_ENDINGS):
                found.append(token)
    return found


def _cases() -> list[tuple[str, str]]:
    return [(doc.relative_to(REPO).as_posix(), t) for doc in DOCS for t in _path_tokens(doc.read_text())]


def _dotted_cases() -> list[tuple[str, str]]:
    return [
        (doc.relative_to(REPO).as_posix(), name.rstrip("."))
        for doc in DOCS
        for name in sorted(set(DOTTED.findall(doc.read_text())))
    ]


def test_the_docs_are_scanned() -> None:
    # A scan that found nothing would pass every check below: the page must name paths and modules.
    assert any(doc.name == "ARCHITECTURE.md" for doc in DOCS)
    assert len(_cases()) > 50 and len(_dotted_cases()) > 10


@pytest.mark.parametrize(("doc", "path"), _cases())
def test_path_exists(doc: str, path: str) -> None:
    target = REPO / path
    if not target.exists() and _ignored_output(path):
        return
    assert target.exists(), f"{doc} names `{path}`, which is not in the repository: fix the path or drop it"
    if path.endswith("/"):
        assert target.is_dir(), f"{doc} names `{path}` as a folder, but it is a file"


def _ignored_output(path: str) -> bool:
    """A path .gitignore names (`.gpu-wheels/`) is what a script of the repository writes, not a
    source: the docs may name it before it exists."""
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, check=False)
    return done.returncode == 0


@cache
def _spec(module: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of a dotted module, found without executing any package's `__init__`:
    importlib finds `trainwarden.<package>` (the namespace is empty), then each level below is
    looked up in its parent's search locations."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    spec = importlib.util.find_spec(".".join(parts[:2]))
    for part in parts[2:]:
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(
            f"{spec.name}.{part}", list(spec.submodule_search_locations)
        )
    return spec


@cache
def _top_level_names(origin: str) -> frozenset[str]:
    tree = ast.parse(Path(origin).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value:
                names.update(ast.literal_eval(node.value))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


@pytest.mark.parametrize(("doc", "name"), _dotted_cases())
def test_dotted_name_resolves(doc: str, name: str) -> None:
    parts = name.split(".")
    for cut in range(len(parts), 1, -1):
        spec = _spec(".".join(parts[:cut]))
        if spec is not None:
            break
    else:
        pytest.fail(f"{doc} names `{name}`: no module trainwarden.{parts[1]} (the packages: pyproject.toml)")
    module, rest = ".".join(parts[:cut]), parts[cut:]
    assert len(rest) <= 1, (
        f"{doc} names `{name}`, but `{module}` has no submodule `{rest[0]}`: fix the module path"
    )
    if rest:
        assert spec.origin is not None and spec.origin.endswith(".py")
        assert rest[0] in _top_level_names(spec.origin), (
            f"{doc} names `{name}`, but {module} ({spec.origin}) defines no `{rest[0]}`: fix the name"
        )
