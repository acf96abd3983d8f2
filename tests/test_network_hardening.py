"""The channel and /metrics against a hostile network (issue 15: findings 3, 4, 9, 12 and the HTTP
items of its Low list), each attacked as a client would: a real proxy process, raw sockets, a
controller process with its descriptor limit lowered, a self-signed certificate made here.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
import yaml
from helpers import REPO

from trainwarden.adapters.core.channel import ChannelDown, HttpChannel
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    PROTOCOL_VERSION,
    JobShape,
    RankMemory,
    StepRecord,
    exchange_message,
    hello_message,
)
from trainwarden.controller.server import ChannelServer

TOKEN = "network-hardening-token-Zq8Xv2"

LOGGER = "trainwarden.controller.server"


def shape(pid: int | None = None) -> JobShape:
    return helpers.job_shape("run-net", pids=(pid or os.getpid(),))


def record(step: int) -> StepRecord:
    memory = (RankMemory(0, 2**30, 2**30, 2**34, "cpu", os.getpid()),)
    return helpers.step_record(step, memory, loss=2.0)


def wait_for(cond: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ChannelServer, Controller]]:
    ctl = Controller(tmp_path / "run", "run-net")
    srv = ChannelServer(("127.0.0.1", 0), ctl, TOKEN)
    srv.start()
    yield srv, ctl
    srv.stop()
    ctl.close()


def post(port: int, path: str, body: dict[str, Any], token: str = TOKEN) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = json.dumps(body).encode()
        conn.request(
            "POST", path, data, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def raw(port: int, data: bytes, read_timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


# --- finding 3: never through a proxy ------------------------------------------------------------

PROXY = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    log = open(sys.argv[2], "a")

    class H(BaseHTTPRequestHandler):
        def _any(self):
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            log.write(json.dumps({"method": self.command, "target": self.path,
                                  "authorization": self.headers.get("Authorization")}) + "\\n")
            log.flush()
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_GET = do_POST = do_CONNECT = _any
        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    open(sys.argv[1], "w").write(str(srv.server_address[1]))
    srv.serve_forever()
    """
)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP proxy process that records every request it receives (and answers 502)."""
    port_file, seen = tmp_path / "proxy.port", tmp_path / "proxy.log"
    seen.touch()
    proc = subprocess.Popen([sys.executable, "-c", PROXY, str(port_file), str(seen)])
    try:
        port = wait_for(lambda: port_file.exists() and port_file.read_text(), what="the proxy to listen")
        yield f"http://127.0.0.1:{port}", seen
    finally:
        proc.kill()
        proc.wait()


def test_the_token_never_goes_through_a_proxy_unless_the_user_says_so(
    served: tuple[ChannelServer, Controller], proxy: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, ctl = served
    proxy_url, seen = proxy
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.setenv(var, proxy_url)
    monkeypatch.setenv("no_proxy", "localhost")  # what users try; urllib still proxies 127.0.0.1
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("TRAINWARDEN_USE_PROXY", raising=False)
    endpoint = f"http://127.0.0.1:{srv.port}"

    channel = HttpChannel(endpoint, TOKEN)
    channel.hello(shape())
    for step in range(1, 8):
        channel.exchange([record(step)], [], False)
    from trainwarden.controller.cli import _get_json  # `trainwarden run`'s status line

    assert (_get_json(endpoint + "/v1/status", TOKEN) or {}).get("step") == 7
    assert seen.read_text() == "", "the proxy received the job's requests (and its token)"
    assert ctl.state.step == 7

    # The user's explicit opt-in: then the proxy is used (here it answers 502).
    monkeypatch.setenv("TRAINWARDEN_USE_PROXY", "1")
    with pytest.raises(ChannelDown, match="502"):
        HttpChannel(endpoint, TOKEN).exchange([record(8)], [], False)
    [line] = [json.loads(s) for s in seen.read_text().splitlines()]
    assert line["target"] == endpoint + "/v1/exchange"


# --- finding 4: bounded workers, a deadline per request, accept errors survived -------------------


def _short_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each request's deadline 2 s instead of 10, for a short test. (Code from before the bounded
    server has no such deadline: there the dribble runs its whole course and the test fails.)"""
    try:
        from trainwarden.controller import httpserve
    except ImportError:
        return
    monkeypatch.setattr(httpserve, "REQUEST_DEADLINE_S", 2.0)


