"""`trainwarden run --attach` for Accelerate: `accelerate.Accelerator` in a job nobody changed is
trainwarden's drop-in (adapters/accelerate/).

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

import logging
import sys
from types import ModuleType
from typing import Any

from trainwarden.adapters.attach.finder import PatchingFinder

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


class AccelerateFinder(PatchingFinder):
    """Finds `accelerate` with the finders after it and wraps its loader."""

    def __init__(self) -> None:
        super().__init__("accelerate", patch)


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
            from trainwarden.adapters.attach import announce

            announce("accelerate.Accelerator", "the job's Accelerator is trainwarden's drop-in")
            return super().__new__(cls)

    original = cls
    setattr(AttachedAccelerator, ORIGINAL_ATTR, original)
    AttachedAccelerator.__name__ = AttachedAccelerator.__qualname__ = "Accelerator"
    AttachedAccelerator.__module__ = "accelerate"
    module.Accelerator = AttachedAccelerator


__all__ = ["LIBRARY_CALLERS", "AccelerateFinder", "install", "patch", "uninstall"]
