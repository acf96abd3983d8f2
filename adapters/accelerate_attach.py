"""`trainwarden run --attach` for Accelerate: `accelerate.Accelerator` in a job nobody changed is
trainwarden's drop-in (adapters/accelerate.py).

Installed by `attach_hook.install()` (the sitecustomize `trainwarden run --attach` puts on the
job's PYTHONPATH), the same way as the DeepSpeed hook there: a finder in `sys.meta_path` answers
only for the top-level name `accelerate`; the real package is found and executed as usual, and
right after, `accelerate.Accelerator` is replaced by `AttachedAccelerator`, before the import
returns (so `from accelerate import Accelerator` sees it). Nothing is imported early: this module
is standard library only until Accelerate is imported by the job.

Calls from libraries that build an Accelerator for their own loop (transformers' Trainer,
Lightning, TRL, ...) get Accelerate's own class, exactly as without --attach: their loops do not
follow Accelerate's user-loop contract the drop-in relies on (the Trainer has its own callback:
adapters/hf.py). `accelerate.accelerator.Accelerator` stays Accelerate's own too. What it costs:
a string comparison per import, and the import of the adapter when Accelerate is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType
from typing import Any

log = logging.getLogger("trainwarden")

#: The replaced module attribute keeps Accelerate's own class under this name.
ORIGINAL_ATTR = "__trainwarden_original__"
#: Top-level packages whose `Accelerator(...)` gets Accelerate's own class.
LIBRARY_CALLERS = frozenset(
    {
        "accelerate",
        "transformers",
        "trl",
        "peft",
        "lightning",
        "pytorch_lightning",
        "lightning_fabric",
        "diffusers",
        "sentence_transformers",
        "setfit",
        "trainwarden",
    }
)


class _PatchingLoader(importlib.abc.Loader):
    """The real loader of `accelerate`, plus the replacement of `Accelerator` once it has run."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        if spec is not None:
            spec.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        patch(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class AccelerateFinder(importlib.abc.MetaPathFinder):
    """Finds `accelerate` with the finders after it and wraps its loader."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(
        self, fullname: str, path: Any = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "accelerate" or self._busy:
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
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def install() -> None:
    """Make `accelerate.Accelerator` the drop-in in this process, now or when it is imported."""
    if not any(isinstance(f, AccelerateFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AccelerateFinder())
    module = sys.modules.get("accelerate")
    if module is not None:
        patch(module)


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, AccelerateFinder)]
    module = sys.modules.get("accelerate")
    if module is not None:
        original = getattr(getattr(module, "Accelerator", None), ORIGINAL_ATTR, None)
        if original is not None:
            module.Accelerator = original


def patch(module: ModuleType) -> None:
    """Replace `module.Accelerator` by the drop-in; idempotent. Never raises into the job."""
    cls = getattr(module, "Accelerator", None)
    if cls is None or cls.__dict__.get(ORIGINAL_ATTR) is not None:
        return
    try:
        from trainwarden.adapters.accelerate import Accelerator
    except Exception as exc:  # an Accelerate this adapter cannot work with: leave it alone
        log.warning("trainwarden --attach: Accelerator not attached (%s: %s)", type(exc).__name__, exc)
        return

    class AttachedAccelerator(Accelerator):
        """trainwarden's Accelerator for the job's own loop; libraries get Accelerate's own."""

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "") or ""
            if caller.split(".")[0] in LIBRARY_CALLERS:
                return original(*args, **kwargs)
            return super().__new__(cls)

    original = cls
    setattr(AttachedAccelerator, ORIGINAL_ATTR, original)
    AttachedAccelerator.__name__ = AttachedAccelerator.__qualname__ = "Accelerator"
    AttachedAccelerator.__module__ = "accelerate"
    module.Accelerator = AttachedAccelerator
    log.info("trainwarden --attach: accelerate.Accelerator is trainwarden's drop-in")


__all__ = ["LIBRARY_CALLERS", "AccelerateFinder", "install", "patch", "uninstall"]
