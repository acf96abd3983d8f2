"""The agent against a real controller over HTTP: telemetry flows, actions arrive at a step
boundary, and nothing the network does (hangs, outages, a wrong token) stops training."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from trainwarden.adapters import pytorch as tw
from trainwarden.adapters.core.channel import HttpChannel
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import KNOB_MICRO_BATCH
from trainwarden.controller.runlog import read_jsonl
from trainwarden.controller.server import ChannelServer
from trainwarden.policies.loader import load_policy_file

TOKEN = "t0ken-for-tests"
GLOBAL = 8


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "TRAINWARDEN_DISABLE",
        "TRAINWARDEN_ENDPOINT",
        "TRAINWARDEN_TOKEN",
        "TRAINWARDEN_TOKEN_FILE",
        "TRAINWARDEN_POLICY",
        "TRAINWARDEN_RUN_DIR",
        "TRAINWARDEN_SYNC_EVERY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRAINWARDEN_RUN_ID", "agent-test")


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def _batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randn(GLOBAL, 4, generator=g), torch.randn(GLOBAL, 1, generator=g)


class Job:
    """A tiny model trained through the adapter, one optimizer step at a time."""

    def __init__(self, micro: int = GLOBAL, **kw: object) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.handle = tw.attach(
            self.model,
            torch.optim.SGD(self.model.parameters(), lr=0.01),
            global_batch_size=GLOBAL,
            micro_batch_size=micro,
            **kw,
        )
        self._steps = self.handle.steps(_batches())
        self.step_times: list[float] = []

    def step(self) -> None:
        for x, y in next(self._steps):
            self.handle.backward(torch.nn.functional.mse_loss(self.model(x), y))
        t = time.perf_counter()
        self.handle.step()
        self.step_times.append(time.perf_counter() - t)

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()


def _serve(controller: Controller, port: int = 0, token: str = TOKEN) -> ChannelServer:
    server = ChannelServer(("127.0.0.1", port), controller, token)
    server.start()
    return server


def _point_at(monkeypatch: pytest.MonkeyPatch, port: int, token: str = TOKEN) -> None:
    monkeypatch.setenv("TRAINWARDEN_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TRAINWARDEN_TOKEN", token)


def _events(run_dir: Path, event: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "telemetry.jsonl") if r.get("event") == event]


def test_telemetry_reaches_a_controller_over_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctl = Controller(tmp_path, "agent-test")
    server = _serve(ctl)
    _point_at(monkeypatch, server.port)
    try:
        job = Job(micro=4, sync_every=1)  # memory at every step
        assert job.handle.controller is None  # a sidecar, not an embedded controller
        job.run(5)
        wait_for(lambda: ctl.state.step == 5, what="telemetry of step 5")
        assert ctl.state.shape is not None and ctl.state.shape.global_batch_size == GLOBAL
        assert ctl.state.config[KNOB_MICRO_BATCH] == 4
        job.handle.close()
        assert ctl.state.finished
        steps = _events(tmp_path, "step")
        assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
        assert all(r["loss"] is not None and r["samples"] == GLOBAL * r["step"] for r in steps)
        assert all(r["memory"][0]["rank"] == 0 and r["memory"][0]["peak_bytes"] > 0 for r in steps)
        assert len(_events(tmp_path, "hello")) == 1
    finally:
        server.stop()
        ctl.close()


def test_a_hung_controller_never_blocks_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # A controller that takes the connection and never answers: the request hangs until the
    # channel's timeout (5 s).
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    blackhole.settimeout(10)
    _point_at(monkeypatch, blackhole.getsockname()[1])
    job = Job(micro=4)
    conn = None
    try:
        assert isinstance(job.handle.agent.channel, HttpChannel)
        assert job.handle.agent.channel.timeout_s >= 5.0
        conn, _ = blackhole.accept()  # the agent's hello is now waiting for an answer
        for _ in range(20):
            job.step()
            time.sleep(0.01)
        assert job.handle.step_count == 20
        assert not job.handle.agent.connected  # the agent thread is still stuck on the network
        assert len(job.handle.agent._records) == 20  # telemetry queued, not lost
        assert max(job.step_times) < 0.5, f"a step waited on the network: {max(job.step_times):.2f}s"
    finally:
        if conn is not None:
            conn.close()  # ends the hung request, so close() below does not wait it out
        blackhole.close()
    t = time.monotonic()
    job.handle.close()
    assert time.monotonic() - t < 5


def test_training_goes_on_while_the_controller_is_away_and_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctl = Controller(tmp_path, "agent-test")
    server = _serve(ctl)
    port = server.port
    _point_at(monkeypatch, port)
    job = Job()
    agent = job.handle.agent
    try:
        job.run(3)
        wait_for(lambda: ctl.state.step == 3, what="telemetry before the outage")

        server.stop()
        job.run(4)  # training goes on
        wait_for(lambda: not agent.connected, what="the agent to notice the outage")
        job.run(2)
        assert job.handle.step_count == 9
        assert ctl.state.step == 3

        server = _serve(ctl, port=port)  # the controller is back, on the same address
        job.run(1)
        wait_for(lambda: ctl.state.step == 10, what="telemetry after the controller came back")
        assert agent.connected
        assert len(_events(tmp_path, "hello")) == 2  # it said hello again
        job.handle.close()
        # What was queued during the outage was delivered, once each and in order.
        assert [r["step"] for r in _events(tmp_path, "step")] == list(range(1, 11))
    finally:
        job.handle.close()
        server.stop()
        ctl.close()


def test_a_wrong_token_is_logged_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trainwarden.agent")
    ctl = Controller(tmp_path, "agent-test")
    server = _serve(ctl)
    _point_at(monkeypatch, server.port, token="not-the-token")
    job = Job()
    try:
        job.run(5)

        def refused() -> bool:
            return any(
                # The server cannot prove it holds the job's token, so it is never sent the token.
                r.name == "trainwarden.agent" and "did not prove it holds this job's token" in r.getMessage()
                for r in caplog.records
            )

        wait_for(refused, what="the agent to log the refused proof")
        job.run(5)
        assert job.handle.step_count == 10
        assert ctl.state.shape is None and ctl.state.step == -1  # nothing got in
    finally:
        job.handle.close()
        server.stop()
        ctl.close()


POLICY = """\
version: 1
budget:
  device_memory: 1MiB
