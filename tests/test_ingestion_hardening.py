"""What a job (or anyone holding its token) sends, taken in safely (issue 15: findings 7, 10, 11
and the ingestion items of its Low list), through a real ChannelServer, a real Controller with
the memory policy, and a real Prometheus scrape over HTTP.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
from prometheus_client.parser import text_string_to_metric_families

from trainwarden.controller.exporter import serve_metrics
from trainwarden.controller.loop import MAX_FAILURES, Controller
from trainwarden.controller.protocol import (
    KNOB_DOMAIN_WEIGHTS,
    KNOB_MICRO_BATCH,
    MAX_DOMAINS,
    PROTOCOL_VERSION,
    JobShape,
    KnobSpec,
    Outcome,
    StepRecord,
)
from trainwarden.controller.runlog import TELEMETRY_FILE
from trainwarden.controller.server import ChannelServer
from trainwarden.policies.loader import load_policy_text

TOKEN = "ingestion-hardening-token-K3p9"
MiB = 2**20
#: The issue's case: a 600 MiB cap, the job at 700 MiB.
POLICY = """\
version: 1
budget:
  device_memory: 600MiB
controller:
  decide_interval_s: 1
policies:
  - kind: memory
    high_water: 0.9
    low_water: 0.5
    cooldown_steps: 0