def test_a_client_sending_one_byte_at_a_time_is_cut_off_at_the_request_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _short_deadline(monkeypatch)
    ctl = Controller(tmp_path / "run", "run-net")
    srv = ChannelServer(("127.0.0.1", 0), ctl, TOKEN)
    srv.start()
    first = b"POST /v1/exchange HTTP/1.1\r\n"
    request = f"Host: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 400\r\n\r\n".encode() + b"{" * 60
    sent, answer = 0, b""
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(first)
            for i in range(len(request)):  # one byte every 0.4 s: each read is quick, the request is not
                try:
                    sock.send(request[i : i + 1])
                except OSError:
                    break
                sent += 1
                if select.select([sock], [], [], 0.4)[0]:
                    answer = sock.recv(4096)
                    break
    finally:
        srv.stop()
        ctl.close()
    # A per-read timeout (10 s) would let this client hold its thread for the whole 70 s dribble.
    assert sent < 40, f"the server still read byte {sent} of a request past its deadline"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]


def _metrics_dribble(port: int) -> int:
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 60:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            sent += 1
            if select.select([sock], [], [], 0.4)[0]:
                break
    return sent


def test_the_metrics_port_has_a_request_deadline_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainwarden.controller.exporter import serve_metrics

    _short_deadline(monkeypatch)
    ctl = Controller(tmp_path / "run", "run-net")
    server, port = serve_metrics(ctl, "127.0.0.1", 0)
    try:
        sent = _metrics_dribble(port)
    finally:
        server.shutdown()
        server.server_close()
        ctl.close()
    assert sent < 40, "/metrics kept reading a request past its deadline"


def test_a_burst_of_idle_connections_costs_bounded_threads_and_the_job_gets_through(
    served: tuple[ChannelServer, Controller],
) -> None:
    srv, ctl = served
    before = threading.active_count()
    idle: list[socket.socket] = []
    try:
        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        time.sleep(0.5)
        grown = threading.active_count() - before
        workers = getattr(srv, "workers", 32)
        assert grown <= workers + 2, f"{grown} threads for 300 idle connections"
        # The ones past the workers were answered 503 at once, not left hanging.
        refused = sum(
            1 for s in idle if select.select([s], [], [], 0)[0] and s.recv(64).startswith(b"HTTP/1.1 503")
        )
        assert refused >= 300 - workers - 5, refused
    finally:
        for s in idle:
            s.close()
    status, data = wait_for(
        lambda: (r := post(srv.port, "/v1/hello", hello_message(shape())))[0] == 200 and r,
        what="a free worker",
    )
    assert status == 200, data
    assert post(srv.port, "/v1/exchange", exchange_message([record(1)], []))[0] == 200
    assert ctl.state.step == 1
    # The listen backlog holds a burst (the kernel shows it as the listening socket's Send-Q).
    if shutil.which("ss"):
        out = subprocess.run(
            ["ss", "-ltnH", f"sport = :{srv.port}"], capture_output=True, text=True, check=False
        ).stdout.split()
        if out:
            assert int(out[2]) >= 128, out


