"""Hostile and broken input on the channel and the metrics port, against a real server.

A real ChannelServer on 127.0.0.1 (port 0) answers for a real Controller running the memory
policy (cap 10 GiB: high water 9 GiB, low water 5 GiB). What is tried here:
- actions a policy did not issue cannot be injected (no endpoint takes one; forged outcomes
  and claimed configurations change nothing the policy did not decide);
- telemetry with NaN or infinite losses, negative or backwards times, huge numbers: never a
  crash, the smoothed loss stays finite, and the loop still decides afterwards;
- the control port binds loopback by default and never runs without a token; the metrics
  port is read-only;
- a stalled (slowloris) client does not hold up the job's exchanges.
The server's own refusals (token, size, version, malformed JSON) are in test_server.py.
"""

from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trainwarden.controller.cli import UsageError, build_parser, cmd_controller
from trainwarden.controller.exporter import ControllerCollector, serve_metrics
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    KNOB_LR_MULTIPLIER,
    KNOB_MICRO_BATCH,
    KNOB_STOP,
    PROTOCOL_VERSION,
    JobShape,
    KnobSpec,
    hello_message,
)
from trainwarden.controller.runlog import DECISIONS_FILE
from trainwarden.controller.server import ChannelServer
from trainwarden.policies.loader import load_policy_text

TOKEN = "hostile-input-token-0123456789"
GiB = 2**30
POLICY = """\
version: 1
budget:
  device_memory: 10GiB
controller:
  decide_interval_s: 1
policies:
  - kind: memory
    high_water: 0.9
    low_water: 0.5
    cooldown_steps: 0
"""
CALM_GIB = 7.0  # between the water marks: the memory policy does nothing
HOT_GIB = 9.5  # above the high-water mark: at micro-batch 8 the policy asks for 4


def shape() -> JobShape:
    knobs = (
        KnobSpec(KNOB_MICRO_BATCH, 8, choices=(1, 2, 4, 8)),
        KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=1.0),
        KnobSpec(KNOB_STOP, False),
    )
    return helpers.job_shape(
        "run-hostile",
        knobs=knobs,
        param_count=10_000_000,
        global_batch_size=64,
        tokens_per_sample=128,
        device_total_bytes=64 * GiB,
    )


def record(step: int, peak_gib: float = CALM_GIB, **override: Any) -> dict[str, Any]:
    """A step record as the agent sends it (a JSON object), with fields overridden."""
    peak = int(peak_gib * GiB)
    return helpers.step_record_json(
        step, used_bytes=peak - GiB, peak_bytes=peak, total_bytes=64 * GiB, tokens_per_sample=128, **override
    )


def exchange_body(records: list[dict[str, Any]], outcomes: list[dict[str, Any]] | None = None) -> bytes:
    """As Python's json writes it: NaN and Infinity as the bare literals `NaN`, `Infinity`."""
    return json.dumps({"v": PROTOCOL_VERSION, "records": records, "outcomes": outcomes or []}).encode()


# --- the server -------------------------------------------------------------------------------


def ticking_clock() -> Any:
    """Each reading one second after the last: every exchange may decide."""
    return itertools.count(1_000_000.0, 1.0).__next__


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChannelServer]:
    idle = Controller(tmp_path_factory.mktemp("idle"), "idle")
    srv = ChannelServer(("127.0.0.1", 0), idle, TOKEN)
    srv.start()
    yield srv
    srv.stop()
    idle.close()


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path / "run", "run-hostile", load_policy_text(POLICY), clock=ticking_clock())
    yield ctl
    ctl.close()


@pytest.fixture
def server(shared_server: ChannelServer, controller: Controller) -> ChannelServer:
    shared_server.controller = controller
    shared_server.job_finished.clear()
    return shared_server


