"""The channel's server side: versioned JSON over HTTP, bearer token required.

Loopback by default. Every request but /healthz needs `Authorization: Bearer <token>`
(401 otherwise); a body over MAX_BODY_BYTES gets 413, malformed JSON or a message this
version does not understand gets 400. Each is logged with the client's address and never
reaches the control loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from trainwarden.controller.identity import CHALLENGE_HEADER, MAX_CHALLENGE_CHARS, PROOF_HEADER, token_proof
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    MAX_BODY_BYTES,
    PROTOCOL_VERSION,
    JobShape,
    Outcome,
    ProtocolError,
    StepRecord,
    check_version,
    events_of,
)

log = logging.getLogger(__name__)

#: Seconds a client may take to send a request: a stalled client holds one thread, not the server.
REQUEST_TIMEOUT_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    server: ChannelServer
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # -- helpers --------------------------------------------------------------------------
    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        challenge = self.headers.get(CHALLENGE_HEADER) if self.headers else None
        if challenge and len(challenge) <= MAX_CHALLENGE_CHARS and challenge.isascii():
            # The controller proves it holds the token (identity.py): the job trusts no other server.
            self.send_header(PROOF_HEADER, token_proof(self.server.token, challenge))
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        log.warning(
            "refused %s %s from %s: %d %s", self.command, self.path, self.client_address[0], status.value, why
        )
        self.close_connection = True
        self._reply(status.value, {"v": PROTOCOL_VERSION, "error": why})

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        want = f"Bearer {self.server.token}"
        return hmac.compare_digest(got.encode(), want.encode())

    def _body(self) -> dict[str, Any] | None:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return None
        n = int(length)
        if n > MAX_BODY_BYTES:
            self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {n} bytes exceeds {MAX_BODY_BYTES}")
            return None
        raw = self.rfile.read(n)
        if len(raw) != n:
            self._refuse(HTTPStatus.BAD_REQUEST, f"body truncated: {len(raw)} of {n} bytes")
            return None
        try:
            return check_version(json.loads(raw))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digit limit
            self._refuse(HTTPStatus.BAD_REQUEST, f"body is not JSON: {str(exc)[:200]}")
        except ProtocolError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
        return None

    # -- routes ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, {"v": PROTOCOL_VERSION, "ok": True})
            return
        if not self._authorized():
            self._refuse(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            return
        if self.path == "/v1/status":
            self._reply(200, {"v": PROTOCOL_VERSION, **self.server.controller.status()})
            return
        self._refuse(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}")

    def do_POST(self) -> None:
        if not self._authorized():
            self._refuse(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            return
        if self.path not in ("/v1/hello", "/v1/exchange"):
            self._refuse(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path}")
            return
        body = self._body()
        if body is None:
            return
        ctl = self.server.controller
        try:
            if self.path == "/v1/hello":
                ack = ctl.hello(JobShape.from_json(body.get("shape")))
                self._reply(200, {"v": PROTOCOL_VERSION, **ack})
            else:
                records = [StepRecord.from_json(r) for r in _list(body, "records")]
                outcomes = [Outcome.from_json(o) for o in _list(body, "outcomes")]
                finished = body.get("finished", False) is True
                events = events_of(body)
                actions = ctl.exchange(records, outcomes, finished, events=events)
                self._reply(200, {"v": PROTOCOL_VERSION, "actions": [a.to_json() for a in actions]})
                if finished:
                    self.server.job_finished.set()
        except ProtocolError as exc:
            self._refuse(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception:  # the controller survives anything a request does
            log.exception("error handling %s", self.path)
            self._reply(500, {"v": PROTOCOL_VERSION, "error": "internal error; see the controller log"})


def _list(body: dict[str, Any], key: str) -> list[Any]:
    value = body.get(key, [])
    if not isinstance(value, list):
        raise ProtocolError(f"message.{key} must be a list")
    return value


class ChannelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], controller: Controller, token: str) -> None:
        if not token:
            raise ValueError("the channel needs a bearer token; none was given")
        super().__init__(address, _Handler)
        self.controller = controller
        self.token = token
        self.job_finished = threading.Event()
        self._thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up before its answer (BrokenPipe, reset) is not the controller's
        # problem: one log line, not a traceback on stderr.
        import sys

        log.info("connection from %s ended early: %s", client_address[0], sys.exc_info()[1])

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="trainwarden-channel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