CONTROLLER_UNDER_A_LOW_FD_LIMIT = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
    from trainwarden.controller.cli import main
    sys.exit(main(sys.argv[2:]))
    """
)


def _start_controller(
    tmp_path: Path, *extra: str, fd_limit: int = 4096
) -> tuple[subprocess.Popen[str], dict]:
    run_dir = tmp_path / "ctl"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CONTROLLER_UNDER_A_LOW_FD_LIMIT,
            str(fd_limit),
            "controller",
            "--run-dir",
            str(run_dir),
            "--token-file",
            str(token_file),
            "--metrics-port",
            "0",
            *(extra or ("--listen", "127.0.0.1:0")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ready = run_dir / "controller.json"
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, what="the controller to listen")
    except AssertionError:
        proc.kill()
        raise
    if proc.poll() is not None:
        raise AssertionError(f"the controller exited: {proc.communicate()[0]}")
    return proc, json.loads(ready.read_text())


def _stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out = proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    return proc.returncode, out


@pytest.mark.slow
def test_at_the_descriptor_limit_the_controller_lives_on_and_writes_its_summary(tmp_path: Path) -> None:
    """A flood of connections held open against a controller limited to 128 descriptors: it keeps
    running, serves the job once the flood ends, and exits 0 with summary.json on SIGTERM."""
    proc, ready = _start_controller(tmp_path, fd_limit=128)
    port = int(ready["endpoint"].rsplit(":", 1)[1])
    metrics_port = int(ready["metrics"].rsplit(":", 1)[1].split("/")[0])
    flood: list[socket.socket] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    try:
        assert post(port, "/v1/hello", hello_message(shape()))[0] == 200  # check_job now reads /proc
        for i in range(600):
            try:
                flood.append(socket.create_connection(("127.0.0.1", (port, metrics_port)[i % 2]), timeout=2))
            except OSError:
                pass
        time.sleep(3.0)  # several rounds of the main loop at the limit
        assert proc.poll() is None, f"the controller died: {_stop(proc)[1][-3000:]}"
    finally:
        for s in flood:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    status = wait_for(
        lambda: post(port, "/v1/exchange", exchange_message([record(1)], []))[0] == 200,
        what="the job's exchange",
    )
    assert status
    rc, out = _stop(proc)
    assert rc == 0, out[-3000:]
    summary = json.loads((tmp_path / "ctl" / "summary.json").read_text())
    assert summary["step"] == 1


# --- finding 9 and the Low items: what a client can make the controller log, echo or do ----------


def test_a_flood_of_refused_requests_is_rate_limited_truncated_and_escaped(
    served: tuple[ChannelServer, Controller], caplog: pytest.LogCaptureFixture
) -> None:
    srv, _ctl = served
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = "/x\x1b[2J\x1b]0;pwned\x07" + "A" * 8000
    sent = 0
    for _ in range(300):
        raw(srv.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
        sent += 8000
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    logged = sum(len(m) for m in messages)
    assert logged < 64 * 1024, f"{logged} bytes logged for {sent} bytes of refused paths"
    assert len(messages) <= 60, len(messages)
    for m in messages:
        assert "\x1b" not in m and "\x07" not in m and "\n" not in m, repr(m[:200])
    assert any("\\x1b[2J" in m for m in messages), "the refusal names the path, escaped"


def test_a_token_in_the_query_string_is_never_logged_or_echoed(
    served: tuple[ChannelServer, Controller], caplog: pytest.LogCaptureFixture
) -> None:
    srv, _ctl = served
    caplog.set_level(logging.DEBUG)
    secret = "Qs7-secret-from-the-query"
    answers = [
        raw(srv.port, f"GET /v1/status?token={secret} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        raw(srv.port, f"GET /nowhere?access_token={secret} HTTP/1.1\r\nHost: x\r\n\r\n".encode()),
        raw(
            srv.port,
            f"GET /v1/status?token={secret} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(),
        ),
        raw(srv.port, f"GET /v1/x?token={secret} HTTP/9.9\r\n\r\n".encode()),  # http.server's own refusal
    ]
    for a in answers:
        assert a.startswith(b"HTTP/1."), a[:100]
        assert secret.encode() not in a, a
    assert secret not in caplog.text


def test_transfer_encoding_with_content_length_is_refused(served: tuple[ChannelServer, Controller]) -> None:
    srv, ctl = served
    body = json.dumps(hello_message(shape())).encode()
    answer = raw(
        srv.port,
        (
            f"POST /v1/hello HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"Transfer-Encoding" in answer
    assert ctl.state.shape is None


def test_100_continue_only_after_the_token(served: tuple[ChannelServer, Controller]) -> None:
    srv, _ctl = served
    head = "POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall((head + "\r\n").encode())
        first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 401"), first[:100]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall((head + f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
        first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 100"), first[:100]


def test_a_run_id_cannot_carry_a_newline_into_the_log(
    served: tuple[ChannelServer, Controller], caplog: pytest.LogCaptureFixture
) -> None:
    srv, ctl = served
    forged = shape().to_json() | {"run_id": "x\n2026-01-01 00:00:00 ERROR trainwarden: budget spent; stop"}
    status, data = post(srv.port, "/v1/hello", {"v": PROTOCOL_VERSION, "shape": forged})
    assert status == 400 and b"run_id" in data, data
    assert ctl.state.shape is None
    # And a message that does hold one is written on one line by the controller's formatter.
    from trainwarden.controller.logsafe import OneLineFormatter

    rec = logging.LogRecord("t", logging.INFO, __file__, 1, "job %s", ("a\nb\r\x1b[31mc",), None)
    line = OneLineFormatter("%(message)s").format(rec)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line, repr(line)


# --- finding 12: weak tokens, open binds, TLS ------------------------------------------------------


def _controller_args(tmp_path: Path, token: str, *extra: str) -> Any:
    from trainwarden.controller.cli import build_parser

    token_file = tmp_path / "weak-token"
    token_file.write_text(token)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a controller that (wrongly) took the token would exit at once: its parent is gone
    extra = (*extra, "--parent-pid", str(gone.pid), "--metrics-port", "0")
    return build_parser().parse_args(
        [
            "controller",
            "--run-dir",
            str(tmp_path / "r"),
            "--token-file",
            str(token_file),
            "--listen",
            "127.0.0.1:0",
            *extra,
        ]
    )


def _secret_placeholder() -> str:
    doc = yaml.safe_load((REPO / "deploy" / "k8s" / "secrets" / "secret.yaml").read_text())
    return doc["stringData"]["token"]


@pytest.mark.parametrize("token", ["aaaaaaaaaaaaaaaa", "abababababababababababab", "secret"], ids=str)
def test_weak_tokens_are_refused_with_how_to_make_one(tmp_path: Path, token: str) -> None:
    from trainwarden.controller.cli import UsageError, cmd_controller

    with pytest.raises(UsageError, match=r"secrets\.token_urlsafe"):
        cmd_controller(_controller_args(tmp_path, token))


def test_the_secrets_placeholder_is_refused(tmp_path: Path) -> None:
    from trainwarden.controller.cli import UsageError, cmd_controller

    with pytest.raises(UsageError, match=r"placeholder.*secrets\.token_urlsafe"):
        cmd_controller(_controller_args(tmp_path, _secret_placeholder()))


def test_a_channel_beyond_loopback_is_said_loudly(tmp_path: Path) -> None:
    proc, _ready = _start_controller(tmp_path, "--listen", "0.0.0.0:0", "--metrics-host", "0.0.0.0")
    rc, out = _stop(proc)
    assert rc == 0, out
    assert "beyond this machine" in out and "clear text" in out and "--tls-cert" in out, out
    assert "/metrics listens on 0.0.0.0" in out, out


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if not shutil.which("openssl"):
        pytest.skip("no openssl CLI to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=trainwarden-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_the_channel_over_tls_with_a_self_signed_certificate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    proc, ready = _start_controller(
        tmp_path, "--listen", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(key)
    )
    try:
        endpoint = ready["endpoint"]
        assert endpoint.startswith("https://127.0.0.1:"), endpoint
        # Without the CA the agent refuses the controller's certificate: no token sent to it.
        monkeypatch.delenv("TRAINWARDEN_CA_FILE", raising=False)
        with pytest.raises(ChannelDown, match="CERTIFICATE_VERIFY_FAILED"):
            HttpChannel(endpoint, TOKEN).hello(shape())
        monkeypatch.setenv("TRAINWARDEN_CA_FILE", str(cert))
        channel = HttpChannel(endpoint, TOKEN)
        channel.hello(shape())
        assert channel.exchange([record(1)], [], False) == []
        # Plain HTTP to the TLS port gets nothing useful, and the server lives on.
        port = int(endpoint.rsplit(":", 1)[1])
        raw(
            port, f"GET /v1/status HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode(), read_timeout=5
        )
        ctx = ssl.create_default_context(cafile=str(cert))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as s,
            ctx.wrap_socket(s, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(
                f"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
            )
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'"step":1' in answer, answer[:300]
    finally:
        rc, out = _stop(proc)
    assert rc == 0, out
