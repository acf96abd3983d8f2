"""A meta-path finder that lets one top-level package import as usual, then patches it.

`trainwarden run --attach` uses it twice (adapters/attach/ for `deepspeed`,
adapters/attach/accelerate.py for `accelerate`). The finder answers only for its one name: it
asks the finders after it for the real spec and wraps the real loader, which executes the
package and then calls `patch(module)` before the import returns (so `from pkg import X` already
sees the patched X). Standard library only: it is imported by the job's sitecustomize, before
anything else. What it costs: a string comparison per import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any


class _PatchingLoader(importlib.abc.Loader):
    """The real loader, plus `patch(module)` once it has run."""

    def __init__(self, loader: Any, patch: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module is the real loader's from here on: nothing of the hook stays visible.
        spec = module.__spec__
        if spec is not None:
            spec.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds `name` with the finders after it, and wraps its loader to call `patch`."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self._name = name
        self._patch = patch
        self._busy = False

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._name or self._busy:
            return None
        self._busy = True
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None  # not installed, or a kind of module this hook leaves alone
        spec.loader = _PatchingLoader(spec.loader, self._patch)
        return spec
