"""`trainwarden run --attach`: a job whose code nobody changed gets trainwarden's adapters.

- env.py: the `sitecustomize.py` that `trainwarden run --attach` puts first on the job's
  PYTHONPATH (it calls `install()` here once TRAINWARDEN_ATTACH=1), the job's variables
  (`job_env`), and the note of which frameworks the job imported.
- finder.py: the meta-path finder that lets one package import as usual, then patches it.
- deepspeed.py: `deepspeed.initialize` returns the DeepSpeed adapter's live handle.
- accelerate.py: `accelerate.Accelerator` is trainwarden's drop-in.
- hf.py: every `transformers.Trainer` gets the `TrainwardenCallback`.

    python -m trainwarden.adapters.attach DIR      # the sitecustomize for another launcher
"""

from __future__ import annotations

from trainwarden.adapters.attach import accelerate as _accelerate
from trainwarden.adapters.attach import deepspeed as _deepspeed
from trainwarden.adapters.attach import env as _env
from trainwarden.adapters.attach import hf as _hf
from trainwarden.adapters.attach.deepspeed import (
    LIBRARY_CALLERS,
    ORIGINAL_ATTR,
    DeepSpeedFinder,
    make_dropin,
    original_initialize,
    patch,
)
from trainwarden.adapters.attach.env import (
    IMPORTED_FILE,
    SITE_DIR_NAME,
    SITECUSTOMIZE,
    WATCHED,
    announce,
    imported_frameworks,
    job_env,
    write_site_dir,
)


def install() -> None:
    """Make `deepspeed.initialize` return trainwarden's handle in this process (now if DeepSpeed is
    already imported, else when it is), `accelerate.Accelerator` trainwarden's drop-in and every
    Trainer carry the callback; the DeepSpeed finder goes first. Idempotent."""
    _env.watch_imports()
    _hf.install()
    _accelerate.install()
    _deepspeed.install()


def uninstall() -> None:
    """Remove the finders and give the frameworks' own objects back."""
    _accelerate.uninstall()
    _hf.uninstall()
    _env.unwatch_imports()
    _deepspeed.uninstall()


__all__ = [
    "IMPORTED_FILE",
    "LIBRARY_CALLERS",
    "ORIGINAL_ATTR",
    "SITECUSTOMIZE",
    "SITE_DIR_NAME",
    "WATCHED",
    "DeepSpeedFinder",
    "announce",
    "imported_frameworks",
    "install",
    "job_env",
    "make_dropin",
    "original_initialize",
    "patch",
    "uninstall",
    "write_site_dir",
]