def send(
    srv: ChannelServer, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN
) -> tuple[int, bytes]:
    """(status, body); a server that closes without answering fails the test."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (http.client.RemoteDisconnected, ConnectionResetError) as exc:
        pytest.fail(f"{method} {path}: the server closed the connection without an answer ({exc})")
    finally:
        conn.close()


def strict_json(data: bytes) -> Any:
    """JSON as RFC 8259 has it: a bare NaN or Infinity is not JSON."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"the answer holds {name}, which is not JSON")

    return json.loads(data, parse_constant=refuse)


def exchange(srv: ChannelServer, body: bytes) -> tuple[int, dict[str, Any]]:
    status, data = send(srv, "POST", "/v1/exchange", body)
    assert status < 500, f"{status}: {data[:300]!r}"
    return status, strict_json(data)


def connect(srv: ChannelServer, steps: int = 1) -> None:
    """The job says hello and reports `steps` calm steps (no action due)."""
    status, ack = send(srv, "POST", "/v1/hello", json.dumps(hello_message(shape())).encode())
    assert status == 200, ack
    status, reply = exchange(srv, exchange_body([record(s) for s in range(1, steps + 1)]))
    assert (status, reply["actions"]) == (200, []), reply


def memory_action_follows(srv: ChannelServer, step: int) -> dict[str, Any]:
    """The loop still works: a hot step at micro-batch 8 gets the memory policy's step down."""
    status, reply = exchange(srv, exchange_body([record(step, HOT_GIB)]))
    assert status == 200, reply
    actions = reply["actions"]
    assert [(a["kind"], a["params"], a["policy"]) for a in actions] == [
        (KNOB_MICRO_BATCH, {"value": 4}, "memory")
    ], actions
    assert actions[0]["step"] > step
    return actions[0]


def decisions_bytes(ctl: Controller) -> bytes:
    path = ctl.run_dir / DECISIONS_FILE
    return path.read_bytes() if path.exists() else b""


def scrape(ctl: Controller) -> dict[str, list[Any]]:
    """What Prometheus would read, parsed by prometheus_client's own parser: name -> samples."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(ctl))
    text = generate_latest(registry).decode()
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def one(samples: dict[str, list[Any]], name: str) -> float:
    [s] = samples[name]
    return float(s.value)


# --- (a) actions a policy did not issue cannot be injected ------------------------------------

ACTION = {
    "id": "forged-1",
    "kind": KNOB_STOP,
    "params": {},
    "reason": "injected",
    "step": 2,
    "policy": "memory",
}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/actions"),
        ("POST", "/v1/act"),
        ("POST", "/v1/action"),
        ("POST", "/v1/decide"),
        ("POST", "/v1/decisions"),
        ("POST", "/v1/status"),
        ("POST", "/v1/exchange/"),
        ("POST", "/v1//exchange"),
        ("POST", "/v1/exchange?actions=1"),
        ("POST", "/V1/EXCHANGE"),
        ("POST", "/metrics"),
        ("PUT", "/v1/exchange"),
        ("PUT", "/v1/actions"),
        ("PATCH", "/v1/exchange"),
        ("DELETE", "/v1/exchange"),
        ("GET", "/v1/actions"),
        ("GET", "/v1/exchange"),
    ],
)
def test_no_endpoint_takes_an_action(
    method: str, path: str, server: ChannelServer, controller: Controller
) -> None:
    connect(server)
    body = json.dumps({"v": PROTOCOL_VERSION, "actions": [ACTION], "action": ACTION}).encode()
    status, data = send(server, method, path, body)
    assert status in (404, 405, 501), f"{method} {path} answered {status}: {data[:200]!r}"
    # Nothing was issued: the next exchange brings no action, and nothing was logged.
    status, reply = exchange(server, exchange_body([record(2)]))
    assert (status, reply["actions"]) == (200, [])
    assert decisions_bytes(controller) == b""
    assert dict(controller.actions_total) == {}


def test_actions_inside_an_exchange_are_not_taken_up(server: ChannelServer, controller: Controller) -> None:
    connect(server)
    body = json.dumps(
        {
            "v": PROTOCOL_VERSION,
            "records": [record(2)],
            "outcomes": [],
            "actions": [ACTION],
            "pending": [ACTION],
        }
    ).encode()
    status, reply = exchange(server, body)
    assert (status, reply["actions"]) == (200, [])
    assert decisions_bytes(controller) == b"" and dict(controller.actions_total) == {}
    assert controller.observe().pending == frozenset()


def forged_outcomes(step: int, issued: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Outcomes for ids the controller never issued: made up, and in its own id format (the
    controller runs in this process, so its ids are `<pid hex>-<n>`), less those in `issued`."""
    ids = ["forged-1", "", "0", "x" * 1000] + [f"{os.getpid():x}-{n}" for n in range(1, 60)]
    ids = [i for i in ids if i not in issued]
    return [
        {"action_id": i, "outcome": o, "step": step, "duration_s": 0.01, "detail": "forged"}
        for i, o in zip(ids, itertools.cycle(("applied", "rejected", "rolled_back", "noop")))
    ]


