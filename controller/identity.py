"""Who is on the other end: the controller proves it holds the token, and pids are only compared
within the pid namespace they belong to.

The bearer token proves the job to the controller. The other way round, a process that took a
dead controller's port (or an old run's endpoint) must not steer the job: every request the agent
sends carries a fresh random challenge, and the controller answers with an HMAC of it keyed by
the token; the agent uses nothing from an answer without the right proof, and proves a server
(an unauthenticated /healthz with a challenge) before it sends it the token at all.

A job's pids mean something to the controller only in the job's own pid namespace on the same
boot: a Kubernetes pod without a shared process namespace, or `unshare --pid`, sees other
processes under the same numbers. The job says which namespace its pids are in.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time

CHALLENGE_HEADER = "X-Trainwarden-Challenge"
PROOF_HEADER = "X-Trainwarden-Proof"
#: A challenge is 32 hex digits; a server answers only challenges of at most this length.
MAX_CHALLENGE_CHARS = 128


def new_run_id() -> str:
    """A fresh run id: the local start time and 6 random hex digits (`20260101-120000-a1b2c3`)."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def new_challenge() -> str:
    return secrets.token_hex(16)


def token_proof(token: str, challenge: str) -> str:
    """The controller's answer to `challenge`: HMAC-SHA256 keyed by the token. Domain-separated,
    so a proof is never a valid bearer token nor a proof of anything else."""
    msg = b"trainwarden-controller-proof:" + challenge.encode("ascii", "replace")
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def proof_ok(token: str, challenge: str, proof: str | None) -> bool:
    return proof is not None and hmac.compare_digest(token_proof(token, challenge), proof)


#: (pid, its namespace): a process's own pid namespace never changes (unshare and setns move only
#: its children), and the sidecar asks at every tick (two /proc reads, ~0.1 ms).
_own_namespace: tuple[int, str] | None = None


def pid_namespace() -> str:
    """This process's pid namespace on this boot ("BOOT_ID/pid:[INODE]"), or "" where unknown.
    The boot id keeps two hosts' initial namespaces (the same inode everywhere) apart."""
    global _own_namespace
    pid = os.getpid()
    if _own_namespace is not None and _own_namespace[0] == pid:
        return _own_namespace[1]
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        namespace = f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""  # not cached: a read that failed (out of descriptors) may succeed next time
    _own_namespace = (pid, namespace)
    return namespace
