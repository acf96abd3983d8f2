"""The channel server: a real ChannelServer on loopback, refusing what it must, never crashing."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest

from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    MAX_BODY_BYTES,
    PROTOCOL_VERSION,
    JobShape,
    RankMemory,
    StepRecord,
    exchange_message,
    hello_message,
)
from trainwarden.controller.runlog import TELEMETRY_FILE, read_jsonl
from trainwarden.controller.server import ChannelServer

TOKEN = "s3cret-token"
LOGGER = "trainwarden.controller.server"
GiB = 2**30


def shape() -> JobShape:
    return helpers.job_shape(
        "run-srv",
        micro_batch=4,
        choices=(1, 2, 4),
        param_count=10_000_000,
        global_batch_size=16,
        tokens_per_sample=128,
        pids=(12345,),
        device_total_bytes=16 * GiB,
    )


def record(step: int) -> StepRecord:
    memory = (RankMemory(0, GiB, GiB, 16 * GiB, "cpu", 12345),)
    return helpers.step_record(step, memory, batch=16, tokens_per_sample=128, step_time_s=0.5, micro_batch=4)


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    ctl = Controller(tmp_path / "run", "run-srv")
    yield ctl
    ctl.close()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChannelServer]:
    """One server for the module (a fresh one per test would cost a port, threads and a token)."""
    idle = Controller(tmp_path_factory.mktemp("idle"), "idle")
    srv = ChannelServer(("127.0.0.1", 0), idle, TOKEN)
    srv.start()
    yield srv
    srv.stop()
    idle.close()


@pytest.fixture
def server(shared_server: ChannelServer, controller: Controller) -> ChannelServer:
    """The shared server, answering for this test's fresh controller."""
    shared_server.controller = controller
    shared_server.job_finished.clear()
    return shared_server


# --- clients ------------------------------------------------------------------------------------