"""


def shape(incarnation: str = "first", pid: int | None = None, run_id: str = "run-ingest") -> dict[str, Any]:
    job = helpers.job_shape(
        run_id, global_batch_size=64, pids=(pid or os.getpid(),), device_total_bytes=4096 * MiB
    )
    return job.to_json() | {"incarnation": incarnation}  # which start of the job this is


def record(step: int, peak_mib: float = 300.0, **override: Any) -> dict[str, Any]:
    peak = int(peak_mib * MiB)
    return helpers.step_record_json(
        step, used_bytes=peak, peak_bytes=peak, total_bytes=4096 * MiB, **override
    )


def ticking_clock() -> Any:
    return itertools.count(2_000_000.0, 1.0).__next__


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def served(run_dir: Path) -> Iterator[ChannelServer]:
    ctl = Controller(run_dir, "run-ingest", load_policy_text(POLICY), clock=ticking_clock())
    srv = ChannelServer(("127.0.0.1", 0), ctl, TOKEN)
    srv.start()
    yield srv
    srv.stop()
    srv.controller.close()


def send(srv: ChannelServer, path: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        conn.request(
            "POST" if path != "/v1/status" else "GET", path, data if path != "/v1/status" else None, headers
        )
        resp = conn.getresponse()
        return resp.status, strict_json(resp.read())
    finally:
        conn.close()


def strict_json(data: bytes | str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} is not JSON (RFC 8259)")

    return json.loads(data, parse_constant=refuse)


def hello(srv: ChannelServer, **kw: Any) -> None:
    status, reply = send(srv, "/v1/hello", hello_message_json(shape(**kw)))
    assert status == 200, reply


def hello_message_json(shape_json: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "shape": shape_json}


def exchange(
    srv: ChannelServer, *records: dict[str, Any], outcomes: list[dict[str, Any]] | None = None
) -> Any:
    status, reply = send(
        srv, "/v1/exchange", {"v": PROTOCOL_VERSION, "records": list(records), "outcomes": outcomes or []}
    )
    return status, reply


def scrape(ctl: Controller) -> dict[str, list[Any]]:
    server, port = serve_metrics(ctl, "127.0.0.1", 0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200, text[:300]
    finally:
        server.shutdown()
        server.server_close()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


# --- finding 7: a new job on a used run directory ------------------------------------------------


def test_a_new_job_on_a_used_run_directory_is_controlled_from_its_first_step(run_dir: Path) -> None:
    """The first job reached step 900,000; a controller restarted on its directory meets a new job
    at step 1, at 700 MiB over a 600 MiB cap: the memory policy steps the micro-batch down."""
    ctl = Controller(run_dir, "run-ingest", load_policy_text(POLICY), clock=ticking_clock())
    ctl.hello(JobShape.from_json(shape("first", pid=1)))
    ctl.exchange([StepRecord.from_json(record(s)) for s in (1, 2, 900_000)], [])
    ctl.close()

    ctl = Controller(run_dir, "run-ingest", load_policy_text(POLICY), clock=ticking_clock())
    srv = ChannelServer(("127.0.0.1", 0), ctl, TOKEN)
    srv.start()
    try:
        assert ctl.state.step == 900_000  # picked up from the logs
        hello(srv, incarnation="second")
        status, reply = exchange(srv, record(1, 700.0))
        assert status == 200, reply
        assert ctl.state.step == 1
        assert [(a["kind"], a["params"]) for a in reply["actions"]] == [(KNOB_MICRO_BATCH, {"value": 4})], (
            reply
        )
        # The same job saying hello again (a reconnect) keeps its sequence.
        hello(srv, incarnation="second")
        assert exchange(srv, record(2, 700.0))[0] == 200
        assert ctl.state.step == 2
    finally:
        srv.stop()
        ctl.close()
    # A controller restarted once more reads the second job's steps as its own sequence too.
    again = Controller(run_dir, "run-ingest", load_policy_text(POLICY), clock=ticking_clock())
    assert again.state.step == 2
    again.close()


def test_an_absurd_step_is_refused_with_the_reason_and_blinds_nothing(served: ChannelServer) -> None:
    hello(served)
    assert exchange(served, record(1))[0] == 200
    status, reply = exchange(served, record(2**63 - 1))
    assert status == 400 and "record.step" in reply["error"] and "optimizer step" in reply["error"], reply
    status, reply = exchange(served, record(2, 700.0))
    assert status == 200 and served.controller.state.step == 2
    assert [a["kind"] for a in reply["actions"]] == [KNOB_MICRO_BATCH], reply


# --- finding 10: /metrics never fails because of what a job sent ---------------------------------

SURROGATE_BODY = (
    b'{"v": 1, "outcomes": [], "records": [{"step": 1, "time": 1001.0, "loss": 3.0, "samples": 64, '
    b'"tokens": 1024, "step_time_s": 1.0, "lr": 0.001, '
    b'"config": {"micro_batch_size": 8, "k\\ud800": 1.5, "nan_knob": NaN, "inf_knob": Infinity, '
    b'"domain_weights": {"web\\udfff": 1.0}}, '
    b'"memory": [{"rank": 0, "used_bytes": 1, "peak_bytes": 1, "total_bytes": 2, '
    b'"device": "cpu\\ud800", "pid": 1}], '
    b'"domain_loss": {"web\\udc80": 2.5, "ok": 2.0}}]}'
)


def test_lone_surrogates_and_non_finite_values_never_break_a_scrape(served: ChannelServer) -> None:
    hello(served)
    status, reply = exchange_raw(served, SURROGATE_BODY)
    assert status == 200, reply
    samples = scrape(served.controller)
    domains = {s.labels["domain"] for s in samples["trainwarden_domain_loss"]}
    assert domains == {"web\\udc80", "ok"}, domains
    assert {s.labels["device"] for s in samples["trainwarden_device_memory_used_bytes"]} == {"cpu\\ud800"}
    knobs = {s.labels["knob"]: s.value for s in samples["trainwarden_config_value"]}
    assert math.isnan(knobs["nan_knob"]) and knobs["inf_knob"] == math.inf and knobs["k\\ud800"] == 1.5
    # The status answer is strict JSON even so.
    status, st = send(served, "/v1/status", b"")
    assert status == 200 and st["config"]["nan_knob"] == "NaN" and st["config"]["inf_knob"] == "Infinity"


def exchange_raw(srv: ChannelServer, body: bytes) -> tuple[int, Any]:
    return send(srv, "/v1/exchange", body)


def test_an_integer_of_400_digits_in_the_configuration_is_refused_and_scrapes_go_on(
    served: ChannelServer,
) -> None:
    hello(served)
    assert exchange(served, record(1))[0] == 200
    status, reply = exchange(served, record(2, config={KNOB_MICRO_BATCH: 8, "seed": 10**400}))
    assert status == 400 and "config" in reply["error"] and "64-bit" in reply["error"], reply
    samples = scrape(served.controller)
    assert samples["trainwarden_step"][0].value == 1


def test_nan_and_infinity_are_written_as_strict_json_everywhere(served: ChannelServer, run_dir: Path) -> None:
    hello(served)
    nan_record = record(1, loss=math.nan, config={KNOB_MICRO_BATCH: 8, "scale": math.inf})
    body = json.dumps({"v": 1, "records": [nan_record, record(2)], "outcomes": []}).encode()  # NaN literals
    assert exchange_raw(served, body)[0] == 200
    assert send(served, "/v1/status", b"")[0] == 200
    served.controller.close()
    lines = (run_dir / TELEMETRY_FILE).read_text().splitlines()
    steps = [strict_json(line) for line in lines if '"event":"step"' in line]
    assert steps[0]["loss"] == "NaN" and steps[0]["config"]["scale"] == "Infinity"
    strict_json((run_dir / "summary.json").read_text())
    # Read back (a restarted controller) the NaN is a NaN again: counted, not averaged.
    again = Controller(run_dir, "run-ingest", load_policy_text(POLICY))
    assert again.state.nonfinite_losses == 1 and again.state.loss_ema == 3.0
    again.close()
    # And `trainwarden report` reads them as numbers (its first step's loss is the NaN).
    from trainwarden.controller.report import write_report

    rep = write_report(run_dir, run_dir.parent / "report")
    assert rep.html.exists()


# --- finding 11: label cardinality capped -----------------------------------------------------------


def test_domains_past_the_cap_are_left_out_with_one_message(
    served: ChannelServer, caplog: pytest.LogCaptureFixture
) -> None:
    hello(served)
    caplog.set_level(logging.WARNING)
    for step in range(1, 401):
        status, reply = exchange(served, record(step, domain_loss={f"d{step}": 1.0}))
        assert status == 200, reply
    samples = scrape(served.controller)
    assert len(samples["trainwarden_domain_loss"]) == MAX_DOMAINS
    assert len(served.controller.state.domain_loss_ema) == MAX_DOMAINS
    said = [r.getMessage() for r in caplog.records if "data domains" in r.getMessage()]
    assert len(said) == 1 and f"more than {MAX_DOMAINS}" in said[0], said
    # One record naming too many at once is refused, naming the limit.
    status, reply = exchange(served, record(401, domain_loss={f"x{i}": 1.0 for i in range(MAX_DOMAINS + 1)}))
    assert status == 400 and f"at most {MAX_DOMAINS}" in reply["error"], reply
    # Ranks past any job's are refused too (each would be a series).
    bad = record(402)
    bad["memory"][0]["rank"] = 10**6
    status, reply = exchange(served, bad)
    assert status == 400 and "memory.rank" in reply["error"], reply


def test_a_restarted_controller_reingesting_its_logs_keeps_the_cap(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    with open(run_dir / TELEMETRY_FILE, "w") as fh:
        fh.write(json.dumps({"v": 1, "event": "hello", "time": 0.0, "shape": shape()}) + "\n")
        for step in range(1, 2001):
            fh.write(
                json.dumps({"v": 1, "event": "step", **record(step, domain_loss={f"d{step}": 1.0})}) + "\n"
            )
    ctl = Controller(run_dir, "run-ingest", load_policy_text(POLICY))
    try:
        assert ctl.state.step == 2000
        assert len(ctl.state.domain_loss) == MAX_DOMAINS
        assert len(scrape(ctl)["trainwarden_domain_loss"]) == MAX_DOMAINS
    finally:
        ctl.close()


# --- Low: a forged hello or forged outcomes have a bounded effect -----------------------------------

DATA_POLICY = """\
version: 1
budget: {}
policies:
  - kind: data
    domains: [code, text]
