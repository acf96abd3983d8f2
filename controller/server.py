"""The channel's server side: versioned JSON over HTTP, bearer token required.

Loopback by default (TLS with a certificate when it leaves the host: channel_security.py).
Every request but /healthz needs `Authorization: Bearer <token>` (401 otherwise); a body over
MAX_BODY_BYTES gets 413, Transfer-Encoding (with or without Content-Length) 400, malformed JSON
or a message this version does not understand 400. `100 Continue` is sent only to a client that
presented the token. Each refusal is logged (rate-limited, the path without its query, escaped)
and never reaches the control loop. The server under it (httpserve.py) bounds workers, time per
request and what a flood can cost.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from trainwarden.controller.httpserve import (
    BoundedHTTPServer,
    RefusalLog,
    printable,
    request_path,
)
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
    dumps,
    events_of,
)

log = logging.getLogger(__name__)

_POST_PATHS = ("/v1/hello", "/v1/exchange")


class _Handler(BaseHTTPRequestHandler):
    server: ChannelServer
    protocol_version = "HTTP/1.1"
    # Buffered: a reply's status line, headers and body leave in one send (flushed in _reply), not
    # one send for the headers and one for the body (a quarter of the sidecar's CPU per exchange
    # went to the two sends).
    wbufsize = 64 * 1024

    def handle(self) -> None:
        # One request per connection: the deadline is per request, and a kept-alive connection
        # would hold a worker between the job's exchanges.
        self.close_connection = True
        self.handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), printable(format % args))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Not the request line: its query may hold a token.
        log.debug(
            "%s %s %s %s",
            self.address_string(),
            printable(str(getattr(self, "command", None) or "?"), 16),
            request_path(str(getattr(self, "path", "") or "")),
            code,
        )

    # -- helpers --------------------------------------------------------------------------
    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        headers = getattr(self, "headers", None)  # absent when the request line itself was refused
        challenge = headers.get(CHALLENGE_HEADER) if headers else None
        if challenge and len(challenge) <= MAX_CHALLENGE_CHARS and challenge.isascii():
            # The controller proves it holds the token (identity.py): the job trusts no other server.
            self.send_header(PROOF_HEADER, token_proof(self.server.token, challenge))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _refuse(self, status: HTTPStatus, why: str) -> None:
        self.server.refusals.warning(
            "refused %s %s from %s: %d %s",
            printable(str(getattr(self, "command", None) or "?"), 16),
            request_path(str(getattr(self, "path", "") or "")),
            self.client_address[0],
            status.value,
            printable(why, 300),
        )
        self.close_connection = True
        self._reply(status.value, {"v": PROTOCOL_VERSION, "error": why})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (a malformed request line, headers too long) would echo the
        # request line, query and all, into an HTML page and stderr: a JSON refusal instead.
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # a status line even to a client that sent no version
        self._refuse(status, f"malformed request ({status.phrase})")

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        want = f"Bearer {self.server.token}"
        return hmac.compare_digest(got.encode(), want.encode())

    def handle_expect_100(self) -> bool:
        # `Expect: 100-continue` asks to send the body: only to a client with the token, to a
        # path that takes one.
        if not self._authorized():
            self._refuse(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            return False
        if self.command != "POST" or self.path not in _POST_PATHS:
            self._refuse(HTTPStatus.NOT_FOUND, "no such endpoint")
            return False
        ok = super().handle_expect_100()
        self.wfile.flush()  # the client waits for the 100 before it sends the body
        return ok

    def _body(self) -> dict[str, Any] | None:
        if "Transfer-Encoding" in self.headers:
            # Chunked bodies are not spoken here; with a Content-Length too, two readers of the same
            # bytes (a proxy and this server) could disagree where the request ends (smuggling).
            self._refuse(
                HTTPStatus.BAD_REQUEST,
                "Transfer-Encoding is not accepted"
                + (" with Content-Length" if "Content-Length" in self.headers else "")
                + "; send the body with a Content-Length only",
            )
            return None
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
            return None
        if len(self.headers.get_all("Content-Length") or ()) > 1:
            self._refuse(HTTPStatus.BAD_REQUEST, "more than one Content-Length")
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
        self._refuse(HTTPStatus.NOT_FOUND, "no such endpoint")

    def do_POST(self) -> None:
        if not self._authorized():
            self._refuse(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token")
            return
        if self.path not in ("/v1/hello", "/v1/exchange"):
            self._refuse(HTTPStatus.NOT_FOUND, "no such endpoint")
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
                self._reply(
                    200,
                    {
                        "v": PROTOCOL_VERSION,
                        "actions": [a.to_json() for a in actions],
                        "next_exchange_s": ctl.next_exchange_s,
                    },
                )
                if finished:
                    self.server.job_finished.set()
                    if self.server.on_finished is not None:
                        self.server.on_finished()
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


class ChannelServer(BoundedHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        controller: Controller,
        token: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        workers: int | None = None,
        deadline_s: float | None = None,
    ) -> None:
        if not token:
            raise ValueError("the channel needs a bearer token; none was given")
        super().__init__(
            address, _Handler, workers=workers, deadline_s=deadline_s, ssl_context=ssl_context, name="channel"
        )
        self.refusals = RefusalLog(log, per_window=50)
        self.controller = controller
        self.token = token
        self.job_finished = threading.Event()
        #: Called once the job said it finished (the sidecar's loop waits on it).
        self.on_finished: Callable[[], None] | None = None
