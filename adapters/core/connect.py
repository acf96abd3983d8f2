"""How an adapter finds its controller: a sidecar from the environment, or one embedded here.

- `TRAINWARDEN_ENDPOINT` set (by `trainwarden run`, or a Kubernetes sidecar's manifest):
  talk HTTP to it, with the token from `TRAINWARDEN_TOKEN` or `TRAINWARDEN_TOKEN_FILE`.
- otherwise: run the same control loop embedded in a background thread of rank 0, with the
  policy given to `attach(policy=...)` or in `TRAINWARDEN_POLICY` (none: observe only,
  telemetry and decision logs still written).
- `TRAINWARDEN_DISABLE=1`: no controller at all; the adapter still carries its knobs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from trainwarden.adapters.core.channel import Channel, HttpChannel, LocalChannel
from trainwarden.controller.identity import new_run_id
from trainwarden.controller.protocol import (
    ENV_DISABLE,
    ENV_ENDPOINT,
    ENV_POLICY,
    ENV_RUN_DIR,
    ENV_RUN_ID,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
)

log = logging.getLogger("trainwarden")


class AttachError(RuntimeError):
    """trainwarden cannot attach as configured; the message says what to change."""


def run_id_from_env() -> str:
    return os.environ.get(ENV_RUN_ID) or new_run_id()


def sidecar_channel() -> Channel | None:
    endpoint = os.environ.get(ENV_ENDPOINT)
    if not endpoint:
        return None
    token = os.environ.get(ENV_TOKEN)
    token_file = os.environ.get(ENV_TOKEN_FILE)
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise AttachError(
                f"{ENV_TOKEN_FILE}={token_file} cannot be read ({exc}); "
                "mount the controller's token file there or set TRAINWARDEN_TOKEN"
            ) from exc
    if not token:
        raise AttachError(
            f"{ENV_ENDPOINT} is set but no token: set {ENV_TOKEN} or {ENV_TOKEN_FILE} "
            "to the controller's bearer token"
        )
    try:
        return HttpChannel(endpoint, token)
    except ValueError as exc:  # an unreadable TRAINWARDEN_CA_FILE: the message says which and why
        raise AttachError(str(exc)) from exc


def connect(
    rank: int, run_id: str, policy: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str] | None
) -> tuple[Channel | None, Any]:
    """The channel rank 0 uses, and the embedded controller (or None). Other ranks get (None, None)."""
    if rank != 0 or os.environ.get(ENV_DISABLE, "") not in ("", "0"):
        return None, None
    channel = sidecar_channel()
    if channel is not None:
        return channel, None
    return embedded(run_id, policy or os.environ.get(ENV_POLICY), run_dir or os.environ.get(ENV_RUN_DIR))


def embedded(
    run_id: str, policy: str | os.PathLike[str] | None, run_dir: str | os.PathLike[str] | None
) -> tuple[Channel, Any]:
    """An in-process controller: the same loop, logs and policies as the sidecar, no network."""
    from trainwarden.controller.embedded import PolicyFileError, load_policy_file
    from trainwarden.controller.loop import Controller
    from trainwarden.controller.sources import default_sources

    pf = None
    if policy is not None:
        try:
            pf = load_policy_file(policy)
        except PolicyFileError as exc:
            raise AttachError(f"the policy file is not valid:\n{exc}") from exc
    directory = Path(run_dir) if run_dir else Path("runs") / run_id
    controller = Controller(directory, run_id, policy_file=pf, sources=default_sources())
    log.info("trainwarden: embedded controller, run directory %s", directory)
    return LocalChannel(controller, on_close=controller.close), controller
