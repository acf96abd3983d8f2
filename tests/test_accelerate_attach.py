"""`trainwarden run --attach` makes `accelerate.Accelerator` in an unchanged job trainwarden's
drop-in (adapters/attach/accelerate.py); libraries building their own Accelerator (the HF Trainer)
get Accelerate's own, and without --attach nothing changes. Checked in a fresh interpreter with
the sitecustomize `trainwarden run --attach` writes, against the real Accelerate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from accelerate_helpers import fresh_job_env

from trainwarden.adapters import attach as attach_hook

PROBE = """\
import json, sys
out = {"early": "accelerate" in sys.modules or "torch" in sys.modules,
       "finders": [type(f).__name__ for f in sys.meta_path[:2]]}
import accelerate
from accelerate import Accelerator
acc = Accelerator()
out["is_trainwarden"] = hasattr(acc, "should_stop") and hasattr(acc, "log_domain_loss")
out["isinstance_accelerate"] = isinstance(acc, accelerate.accelerator.Accelerator)
out["same_name"] = [Accelerator.__module__, Accelerator.__name__, Accelerator is accelerate.Accelerator]
scope = {"__name__": "transformers.trainer", "Accelerator": Accelerator}
exec("lib = Accelerator()", scope)  # as the HF Trainer builds its own
out["library_gets"] = type(scope["lib"]).__module__
print(json.dumps(out))
"""


def _probe(tmp_path: Path, attach: str) -> dict[str, Any]:
    env = fresh_job_env(TRAINWARDEN_DISABLE="1")
    env.update(attach_hook.job_env(tmp_path / "run", env))
    env["TRAINWARDEN_ATTACH"] = attach
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_attach_makes_the_jobs_accelerator_the_dropin_and_leaves_libraries_alone(tmp_path: Path) -> None:
    out = _probe(tmp_path, "1")
    assert out["early"] is False  # nothing imported before the job does
    assert out["finders"] == ["DeepSpeedFinder", "AccelerateFinder"]
    assert out["is_trainwarden"] and out["isinstance_accelerate"]
    assert out["same_name"] == ["accelerate", "Accelerator", True]
    assert out["library_gets"] == "accelerate.accelerator"


@pytest.mark.slow
def test_without_attach_the_job_gets_accelerates_own(tmp_path: Path) -> None:
    out = _probe(tmp_path, "0")
    assert out["is_trainwarden"] is False
    assert out["library_gets"] == "accelerate.accelerator"