controller:
  decide_interval_s: 0.01
policies:
  - kind: memory
    cooldown_steps: 1
    step_up: false
"""


def test_an_action_is_applied_at_a_step_boundary_and_its_outcome_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run_dir = tmp_path / "run"
    ctl = Controller(run_dir, "agent-test", policy_file=load_policy_file(policy))
    server = _serve(ctl)
    _point_at(monkeypatch, server.port)
    job = Job(micro=GLOBAL)
    h = job.handle
    switched_at = None
    try:
        deadline = time.monotonic() + 10
        while switched_at is None and time.monotonic() < deadline:
            job.step()
            if h.micro_batch_size != GLOBAL:
                switched_at = h.step_count
            time.sleep(0.01)
        assert switched_at is not None, "the memory policy's step-down never reached the job"
        assert h.micro_batch_size == GLOBAL // 2  # halved: 8 -> 4, accumulation 1 -> 2
        assert h.gradient_accumulation_steps == 2
        job.run(2)
        h.close()
    finally:
        h.close()
        server.stop()
        ctl.close()

    decisions = list(read_jsonl(run_dir / "decisions.jsonl"))
    applied = [d for d in decisions if d["outcome"] == "applied"]
    assert applied, decisions
    first = applied[0]
    assert first["kind"] == KNOB_MICRO_BATCH and first["params"] == {"value": GLOBAL // 2}
    assert first["policy"] == "memory" and "high-water" in first["reason"]
    assert first["step"] == switched_at  # applied at the boundary after that step
    assert first["decided_step"] < switched_at
    steps = {r["step"]: r for r in _events(run_dir, "step")}
    # A step's record carries the configuration it ran with: the switch shows from the next step.
    assert steps[switched_at]["config"][KNOB_MICRO_BATCH] == GLOBAL
    assert steps[switched_at + 1]["config"][KNOB_MICRO_BATCH] == GLOBAL // 2
    assert steps[switched_at + 1]["config"]["gradient_accumulation_steps"] == 2
    json.dumps(decisions)  # the log is plain JSON
