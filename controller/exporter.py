"""Prometheus exporter: a custom Collector that reads the controller at scrape time.

Nothing is updated on the hot path; each scrape takes one consistent view under the
controller's lock. Metrics live in the controller's own registry (no process or platform
collectors of the sidecar mixed in). The run is the label `run`: Prometheus owns `job`.
See docs/metrics.md for every name.

What a job sent is cleaned when it arrives (protocol.py: text made UTF-8-safe, integers in 64
bits, domains, ranks and keys capped); the collector cleans label values and numbers once more,
and the port is served by httpserve's bounded server (workers, a deadline per request), so no
job and no client can make a scrape fail or hang.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trainwarden.controller.forecast import DEFAULT_GAIN_WINDOW, current_gain
from trainwarden.controller.httpserve import BoundedHTTPServer, printable, request_path
from trainwarden.controller.loop import Controller
from trainwarden.controller.protocol import (
    CONFIG_PRUNED_FRACTION,
    KNOB_CURRICULUM_LEVEL,
    KNOB_DOMAIN_WEIGHTS,
    clean_text,
)

log = logging.getLogger(__name__)


class ControllerCollector(Collector):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def _gain_window(self) -> float:
        for p in self.controller.policies:
            window = getattr(p.params, "gain_window", None)
            if isinstance(window, float):
                return window
        return DEFAULT_GAIN_WINDOW

    def collect(self) -> Iterator[Metric]:
        v = self.controller.view()
        snap = v.snapshot
        run = [clean_text(v.run_id)]

        def gauge(name: str, doc: str, value: float | None, unit: str = "") -> Iterator[Metric]:
            g = GaugeMetricFamily(name, doc, labels=["run"], unit=unit)
            if value is not None:
                g.add_metric(run, float(value))
            yield g

        yield from gauge(
            "trainwarden_job_connected",
            "1 when a job has connected to this controller.",
            1.0 if v.connected else 0.0,
        )
        yield from gauge(
            "trainwarden_step", "Last optimizer step the job reported.", snap.step if snap.step >= 0 else None
        )
        yield from gauge("trainwarden_loss", "Training loss, smoothed (EMA 0.1).", snap.loss)
        yield from gauge(
            "trainwarden_tokens_per_second",
            "Training throughput over the last steps.",
            snap.tokens_per_second,
        )
        yield from gauge(
            "trainwarden_step_time_seconds",
            "Median optimizer-step time over the last steps.",
            snap.step_time_s,
        )
        yield from gauge("trainwarden_learning_rate", "Learning rate applied at the last step.", v.lr)
        yield from gauge(
            "trainwarden_elapsed_seconds", "Wall time since the job's first step.", snap.elapsed_s
        )
        yield from gauge(
            "trainwarden_telemetry_age_seconds", "Seconds since the job last reported.", v.telemetry_age_s
        )
        yield from gauge(
            "trainwarden_device_memory_cap_bytes",
            "Device memory cap per rank, from the budget.",
            snap.memory_cap_bytes,
        )

        c = CounterMetricFamily("trainwarden_tokens", "Tokens trained on.", labels=["run"])
        c.add_metric(run, float(snap.tokens))
        yield c
        c = CounterMetricFamily("trainwarden_samples", "Samples trained on.", labels=["run"])
        c.add_metric(run, float(snap.samples))
        yield c
        c = CounterMetricFamily(
            "trainwarden_nonfinite_losses", "Steps whose loss was NaN or infinite.", labels=["run"]
        )
        c.add_metric(run, float(snap.nonfinite_losses))
        yield c

        used = GaugeMetricFamily(
            "trainwarden_device_memory_used_bytes",
            "Device memory in use on a rank at its last sync (RSS on a CPU).",
            labels=["run", "rank", "device"],
        )
        peak = GaugeMetricFamily(
            "trainwarden_device_memory_peak_bytes",
            "Per-step peak device memory of a rank since its previous sync.",
            labels=["run", "rank", "device"],
        )
        total = GaugeMetricFamily(
            "trainwarden_device_memory_total_bytes",
            "Device memory a rank's device has.",
            labels=["run", "rank", "device"],
        )
        for m in snap.memory:
            labels = [run[0], str(m.rank), clean_text(m.device)]
            used.add_metric(labels, float(m.used_bytes))
            peak.add_metric(labels, float(m.peak_bytes))
            total.add_metric(labels, float(m.total_bytes))
        yield used
        yield peak
        yield total

        cfg = GaugeMetricFamily(
            "trainwarden_config_value",
            "Numeric configuration the job runs with now (micro-batch, accumulation, LR multiplier, ...).",
            labels=["run", "knob"],
        )
        for knob, value in sorted(snap.config.items()):
            num = _number(value)
            if num is not None:
                cfg.add_metric([run[0], clean_text(str(knob))], num)
        yield cfg

        actions = CounterMetricFamily(
            "trainwarden_actions", "Actions decided, by kind and outcome.", labels=["run", "kind", "outcome"]
        )
        for (kind, outcome), n in sorted(v.actions_total.items()):
            actions.add_metric([run[0], clean_text(kind), clean_text(outcome)], float(n))
        yield actions

        spent = GaugeMetricFamily(
            "trainwarden_budget_spent_ratio", "Fraction of each budget spent.", labels=["run", "budget"]
        )
        for b in snap.budgets:
            spent.add_metric([run[0], b.name], b.fraction)
        yield spent
        binding = snap.binding_budget
        yield from gauge(
            "trainwarden_budget_remaining_seconds",
            "Forecast wall time until the binding budget runs out, at the current rate.",
            None if binding is None else binding.remaining_s,
        )
        end = GaugeMetricFamily(
            "trainwarden_budget_forecast_end_timestamp_seconds",
            "Unix time at which each budget is forecast to run out, at the throughput measured since "
            "the last change.",
            labels=["run", "budget"],
        )
        binds = GaugeMetricFamily(
            "trainwarden_budget_binding",
            "1 for the budget forecast to run out first (the one the compute policy follows), else 0.",
            labels=["run", "budget"],
        )
        for b in snap.budgets:
            t = snap.forecast_end_time(b)
            if t is not None:
                end.add_metric([run[0], b.name], t)
            binds.add_metric([run[0], b.name], float(binding is not None and b.name == binding.name))
        yield end
        yield binds
        yield from gauge(
            "trainwarden_eval_loss", "Validation loss the job last reported (handle.report).", snap.eval_loss
        )
        yield from gauge(
            "trainwarden_marginal_gain",
            "Loss improvement per 10% of the budget, over the compute policy's gain window.",
            current_gain(snap, self._gain_window()),
        )

        dl = GaugeMetricFamily(
            "trainwarden_domain_loss", "Training loss per data domain.", labels=["run", "domain"]
        )
        for domain, loss in sorted(v.domain_loss.items()):
            dl.add_metric([run[0], clean_text(domain)], loss)
        yield dl
        yield from _data_metrics(run[0], snap.config)


def _data_metrics(run_id: str, config: Any) -> Iterator[Metric]:
    """The data mixture's state, from the configuration the job reports (adapters/data.py)."""
    weights = config.get(KNOB_DOMAIN_WEIGHTS)
    dw = GaugeMetricFamily(
        "trainwarden_domain_weight", "Sampling weight of each data domain now.", labels=["run", "domain"]
    )
    if isinstance(weights, dict):
        for domain, w in sorted(weights.items()):
            if _number(w) is not None:
                dw.add_metric([run_id, clean_text(str(domain))], float(w))
    yield dw
    for name, key, doc in (
        ("trainwarden_data_pruned_ratio", CONFIG_PRUNED_FRACTION, "Fraction of the examples left out now."),
        ("trainwarden_curriculum_level", KNOB_CURRICULUM_LEVEL, "Curriculum level: easiest fraction drawn."),
    ):
        g = GaugeMetricFamily(name, doc, labels=["run"])
        value = _number(config.get(key))
        if value is not None:
            g.add_metric([run_id], value)
        yield g


