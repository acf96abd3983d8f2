"""`trainwarden run --attach` for the HF Trainer: every `transformers.Trainer` the job builds gets
trainwarden's callback (adapters/hf.py), with no line of the script changed.

Installed by `attach_hook.install()` like the DeepSpeed and Accelerate hooks: a finder answers
only for `transformers.trainer` (the module that defines the Trainer, imported lazily by
`transformers`); once the real module has run, `Trainer.__init__` is wrapped to add a
`TrainwardenCallback` after the Trainer's own `__init__`, unless one is there already (a script
that added it by hand keeps its own). Subclasses (Seq2SeqTrainer, TRL's trainers) call it through
`super().__init__` and are attached too. Standard library only until transformers is imported.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType
from typing import Any

from trainwarden.adapters.attach.finder import PatchingFinder

ORIGINAL_ATTR = "__trainwarden_original__"
MODULE = "transformers.trainer"


class TrainerFinder(PatchingFinder):
    def __init__(self) -> None:
        super().__init__(MODULE, patch)


def install() -> None:
    if not any(isinstance(f, TrainerFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TrainerFinder())
    module = sys.modules.get(MODULE)
    if module is not None:
        patch(module)


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TrainerFinder)]
    cls = getattr(sys.modules.get(MODULE), "Trainer", None)
    original = getattr(getattr(cls, "__init__", None), ORIGINAL_ATTR, None)
    if cls is not None and original is not None:
        cls.__init__ = original


def patch(module: ModuleType) -> None:
    """Wrap `module.Trainer.__init__` (idempotent; never raises into the job)."""
    cls = getattr(module, "Trainer", None)
    init = getattr(cls, "__init__", None)
    if cls is None or init is None or getattr(init, ORIGINAL_ATTR, None) is not None:
        return

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        from trainwarden.adapters.attach import announce
        from trainwarden.adapters.hf import TrainwardenCallback

        callbacks = getattr(getattr(self, "callback_handler", None), "callbacks", [])
        if not any(isinstance(cb, TrainwardenCallback) for cb in callbacks):
            self.add_callback(TrainwardenCallback())
            announce("transformers.Trainer", "the Trainer has trainwarden's callback")

    setattr(__init__, ORIGINAL_ATTR, init)
    cls.__init__ = __init__


__all__ = ["TrainerFinder", "install", "patch", "uninstall"]
