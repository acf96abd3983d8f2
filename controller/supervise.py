"""`trainwarden run` keeps its controller alive: started, watched, restarted on the same run
directory (it picks the run up from its logs) on the same port (the job reconnects by itself).

Each start removes the previous controller.json and gives the controller a fresh nonce; `run`
reads only the file that names this start's pid and nonce, so a job never gets a stale endpoint.
A controller that dies while the job runs is restarted after a back-off (0.5 s, doubling), at
most MAX_RESTARTS times in a row (a controller that lived STABLE_S resets the count). When no
controller can be had, `run` says so loudly and the job keeps its budget's end by itself
(controller/budget_end.py): it does not train on unbounded.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainwarden.controller.rundir import READY_FILE, RunDirError, open_private, read_ready, remove_stale

MAX_RESTARTS = 5
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
#: A controller that ran this long before dying was healthy: the next death starts the count anew.
STABLE_S = 60.0
START_TIMEOUT_S = 30.0
#: What a controller waits at exit, at most, for Prometheus to scrape its final numbers (its
#: `--final-scrape-wait` default): the shipped scrape interval is 5 s, and it waits 1.5 of them.
FINAL_SCRAPE_WAIT_S = 8.0
#: What stop() gives a controller after SIGTERM to close its logs, write summary.json and serve
#: that final scrape, before it is killed.
STOP_GRACE_S = 10.0 + FINAL_SCRAPE_WAIT_S


class ControllerStartError(Exception):
    """No controller could be started; the message carries its log's tail."""


def describe_rc(rc: int) -> str:
    import signal

    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with {rc}"


class Supervisor:
    def __init__(
        self,
        run_dir: Path,
        base_cmd: list[str],
        say: Callable[[str], None],
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        self.run_dir = run_dir
        self.base_cmd = base_cmd  # `trainwarden controller ...` without --listen/--metrics-port/--ready-nonce
        self.say = say
        self.max_restarts = max_restarts
        self.proc: subprocess.Popen[bytes] | None = None
        self._host = "127.0.0.1"  # the channel's host, kept by a restart (start() sets it)
        self.ready: dict[str, Any] = {}
        self.restarts = 0  # in a row
        self.restarts_total = 0
        self.given_up = False
        self._stopped = False
        self._started_at = 0.0
        self._retry_at: float | None = None

    # ---- one start ------------------------------------------------------------------------
    def _launch(self, listen: str, metrics_port: int) -> subprocess.Popen[bytes]:
        remove_stale(self.run_dir / READY_FILE)  # never the previous run's (or start's) endpoint
        self._nonce = secrets.token_hex(16)
        cmd = [*self.base_cmd, "--listen", listen, "--metrics-port", str(metrics_port)]
        cmd += ["--ready-nonce", self._nonce]
        with open_private(self.run_dir / "controller.stderr", "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._started_at = time.monotonic()
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        path = self.run_dir / READY_FILE
        while True:
            ready = read_ready(path, proc.pid, self._nonce)  # RunDirError on a planted file
            if ready is not None:
                return ready
            if proc.poll() is not None or time.monotonic() > deadline:
                _kill(proc)
                raise ControllerStartError(self._tail())
            time.sleep(0.05)

    def _tail(self) -> str:
        try:
            with open_private(self.run_dir / "controller.stderr", "r") as fh:
                return fh.read()[-2000:]
        except OSError as exc:
            return f"(controller.stderr cannot be read: {exc})"

    def start(self, metrics_port: int, listen: str = "127.0.0.1:0") -> dict[str, Any]:
        """The first start (default: a free loopback port for the channel). Raises
        ControllerStartError. A restart keeps the host and port this start got."""
        self._host = listen.rsplit(":", 1)[0]
        self.proc = self._launch(listen, metrics_port)
        try:
            self.ready = self._wait_ready(self.proc)
        except RunDirError:
            _kill(self.proc)
            raise
        return self.ready

    # ---- watching -------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Called by `run` every half second while the job runs: notice a dead controller and
        restart it (after the back-off), or give up loudly."""
        if self.given_up or self._stopped or self.proc is None:
            return
        now = time.monotonic()
        if self._retry_at is None:
            rc = self.proc.poll()
            if rc is None:
                return
            if now - self._started_at >= STABLE_S:
                self.restarts = 0
            self._schedule(f"the controller (pid {self.proc.pid}) {describe_rc(rc)}", now)
            return
        if now < self._retry_at:
            return
        self._retry_at = None
        self.restarts += 1
        self.restarts_total += 1
        port = self.ready["endpoint"].rsplit(":", 1)[1]
        metrics_port = int(self.ready["metrics"].rsplit(":", 1)[1].split("/", 1)[0])
        try:
            self.proc = self._launch(f"{self._host}:{port}", metrics_port)
            self.ready = self._wait_ready(self.proc)
        except (ControllerStartError, RunDirError, OSError) as exc:
            self._schedule(
                f"restart {self.restarts} failed: {str(exc).strip().splitlines()[-1:]}", time.monotonic()
            )
            return
        self.say(
            f"controller restarted (pid {self.proc.pid}, restart {self.restarts} of at most "
            f"{self.max_restarts} in a row) on the same run directory and port; the job reconnects to it"
        )

    def _schedule(self, what: str, now: float) -> None:
        if self.restarts >= self.max_restarts:
            self.given_up = True
            self.say(
                f"{what}; gave up after {self.restarts} restarts in a row. The job goes on WITHOUT a "
                "controller: no memory protection, no decisions; it stops itself at its budget's end "
                f"if the policy has one (see {self.run_dir / 'controller.stderr'})"
            )
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2**self.restarts)
        self._retry_at = now + delay
        self.say(f"{what}; restarting it in {delay:.1f} s (the job trains on meanwhile)")

    def stop(self) -> None:
        """The job has ended: stop the controller (SIGTERM: it writes summary.json); no restarts."""
        self._retry_at = None
        self._stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill(self.proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def say_on_stderr(line: str) -> None:
    print(f"\ntrainwarden: {line}", file=sys.stderr, flush=True)
