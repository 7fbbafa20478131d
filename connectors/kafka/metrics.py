"""The daemon's Prometheus metrics and its ``/metrics`` and ``/healthz`` HTTP endpoint."""

from __future__ import annotations

import collections
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

__all__ = ["DaemonMetrics", "MetricsServer"]


class DaemonMetrics:
    """Counters and gauges of one daemon, in a registry of its own.

    Examples
    --------
    >>> m = DaemonMetrics()
    >>> for ms in range(1, 101):
    ...     m.observe_latency(ms / 1000)
    >>> round(m.latency_quantile(0.5), 3), round(m.latency_quantile(0.99), 3)
    (0.05, 0.099)
    >>> b"neuralsync_records_total" in m.render()
    True

    """

    def __init__(self, window: int = 10_000):
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter("neuralsync_records", "Input records processed.", registry=r)
        self.dead_letters = Counter(
            "neuralsync_dead_letters", "Records sent to the dead-letter topic.", registry=r
        )
        self.predictions = Counter(
            "neuralsync_predictions", "Prediction messages published.", registry=r
        )
        self.regime_changes = Counter(
            "neuralsync_regime_changes", "Regime changes detected.", registry=r
        )
        self.swaps = Counter("neuralsync_swaps", "Live models replaced.", registry=r)
        self.rebalances = Counter(
            "neuralsync_rebalances", "Partition assignments received.", registry=r
        )
        self.checkpoints = Counter(
            "neuralsync_checkpoints", "Partition checkpoints written.", registry=r
        )
        self.lag = Gauge(
            "neuralsync_consumer_lag",
            "High-water mark minus the next offset to process.",
            ["partition"],
            registry=r,
        )
        self.rate = Gauge(
            "neuralsync_records_per_second", "Records processed per second (recent).", registry=r
        )
        self.checkpoint_age = Gauge(
            "neuralsync_checkpoint_age_seconds",
            "Seconds since the oldest assigned partition's last checkpoint.",
            registry=r,
        )
        self.stalled = Gauge(
            "neuralsync_stalled", "1 while no record has arrived for stall_timeout_s.", registry=r
        )
        self.assigned = Gauge(
            "neuralsync_assigned_partitions", "Partitions this daemon owns.", registry=r
        )
        self.latency = Histogram(
            "neuralsync_prediction_latency_seconds",
            "From the input record's Kafka timestamp to its prediction being sent.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        for q in (0.5, 0.99):
            gauge = Gauge(
                f"neuralsync_prediction_latency_p{int(q * 100)}_seconds",
                f"Prediction latency, {q:.0%} quantile of the last {window} predictions.",
                registry=r,
            )
            gauge.set_function(lambda q=q: self.latency_quantile(q))

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)
        with self._lock:
            self._recent.append(seconds)

    def reset_latency(self) -> None:
        """Forget the recent latencies (the quantiles start afresh; the histogram does not)."""
        with self._lock:
            self._recent.clear()

    def latency_quantile(self, q: float) -> float:
        """A quantile of the recent latencies (NaN before the first)."""
        with self._lock:
            recent = list(self._recent)
        return float(np.quantile(recent, q, method="lower")) if recent else float("nan")

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/healthz`` (JSON) on a background thread.

    ``health`` returns the ``/healthz`` document; its ``"status"`` is ``"ok"`` for HTTP 200,
    anything else for 503.
    """

    def __init__(
        self,
        metrics: DaemonMetrics,
        health: Callable[[], dict[str, Any]],
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/metrics"):
                    body, status, kind = metrics.render(), 200, CONTENT_TYPE_LATEST
                elif self.path.startswith("/healthz"):
                    document = health()
                    status = 200 if document.get("status") == "ok" else 503
                    body, kind = json.dumps(document).encode(), "application/json"
                else:
                    body, status, kind = b"not found; try /metrics or /healthz\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the daemon's own log

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