def _number(value: Any) -> float | None:
    if isinstance(value, (bool, int, float)):
        try:
            return float(value)
        except OverflowError:  # an integer past 1.8e308 (ingestion refuses them; kept as a guard)
            return None
    return None


class _MetricsHandler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        self.close_connection = True  # one request per connection: the deadline is per request
        self.handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), printable(format % args))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        log.debug("%s %s %s", self.address_string(), request_path(str(getattr(self, "path", ""))), code)

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.server.refusals.warning(
            "metrics port refused a request from %s: %d %s", self.client_address[0], code, phrase
        )
        self._send(code, f"{code} {phrase}\n".encode())

    def do_GET(self) -> None:
        if self.path.partition("?")[0] not in ("/metrics", "/"):
            self.server.refusals.warning(
                "metrics port: no such path %s from %s", request_path(self.path), self.client_address[0]
            )
            self._send(404, b"only /metrics here\n")
            return
        started = time.monotonic()
        try:
            body = generate_latest(self.server.registry)
        except Exception:  # a bug, never what a job sent (that is cleaned on ingestion)
            log.exception("a scrape failed")
            self._send(500, b"scrape failed; see the controller log\n")
            return
        self._send(200, body, CONTENT_TYPE_LATEST)
        if self.command == "GET":
            self.server.scraped(started)

    do_HEAD = do_GET

    def _read_only(self) -> None:
        self._send(405, b"the metrics port is read-only\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _read_only


class MetricsServer(BoundedHTTPServer):
    def __init__(self, address: tuple[str, int], registry: CollectorRegistry) -> None:
        super().__init__(address, _MetricsHandler, name="metrics")
        self.registry = registry
        self._scrape = threading.Condition()
        self._last_start: float | None = None  # when the latest served scrape began (monotonic)
        self._interval: float | None = None  # between the starts of the last two scrapes

    def scraped(self, started: float) -> None:
        """A scrape that began at `started` (monotonic) was served."""
        with self._scrape:
            if self._last_start is not None and started > self._last_start:
                self._interval = started - self._last_start
            self._last_start = max(started, self._last_start or started)
            self._scrape.notify_all()

    def await_final_scrape(self, most_s: float, abandon: threading.Event | None = None) -> bool:
        """Wait until a scrape that began from now on was served: the run's last numbers (actions
        that ended unanswered at close, the final step) reach Prometheus only so, and a decision
        that is never scraped is missing from the dashboard. Waits about one and a half scrape
        intervals (as seen so far), at most `most_s`, not at all when nothing scrapes this port
        regularly (fewer than two scrapes seen) or `abandon` is set. True when one came."""
        since = time.monotonic()
        with self._scrape:
            if self._interval is None or most_s <= 0:
                return False
            deadline = since + min(most_s, 1.5 * self._interval + 0.5)
            while self._last_start is None or self._last_start < since:
                left = deadline - time.monotonic()
                if left <= 0 or (abandon is not None and abandon.is_set()):
                    return False
                self._scrape.wait(min(left, 0.2))
            return True


def serve_metrics(controller: Controller, host: str, port: int) -> tuple[MetricsServer, int]:
    """Serve /metrics for this controller on host:port (0 picks a free port). Returns (server, port)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(controller))
    server = MetricsServer((host, port), registry)
    server.start()
    return server, server.port