def test_outcomes_for_actions_never_issued_change_nothing(
    server: ChannelServer, controller: Controller
) -> None:
    connect(server, steps=3)
    before = controller.observe()
    config_before = controller.status()["config"]
    status, reply = exchange(server, exchange_body([], forged_outcomes(3)))
    assert (status, reply["actions"]) == (200, [])
    after = controller.observe()
    assert decisions_bytes(controller) == b""
    assert dict(controller.actions_total) == {}
    assert controller.status()["config"] == config_before == {KNOB_MICRO_BATCH: 8}
    assert after.last_action_step == before.last_action_step == {}
    assert after.pending == frozenset()
    # And the loop is untouched: the first hot step still gets its action (no cooldown began).
    memory_action_follows(server, 4)


def test_forged_and_replayed_outcomes_leave_a_real_action_alone(
    server: ChannelServer, controller: Controller
) -> None:
    connect(server)
    action = memory_action_follows(server, 2)
    # Forged outcomes do not answer the real action: it is still pending, and re-sent.
    status, reply = exchange(server, exchange_body([], forged_outcomes(2, frozenset({action["id"]}))))
    assert [a["id"] for a in reply["actions"]] == [action["id"]]
    assert decisions_bytes(controller) == b""
    # The job answers it once; replays and contradicting answers afterwards change nothing.
    applied = {"action_id": action["id"], "outcome": "applied", "step": 3, "duration_s": 0.2, "detail": ""}
    status, reply = exchange(
        server, exchange_body([record(3, CALM_GIB, config={KNOB_MICRO_BATCH: 4})], [applied])
    )
    assert (status, reply["actions"]) == (200, [])
    logged = decisions_bytes(controller)
    totals = dict(controller.actions_total)
    assert [json.loads(line)["outcome"] for line in logged.splitlines()] == ["applied"]
    replays = [applied, {**applied, "outcome": "rolled_back"}, {**applied, "outcome": "rejected", "step": 99}]
    status, reply = exchange(server, exchange_body([], replays))
    assert (status, reply["actions"]) == (200, [])
    assert decisions_bytes(controller) == logged
    assert dict(controller.actions_total) == totals
    assert controller.observe().last_action_step == {KNOB_MICRO_BATCH: 3}


