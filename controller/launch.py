"""`trainwarden run` owns its job's whole process tree: a session of its own, signals forwarded,
SIGKILL after a grace period, nothing left behind.

The job starts in a new session (so its process group is all of it that did not leave: a `bash -c`
wrapper's children, torchrun's ranks, DataLoader workers), and `run` is a child subreaper (Linux
PR_SET_CHILD_SUBREAPER), so whatever does leave the group, or is orphaned, stays below `run`.
SIGINT and SIGTERM to `run` (Ctrl-C reaches `run` alone now: the job has left the terminal's
foreground group) go to the job's group; if the job has not ended `grace_s` after the first, the
group and every process below `run` but the controller get SIGKILL, so a job that traps SIGTERM
cannot keep `run` alive for ever. When the job's leader exits, what it left behind in its group
gets SIGTERM, then SIGKILL.

If `run` itself is SIGKILLed, nothing is killed by accident: the job trains on, its controller
exits (it watches run's pid), and the job's agent, having no controller, stops it at the
budget's end (controller/budget_end.py).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import psutil

PR_SET_CHILD_SUBREAPER = 36
DEFAULT_GRACE_S = 30.0
#: What the job's leader left behind in its group gets this long after SIGTERM.
LEFTOVER_GRACE_S = 5.0


def become_subreaper() -> bool:
    """Orphans of the job are re-parented to this process instead of init (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class Job:
    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str],
        say: Callable[[str], None],
        grace_s: float = DEFAULT_GRACE_S,
        spare: Callable[[], set[int]] = set,
    ) -> None:
        become_subreaper()
        self.say = say
        self.grace_s = grace_s
        self.spare = spare  # pids never to kill: the controller
        self.proc = subprocess.Popen(list(command), env=dict(env), start_new_session=True)
        self.pgid = self.proc.pid
        self.signalled_at: float | None = None
        self._unsaid = 0
        self.killed = False

    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int:
        rc = self.proc.returncode
        assert rc is not None
        return rc

    # ---- signals ----------------------------------------------------------------------------
    def forward(self, sig: int) -> None:
        """Pass `sig` to the job's whole group (from run's signal handler: no printing here, a
        handler that prints while the loop prints raises; `check` says it)."""
        _killpg(self.pgid, sig)
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            self._unsaid = sig

    def check(self) -> None:
        """In run's loop: say what was forwarded; the grace period after a forwarded signal is
        over: SIGKILL everything."""
        if self._unsaid:
            name, self._unsaid = signal.Signals(self._unsaid).name, 0
            self.say(
                f"{name} passed on to the job's process group; SIGKILL in {self.grace_s:g} s "
                "if it has not ended"
            )
        if self.signalled_at is None or self.killed:
            return
        if time.monotonic() - self.signalled_at >= self.grace_s:
            self.killed = True
            self.say(f"the job has not ended {self.grace_s:g} s after the signal: SIGKILL to all of it")
            self.kill_all()

    def kill_all(self) -> None:
        _killpg(self.pgid, signal.SIGKILL)
        for p in self._below_run():
            try:
                p.kill()
            except psutil.Error:
                pass

    def _below_run(self) -> list[psutil.Process]:
        """Processes below `run` (its subreaper children included) but the spared ones and theirs."""
        spare = self.spare()
        try:
            kids = psutil.Process().children(recursive=True)
        except psutil.Error:
            return []
        spared = set(spare)
        for p in kids:
            try:
                if p.pid in spare:
                    spared |= {c.pid for c in p.children(recursive=True)}
            except psutil.Error:
                pass
        return [p for p in kids if p.pid not in spared]

    def reap_leftovers(self) -> int:
        """After the leader exited: SIGTERM what it left in its group and below `run`, SIGKILL
        what is still there after LEFTOVER_GRACE_S. Returns how many were left."""
        left = []
        for p in self._below_run():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    p.wait(0)  # an orphan that already ended: reap it (run is its subreaper)
                    continue
            except (psutil.Error, psutil.TimeoutExpired):
                pass
            left.append(p)
        if not left and not _group_alive(self.pgid):
            return 0
        self.say(
            f"{len(left)} process(es) of the job outlived it: SIGTERM, then SIGKILL in {LEFTOVER_GRACE_S:g} s"
        )
        _killpg(self.pgid, signal.SIGTERM)
        for p in left:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(left, timeout=LEFTOVER_GRACE_S)
        _killpg(self.pgid, signal.SIGKILL)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=2)
        return len(left)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
