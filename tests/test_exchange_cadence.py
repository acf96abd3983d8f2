"""The exchange cadence: the controller asks for the next exchange as late as its policies allow.

Every policy says how soon it needs fresher telemetry (`watch_s`); the controller answers each
exchange with `next_exchange_s`: 0.5 s while an action is pending or a policy watches closely,
up to `controller.max_exchange_interval_s` when all are far from their thresholds. The agent
waits that long, but a memory surge, an outcome or an event wakes it at once (issue 18, part 3:
fewer exchanges is CPU the sidecar and the agent's thread no longer take from training)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import job_shape, step_record
from test_data_policy import snap as data_snap

from trainwarden.adapters.core.agent import WAKE_ON_RECORDS, Agent
from trainwarden.adapters.core.channel import HttpChannel
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    EXCHANGE_INTERVAL_S,
    KNOB_DOMAIN_WEIGHTS,
    KNOB_LR_MULTIPLIER,
    KnobSpec,
    RankMemory,
    StepRecord,
    next_exchange_of,
)
from trainwarden.controller.schema import ControllerSettings
from trainwarden.controller.server import ChannelServer
from trainwarden.policies.data import DataParams, DataPolicy
from trainwarden.policies.loader import load_policy_text

GiB = 2**30
#: The interval the controller asks for when every policy is far from its thresholds.
FAR = ControllerSettings().max_exchange_interval_s
#: Cap 10 GiB: low water 5 GiB, high water 9 GiB.
MEMORY = """\
version: 1
budget:
  device_memory: 10GiB
controller:
  decide_interval_s: 0.01
{extra}policies:
  - kind: memory
    high_water: 0.9
    low_water: 0.5
"""


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def controller(tmp_path: Path, text: str) -> tuple[Controller, Clock]:
    clock = Clock()
    return Controller(tmp_path / "run", "cadence", load_policy_text(text), clock=clock), clock


def rec(step: int, t: float, peak_gib: float = 1.0, config: dict[str, Any] | None = None) -> StepRecord:
    peak = int(peak_gib * GiB)
    r = step_record(step, (RankMemory(0, peak - 1, peak, 80 * GiB, "cpu", 1),), time=t)
    return r if config is None else dataclasses.replace(r, config=config)


def feed(ctl: Controller, clock: Clock, step: int, peak_gib: float) -> float:
    clock.t += 1.0
    ctl.exchange([rec(step, clock.t, peak_gib)], [])
    return ctl.next_exchange_s


def test_far_from_every_threshold_the_job_is_asked_to_exchange_less_often(tmp_path: Path) -> None:
    ctl, clock = controller(tmp_path, MEMORY.format(extra=""))
    assert ctl.next_exchange_s == EXCHANGE_INTERVAL_S  # no job yet
    ctl.hello(job_shape("cadence", device_total_bytes=80 * GiB))
    assert feed(ctl, clock, 1, 2.0) == FAR == 5.0  # 2 GiB of a 10 GiB cap: the default bound
    assert feed(ctl, clock, 2, 6.0) == EXCHANGE_INTERVAL_S  # above the low-water mark: watched
    assert feed(ctl, clock, 3, 3.0) == FAR
    # Over the high-water mark: an action is pending until the job answers, watched closely.
    assert feed(ctl, clock, 4, 9.5) == EXCHANGE_INTERVAL_S
    assert ctl._pending


@pytest.mark.parametrize(("bound", "asked"), [("5", 5.0), ("0.1", EXCHANGE_INTERVAL_S), ("30s", 30.0)])
def test_the_files_bound_is_kept(tmp_path: Path, bound: str, asked: float) -> None:
    ctl, clock = controller(tmp_path, MEMORY.format(extra=f"  max_exchange_interval_s: {bound}\n"))
    ctl.hello(job_shape("cadence", device_total_bytes=80 * GiB))
    assert feed(ctl, clock, 1, 1.0) == asked
    # The agent takes at most MAX_EXCHANGE_INTERVAL_S whatever the controller says: the heartbeat
    # must stay within the liveness limits.
    assert next_exchange_of({"next_exchange_s": asked}) == min(asked, 10.0)


def test_a_bad_bound_in_the_file_is_a_clear_error() -> None:
    with pytest.raises(Exception, match="max_exchange_interval_s"):
        load_policy_text(MEMORY.format(extra="  max_exchange_interval_s: -1\n"))


@pytest.mark.parametrize("value", [None, "2", True, float("nan"), float("inf"), -3, 0])
def test_a_reply_without_a_sound_interval_keeps_the_default_or_the_bounds(value: Any) -> None:
    reply = {} if value is None else {"next_exchange_s": value}
    got = next_exchange_of(reply)
    assert EXCHANGE_INTERVAL_S <= got <= 10.0
    if value is None or isinstance(value, (str, bool)) or (isinstance(value, float) and math.isnan(value)):
        assert got == EXCHANGE_INTERVAL_S


def test_a_policy_that_fails_to_say_is_watched_closely(tmp_path: Path, caplog: Any) -> None:
    ctl, clock = controller(tmp_path, MEMORY.format(extra=""))
    ctl.hello(job_shape("cadence", device_total_bytes=80 * GiB))
    assert feed(ctl, clock, 1, 1.0) == FAR

    def broken(*_: Any) -> float:
        raise RuntimeError("a bug in watch_s")

    ctl.policies[0].watch_s = broken  # type: ignore[method-assign]
    assert feed(ctl, clock, 2, 1.0) == EXCHANGE_INTERVAL_S
    assert "failed to say how soon" in caplog.text


COMPUTE = """\
version: 1
budget:
  wall_time: 100s
