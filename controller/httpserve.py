"""The HTTP server under the controller's two ports (the channel and /metrics), bounded.

Whatever clients do, the controller keeps its threads, file descriptors and log in hand:
- at most `workers` requests are served at once; a connection past that gets 503 at once
  (from the accepting thread, which never blocks on it) and is closed;
- each connection carries one request, with a total deadline (not a per-read timeout): a client
  that sends a byte every few seconds is cut off when the deadline passes;
- the listen backlog holds a burst (LISTEN_BACKLOG, the kernel caps it at somaxconn);
- an accept that fails (EMFILE, ENFILE, ENOBUFS: out of descriptors or memory) is logged,
  rate-limited, and retried after a pause: it never ends the serving thread nor spins a core;
- what is logged about a client's request is truncated and escaped (RefusalLog).
Optionally TLS (`ssl_context`): the handshake runs in the worker, under the same deadline.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import selectors
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

log = logging.getLogger(__name__)

#: Requests served at once, per server (fewer when the descriptor limit is low: see workers_for).
MAX_WORKERS = 32
#: Seconds a client has to send its whole request (and, with TLS, to finish the handshake).
REQUEST_DEADLINE_S = 10.0
#: Connections the kernel queues before accept (a burst of clients waits here, costs no descriptor).
LISTEN_BACKLOG = 1024
#: Pause after an accept that failed for lack of descriptors or memory: the listening socket stays
#: readable, so retrying at once would spin a core.
ACCEPT_PAUSE_S = 0.1
#: Descriptors left for everything but serving (logs, /proc reads, summary.json, the other port).
RESERVED_FDS = 48
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def workers_for(limit: int | None = None) -> int:
    """Workers per server that fit the process's descriptor limit (two servers, RESERVED_FDS kept)."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            return MAX_WORKERS
    return max(2, min(MAX_WORKERS, (limit - RESERVED_FDS) // 2))


def printable(text: str, limit: int = 160) -> str:
    """`text` safe for one log line: control characters, escape sequences and lone surrogates
    written as escapes, at most `limit` characters (the rest counted)."""
    out = [ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text[:limit]]
    if len(text) > limit:
        out.append(f"...(+{len(text) - limit} chars)")
    return "".join(out)


def request_path(path: str) -> str:
    """A request's path as it may be logged or echoed: without its query (it may hold a token)."""
    base, sep, _query = path.partition("?")
    return printable(base, 120) + ("?..." if sep else "")


class RefusalLog:
    """WARNING lines about refused requests, at most `per_window` per `window_s`; the rest are
    counted and said in one line when the window ends: a flood of bad requests cannot fill the
    disk or drown the log."""

    def __init__(self, logger: logging.Logger, per_window: int = 20, window_s: float = 10.0) -> None:
        self.logger = logger
        self.per_window = per_window
        self.window_s = window_s
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._logged = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._start >= self.window_s:
                if self._suppressed:
                    self.logger.warning(
                        "%d more refused requests not logged in the last %.0f s",
                        self._suppressed,
                        now - self._start,
                    )
                self._start, self._logged, self._suppressed = now, 0, 0
            if self._logged >= self.per_window:
                self._suppressed += 1
                return
            self._logged += 1
        self.logger.warning(msg, *args)


class _Conn:
    """A connection in service, for the reaper: its socket (replaced by the TLS one) and deadline."""

    __slots__ = ("deadline", "sock", "stage")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.stage = 0


class BoundedHTTPServer(HTTPServer):
    """HTTPServer with bounded workers, a deadline per request, a deep backlog, accept errors
    survived, optional TLS. Handlers should answer one request per connection."""

    request_queue_size = LISTEN_BACKLOG
    #: After the deadline the reading side is shut (the handler sees the end of the request and can
    #: still answer 4xx); after this grace the connection is shut both ways.
    grace_s = 2.0

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        workers: int | None = None,
        deadline_s: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "http",
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.workers = workers or workers_for()
        self.deadline_s = deadline_s or REQUEST_DEADLINE_S
        self.ssl_context = ssl_context
        self.name = name
        self.refusals = RefusalLog(logging.getLogger(f"trainwarden.controller.{name}"))
        self._slots = threading.BoundedSemaphore(self.workers)
        self._conns: set[_Conn] = set()
        self._conns_lock = threading.Lock()
        # The reaper sleeps on this while no connection is in service: an idle sidecar's threads
        # wake for nothing (a 0.25 s poll cost ~0.3 ms of CPU a second per port).
        self._conns_changed = threading.Condition(self._conns_lock)
        self._closing = threading.Event()
        self._accept_errors = RefusalLog(log, per_window=1, window_s=30.0)
        self.busy_refusals = 0
        super().__init__(address, handler)
        self._thread: threading.Thread | None = None
        # What wakes the serving loop's select at shutdown (a byte sent on _wake_w).
        self._wake_r, self._wake_w = socket.socketpair()
        self._served = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name=f"trainwarden-{name}-reaper", daemon=True)
        self._reaper.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    # -- accepting ------------------------------------------------------------------------------
    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as exc:
            if exc.errno in _OUT_OF_RESOURCES:
                self._accept_errors.warning(
                    "%s port: cannot accept a connection (%s); the controller goes on, retrying",
                    self.name,
                    exc,
                )
                time.sleep(ACCEPT_PAUSE_S)
            raise  # socketserver drops the attempt and returns to its loop

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._busy(request)
            return
        try:
            threading.Thread(
                target=self._work,
                args=(request, client_address),
                name=f"trainwarden-{self.name}",
                daemon=True,
            ).start()
        except RuntimeError:  # can't start new thread
            self._slots.release()
            self._busy(request)

    def _busy(self, request: socket.socket) -> None:
        """Every worker is taken: answer 503 without blocking (plain HTTP only) and close."""
        self.busy_refusals += 1
        self.refusals.warning(
            "%s port: %d requests in service; refused a connection (503)", self.name, self.workers
        )
        try:
            if self.ssl_context is None:
                request.setblocking(False)
                request.send(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n"
                    b"Retry-After: 1\r\n\r\n"
                )
        except OSError:
            pass
        self.shutdown_request(request)

    def _work(self, request: socket.socket, client_address: Any) -> None:
        conn = _Conn(request, time.monotonic() + self.deadline_s)
        with self._conns_changed:
            self._conns.add(conn)
            self._conns_changed.notify()
        try:
            request.settimeout(self.deadline_s)
            if self.ssl_context is not None:
                tls = self.ssl_context.wrap_socket(request, server_side=True)
                with self._conns_lock:
                    conn.sock = tls
                request = tls
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._conns_lock:  # the reaper never touches a socket closed under it
                self._conns.discard(conn)
            self.shutdown_request(conn.sock)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # A client that hangs up, stalls past its deadline or fails the TLS handshake is not the
        # controller's problem: a rate-limited line, never a traceback.
        self.refusals.warning(
            "%s port: connection from %s ended early: %s",
            self.name,
            client_address[0] if client_address else "?",
            printable(str(sys.exc_info()[1])),
        )

    def _reap(self) -> None:
        while True:
            with self._conns_changed:
                while not self._conns and not self._closing.is_set():
                    self._conns_changed.wait()
            if self._closing.wait(0.25):
                return
            now = time.monotonic()
            with self._conns_lock:
                for conn in self._conns:
                    if now < conn.deadline:
                        continue
                    how = socket.SHUT_RD if conn.stage == 0 else socket.SHUT_RDWR
                    conn.stage += 1
                    conn.deadline = now + self.grace_s
                    try:
                        # The plain socket's shutdown even under TLS: SSLSocket's own would drop its
                        # SSL object under the worker that is reading with it.
                        socket.socket.shutdown(conn.sock, how)
                    except OSError:
                        pass

    # -- running --------------------------------------------------------------------------------
    def serve(self) -> None:
        """Accept connections until shutdown(). It sleeps in select on the listening socket and a
        wake-up socket, with no timeout: an idle server never wakes. (serve_forever polls every
        0.5 s so that shutdown() is seen: four wakes a second for the two ports, ~0.3 ms of CPU a
        second that, on a job's own cores, comes out of training.) A failure in the loop is
        logged and the loop goes on; it never ends the serving thread."""
        with selectors.PollSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ, "accept")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            try:
                while not self._closing.is_set():
                    try:
                        for key, _events in selector.select():
                            if key.data == "accept" and not self._closing.is_set():
                                self._handle_request_noblock()
                    except Exception:
                        log.exception("%s port: the server loop failed; going on", self.name)
                        time.sleep(ACCEPT_PAUSE_S)
            finally:
                self._served.set()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's name for `serve` (`poll_interval` is not needed: shutdown() wakes it)."""
        self.serve()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve, name=f"trainwarden-{self.name}-accept", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting: wake the serving loop and wait until it has returned."""
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._served.wait()

    def server_close(self) -> None:
        self._closing.set()
        with self._conns_changed:
            self._conns_changed.notify_all()
        super().server_close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
