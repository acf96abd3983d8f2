"""`trainwarden run --attach`: `deepspeed.initialize` in a job whose code nobody changes returns
trainwarden's live handle.

    trainwarden run --attach --policy P.yaml -- torchrun --nproc_per_node 8 train.py ...

How: `trainwarden run` writes a `sitecustomize.py` into the run directory (`<run_dir>/attach/`)
and puts that directory first on the job's PYTHONPATH, with `TRAINWARDEN_ATTACH=1`. Python
imports `sitecustomize` at start-up in every interpreter of the job (the launcher, every rank,
any Python subprocess that inherits the environment). Ours does two things:

1. it inserts a finder at the front of `sys.meta_path` that answers only for the top-level
   name `deepspeed`: when the job imports DeepSpeed, the real module is found and executed as
   usual, and right after, `deepspeed.initialize` is replaced by trainwarden's drop-in
   (`trainwarden.adapters.deepspeed.initialize`, same arguments, same return tuple). Nothing is
   imported early: a job that never imports DeepSpeed is untouched, and one that does gets the
   module it would have got, with one attribute replaced (`deepspeed.__loader__` and
   `__spec__.loader` are the real loader again once it is loaded). `from deepspeed import
   initialize` sees the drop-in, since the replacement happens before the import returns.
2. it then runs the `sitecustomize` it hides, if any (the next one on sys.path: Debian's, a
   cluster's, a user's), so prepending ours takes nothing away.

A PYTHONPATH directory is used rather than a `.pth` file because it needs no write access to
the environment and lives only as long as the job's environment does. What it costs: the
import of this module (standard library only: a few milliseconds) in each Python process of
the job, and a string comparison per import.

What is not attached (DeepSpeed's own `initialize` runs, as without --attach):
- calls from libraries that expect a real `DeepSpeedEngine` back (Accelerate, HF transformers,
  Lightning, DeepSpeed itself): they have their own integration points;
- a `PipelineModule` (pipeline engines train through `train_batch`, which the handle cannot
  observe step by step);
- a second `deepspeed.initialize` while an attached handle is open (an evaluation or teacher
  engine) gets a handle too, but no agent: one job reports to its controller once.
Interpreters started with `-E`, `-I` or `-S` ignore PYTHONPATH or site, and launchers that do
not forward the environment (pdsh for multi-node DeepSpeed launches: put PYTHONPATH and
TRAINWARDEN_ATTACH in `.deepspeed_env`) start ranks without the hook.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any

from trainwarden.adapters.attach.env import announce
from trainwarden.adapters.attach.finder import PatchingFinder

log = logging.getLogger("trainwarden")

#: The drop-in keeps DeepSpeed's own initialize under this attribute (trainwarden builds its
#: engines with it, and `original_initialize` finds it).
ORIGINAL_ATTR = "__trainwarden_original__"
#: Top-level packages whose calls to deepspeed.initialize are left to DeepSpeed.
LIBRARY_CALLERS = frozenset(
    {"accelerate", "transformers", "lightning", "pytorch_lightning", "lightning_fabric", "deepspeed"}
)


class DeepSpeedFinder(PatchingFinder):
    """Finds `deepspeed` with the finders after it, and wraps its loader (see the docstring)."""

    def __init__(self) -> None:
        super().__init__("deepspeed", patch)


def original_initialize(deepspeed_module: ModuleType) -> Callable[..., Any]:
    """DeepSpeed's own initialize, whether or not the drop-in replaced it."""
    fn = deepspeed_module.initialize
    return getattr(fn, ORIGINAL_ATTR, fn)


def patch(module: ModuleType) -> None:
    """Replace `module.initialize` (DeepSpeed's) by the drop-in; idempotent. A DeepSpeed without
    `initialize` is left alone, with a warning."""
    fn = getattr(module, "initialize", None)
    if fn is None:
        log.warning("trainwarden --attach: deepspeed has no initialize(); not attached")
        return
    if getattr(fn, ORIGINAL_ATTR, None) is not None:
        return
    module.initialize = make_dropin(fn)


#: The handle that reports to the controller (one per process).
_reporting: weakref.ReferenceType[Any] | None = None


def make_dropin(original: Callable[..., Any]) -> Callable[..., Any]:
    """A function with `original`'s signature that returns trainwarden's handle instead."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        global _reporting
        caller = sys._getframe(1).f_globals.get("__name__", "") or ""
        if caller.split(".")[0] in LIBRARY_CALLERS:
            return original(*args, **kwargs)
        arguments = signature.bind(*args, **kwargs).arguments
        model = arguments.get("model")
        if type(model).__name__ == "PipelineModule":
            log.warning(
                "trainwarden --attach: a PipelineModule is trained through train_batch, which "
                "trainwarden cannot observe step by step; this engine is DeepSpeed's own"
            )
            return original(*args, **kwargs)
        from trainwarden.adapters import deepspeed as twds

        unknown = set(arguments) - set(inspect.signature(twds.initialize).parameters)
        if unknown:  # a newer DeepSpeed's argument trainwarden does not know: run it untouched
            log.warning(
                "trainwarden --attach: deepspeed.initialize got %s, which trainwarden does not know; "
                "this engine is DeepSpeed's own",
                ", ".join(sorted(unknown)),
            )
            return original(*args, **kwargs)
        live = _reporting() if _reporting is not None else None
        report = live is None or live._closed
        if not report:
            log.warning(
                "trainwarden --attach: another deepspeed.initialize while an attached engine is "
                "open; this one can be switched by hand (engine.reconfigure) but reports nothing"
            )
        out = twds.initialize(**arguments, attach_agent=report)
        if report:
            _reporting = weakref.ref(out[0])
            announce("deepspeed.initialize", "it returns trainwarden's live handle")
        return out

    setattr(initialize, ORIGINAL_ATTR, original)
    return initialize


def install() -> None:
    """The DeepSpeed finder at the front of sys.meta_path, and the drop-in now if DeepSpeed is
    already imported; idempotent."""
    if not any(isinstance(f, DeepSpeedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, DeepSpeedFinder())
    module = sys.modules.get("deepspeed")
    if module is not None:
        patch(module)


def uninstall() -> None:
    """The finder removed and DeepSpeed's own initialize given back."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, DeepSpeedFinder)]
    module = sys.modules.get("deepspeed")
    if module is not None:
        original = getattr(getattr(module, "initialize", None), ORIGINAL_ATTR, None)
        if original is not None:
            module.initialize = original


__all__ = [
    "LIBRARY_CALLERS",
    "ORIGINAL_ATTR",
    "DeepSpeedFinder",
    "install",
    "make_dropin",
    "original_initialize",
    "patch",
    "uninstall",
]
