"""Prometheus metrics: counters and histograms fed by the supervisor's events, gauges read from its status.

One registry per supervisor. ``Metrics`` is an events subscriber (``events.subscribe(metrics)``); the
gauges come from the last ``status`` snapshot handed to ``refresh`` (the event loop refreshes it; the
listener thread only reads it). Rendered by ``exposition()`` (the ``metrics`` op) and by
prometheus_client's HTTP server on ``[metrics] listen``. Metric names are listed in the README.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from akidb_embed.supervisor.config import split_listen
from akidb_embed.supervisor.events import (
    BackendStateChanged, BatchRun, Event, RequestAnswered, WorkerExited, WorkerReady, WorkerStarted,
)

log = logging.getLogger(__name__)

PREFIX = "akidb_embed"
# Embeddings take from a millisecond (mock, one short text) to tens of seconds (a large batch queued on CPU).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_TEXTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKENS_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)
STATES = ("STARTING", "READY", "DEGRADED", "RESTARTING", "FAILED", "STOPPED")   # pool.BState values


class StatusCollector(Collector):
    """Gauges computed at scrape time from the last status snapshot (the ``status`` op's answer)."""

    def __init__(self) -> None:
        self.status: Mapping[str, Any] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self.status   # one reference read: the event loop swaps in a new dict, never mutates it
        backends: Mapping[str, Any] = status.get("backends", {})
        queue = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting in the supervisor for a worker",
                                  labels=["backend"])
        inflight = GaugeMetricFamily(f"{PREFIX}_in_flight", "Requests handed to workers and not answered yet",
                                     labels=["backend"])
        rss = GaugeMetricFamily(f"{PREFIX}_worker_rss_bytes", "Resident memory of each worker process",
                                labels=["backend", "wid"])
        state = GaugeMetricFamily(f"{PREFIX}_backend_state", "1 for the backend's current state, 0 for the others",
                                  labels=["backend", "state"])
        for name, b in backends.items():
            queue.add_metric([name], b.get("queue", 0))
            inflight.add_metric([name], b.get("in_flight", 0))
            for w in b.get("workers", []):
                rss.add_metric([name, str(w.get("wid"))], float(w.get("rss_mb", 0.0)) * 2**20)
            for s in STATES:
                state.add_metric([name, s], 1.0 if b.get("state") == s else 0.0)
        quarantined = GaugeMetricFamily(f"{PREFIX}_quarantined_inputs",
                                        "Inputs refused as POISON_INPUT until their quarantine expires")
        quarantined.add_metric([], status.get("supervisor", {}).get("quarantined", 0))
        yield from (queue, inflight, rss, state, quarantined)


class Metrics:
    """The supervisor's registry; call it with each event."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Embed requests answered, by backend and code "
                                "(ok or the error code)", ["backend", "code"], registry=r)
        self.request_s = Histogram(f"{PREFIX}_request_duration_seconds", "From arrival to the answer",
                                   ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_s = Histogram(f"{PREFIX}_queue_duration_seconds", "From arrival to the first hand-over to a "
                                 "worker", ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_s = Histogram(f"{PREFIX}_inference_duration_seconds", "One forward pass in a worker",
                                     ["backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_texts = Histogram(f"{PREFIX}_batch_texts", "Texts in one forward pass", ["backend"],
                                     buckets=BATCH_TEXTS_BUCKETS, registry=r)
        self.batch_tokens = Histogram(f"{PREFIX}_batch_tokens", "Tokens in one forward pass (unpadded)", ["backend"],
                                      buckets=BATCH_TOKENS_BUCKETS, registry=r)
        self.restarts = Counter(f"{PREFIX}_worker_restarts", "Worker exits nobody asked for, by cause "
                                "(crash, killed, load_failed, recycled)", ["backend", "reason"], registry=r)
        self.status = StatusCollector()
        r.register(self.status)
        self._children: dict[tuple[Any, ...], Any] = {}   # labels() costs a lock and a dict walk per call
        self._server: Any = None

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def __call__(self, event: Event) -> None:
        if isinstance(event, RequestAnswered):
            b = event.backend
            self._child(self.requests, b, event.code or "ok").inc()
            self._child(self.request_s, b).observe(event.total_s)
            self._child(self.queue_s, b).observe(event.queue_s)
        elif isinstance(event, BatchRun):
            b = event.backend
            self._child(self.inference_s, b).observe(event.seconds)
            self._child(self.batch_texts, b).observe(event.texts)
            self._child(self.batch_tokens, b).observe(event.tokens)
        elif isinstance(event, WorkerExited):
            if event.cause != "planned":
                self._child(self.restarts, event.backend, event.cause).inc()
        elif isinstance(event, (WorkerStarted, WorkerReady, BackendStateChanged)):
            pass   # the gauges read these states from the status snapshot

    def refresh(self, status: Mapping[str, Any]) -> None:
        """Hand over a new status snapshot for the gauges (from the event loop's thread)."""
        self.status.status = status

    def exposition(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        return generate_latest(self.registry).decode()

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve ``/metrics`` on HOST:PORT from a daemon thread; returns the bound address (PORT 0 = any)."""
        host, port = split_listen(listen)
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address
        log.info("metrics listening: http://%s:%d/metrics", bound[0], bound[1])
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

