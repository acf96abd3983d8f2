"""What `trainwarden run --attach` and the attached job share: the job's sitecustomize.py, the
environment that puts it first on the job's PYTHONPATH, and the file in which the job notes the
frameworks it imported (read back for `trainwarden run`'s "no job connected" line).

Text and files only, standard library only: the controller writes and reads them without
importing the adapters or torch. The hook the sitecustomize installs lives in the job
(`trainwarden.adapters.attach`, which writes IMPORTED_FILE).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from trainwarden.controller.protocol import ENV_ATTACH

#: Directory under the run directory that holds the job's sitecustomize.py.
SITE_DIR_NAME = "attach"
#: Frameworks whose import the hook notes (for `trainwarden run`'s "no job connected" line).
WATCHED = ("torch", "deepspeed", "accelerate", "transformers", "lightning", "pytorch_lightning")
#: File under SITE_DIR_NAME: a line "PID NAME" per first import of a WATCHED name in a process.
IMPORTED_FILE = "imported.txt"

#: The job's sitecustomize.py. Standard library only until TRAINWARDEN_ATTACH says to attach;
#: never raises (site would print "Error in sitecustomize" and go on, but a job should not
#: see trainwarden fail at start-up). The hook is `trainwarden.adapters.attach`.
SITECUSTOMIZE = '''\
"""Written by `trainwarden run --attach` (trainwarden.controller.attach_env): makes
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
    "imported_frameworks",
    "job_env",
    "write_site_dir",
]


if __name__ == "__main__":  # python -m trainwarden.controller.attach_env DIR: for other launchers
    print(write_site_dir(sys.argv[1] if len(sys.argv) > 1 else "trainwarden-attach").resolve())
