"""Prometheus metrics of one aggregator, served in the text exposition format.

Each ``AggregatorMetrics`` owns a private ``CollectorRegistry`` instead of the library's global
one: the global registry refuses a second metric of the same name, so two aggregators in one
process (tests, benchmarks) would clash. Every metric carries a ``run`` label so a Prometheus
server scraping several aggregators can tell runs apart.

The aggregator reports once per batch it applies (``observe_batch``), the evaluator reports test
accuracy (``set_accuracy``), and the privacy accounting reports ε spent per participant
(``set_epsilon``). ``serve`` exposes ``/metrics`` over HTTP from a daemon thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)

# A batch apply+commit is a vectorised scatter-add plus one Redis round trip: sub-millisecond on
# a small model, up to seconds when Redis stalls or the model is large.
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# Staleness in global versions grows with the number of participants; powers of two keep the
# buckets few while still resolving "fresh" (0, 1) from "far behind".
STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class AggregatorMetrics:
    """The Prometheus metrics of one run's aggregator, in a registry of its own."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.registry = CollectorRegistry(auto_describe=True)
        self._declare_update_metrics(self.registry)
        self._declare_state_metrics(self.registry)
        # Children created now so a scrape before the first batch shows zeros rather than missing
        # series (rate() over a series that appears mid-way loses its first increment). Accuracy,
        # loss and ε are left absent until measured: a 0 there would read as a real value.
        self._applied_c = self._applied.labels(run_id)
        self._duplicates_c = self._duplicates.labels(run_id)
        self._apply_seconds_c = self._apply_seconds.labels(run_id)
        self._staleness_c = self._staleness.labels(run_id)
        self._bytes_in_c = self._bytes_in.labels(run_id)
        self._version_c = self._version.labels(run_id)
        self._batch_size_c = self._batch_size.labels(run_id)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _declare_update_metrics(self, reg: CollectorRegistry) -> None:
        """What happens to the updates received (declared in exposition order)."""
        run = ("run",)
        self._applied = Counter(
            "dssgd_updates_applied", "Updates applied to the global model", run, registry=reg
        )
        self._rejected = Counter(
            "dssgd_updates_rejected",
            "Updates rejected by validation",
            (*run, "reason"),
            registry=reg,
        )
        self._duplicates = Counter(
            "dssgd_duplicates", "Redelivered updates dropped as duplicates", run, registry=reg
        )
        self._apply_seconds = Histogram(
            "dssgd_apply_seconds",
            "Latency of applying and committing one batch (seconds)",
            run,
            registry=reg,
            buckets=APPLY_BUCKETS,
        )
        self._staleness = Histogram(
            "dssgd_staleness",
            "Global versions applied since the base version of an update",
            run,
            registry=reg,
            buckets=STALENESS_BUCKETS,
        )
        self._bytes_in = Counter(
            "dssgd_bytes_in", "Bytes of update messages received", run, registry=reg
        )

    def _declare_state_metrics(self, reg: CollectorRegistry) -> None:
        """The global model's version and quality, ε spent, and the last batch's size."""
        run = ("run",)
        self._version = Gauge(
            "dssgd_global_version", "Global model version (updates applied)", run, registry=reg
        )
        self._accuracy = Gauge(
            "dssgd_test_accuracy", "Test accuracy of the global model", run, registry=reg
        )
        self._loss = Gauge("dssgd_test_loss", "Test loss of the global model", run, registry=reg)
        self._epsilon = Gauge(
            "dssgd_epsilon_spent",
            "Differential-privacy budget ε spent (the tightest valid bound, named by "
            "dssgd_epsilon_bound)",
            (*run, "participant"),
            registry=reg,
        )
        self._epsilon_bound = Gauge(
            "dssgd_epsilon_bound",
            "1 for the bound dssgd_epsilon_spent reports: pld, advanced or basic composition",
            (*run, "participant", "bound"),
            registry=reg,
        )
        self._batch_size = Gauge(
            "dssgd_queue_batch_size",
            "Messages in the last batch taken from the queue",
            run,
            registry=reg,
        )

    # --- recording ---------------------------------------------------------------------------

    def observe_batch(
        self,
        applied: int,
        duplicates: int,
        rejected: Mapping[str, int],
        staleness: Sequence[int],
        bytes_in: int,
        seconds: float,
        version: int,
    ) -> None:
        """Record one batch: counts by outcome, staleness of each applied update, bytes received,
        apply+commit latency, and the global version after it."""
        self._applied_c.inc(applied)
        self._duplicates_c.inc(duplicates)
        for reason, count in rejected.items():
            # Skipped when zero so a reason only becomes a series once it has actually happened.
            if count:
                self._rejected.labels(self.run_id, reason).inc(count)
        for s in staleness:
            self._staleness_c.observe(s)
        self._bytes_in_c.inc(bytes_in)
        self._apply_seconds_c.observe(seconds)
        self._version_c.set(version)
        self._batch_size_c.set(applied + duplicates + sum(rejected.values()))

    def set_accuracy(self, accuracy: float, loss: float) -> None:
        """Record the latest evaluation of the global model on the test set."""
        self._accuracy.labels(self.run_id).set(accuracy)
        self._loss.labels(self.run_id).set(loss)

    def set_epsilon(self, participant: int, epsilon: float, bound: str = "basic") -> None:
        """Record the privacy budget a participant has spent so far, and which bound it is."""
        self._epsilon.labels(self.run_id, str(participant)).set(epsilon)
        for name in ("pld", "advanced", "basic"):
            self._epsilon_bound.labels(self.run_id, str(participant), name).set(name == bound)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    # --- HTTP endpoint -----------------------------------------------------------------------

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; returns the bound port.

        Port 0 picks a free port. Raises RuntimeError when already serving, OSError when the
        port cannot be bound.
        """
        with self._lock:
            if self._server is not None:
                raise RuntimeError("metrics endpoint already serving")
            family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
            server_class = type("_Server", (_ThreadingServer,), {"address_family": family})
            httpd = make_server(
                addr, port, make_wsgi_app(self.registry), server_class, _QuietHandler
            )
            # The library's own start_http_server polls for shutdown every 0.5 s: the
            # aggregator's exit waited that long at the end of every run.
            thread = threading.Thread(
                target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._server, self._thread = httpd, thread
            return int(httpd.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint; idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        # shutdown() only stops the loop; server_close() releases the listening socket so the
        # port can be reused at once.
        with contextlib.suppress(OSError):
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (the library's own handler is silent too)."""
