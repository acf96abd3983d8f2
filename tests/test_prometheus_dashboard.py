"""The Grafana dashboard (deploy/grafana/dashboard.json), proven against a real Prometheus.

Grafana cannot be installed on these machines, so the dashboard is proven through its
queries: a real Prometheus server (Debian's `prometheus` package) scrapes a controller
every second during a short real run under `trainwarden run`, and every PromQL expression
of every panel, annotation and template variable is evaluated through Prometheus' HTTP API
over the run's window, with Grafana's variables substituted. Each must return data.

The fast tests check the JSON itself: the schema Grafana exports, the datasource and job
variables, panel layout, and that every metric a panel names is one the exporter emits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO, TRAINWARDEN, free_port, job_env, wait_for

from trainwarden.controller.exporter import ControllerCollector
from trainwarden.controller.loop import Controller
from trainwarden.controller.runlog import read_jsonl

DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"
DS_REF = {"type": "prometheus", "uid": "${datasource}"}

#: Exported metrics the dashboard may leave out, and why. Every other metric has a panel:
#: an issue that adds a metric adds its panel (the test below fails otherwise).
NOT_ON_DASHBOARD = {
    "trainwarden_job_connected": "stays 1 after the job ends; 'Last report' shows liveness",
    "trainwarden_samples_total": "tokens say the same for a language model",
    "trainwarden_device_memory_total_bytes": "the cap, not the device size, is what matters",
    "trainwarden_elapsed_seconds": "shown as the budget spent and the time left",
}


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every Prometheus annotation."""
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} target {t['refId']}", t["expr"]))
    for a in dash["annotations"]["list"]:
        if a.get("datasource") == DS_REF:
            out.append((f"annotation {a['name']!r}", a["expr"]))
    return out


def exported_metric_names(tmp_path: Path) -> set[str]:
    """Sample names the real exporter emits (counters with their `_total`)."""
    names = set()
    for fam in ControllerCollector(Controller(tmp_path / "ctl", "r")).collect():
        names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return names


# ---- the JSON ----------------------------------------------------------------------------------
def test_dashboard_is_a_grafana_export_with_datasource_job_and_run_variables() -> None:
    dash = load_dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["id"] is None and dash["uid"] and dash["title"]
    assert [i["pluginId"] for i in dash["__inputs"]] == ["prometheus"]
    required = {(r["type"], r["id"]) for r in dash["__requires"]}
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= required
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    # The import picker's choice (__inputs) becomes the variable's default.
    assert ds["current"]["value"] == "${" + dash["__inputs"][0]["name"] + "}"
    job, run = variables["job"], variables["run"]
    assert job["type"] == run["type"] == "query"
    assert job["query"]["query"] == "label_values(trainwarden_step, job)"
    assert run["query"]["query"] == 'label_values(trainwarden_step{job=~"$job"}, run)'
    assert job["datasource"] == run["datasource"] == DS_REF

    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in all_panels(dash) if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique"
    used_types = set()
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels(dash):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        used_types.add(p["type"])
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"] == DS_REF, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF, p["title"]
    assert {("panel", t) for t in used_types} <= required
    for want in ("Memory per rank against the cap", "Tokens per second", "Step time", "Loss per domain"):
        assert want in titles
    assert any(a["name"] == "Decisions" for a in dash["annotations"]["list"])


def test_dashboard_uses_only_exported_metrics_each_filtered_by_job_and_run(tmp_path: Path) -> None:
    dash = load_dashboard()
    exported = exported_metric_names(tmp_path)
    documented = set(re.findall(r"^\| `(trainwarden_\w+)`", (REPO / "docs" / "metrics.md").read_text(), re.M))
    assert exported == documented, "docs/metrics.md and the exporter disagree"
    used: set[str] = set()
    for where, expr in queries(dash):
        for m in re.finditer(r"\b(trainwarden_\w+)(\{[^}]*\})?", expr):
            name, sel = m.group(1), m.group(2) or ""
            assert name in exported, f"{where}: {name} is not a metric the exporter emits"
            assert 'job=~"$job"' in sel and 'run=~"$run"' in sel, f"{where}: {name} not filtered: {expr}"
            used.add(name)
    missing = exported - used - set(NOT_ON_DASHBOARD)
    assert not missing, f"exported metrics with no panel: {sorted(missing)}"


