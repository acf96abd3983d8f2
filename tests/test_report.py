"""`trainwarden report RUN_DIR`: PNG plots and a self-contained HTML page of a real run.

One short real job runs under `trainwarden run` (the demo's script on a tiny model) with a
memory cap that forces micro-batch switches and a wall-time budget that cools the LR down and
stops the job. A report is made while it runs (the cap comes from the live controller) and once
it is over; the images must be real, readable PNGs and the page must carry every decision.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAINWARDEN, free_port, job_env, tiny_job, wait_for

from trainwarden.controller import cli
from trainwarden.controller.report import INSTALL_HINT, ReportError, load_run, write_report
from trainwarden.controller.runlog import read_jsonl

try:
    import matplotlib  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise  # CI installs the `all` extra, which has it
    pytest.skip(f"the report needs matplotlib: {INSTALL_HINT}", allow_module_level=True)

pytestmark = pytest.mark.slow

POLICY = """\
version: 1
budget:
  device_memory: 64MiB   # far below any Python process: the memory policy steps the micro-batch down
  wall_time: 6s          # the compute policy cools the LR down over the last half, then stops the job
controller:
  decide_interval_s: 0.1
  sync_every: 4
policies:
  - kind: memory
    cooldown_steps: 2
    min_micro_batch: 2
  - kind: compute
    cooldown_fraction: 0.5
    resolution: 0.1
"""

JOB = tiny_job(1_000_000)
PLOTS = ("overview", "config", "memory", "loss", "throughput", "budget")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory of a finished real run, report made while it was running)."""
    tmp = tmp_path_factory.mktemp("report")
    policy = tmp / "policy.yaml"
    policy.write_text(POLICY)
    run_dir = tmp / "run"
    proc = subprocess.Popen(
        [
            *TRAINWARDEN,
            "run",
            "--policy",
            str(policy),
            "--run-dir",
            str(run_dir),
            "--metrics-port",
            str(free_port()),
            "--quiet",
            "--",
            *JOB,
        ],
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp,
    )
    try:
        decisions = run_dir / "decisions.jsonl"
        assert wait_for(lambda: decisions.exists() and decisions.stat().st_size > 0, 60, 0.1)
        live = write_report(run_dir, tmp / "live-report")
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    return run_dir, live.html


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_png(path: Path) -> None:
    import matplotlib.image

    assert path.stat().st_size > 10_000, f"{path} is suspiciously small"
    width, height = png_size(path)
    assert width > 400 and height > 400, (path, width, height)
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert float(pixels[..., :3].var()) > 0.001, f"{path} is blank"


def test_report_of_a_finished_run(real_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, _ = real_run
    t = time.monotonic()
    rep = write_report(run_dir, tmp_path / "report")
    took = time.monotonic() - t
    assert set(rep.images) == set(PLOTS)
    for path in rep.images.values():
        check_png(path)

    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    kinds = {d["kind"] for d in decisions if d["outcome"] == "applied"}
    assert {"micro_batch_size", "lr_multiplier", "stop"} <= kinds, decisions
    page = rep.html.read_text()
    for d in decisions:
        assert html.escape(d["reason"]) in page, d["reason"]
    # Self-contained: every image inline, nothing fetched from elsewhere.
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert not re.search(r'(src|href)="(?!data:)', page)
    # The summary box and the story say what happened.
    assert "finished" in page and "micro_batch_size: 16 -&gt; 8" in page
    assert "Stopped at step" in page and "wall_time budget is spent" in page
    run = load_run(run_dir)
    assert run.finished and run.cap_bytes == 64 * 2**20 and run.budgets[0].name == "wall_time"
    print(f"report of {len(run.steps)} steps, {len(decisions)} decisions in {took:.1f} s")


def test_report_of_a_running_run(real_run: tuple[Path, Path], tmp_path: Path) -> None:
    run_dir, live_html = real_run
    # Made while the job ran: no summary yet, so the cap came from the live controller's /metrics.
    page = live_html.read_text()
    assert "(running)" in page
    assert "against a cap of 64.0 MiB" in page
    for name in PLOTS:
        check_png(live_html.parent / f"{name}.png")

    # A run caught mid-write, its controller gone: a torn last line, no summary.json.
    copy = tmp_path / "torn"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report*", "summary.json"))
    with open(copy / "telemetry.jsonl", "a") as fh:
        fh.write('{"v":1,"event":"step","step":999999,"time":1')
    with open(copy / "decisions.jsonl", "a") as fh:
        fh.write('{"v":1,"time":1,"step":')
    run = load_run(copy)
    assert run.summary is None and not run.live and run.budgets == []
    assert run.steps[-1]["step"] != 999999
    rep = write_report(copy)
    assert rep.out_dir == copy / "report"
    for path in rep.images.values():
        check_png(path)
    assert "(running)" in rep.html.read_text()


def test_the_cli(real_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _ = real_run
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert str(tmp_path / "out" / "report.html") in err
    assert (tmp_path / "out" / "overview.png").exists()

    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no telemetry.jsonl" in capsys.readouterr().err


def test_without_matplotlib_the_error_says_what_to_install(
    real_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ReportError, match=re.escape(INSTALL_HINT)):
        write_report(real_run[0], tmp_path / "r")