def test_a_claimed_configuration_is_telemetry_not_a_decision(
    server: ChannelServer, controller: Controller
) -> None:
    """The job's records may claim any configuration (level-based: the job's word is the state);
    with memory calm, the policy decides nothing, so nothing is issued."""
    connect(server)
    claimed = {
        KNOB_MICRO_BATCH: 1,
        KNOB_LR_MULTIPLIER: 0.001,
        KNOB_STOP: True,
        "zero_stage": 3,
        "offload": "nvme",
    }
    status, reply = exchange(server, exchange_body([record(2, config=claimed), record(3, config=claimed)]))
    assert (status, reply["actions"]) == (200, [])
    assert controller.status()["config"] == claimed
    assert decisions_bytes(controller) == b"" and dict(controller.actions_total) == {}
    # A claimed micro-batch the adapter never offered: whatever the policy asks is a rung it offers.
    status, reply = exchange(server, exchange_body([record(4, HOT_GIB, config={KNOB_MICRO_BATCH: 3})]))
    assert status == 200
    for a in reply["actions"]:
        assert (a["kind"], a["policy"]) == (KNOB_MICRO_BATCH, "memory")
        assert a["params"]["value"] in (1, 2, 4, 8)


# --- (b) broken telemetry: NaN, infinities, negative and backwards times, huge numbers ---------

NAN, INF = float("nan"), float("inf")

