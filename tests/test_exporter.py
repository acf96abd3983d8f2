"""The Prometheus exporter: a real scrape over HTTP of a controller fed with known telemetry."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainwarden.controller.exporter import serve_metrics
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    KNOB_MICRO_BATCH,
    JobShape,
    KnobSpec,
    Outcome,
    RankMemory,
    StepRecord,
)
from trainwarden.controller.state import LOSS_EMA
from trainwarden.policies.loader import load_policy_text

GiB = 2**30
RUN = "exp-run-1"
DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"

POLICY = """\
version: 1
budget:
  device_memory: 10GiB
  wall_time: 1h
  tokens: 10M
controller:
  decide_interval_s: 1
policies:
  - kind: memory
"""

#: Every metric the exporter emits: exposed name -> (type, labels, unit suffix or "").
METRICS: dict[str, tuple[str, set[str], str]] = {
    "trainwarden_job_connected": ("gauge", {"run"}, ""),
    "trainwarden_step": ("gauge", {"run"}, ""),
    "trainwarden_loss": ("gauge", {"run"}, ""),
    "trainwarden_tokens_per_second": ("gauge", {"run"}, "tokens_per_second"),
    "trainwarden_step_time_seconds": ("gauge", {"run"}, "seconds"),
    "trainwarden_learning_rate": ("gauge", {"run"}, ""),
    "trainwarden_elapsed_seconds": ("gauge", {"run"}, "seconds"),
    "trainwarden_telemetry_age_seconds": ("gauge", {"run"}, "seconds"),
    "trainwarden_device_memory_cap_bytes": ("gauge", {"run"}, "bytes"),
    "trainwarden_tokens_total": ("counter", {"run"}, "total"),
    "trainwarden_samples_total": ("counter", {"run"}, "total"),
    "trainwarden_nonfinite_losses_total": ("counter", {"run"}, "total"),
    "trainwarden_device_memory_used_bytes": ("gauge", {"run", "rank", "device"}, "bytes"),
    "trainwarden_device_memory_peak_bytes": ("gauge", {"run", "rank", "device"}, "bytes"),
    "trainwarden_device_memory_total_bytes": ("gauge", {"run", "rank", "device"}, "bytes"),
    "trainwarden_config_value": ("gauge", {"run", "knob"}, ""),
    "trainwarden_actions_total": ("counter", {"run", "kind", "outcome"}, "total"),
    "trainwarden_budget_spent_ratio": ("gauge", {"run", "budget"}, "ratio"),
    "trainwarden_budget_remaining_seconds": ("gauge", {"run"}, "seconds"),
    "trainwarden_domain_loss": ("gauge", {"run", "domain"}, ""),
    "trainwarden_domain_weight": ("gauge", {"run", "domain"}, ""),
    "trainwarden_curriculum_level": ("gauge", {"run"}, ""),
    "trainwarden_data_pruned_ratio": ("gauge", {"run"}, "ratio"),
    "trainwarden_budget_forecast_end_timestamp_seconds": ("gauge", {"run", "budget"}, "seconds"),
    "trainwarden_budget_binding": ("gauge", {"run", "budget"}, ""),
    "trainwarden_eval_loss": ("gauge", {"run"}, ""),
    "trainwarden_marginal_gain": ("gauge", {"run"}, ""),
}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


LOSSES = [3.0, 2.0, 1.0, 0.9]
PEAKS = {1: (9.5, 7.0), 2: (9.5, 7.0), 3: (9.5, 7.0), 4: (6.0, 5.0)}  # per step: rank 0, rank 1 (GiB)


def record(step: int, mb: int) -> StepRecord:
    return StepRecord(
        step=step,
        time=1000.0 + 2.0 * step,
        loss=LOSSES[step - 1],
        samples=64 * step,
        tokens=65536 * step,
        step_time_s=2.0,
        lr=2e-4,
        config={
            KNOB_MICRO_BATCH: mb,
            KNOB_LR_MULTIPLIER: 1.0,
            "precision": "bf16",
            # The data mixture's (adapters/data/): weights by domain, curriculum, pruned fraction.
            "domain_weights": {"web": 0.75, "code": 0.25},
            "curriculum_level": 0.5,
            "pruned_fraction": 0.125,
        },
        memory=tuple(
            RankMemory(rank, int((p - 1.0) * GiB), int(p * GiB), 80 * GiB, f"cuda:{rank}", 5001 + rank)
            for rank, p in enumerate(PEAKS[step])
        ),
        domain_loss={"web": 2.1, "code": 1.4},
        eval_loss=1.5 if step == 4 else None,
    )


def fed_controller(run_dir: Path, answered: bool = True) -> tuple[Controller, Clock]:
    """A controller that has seen 4 steps on 2 ranks, stepped micro-batch 8 -> 4 and heard back
    (not `answered`: seen 3 steps, the step down still pending)."""
    clock = Clock(999.0)
    ctl = Controller(run_dir, RUN, load_policy_text(POLICY), clock=clock)
    ctl.hello(
        JobShape(
            run_id=RUN,
            adapter="plain",
            world_size=2,
            param_count=350_000_000,
            global_batch_size=64,
            tokens_per_sample=1024,
            knobs=(
                KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8)),
                KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=1.0),
            ),
            pids=(5001, 5002),
            device="cuda:0",
            device_total_bytes=80 * GiB,
            sync_every=1,
        )
    )
    clock.t = 1006.0
    [action] = ctl.exchange([record(1, 8), record(2, 8), record(3, 8)], [])
    assert action.params == {"value": 4}
    if not answered:
        return ctl, clock
    clock.t = 1008.5
    assert ctl.exchange([record(4, 4)], [Outcome(action.id, "applied", 4, 0.3)]) == []
    clock.t = 1010.0
    return ctl, clock


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def parse(text: str) -> tuple[dict[str, str], dict[str, list[Any]]]:
    """(exposed name -> type, exposed name -> samples)."""
    types: dict[str, str] = {}
    samples: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        exposed = fam.name + "_total" if fam.type == "counter" else fam.name
        types[exposed] = fam.type
        samples.setdefault(exposed, [])
        for s in fam.samples:
            assert s.name == exposed, (s.name, exposed)
            samples[exposed].append(s)
    return types, samples


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    found = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples[name])
    return found[0]


@pytest.fixture(scope="module")
def scraped(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], dict[str, list[Any]], Controller]]:
    """One fed controller and one scrape for the module (stopping a server takes 0.5 s)."""
    ctl, _clock = fed_controller(tmp_path_factory.mktemp("exporter") / "run")
    server, port = serve_metrics(ctl, "127.0.0.1", 0)
    try:
        assert port > 0
        types, samples = parse(scrape(port))
        yield types, samples, ctl
    finally:
        server.shutdown()
        server.server_close()
        ctl.close()


def test_every_metric_is_present_typed_and_labelled(scraped: Any) -> None:
    types, samples, _ = scraped
    assert set(types) == set(METRICS)
    for name, (typ, labels, _unit) in METRICS.items():
        assert types[name] == typ, name
        assert samples[name], f"{name} has no sample"
        for s in samples[name]:
            assert set(s.labels) == labels, (name, s.labels)
            assert s.labels["run"] == RUN
            assert "job" not in s.labels, "Prometheus owns the `job` label"


def test_names_have_the_prefix_and_their_units(scraped: Any) -> None:
    types, _, _ = scraped
    for name in types:
        assert name.startswith("trainwarden_"), name
        unit = METRICS[name][2]
        if unit:
            assert name.endswith("_" + unit), name
        words = name.split("_")
        if "memory" in words:
            assert name.endswith("_bytes"), name
        if {"time", "elapsed", "age", "remaining"} & set(words):
            assert name.endswith("_seconds"), name


def test_values_match_what_was_fed(scraped: Any) -> None:
    _, samples, _ = scraped
    run = {"run": RUN}
    assert value(samples, "trainwarden_job_connected", **run) == 1.0
    assert value(samples, "trainwarden_step", **run) == 4.0
    ema = LOSSES[0]
    for loss in LOSSES[1:]:
        ema = (1 - LOSS_EMA) * ema + LOSS_EMA * loss
    assert value(samples, "trainwarden_loss", **run) == pytest.approx(ema)
    assert value(samples, "trainwarden_tokens_total", **run) == 4 * 65536
    assert value(samples, "trainwarden_samples_total", **run) == 4 * 64
    # Four steps two seconds apart: (4 - 1) * 65536 tokens in 6 s.
    tps = 3 * 65536 / 6.0
    assert value(samples, "trainwarden_tokens_per_second", **run) == pytest.approx(tps)
    assert value(samples, "trainwarden_step_time_seconds", **run) == 2.0
    assert value(samples, "trainwarden_learning_rate", **run) == pytest.approx(2e-4)
    # From the first step's start (1002 - 2) to the last step's end (1008).
    assert value(samples, "trainwarden_elapsed_seconds", **run) == pytest.approx(8.0)
    assert value(samples, "trainwarden_telemetry_age_seconds", **run) == pytest.approx(1010.0 - 1008.5)
    assert value(samples, "trainwarden_device_memory_cap_bytes", **run) == 10 * GiB
    for rank, peak in enumerate(PEAKS[4]):
        labels = {"run": RUN, "rank": str(rank), "device": f"cuda:{rank}"}
        assert value(samples, "trainwarden_device_memory_peak_bytes", **labels) == int(peak * GiB)
        assert value(samples, "trainwarden_device_memory_used_bytes", **labels) == int((peak - 1) * GiB)
        assert value(samples, "trainwarden_device_memory_total_bytes", **labels) == 80 * GiB
    assert value(samples, "trainwarden_config_value", knob=KNOB_MICRO_BATCH) == 4.0
    assert value(samples, "trainwarden_config_value", knob=KNOB_LR_MULTIPLIER) == 1.0
    assert {s.labels["knob"] for s in samples["trainwarden_config_value"]} == {
        KNOB_MICRO_BATCH,
        KNOB_LR_MULTIPLIER,
        "curriculum_level",
        "pruned_fraction",
    }, "a text setting (precision) and a mapping (domain_weights) are not numbers"
    assert value(samples, "trainwarden_actions_total", kind=KNOB_MICRO_BATCH, outcome="applied") == 1.0
    assert len(samples["trainwarden_actions_total"]) == 1
    assert value(samples, "trainwarden_budget_spent_ratio", budget="wall_time") == pytest.approx(8.0 / 3600)
    assert value(samples, "trainwarden_budget_spent_ratio", budget="tokens") == pytest.approx(
        4 * 65536 / 10e6
    )
    # Tokens run out first: (10M - 262144) / 32768 tokens/s, well before the hour.
    remaining = (10e6 - 4 * 65536) / tps
    assert value(samples, "trainwarden_budget_remaining_seconds", **run) == pytest.approx(remaining)
    assert value(samples, "trainwarden_domain_loss", domain="web") == pytest.approx(2.1)
    assert value(samples, "trainwarden_domain_loss", domain="code") == pytest.approx(1.4)
    assert value(samples, "trainwarden_domain_weight", domain="web") == 0.75
    assert value(samples, "trainwarden_domain_weight", domain="code") == 0.25
    assert value(samples, "trainwarden_curriculum_level", **run) == 0.5
    assert value(samples, "trainwarden_data_pruned_ratio", **run) == 0.125


def test_budget_forecast_metrics(scraped: Any) -> None:
    _, samples, _ = scraped
    # Tokens run out first, at the rate measured before the micro-batch change (the new
    # configuration's one interval is too few to replace it): 32768 tokens/s from step 4's end.
    tokens_end = 1008.0 + (10e6 - 4 * 65536) / (3 * 65536 / 6.0)
    end = "trainwarden_budget_forecast_end_timestamp_seconds"
    assert value(samples, end, budget="tokens") == pytest.approx(tokens_end)
    assert value(samples, end, budget="wall_time") == pytest.approx(1000.0 + 3600.0)
    assert value(samples, "trainwarden_budget_binding", budget="tokens") == 1.0
    assert value(samples, "trainwarden_budget_binding", budget="wall_time") == 0.0
    assert value(samples, "trainwarden_eval_loss", run=RUN) == 1.5
    # The training loss falls over the 2.6% of the token budget spent: a positive gain.
    assert value(samples, "trainwarden_marginal_gain", run=RUN) > 0


def test_every_scraped_metric_is_documented_and_every_documented_one_scraped(scraped: Any) -> None:
    types, _, _ = scraped
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\|\s*`(trainwarden_[a-z0-9_]+)`", text, flags=re.MULTILINE))
    assert documented, "docs/metrics.md lists its metrics in a table, one `name` per row"
    assert set(types) - documented == set(), "emitted but not documented"
    assert documented - set(types) == set(), "documented but not emitted"
    for name, (typ, labels, _) in METRICS.items():
        [row] = [line for line in text.splitlines() if line.startswith(f"| `{name}`")]
        assert typ in row, (name, row)
        for label in labels:
            assert f"`{label}`" in row, (name, label, row)


def test_scrape_before_any_job_connects(tmp_path: Path) -> None:
    ctl = Controller(tmp_path / "idle", "idle-run", load_policy_text(POLICY), clock=Clock(0.0))
    server, port = serve_metrics(ctl, "127.0.0.1", 0)
    try:
        types, samples = parse(scrape(port))
    finally:
        server.shutdown()
        server.server_close()
        ctl.close()
    assert set(types) == set(METRICS), "every family is described even without data"
    assert value(samples, "trainwarden_job_connected", run="idle-run") == 0.0
    assert value(samples, "trainwarden_tokens_total", run="idle-run") == 0.0
    for name in ("trainwarden_step", "trainwarden_loss", "trainwarden_device_memory_used_bytes"):
        assert samples[name] == [], f"{name}: no value is better than a made-up one"
    assert all(name.startswith("trainwarden_") for name in types), "no process_/python_ collectors"


def test_the_final_numbers_wait_for_one_more_scrape(tmp_path: Path) -> None:
    """An action still pending when the job ends is counted `unanswered` only at close: /metrics
    stays up until a scrape that began after close was served, or the dashboard never marks it."""
    ctl, _clock = fed_controller(tmp_path / "run", answered=False)
    server, port = serve_metrics(ctl, "127.0.0.1", 0)
    try:
        scrape(port)
        time.sleep(0.2)
        _, before = parse(scrape(port))  # two scrapes: the port is scraped about every 0.2 s
        assert not [s for s in before["trainwarden_actions_total"] if s.labels["outcome"] == "unanswered"]
        ctl.close()
        seen: list[str] = []
        prometheus = threading.Timer(0.3, lambda: seen.append(scrape(port)))
        prometheus.start()
        t0 = time.monotonic()
        assert server.await_final_scrape(5.0)
        waited = time.monotonic() - t0
        prometheus.join()
        _, after = parse(seen[0])
        assert value(after, "trainwarden_actions_total", kind=KNOB_MICRO_BATCH, outcome="unanswered") == 1.0
        assert 0.25 < waited < 2.0, waited

        # No later scrape: it gives up after about 1.5 intervals, long before `most_s`.
        t0 = time.monotonic()
        assert not server.await_final_scrape(30.0)
        assert time.monotonic() - t0 < 3.0
        # A second signal (`abandon`) or --final-scrape-wait 0 ends the wait at once.
        gone = threading.Event()
        gone.set()
        t0 = time.monotonic()
        assert not server.await_final_scrape(30.0, gone)
        assert not server.await_final_scrape(0.0)
        assert time.monotonic() - t0 < 0.5
    finally:
        server.shutdown()
        server.server_close()


def test_nothing_to_wait_for_when_nobody_scrapes(tmp_path: Path) -> None:
    """Without Prometheus (fewer than two scrapes seen) the controller exits at once."""
    ctl = Controller(tmp_path / "idle", "idle-run", load_policy_text(POLICY), clock=Clock(0.0))
    server, port = serve_metrics(ctl, "127.0.0.1", 0)
    try:
        scrape(port)  # one look by hand is no scraper
        ctl.close()
        t0 = time.monotonic()
        assert not server.await_final_scrape(30.0)
        assert time.monotonic() - t0 < 0.1
    finally:
        server.shutdown()
        server.server_close()
