"""The wheel holds every module: pyproject lists its packages one by one, so a subpackage left out
still imports in an editable install (the tests' own) and is missing from what `pip install`
gets. Build the wheel, install it into a fresh venv, import every module of the source tree from
it and run the command it installs.

The fresh venv reaches the third-party packages (yaml, prometheus_client, torch, ...) through a
.pth line naming the project venv's site-packages. A directory added by a .pth line is no site
directory, so the .pth files in it (the editable install's among them) are not processed:
trainwarden resolves from the wheel alone, which the test asserts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow

#: The folders pyproject maps under `trainwarden.*`.
SOURCE_DIRS = ("controller", "adapters", "policies", "examples")

IMPORT_ALL = """
import importlib, importlib.util, json, sys
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        if name.endswith(".__main__"):  # a `python -m` entry point: importing it runs it
            if importlib.util.find_spec(name) is None:
                raise ModuleNotFoundError(name)
            continue
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
import trainwarden.controller
print(json.dumps({"failed": failed, "controller_file": trainwarden.controller.__file__}))
"""


def source_modules(root: Path) -> list[str]:
    """Every module the source tree has, as the name it installs under (`trainwarden.<folder>...`)."""
    names = []
    for top in SOURCE_DIRS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(["trainwarden", *parts]))
    return names


def test_source_modules_maps_folders_to_names(tmp_path: Path) -> None:
    for rel in ("controller/__init__.py", "controller/report/plots.py", "policies/x.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert source_modules(tmp_path) == [
        "trainwarden.controller",
        "trainwarden.controller.report.plots",
        "trainwarden.policies.x",
    ]


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_the_wheel_installs_every_module_and_the_command(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for top in SOURCE_DIRS:
        shutil.copytree(REPO / top, src / top, ignore=ignore)
    wheels = tmp_path / "wheels"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ]
    )
    [wheel] = wheels.glob("trainwarden-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)])
    site = run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(site) / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    modules = source_modules(REPO)

    out = run([str(py), "-c", IMPORT_ALL, json.dumps(modules)], cwd=tmp_path, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["controller_file"]).resolve().is_relative_to(venv.resolve()), (
        f"trainwarden came from {result['controller_file']}, not the wheel in {venv}"
    )
    assert result["failed"] == {}, (
        f"modules missing from (or broken in) the wheel: {result['failed']}; "
        "list every package in pyproject.toml's [tool.setuptools] packages"
    )
    examples = run(
        [
            str(py),
            "-c",
            "import importlib.resources as r; print(sorted(p.name for p in "
            "(r.files('trainwarden.policies') / 'examples').iterdir()))",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert ".yaml" in examples.stdout, (
        f"the example policy files are missing from the wheel: {examples.stdout}"
    )
    help_out = run([str(venv / "bin" / "trainwarden"), "demo", "--quick", "--help"], cwd=tmp_path, env=env)
    assert "--quick" in help_out.stdout
