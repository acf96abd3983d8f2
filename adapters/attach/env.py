"""The job's side of what a job attached with zero lines shares with `trainwarden run --attach`:
the note of which frameworks the job imported (for `run`'s "no job connected" line) and the
"attached" line. The sitecustomize, its environment and the file names are the controller's
(controller/attach_env.py: `run` writes them without importing the adapters); re-exported here.
Standard library only: the sitecustomize imports the rest only once TRAINWARDEN_ATTACH says so.

    python -m trainwarden.adapters.attach DIR      # writes DIR/sitecustomize.py for another launcher
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from trainwarden.controller.attach_env import (
    IMPORTED_FILE,
    SITE_DIR_NAME,
    SITECUSTOMIZE,
    WATCHED,
    imported_frameworks,
    job_env,
    write_site_dir,
)
from trainwarden.controller.protocol import ENV_RUN_DIR

_announced: set[str] = set()


def announce(what: str, detail: str) -> None:
    """Say once per process, on stderr, whatever the job's log level, that `what` is attached
    (rank 0 only: a job of N ranks says it once)."""
    if what in _announced or os.environ.get("RANK", "0") != "0":
        return
    _announced.add(what)
    sys.stderr.write(f"trainwarden --attach: {what} attached: {detail}\n")
    sys.stderr.flush()


class _ImportWatcher:
    """A meta-path finder that finds nothing: it notes the first import of each WATCHED name in
    the run directory (TRAINWARDEN_RUN_DIR), once per process. A set lookup per import."""

    def __init__(self, run_dir: str) -> None:
        self._path = Path(run_dir) / SITE_DIR_NAME / IMPORTED_FILE
        self._seen: set[str] = set()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname in WATCHED and fullname not in self._seen:
            self._seen.add(fullname)
            try:
                with open(self._path, "a") as fh:
                    fh.write(f"{os.getpid()} {fullname}\n")
            except OSError:
                pass
        return None


def watch_imports() -> None:
    run_dir = os.environ.get(ENV_RUN_DIR)
    if run_dir and not any(isinstance(f, _ImportWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportWatcher(run_dir))


def unwatch_imports() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ImportWatcher)]


__all__ = [
    "IMPORTED_FILE",
    "SITECUSTOMIZE",
    "SITE_DIR_NAME",
    "WATCHED",
    "announce",
    "imported_frameworks",
    "job_env",
    "unwatch_imports",
    "watch_imports",
    "write_site_dir",
]