"""


def test_a_forged_hello_cannot_switch_a_policy_off_for_the_run(tmp_path: Path) -> None:
    ctl = Controller(tmp_path / "run", "r", load_policy_text(DATA_POLICY))
    real = KnobSpec(KNOB_DOMAIN_WEIGHTS, {"code": 0.5, "text": 0.5})
    job = JobShape.from_json(JobShape("r", "plain", 1, 10, 16, 32, (real,), (1,), "cpu", 2**30, 1).to_json())
    other = KnobSpec(KNOB_DOMAIN_WEIGHTS, {"evil": 1.0})
    forged = JobShape("r", "plain", 1, 10, 16, 32, (other,), (1,), "cpu", 2**30, 1)
    ctl.hello(job)
    assert [p.name for p in ctl.policies] == ["data"]
    ctl.hello(forged)  # a token holder's hello naming other domains: the data policy cannot fit it
    assert ctl.policies == []
    ctl.hello(job)  # the job's own hello (its next reconnect) brings it back
    assert [p.name for p in ctl.policies] == ["data"]
    ctl.close()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_forged_rejected_outcomes_disable_a_kind_for_a_bounded_time(tmp_path: Path) -> None:
    from trainwarden.controller import loop

    disabled_for_s = getattr(loop, "DISABLED_FOR_S", 1800.0)
    clock = Clock()
    ctl = Controller(tmp_path / "run", "r", load_policy_text(POLICY), clock=clock)
    ctl.hello(JobShape.from_json(shape()))
    step = 0

    def hot() -> list[Any]:
        nonlocal step
        step += 1
        return ctl.exchange([StepRecord.from_json(record(step, 700.0))], [])

    rejected = 0
    while clock.t < 2000.0 and rejected < MAX_FAILURES:
        clock.t += 1.0
        for a in hot():
            step += 1
            ctl.exchange(
                [StepRecord.from_json(record(step, 700.0))], [Outcome(a.id, "rejected", step, 0.0, "forged")]
            )
            rejected += 1
    assert rejected == MAX_FAILURES
    clock.t += 10.0
    assert hot() == []  # off for now
    clock.t += disabled_for_s
    assert [a.kind for a in hot()] == [KNOB_MICRO_BATCH], "the kind never came back"
    ctl.close()


def test_an_agent_drops_a_refused_batch_and_its_telemetry_flows_on(
    served: ChannelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch the controller refuses (400: here a record naming more domains than the cap) can
    never pass: the real agent drops it, says so once, and the steps after it reach the controller
    (on main it was put back and retried forever, and all telemetry after it stalled)."""
    from trainwarden.adapters.core.agent import Agent
    from trainwarden.adapters.core.channel import HttpChannel
    from trainwarden.adapters.core.probes import CpuProbe

    caplog.set_level(logging.WARNING)
    job = JobShape.from_json(shape())
    agent = Agent(job, HttpChannel(f"http://127.0.0.1:{served.port}", TOKEN), CpuProbe())
    try:
        too_many = {f"x{i}": 1.0 for i in range(MAX_DOMAINS + 1)}
        agent.on_step(1, 3.0, 64, 1024, 0.1, 1e-3, {KNOB_MICRO_BATCH: 8}, domain_loss=too_many)
        deadline = time.monotonic() + 20
        while agent.refused_batches == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.refused_batches == 1 and agent.dropped_records == 1
        for step in (2, 3):
            agent.on_step(step, 3.0, 64, 1024, 0.1, 1e-3, {KNOB_MICRO_BATCH: 8})
        while served.controller.state.step < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.controller.state.step == 3
        said = [r.getMessage() for r in caplog.records if "refused a batch" in r.getMessage()]
        assert len(said) == 1 and f"at most {MAX_DOMAINS}" in said[0], said
    finally:
        agent.close()


def test_the_reports_live_scrape_never_goes_through_a_proxy(
    served: ChannelServer, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`trainwarden report` on a running job reads the controller's /metrics (for the cap): like the
    channel, not through an http_proxy from the environment (here one that nothing answers)."""
    from trainwarden.controller.report import _live_metrics

    hello(served)
    server, port = serve_metrics(served.controller, "127.0.0.1", 0)
    try:
        (run_dir / "controller.json").write_text(json.dumps({"metrics": f"http://127.0.0.1:{port}/metrics"}))
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = closed.getsockname()[1]
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead}")
        monkeypatch.setenv("no_proxy", "localhost")
        metrics = _live_metrics(run_dir)
        assert metrics and any(name.startswith("trainwarden_") for name, _ in metrics), metrics
    finally:
        server.shutdown()
        server.server_close()
