"""What a job attached with zero lines gets in its environment: the `sitecustomize.py` that
`trainwarden run --attach` puts first on its PYTHONPATH, the variables that go with it, and the
note of which frameworks the job imported (for `trainwarden run`'s "no job connected" line).
Standard library only: the sitecustomize imports the rest only once TRAINWARDEN_ATTACH says so.

    python -m trainwarden.adapters.attach DIR      # writes DIR/sitecustomize.py for another launcher
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainwarden.controller.protocol import ENV_ATTACH, ENV_RUN_DIR

#: Directory under the run directory that holds the job's sitecustomize.py.
SITE_DIR_NAME = "attach"

#: The job's sitecustomize.py. Standard library only until TRAINWARDEN_ATTACH says to attach;
#: never raises (site would print "Error in sitecustomize" and go on, but a job should not
#: see trainwarden fail at start-up).
SITECUSTOMIZE = '''\
"""Written by `trainwarden run --attach` (trainwarden.adapters.attach.env): makes
deepspeed.initialize return trainwarden's live handle, then runs the sitecustomize this one
hides. Only on the PYTHONPATH of that run's job."""


def _trainwarden_attach() -> None:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    if os.environ.get("TRAINWARDEN_ATTACH", "") not in ("", "0"):
        try:
            from trainwarden.adapters import attach

            attach.install()
        except Exception as exc:  # trainwarden not importable in this interpreter, or broken
            sys.stderr.write(
                f"trainwarden --attach: not attached in {sys.executable} ({type(exc).__name__}: {exc}); "
                "the job runs without trainwarden\\n"
            )
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


_trainwarden_attach()
del _trainwarden_attach
'''


def write_site_dir(directory: str | os.PathLike[str]) -> Path:
    """Write the sitecustomize.py into `directory` (created); returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return d


def job_env(run_dir: str | os.PathLike[str], env: Mapping[str, str]) -> dict[str, str]:
    """The variables a job needs to be attached: PYTHONPATH with the site directory first (the
    job's own PYTHONPATH kept after it) and TRAINWARDEN_ATTACH=1. Writes the site directory."""
    site = write_site_dir(Path(run_dir) / SITE_DIR_NAME)
    existing = env.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": os.pathsep.join([str(site), existing]) if existing else str(site),
        ENV_ATTACH: "1",
    }


# ---- what the job imported, and what was attached ---------------------------------------------
#: Frameworks whose import the hook notes (for `trainwarden run`'s "no job connected" line).
WATCHED = ("torch", "deepspeed", "accelerate", "transformers", "lightning", "pytorch_lightning")
IMPORTED_FILE = "imported.txt"
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


def imported_frameworks(run_dir: str | os.PathLike[str]) -> list[str]:
    """The WATCHED frameworks the job's processes imported so far, in WATCHED's order."""
    try:
        text = (Path(run_dir) / SITE_DIR_NAME / IMPORTED_FILE).read_text()
    except OSError:
        return []
    names = {line.split()[-1] for line in text.splitlines() if line.strip()}
    return [n for n in WATCHED if n in names]


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