controller:
  decide_interval_s: 0.01
policies:
  - kind: compute
    cooldown_fraction: 0.2
"""


def test_the_compute_policy_watches_closely_from_its_cooldown_on(tmp_path: Path) -> None:
    ctl, clock = controller(tmp_path, COMPUTE)
    knobs = (KnobSpec(KNOB_LR_MULTIPLIER, 1.0, minimum=0.0, maximum=1.0),)
    ctl.hello(job_shape("cadence", knobs=knobs))
    asked = []
    for step in range(1, 90):
        clock.t += 1.0
        ctl.exchange([rec(step, clock.t, config={KNOB_LR_MULTIPLIER: 1.0})], [])
        asked.append((step, ctl.next_exchange_s))
    early = [a for s, a in asked if 5 <= s <= 60]
    late = [a for s, a in asked if s >= 79]  # the cooldown starts at 80% of the 100 s
    assert early and all(a == FAR for a in early), asked
    assert late and all(a == EXCHANGE_INTERVAL_S for a in late), asked


def test_the_data_policy_watches_as_its_next_decision_nears() -> None:
    p = DataPolicy("data", DataParams(every_steps=20, warmup_steps=0))
    state = {KNOB_DOMAIN_WEIGHTS: {"step": 100, "loss": {}, "score": {}}}
    s = dataclasses.replace(data_snap(105, state=state), step_time_s=0.05)
    assert p.watch_s(s, None) == pytest.approx(15 * 0.05)  # step 120 is 15 steps away
    assert p.watch_s(dataclasses.replace(s, step=125), None) == 0.0  # due
    assert p.watch_s(data_snap(5), None) == 0.0  # not started: due now
    off = DataPolicy("data", DataParams(mixing=False))
    assert off.watch_s(s, None) == math.inf


# ---- end to end: a real server, a real channel, the agent's thread ---------------------------
def test_the_agent_waits_as_long_as_the_controller_asks_but_a_memory_surge_wakes_it(tmp_path: Path) -> None:
    # 8 s apart when nothing is near: a surge answered within a second was not the periodic one.
    exchanges: list[float] = []
    with served(tmp_path, interval_s=8) as (_ctl, channel):
        real = channel.exchange

        def counted(*args: Any, **kwargs: Any) -> Any:
            exchanges.append(time.monotonic())
            return real(*args, **kwargs)

        channel.exchange = counted  # type: ignore[method-assign]
        probe = FixedProbe(int(1 * GiB))
        agent = Agent(job_shape("cadence", device_total_bytes=80 * GiB), channel, probe, sync_every=1)
        try:
            agent.on_step(1, 3.0, 64, 65536, 0.1, 1e-3, {})
            assert wait_until(lambda: channel.next_exchange_s == 8.0, 10), channel.next_exchange_s
            settled = len(exchanges)
            time.sleep(1.0)  # well within one slow interval: no exchange unless woken
            quiet = len(exchanges) - settled
            probe.peak_bytes = int(3 * GiB)  # tripled: wakes the thread at once
            agent.on_step(2, 3.0, 128, 131072, 0.1, 1e-3, {})
            woke = wait_until(lambda: len(exchanges) > settled + quiet, 2.0)
        finally:
            agent.close()
    assert quiet <= 1, exchanges  # at most one already under way when the interval changed
    assert woke, "a tripled memory peak did not wake the exchange thread"
    lines = [json.loads(x) for x in (tmp_path / "run" / "telemetry.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("event") == "step"] == [1, 2]


def test_a_backlog_of_step_records_sends_an_exchange_before_the_interval_ends(tmp_path: Path) -> None:
    # A fast job (WAKE_ON_RECORDS steps well within the controller's 8 s) is carried off as it
    # goes: its queue never outgrows what an exchange takes (MAX_RECORDS_PER_EXCHANGE).
    with served(tmp_path, interval_s=8) as (ctl, channel):
        agent = Agent(
            job_shape("cadence", device_total_bytes=80 * GiB), channel, FixedProbe(GiB), sync_every=1
        )
        try:
            agent.on_step(1, 3.0, 64, 65536, 0.1, 1e-3, {})
            assert wait_until(lambda: channel.next_exchange_s == 8.0 and ctl.state.step == 1, 10)
            last = 1 + WAKE_ON_RECORDS
            started = time.monotonic()
            for step in range(2, last + 1):
                agent.on_step(step, 3.0, 64 * step, 65536 * step, 0.1, 1e-3, {})
            assert wait_until(lambda: ctl.state.step == last, 4.0), ctl.state.step
            assert time.monotonic() - started < 6.0  # not the periodic exchange, 8 s on
        finally:
            agent.close()


@contextlib.contextmanager
def served(tmp_path: Path, interval_s: float) -> Iterator[tuple[Controller, HttpChannel]]:
    """A real channel server for the memory policy asking for `interval_s` when far, and a channel to it."""
    text = MEMORY.format(extra=f"  max_exchange_interval_s: {interval_s}\n")
    ctl = Controller(tmp_path / "run", "cadence", load_policy_text(text))
    token = "t" * 43
    server = ChannelServer(("127.0.0.1", 0), ctl, token)
    server.start()
    try:
        yield ctl, HttpChannel(f"http://127.0.0.1:{server.server_address[1]}", token)
    finally:
        server.stop()


class FixedProbe:
    device = "cpu"
    total_bytes = 80 * GiB

    def __init__(self, peak: int) -> None:
        self.peak_bytes = peak
        self._lock = threading.Lock()

    def sample(self) -> tuple[int, int]:
        return self.peak_bytes - 1, self.peak_bytes


def wait_until(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())
