"""The agent's side of the channel: HTTP to a sidecar, or a direct call to an embedded controller.

The bearer token goes only to the controller: never through a proxy from the environment
(`http_proxy` applies even to 127.0.0.1 in urllib) unless TRAINWARDEN_USE_PROXY=1 says so. An
https endpoint is verified against the system's CAs, or TRAINWARDEN_CA_FILE's (a self-signed
controller certificate).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Protocol

from trainwarden.controller.channel_security import channel_opener
from trainwarden.controller.identity import CHALLENGE_HEADER, PROOF_HEADER, new_challenge, proof_ok
from trainwarden.controller.protocol import (
    EXCHANGE_INTERVAL_S,
    PROTOCOL_VERSION,
    Action,
    AdapterEvent,
    JobShape,
    Outcome,
    ProtocolError,
    StepRecord,
    check_version,
    dumps,
    exchange_message,
    hello_message,
    next_exchange_of,
)


class ChannelDown(ConnectionError):
    """The controller cannot be reached or refused the request; training goes on regardless."""


class ChannelRefused(ChannelDown):
    """The controller read the request and refused its content (400 or 413): sending the same
    batch again can never succeed, so the agent drops it instead of retrying it forever."""


class Channel(Protocol):
    """What the agent talks to. A channel may also carry `next_exchange_s` (seconds, from the
    controller's last reply); the agent exchanges every EXCHANGE_INTERVAL_S where it does not."""

    def hello(self, shape: JobShape) -> dict[str, Any]: ...

    def exchange(
        self,
        records: list[StepRecord],
        outcomes: list[Outcome],
        finished: bool,
        events: list[AdapterEvent] | None = None,
    ) -> list[Action]: ...

    def close(self) -> None: ...


class HttpChannel:
    """HTTP to a sidecar. The controller must prove it holds the token (controller/identity.py)
    before it is sent the token, and on every answer; nothing from a server without the proof
    is used: a stale endpoint, or another process on a dead controller's port, cannot steer the job."""

    def __init__(self, endpoint: str, token: str, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._opener = channel_opener(self.endpoint)
        #: When the controller wants the next exchange (its last reply's `next_exchange_s`).
        self.next_exchange_s = EXCHANGE_INTERVAL_S

    def _check_proof(self, challenge: str, proof: str | None) -> None:
        if not proof_ok(self.token, challenge, proof):
            raise ChannelDown(
                f"the server at {self.endpoint} did not prove it holds this job's token: either the job's "
                "token is not the controller's (check TRAINWARDEN_TOKEN_FILE), or it is not the controller "
                "this run started (a stale endpoint, or another process on its port); nothing it sent is "
                "used and it is not sent the token"
            )

    def _prove(self) -> None:
        """Ask the server to prove it holds the token, sending no token: before a hello."""
        challenge = new_challenge()
        req = urllib.request.Request(self.endpoint + "/healthz", headers={CHALLENGE_HEADER: challenge})
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                resp.read(4096)
                self._check_proof(challenge, resp.headers.get(PROOF_HEADER))
        except urllib.error.HTTPError as exc:
            self._check_proof(challenge, exc.headers.get(PROOF_HEADER) if exc.headers else None)
            raise ChannelDown(f"controller answered {exc.code} to /healthz") from exc
        except ChannelDown:
            raise
        except OSError as exc:
            raise ChannelDown(f"controller at {self.endpoint} unreachable: {exc}") from exc

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = dumps(body).encode()  # strict JSON: a NaN loss goes as "NaN"
        challenge = new_challenge()
        req = urllib.request.Request(
            self.endpoint + path,
            data=data,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.token}",
                CHALLENGE_HEADER: challenge,
            },
        )
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                self._check_proof(challenge, resp.headers.get(PROOF_HEADER))
                return check_version(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            hint = " (the token does not match the controller's)" if exc.code == 401 else ""
            error = ChannelRefused if exc.code in (400, 413) else ChannelDown
            raise error(f"controller answered {exc.code}{hint}: {detail}") from exc
        except ChannelDown:
            raise
        except (OSError, json.JSONDecodeError, ProtocolError) as exc:
            raise ChannelDown(f"controller at {self.endpoint} unreachable: {exc}") from exc

    def hello(self, shape: JobShape) -> dict[str, Any]:
        self._prove()
        return self._post("/v1/hello", hello_message(shape))

    def exchange(
        self,
        records: list[StepRecord],
        outcomes: list[Outcome],
        finished: bool,
        events: list[AdapterEvent] | None = None,
    ) -> list[Action]:
        reply = self._post("/v1/exchange", exchange_message(records, outcomes, finished, events))
        self.next_exchange_s = next_exchange_of(reply)
        try:
            return [Action.from_json(a) for a in reply.get("actions", [])]
        except ProtocolError as exc:
            raise ChannelDown(f"controller sent a malformed action: {exc}") from exc

    def close(self) -> None:
        pass


class LocalChannel:
    """An embedded controller in this process: the same calls, no network."""

    def __init__(self, controller: Any, on_close: Any = None) -> None:
        self.controller = controller
        self._on_close = on_close
        self.next_exchange_s = EXCHANGE_INTERVAL_S

    def hello(self, shape: JobShape) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, **self.controller.hello(shape)}

    def exchange(
        self,
        records: list[StepRecord],
        outcomes: list[Outcome],
        finished: bool,
        events: list[AdapterEvent] | None = None,
    ) -> list[Action]:
        actions = self.controller.exchange(records, outcomes, finished, events=events or ())
        self.next_exchange_s = next_exchange_of({"next_exchange_s": self.controller.next_exchange_s})
        return actions

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