# ---- a real Prometheus scraping a real run ---------------------------------------------------
POLICY = """\
version: 1
budget:
  device_memory: 64MiB   # far below any Python process: the memory policy steps the micro-batch down
  wall_time: 10s         # the compute policy cools the LR down over the last half, then stops the job
controller:
  decide_interval_s: 0.1
  sync_every: 4
policies:
  - kind: memory
    cooldown_steps: 2
    min_micro_batch: 2
  - kind: compute
    cooldown_fraction: 0.5
    resolution: 0.05
  - kind: data             # weights, curriculum level and pruned fraction for the data panels
    every_steps: 5
    warmup_steps: 5
    curriculum: true
    plateau_steps: 10
    pruning: true
    prune_after_steps: 20
    prune_step: 0.1
"""

# The data mixture's training script (examples/train_mixture.py) on the tiny model of tiny_job(): a
# mixture of four stdlib domains with a curriculum and pruning, validation losses every 20 steps.
JOB = [
    *(sys.executable, str(REPO / "examples" / "train_mixture.py"), "--steps", "1000000"),
    *("--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32"),
    *("--global-batch", "16", "--micro-batch", "16", "--threads", "1", "--eval-every", "20"),
    *("--max-bytes", "100000", "--curriculum", "--max-prune-fraction", "0.3"),
]


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        why = (
            "the `prometheus` binary is not installed (Debian: apt-get install prometheus; "
            "scripts/test.sh installs it when it can)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(why + ": under CI=true that is a failure")
        pytest.skip(why)
    return path


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's template variables in an expression, replaced as Grafana would."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"no value for the variable {name!r} in {expr}"
        return values[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", one, expr)
    assert "$" not in out, out
    return out


def api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
        body = json.loads(exc.read())
    return body


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    prometheus = prometheus_binary()
    dash = load_dashboard()

    # The shipped scrape configuration, pointed at this test's controller, every second.
    metrics_port, prom_port = free_port(), free_port()
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    scrape = config["scrape_configs"][0]
    scrape.update(scrape_interval="1s", scrape_timeout="1s")
    scrape["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    job_name = scrape["job_name"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{prom_port}"

    prom_log = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115  (closed in finally)
    prom = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=prom_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    job: subprocess.Popen[str] | None = None
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        assert wait_for(ready, 30, 0.1), (tmp_path / "prometheus.log").read_text()[-3000:]

        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY)
        run_id = "prom-dashboard-test"
        start = time.time()
        job = subprocess.Popen(
            [
                *TRAINWARDEN,
                "run",
                "--policy",
                str(policy),
                "--run-dir",
                str(tmp_path / "run"),
                "--run-id",
                run_id,
                "--metrics-port",
                str(metrics_port),
                "--quiet",
                "--",
                *JOB,
            ],
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=tmp_path,
        )
        out, _ = job.communicate(timeout=120)
        assert job.returncode == 0, out[-3000:]
        # The controller's last scrape (it waits for one after close: the unanswered actions) began
        # under a second ago: the range's last evaluation, on a 1 s grid from `start`, must come after it.
        end = time.time() + 1.0

        # The template variables, as Grafana fills them: the job from the scrape config, the run
        # from the exporter's own label.
        jobs = api(base, "/api/v1/label/job/values", **{"match[]": "trainwarden_step"})
        assert job_name in jobs["data"], jobs
        runs = api(base, "/api/v1/label/run/values", **{"match[]": f'trainwarden_step{{job=~"{job_name}"}}'})
        assert run_id in runs["data"], runs
        values = {
            "job": job_name,
            "run": run_id,
            "__rate_interval": "4s",  # Grafana: max(4 x scrape interval, interval + scrape interval)
            "__interval": "1s",
            "__interval_ms": "1000",
            "__range": f"{int(end - start) + 1}s",
            "__range_s": str(int(end - start) + 1),
        }
        failures = []
        results = {}
        for where, expr in queries(dash):
            q = substitute(expr, values)
            body = api(base, "/api/v1/query_range", query=q, start=str(start), end=str(end), step="1")
            if body.get("status") != "success":
                failures.append(f"{where}: error {body.get('error')!r}\n    {q}")
            elif not any(series["values"] for series in body["data"]["result"]):
                failures.append(f"{where}: no data\n    {q}")
            results[where] = body.get("data", {}).get("result", [])
        assert not failures, "dashboard queries that fail on a real run:\n" + "\n".join(failures)

        # The decision annotations mark every kind of decision the run made, including one made
        # only once (a counter's first appearance is not a change to Prometheus).
        logged = {(d["kind"], d["outcome"]) for d in read_jsonl(tmp_path / "run" / "decisions.jsonl")}
        assert ("micro_batch_size", "applied") in logged and ("stop", "applied") in logged, logged
        marked = {
            (s["metric"]["kind"], s["metric"]["outcome"])
            for s in results["annotation 'Decisions'"]
            if s["values"]
        }
        assert marked == logged
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        prom_log.close()