def request(
    srv: ChannelServer,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request with http.client (which always sends a correct Content-Length)."""
    h = {"Content-Type": "application/json", **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def raw(
    srv: ChannelServer, head: str, body: bytes = b"", shut_write: bool = False
) -> tuple[int, dict[str, Any]]:
    """Bytes on a socket, for what http.client will not send: no or a false Content-Length."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, json.loads(resp.read())


def head(method: str, path: str, *lines: str, token: str | None = TOKEN) -> str:
    out = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if token is not None:
        out.append(f"Authorization: Bearer {token}")
    out.extend(lines)
    return "\n".join(out) + "\n"


def valid_round_trip(srv: ChannelServer, step: int = 1) -> None:
    """The server still does its job: a hello and an exchange answered 200."""
    status, ack = request(srv, "POST", "/v1/hello", hello_message(shape()))
    assert status == 200, ack
    assert ack["v"] == PROTOCOL_VERSION and ack["run_id"] == "run-srv"
    status, reply = request(srv, "POST", "/v1/exchange", exchange_message([record(step)], []))
    assert status == 200, reply
    # When to exchange next: as late as the controller's policies allow (test_exchange_cadence.py).
    assert reply == {"v": PROTOCOL_VERSION, "actions": [], "next_exchange_s": srv.controller.next_exchange_s}
    assert srv.controller.state.step == step


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- the requests that must be refused ------------------------------------------------------------

HELLO = json.dumps(hello_message(shape())).encode()
BIG = MAX_BODY_BYTES + 1

BAD_REQUESTS = {
    "post-without-token": (
        head("POST", "/v1/hello", f"Content-Length: {len(HELLO)}", token=None),
        HELLO,
        401,
    ),
    "post-wrong-token": (
        head("POST", "/v1/exchange", "Content-Length: 2", token="guess"),
        b"{}",
        401,
    ),
    "get-without-token": (head("GET", "/v1/status", token=None), b"", 401),
    "get-token-prefix": (head("GET", "/v1/status", token=TOKEN[:-1]), b"", 401),
    "get-token-longer": (head("GET", "/v1/status", token=TOKEN + "x"), b"", 401),
    "unknown-post-path": (head("POST", "/v1/goodbye", "Content-Length: 2"), b"{}", 404),
    "unknown-get-path": (head("GET", "/metrics"), b"", 404),
    "no-content-length": (head("POST", "/v1/exchange"), b"", 411),
    "content-length-not-a-number": (head("POST", "/v1/exchange", "Content-Length: lots"), b"", 411),
    "content-length-negative": (head("POST", "/v1/exchange", "Content-Length: -5"), b"", 411),
    "oversized-declared": (head("POST", "/v1/exchange", f"Content-Length: {BIG}"), b"", 413),
    "malformed-json": (head("POST", "/v1/exchange", "Content-Length: 9"), b'{"v": 1,]', 400),
    "not-utf8": (head("POST", "/v1/exchange", "Content-Length: 4"), b"\xff\xfe\x00{", 400),
    "json-not-an-object": (head("POST", "/v1/exchange", "Content-Length: 3"), b"[1]", 400),
    "wrong-version": (head("POST", "/v1/exchange", "Content-Length: 9"), b'{"v": 99}', 400),
    "no-version": (head("POST", "/v1/hello", "Content-Length: 2"), b"{}", 400),
    "hello-without-shape": (head("POST", "/v1/hello", "Content-Length: 8"), b'{"v": 1}', 400),
    "records-not-a-list": (
        head("POST", "/v1/exchange", "Content-Length: 24"),
        b'{"v": 1, "records": "x"}',
        400,
    ),
}

MESSAGES = {
    401: "missing or wrong bearer token",
    404: "no such endpoint",
    411: "Content-Length is required",
    413: f"exceeds {MAX_BODY_BYTES}",
}
DETAIL_400 = {
    "malformed-json": "body is not JSON",
    "not-utf8": "body is not JSON",
    "json-not-an-object": "message must be a JSON object, got list",
    "wrong-version": "message version 99 is not supported",
    "no-version": "message version None is not supported",
    "hello-without-shape": "shape must be a JSON object",
    "records-not-a-list": "message.records must be a list",
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_is_refused_logged_and_the_server_lives_on(
    name: str, server: ChannelServer, controller: Controller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    text, body, want = BAD_REQUESTS[name]
    status, reply = raw(server, text, body)
    assert status == want, reply
    assert reply["v"] == PROTOCOL_VERSION
    assert (DETAIL_400[name] if want == 400 else MESSAGES[want]) in reply["error"]
    logged = refusals(caplog)
    assert len(logged) == 1, logged
    assert logged[0].startswith("refused ") and f": {want} " in logged[0] and "127.0.0.1" in logged[0]
    # Nothing refused reaches the control loop.
    assert controller.state.shape is None and controller.state.step == -1
    valid_round_trip(server)


# Found while writing these tests: `_body` checks Content-Length with str.isdigit(), which is
# true for "²" (a latin-1 header byte 0xB2), and then int("²") raises ValueError out of do_POST:
# the client gets no answer at all and the traceback goes to stderr instead of a logged 411.
def test_content_length_with_a_non_ascii_digit_is_refused(
    server: ChannelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    status, reply = raw(server, head("POST", "/v1/exchange", "Content-Length: \u00b2"))
    assert status == 411, reply
    assert any(": 411 " in m for m in refusals(caplog))
    valid_round_trip(server)


def test_healthz_needs_no_token(server: ChannelServer) -> None:
    assert request(server, "GET", "/healthz", token=None) == (200, {"v": PROTOCOL_VERSION, "ok": True})
    assert request(server, "GET", "/healthz", token="wrong")[0] == 200


def test_status_with_the_token(server: ChannelServer) -> None:
    valid_round_trip(server, step=3)
    status, body = request(server, "GET", "/v1/status")
    assert status == 200
    assert body["run_id"] == "run-srv" and body["connected"] is True and body["step"] == 3


def test_missing_and_wrong_token_through_http_client(server: ChannelServer) -> None:
    assert request(server, "POST", "/v1/hello", hello_message(shape()), token=None)[0] == 401
    assert request(server, "POST", "/v1/hello", hello_message(shape()), token="nope")[0] == 401
    assert request(server, "POST", "/v1/hello", hello_message(shape()), token="")[0] == 401
    status, _ = request(
        server, "POST", "/v1/hello", hello_message(shape()), token=None, headers={"Authorization": TOKEN}
    )
    assert status == 401, "the token without the Bearer scheme is refused"
    assert server.controller.state.shape is None


def test_wrong_version_answers_400_with_the_reason(server: ChannelServer) -> None:
    msg = hello_message(shape())
    msg["v"] = PROTOCOL_VERSION + 1
    status, body = request(server, "POST", "/v1/hello", msg)
    assert status == 400
    assert f"message version {PROTOCOL_VERSION + 1} is not supported" in body["error"]
    assert "same trainwarden version" in body["error"]


def test_malformed_record_is_refused_naming_the_field(server: ChannelServer) -> None:
    valid_round_trip(server)
    rec = record(2).to_json()
    del rec["tokens"]
    status, body = request(server, "POST", "/v1/exchange", {"v": PROTOCOL_VERSION, "records": [rec]})
    assert status == 400
    assert "record.tokens is missing" in body["error"]
    assert server.controller.state.step == 1


def test_truncated_body_is_refused(server: ChannelServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    sent = HELLO[:10]
    status, body = raw(
        server, head("POST", "/v1/hello", f"Content-Length: {len(HELLO)}"), sent, shut_write=True
    )
    assert status == 400
    assert f"body truncated: {len(sent)} of {len(HELLO)} bytes" in body["error"]
    assert any("body truncated" in m for m in refusals(caplog))
    valid_round_trip(server)


def test_oversized_body_actually_sent(server: ChannelServer, caplog: pytest.LogCaptureFixture) -> None:
    """A client that pushes the whole body: the server answers 413 without reading it. The
    client may see the answer or a reset (the server closes with unread bytes); either way the
    server is fine."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    body = b" " * BIG
    try:
        status, _ = raw(server, head("POST", "/v1/exchange", f"Content-Length: {BIG}"), body)
        assert status == 413
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert any(": 413 " in m for m in refusals(caplog))
    valid_round_trip(server)


def test_server_survives_a_gauntlet_then_serves(server: ChannelServer, controller: Controller) -> None:
    """Everything above, back to back on one server, then the job connects and trains."""
    for text, body, want in BAD_REQUESTS.values():
        assert raw(server, text, body)[0] == want
    raw(server, head("POST", "/v1/hello", f"Content-Length: {len(HELLO)}"), HELLO[:5], shut_write=True)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")  # a TLS hello, or noise
        sock.recv(1024)
    for step in (1, 2, 3):
        valid_round_trip(server, step)
    lines = list(read_jsonl(controller.run_dir / TELEMETRY_FILE))
    assert [line["event"] for line in lines] == ["hello", "step", "hello", "step", "hello", "step"]


def test_server_refuses_to_start_without_a_token(controller: Controller) -> None:
    with pytest.raises(ValueError, match="bearer token"):
        ChannelServer(("127.0.0.1", 0), controller, "")


def test_server_stops_and_frees_its_port(controller: Controller) -> None:
    srv = ChannelServer(("127.0.0.1", 0), controller, TOKEN)
    srv.start()
    port = srv.port
    assert request(srv, "GET", "/healthz", token=None)[0] == 200
    srv.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_finished_exchange_sets_the_event(server: ChannelServer) -> None:
    valid_round_trip(server)
    assert not server.job_finished.is_set()
    status, _ = request(server, "POST", "/v1/exchange", exchange_message([record(2)], [], finished=True))
    assert status == 200
    assert server.job_finished.wait(5)
    assert server.controller.state.finished


# ---- the serving loop at rest ------------------------------------------------------------------
def _wakeups(thread_id: int) -> int:
    """Times the thread gave up the CPU to wait (voluntary context switches): a wait that ends by
    timeout or by a wake-up counts one each."""
    with open(f"/proc/self/task/{thread_id}/status") as fh:
        for line in fh:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc (not Linux?)")


def test_an_idle_server_sleeps_until_a_connection_or_shutdown(controller: Controller) -> None:
    """The serving loop does not poll: with no client it never wakes (a 0.5 s poll woke each port
    twice a second, CPU that on a job's own cores comes out of training); a connection and
    shutdown() each wake it at once."""
    srv = ChannelServer(("127.0.0.1", 0), controller, TOKEN)
    srv.start()
    try:
        assert request(srv, "GET", "/healthz", token=None)[0] == 200
        assert srv._thread is not None and srv._thread.native_id is not None
        tid = srv._thread.native_id
        before = _wakeups(tid)
        time.sleep(1.6)  # three polls' worth of a 0.5 s poll
        assert _wakeups(tid) - before == 0, "the idle serving loop woke with no client"
        assert request(srv, "GET", "/healthz", token=None)[0] == 200, "a connection still wakes it"
    finally:
        srv.stop()
    assert not srv._thread.is_alive(), "shutdown() woke the loop and it returned"


def test_a_failure_in_the_serving_loop_is_logged_and_serving_goes_on(
    controller: Controller, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    srv = ChannelServer(("127.0.0.1", 0), controller, TOKEN)
    handle = srv._handle_request_noblock
    failures: list[int] = []

    def fail_once() -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("boom in the accept path")
        handle()

    monkeypatch.setattr(srv, "_handle_request_noblock", fail_once)
    srv.start()
    try:
        with caplog.at_level(logging.ERROR, logger="trainwarden.controller.httpserve"):
            # The failure struck before the accept: the connection waits in the backlog and is
            # served on the loop's next turn.
            assert request(srv, "GET", "/healthz", token=None)[0] == 200
        assert failures and "the server loop failed; going on" in caplog.text
        assert request(srv, "GET", "/healthz", token=None)[0] == 200, "the next connection is served"
    finally:
        srv.stop()