#: name -> (records after one good step, whether the server must take them (200) or may refuse (4xx))
BROKEN: dict[str, tuple[list[dict[str, Any]], bool]] = {
    "loss-NaN-literal": ([record(2, loss=NAN)], True),
    "loss-Infinity-literal": ([record(2, loss=INF)], True),
    "loss-minus-Infinity-literal": ([record(2, loss=-INF)], True),
    "loss-1e400-is-Infinity": ([record(2, loss=1e400)], True),
    "loss-NaN-string": ([record(2, loss="NaN")], False),
    "loss-Infinity-string": ([record(2, loss="Infinity")], False),
    "lr-NaN": ([record(2, lr=NAN)], True),
    "domain-loss-NaN-and-Infinity": ([record(2, domain_loss={"web": NAN, "code": INF, "math": 2.5})], True),
    "step-time-negative": ([record(2, step_time_s=-5.0)], True),
    "step-time-NaN": ([record(2, step_time_s=NAN)], True),
    "step-time-Infinity": ([record(2, step_time_s=INF)], True),
    "time-zero": ([record(2, time=0.0)], True),
    "time-negative": ([record(2, time=-1e9)], True),
    "time-NaN": ([record(2, time=NAN)], True),
    "time-Infinity": ([record(2, time=INF)], True),
    "time-minus-Infinity": ([record(2, time=-INF)], True),
    "clock-jumps-back-an-hour": ([record(2), record(3, time=1003.0 - 3600), record(4)], True),
    "clock-runs-backwards": ([record(s, time=2000.0 - 10 * s) for s in range(2, 8)], True),
    "same-time-every-step": ([record(s, time=1001.0) for s in range(2, 6)], True),
    "samples-and-tokens-negative": (
        [record(2, samples=-64, tokens=-8192), record(3, samples=-1, tokens=-1)],
        True,
    ),
    "tokens-going-backwards": ([record(2, tokens=10**9), record(3, tokens=5)], True),
    "memory-negative": (
        [record(2, memory=[{**record(2)["memory"][0], "used_bytes": -1, "peak_bytes": -(2**40)}])],
        True,
    ),
    "step-2^62": ([record(2**62)], False),  # past MAX_STEP: refused (issue 15, finding 7)
    "step-1e30": ([record(10**30)], False),
    # Python's json reads a 400-digit integer exactly; float() of it raises OverflowError.
    "step-1e400": ([record(10**400)], False),
    "tokens-1e400": ([record(2, tokens=10**400)], False),
    "time-1e400-integer": ([record(2, time=10**400)], False),
    "memory-peak-1e400": ([record(2, memory=[{**record(2)["memory"][0], "peak_bytes": 10**400}])], False),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_telemetry_never_crashes_and_the_loop_goes_on(
    case: str, server: ChannelServer, controller: Controller
) -> None:
    records, must_take = BROKEN[case]
    connect(server)
    status, reply = exchange(server, exchange_body(records))
    if must_take:
        assert status == 200, reply
    else:
        assert status == 200 or 400 <= status < 500, reply

    # The controller still answers, and what it says is sane.
    st = controller.status()
    assert st["loss"] == pytest.approx(3.0), "a non-finite loss leaked into the smoothed loss"
    tps = st["tokens_per_second"]
    assert tps is None or (math.isfinite(tps) and tps >= 0), tps
    assert st["step_time_s"] is None or (math.isfinite(st["step_time_s"]) and st["step_time_s"] >= 0)
    assert math.isfinite(st["elapsed_s"]) and st["elapsed_s"] >= 0, st["elapsed_s"]
    status, data = send(server, "GET", "/v1/status")
    assert status == 200, data[:300]
    assert strict_json(data)["loss"] == pytest.approx(3.0)

    # The exporter still scrapes, and parses.
    samples = scrape(controller)
    assert one(samples, "trainwarden_loss") == pytest.approx(3.0)
    for s in samples.get("trainwarden_tokens_per_second", []):
        assert s.value >= 0 and math.isfinite(s.value), s
    assert one(samples, "trainwarden_elapsed_seconds") >= 0

    # And the loop still decides: the next hot step gets the memory policy's action.
    memory_action_follows(server, controller.state.step + 1)


def test_non_finite_losses_are_counted_not_averaged(server: ChannelServer, controller: Controller) -> None:
    """A diverged step is an event the policies see (Snapshot.nonfinite_losses), not a value
    that poisons the smoothed loss."""
    connect(server)
    body = exchange_body(
        [record(2, loss=NAN), record(3, loss=INF), record(4, loss=2.0), record(5, loss=-INF)]
    )
    assert exchange(server, body)[0] == 200
    snap = controller.observe()
    assert snap.nonfinite_losses == 3
    assert snap.last_nonfinite_step == 5
    assert snap.loss == pytest.approx(0.9 * 3.0 + 0.1 * 2.0)
    samples = scrape(controller)
    assert one(samples, "trainwarden_nonfinite_losses_total") == 3
    assert one(samples, "trainwarden_loss") == pytest.approx(snap.loss)
    # A re-sent record is not counted twice.
    assert exchange(server, exchange_body([record(5, loss=-INF)]))[0] == 200
    assert controller.observe().nonfinite_losses == 3


def test_a_job_whose_first_losses_are_nan_gets_a_finite_loss_once_one_is_finite(
    server: ChannelServer, controller: Controller
) -> None:
    send(server, "POST", "/v1/hello", json.dumps(hello_message(shape())).encode())
    assert exchange(server, exchange_body([record(1, loss=NAN), record(2, loss=NAN)]))[0] == 200
    assert controller.observe().loss is None and controller.observe().nonfinite_losses == 2
    samples = scrape(controller)
    assert samples.get("trainwarden_loss", []) == []  # no value rather than NaN
    assert exchange(server, exchange_body([record(3, loss=4.0)]))[0] == 200
    assert controller.observe().loss == 4.0
    assert one(scrape(controller), "trainwarden_loss") == 4.0


@pytest.mark.parametrize(
    "body",
    [
        b'{"v": 1, "records": [{"step": ' + b"1" * 5000 + b"}]}",
        b'{"v": 1, "records": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}",
        b'{"v": 1, "records": [], "outcomes": [' + b"[" * 50_000,
    ],
    ids=["an-integer-of-5000-digits", "nested-100k-deep", "unclosed-50k-deep"],
)
def test_json_that_python_refuses_to_decode_gets_400(
    body: bytes, server: ChannelServer, controller: Controller
) -> None:
    # json.loads raises ValueError (int digit limit) or RecursionError, not JSONDecodeError.
    assert len(body) < 2**20
    connect(server)
    status, data = send(server, "POST", "/v1/exchange", body)
    assert status == 400, data[:300]
    assert strict_json(data)["error"]
    assert controller.state.step == 1
    memory_action_follows(server, 2)


# --- (c) loopback by default, a token always, a read-only metrics port -------------------------


def test_the_controller_listens_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    args = build_parser().parse_args(["controller", "--run-dir", str(tmp_path), "--token-file", "t"])
    assert args.listen.rpartition(":")[0] == "127.0.0.1"
    assert args.listen == "127.0.0.1:7900"
    assert args.metrics_host == "127.0.0.1"


@pytest.mark.parametrize("token", ["", "\n", "   \n", "short"])
def test_the_controller_refuses_to_listen_anywhere_without_a_real_token(tmp_path: Path, token: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(token)
    free = socket.socket()
    free.bind(("0.0.0.0", 0))
    port = free.getsockname()[1]
    free.close()
    args = build_parser().parse_args(
        [
            "controller",
            "--run-dir",
            str(tmp_path / "run"),
            "--token-file",
            str(token_file),
            "--listen",
            f"0.0.0.0:{port}",
        ]
    )
    with pytest.raises(UsageError, match="too short"):
        cmd_controller(args)
    # It refused before listening: the port is still free.
    probe = socket.socket()
    try:
        probe.bind(("0.0.0.0", port))
    finally:
        probe.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::1"])
def test_the_channel_server_refuses_an_empty_token_on_any_address(host: str, controller: Controller) -> None:
    with pytest.raises(ValueError, match="bearer token"):
        ChannelServer((host, 0), controller, "")


def _metrics_request(port: int, method: str, path: str, body: bytes | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _scrape_http(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        text = resp.read().decode()
    finally:
        conn.close()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name != "trainwarden_telemetry_age_seconds":  # the clock ticks between scrapes
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_metrics_port_is_read_only(server: ChannelServer, controller: Controller) -> None:
    connect(server, steps=2)
    metrics, port = serve_metrics(controller, "127.0.0.1", 0)
    try:
        before = _scrape_http(port)
        assert before[("trainwarden_step", (("run", "run-hostile"),))] == 2
        payloads = [
            None,
            exchange_body([record(3, HOT_GIB)]),
            json.dumps({"v": 1, "actions": [ACTION]}).encode(),
            b'trainwarden_step{run="run-hostile"} 99\n',
            b"\xff" * 4096,
        ]
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            for path in ("/metrics", "/", "/v1/exchange", "/v1/actions", "/metrics/job/x"):
                for body in payloads:
                    status = _metrics_request(port, method, path, body)
                    assert status < 500, (method, path, status)
        assert _scrape_http(port) == before
        assert controller.state.step == 2
        assert decisions_bytes(controller) == b"" and dict(controller.actions_total) == {}
    finally:
        metrics.shutdown()
        metrics.server_close()


# --- (d) a stalled client does not hold the job up ---------------------------------------------


def test_slowloris_clients_do_not_block_the_job(server: ChannelServer, controller: Controller) -> None:
    connect(server)
    stalled: list[socket.socket] = []
    try:
        for i in range(8):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 2 == 0:  # half the headers, then nothing
                sock.sendall(b"POST /v1/exchange HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthori")
            else:  # all the headers, a tenth of the body, then nothing
                sock.sendall(
                    f"POST /v1/exchange HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"Content-Length: 1000\r\n\r\n".encode()
                    + b'{"v": 1, "re'
                )
            stalled.append(sock)
        time.sleep(0.2)  # let the server take them all up
        for step in range(2, 5):
            started = time.monotonic()
            status, reply = exchange(server, exchange_body([record(step)]))
            assert (status, reply["actions"]) == (200, [])
            assert time.monotonic() - started < 2.0, "an exchange waited on a stalled client"
        started = time.monotonic()
        memory_action_follows(server, 5)
        assert time.monotonic() - started < 2.0
        # The stalled clients, when they finally give up sending, are refused and change nothing.
        for sock in stalled:
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            status_line = answer.split(b"\r\n", 1)[0]
            assert status_line.startswith(b"HTTP/1.") and status_line.split()[1][:1] == b"4", answer[:200]
        assert controller.state.step == 5
    finally:
        for sock in stalled:
            sock.close()
