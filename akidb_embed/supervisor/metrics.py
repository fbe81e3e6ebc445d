"""Prometheus metrics: counters and histograms fed by the supervisor's events, gauges read from its status.

One registry per supervisor. ``Metrics`` is an events subscriber (``events.subscribe(metrics)``); the
gauges come from the last ``status`` snapshot handed to ``refresh`` (the event loop refreshes it; the
listener thread only reads it). Rendered by ``exposition()`` (the ``metrics`` op) and by
prometheus_client's HTTP server on ``[metrics] listen``. Metric names are listed in the README.
"""
from __future__ import annotations

import logging
import math
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class _Histogram:
    """Bucket counts and a sum, updated by the event loop without locks (a scrape copies them)."""
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last one: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1   # first bound >= value: Prometheus' le is inclusive
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        counts = list(self.counts)    # one C-level copy: consistent buckets even while the loop observes
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds + (math.inf,), counts):
            total += n
            out.append((floatToGoString(bound), total))  # type: ignore[no-untyped-call]
        return out


# name -> (help, buckets): the histograms, each labelled by backend
HISTOGRAMS = {
    "request_duration_seconds": ("From a request's arrival to its answer", LATENCY_BUCKETS),
    "queue_duration_seconds": ("From a request's arrival to its first hand-over to a worker", LATENCY_BUCKETS),
    "inference_duration_seconds": ("One forward pass in a worker", LATENCY_BUCKETS),
    "batch_texts": ("Texts in one forward pass", BATCH_TEXTS_BUCKETS),
    "batch_tokens": ("Tokens in one forward pass (unpadded, after truncation)", BATCH_TOKENS_BUCKETS),
}


class Metrics(Collector):
    """The supervisor's registry and its events subscriber: call it with each event.

    Counters and histograms are plain ints and floats updated on the event loop (a few microseconds per
    request; prometheus_client's own metric objects take a lock and a Python loop per observation, about
    three times as much) and rendered by ``collect`` at scrape time.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}         # (backend, code) -> answered
        self.restarts: dict[tuple[str, str], int] = {}         # (backend, cause) -> worker exits
        self.hists: dict[str, dict[str, _Histogram]] = {name: {} for name in HISTOGRAMS}
        self.status = StatusCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.registry.register(self.status)
        self._server: Any = None

    def _observe(self, name: str, backend: str, value: float) -> None:
        per_backend = self.hists[name]
        h = per_backend.get(backend)
        if h is None:
            h = per_backend[backend] = _Histogram(HISTOGRAMS[name][1])
        h.observe(value)

    def __call__(self, event: Event) -> None:
        if isinstance(event, RequestAnswered):
            key = (event.backend, event.code or "ok")
            self.requests[key] = self.requests.get(key, 0) + 1
            self._observe("request_duration_seconds", event.backend, event.total_s)
            self._observe("queue_duration_seconds", event.backend, event.queue_s)
        elif isinstance(event, BatchRun):
            self._observe("inference_duration_seconds", event.backend, event.seconds)
            self._observe("batch_texts", event.backend, event.texts)
            self._observe("batch_tokens", event.backend, event.tokens)
        elif isinstance(event, WorkerExited):
            if event.cause != "planned":
                key = (event.backend, event.cause)
                self.restarts[key] = self.restarts.get(key, 0) + 1
        elif isinstance(event, (WorkerStarted, WorkerReady, BackendStateChanged)):
            pass   # the gauges read these states from the status snapshot

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Embed requests answered, by backend and code "
                                       "(ok or the error code)", labels=["backend", "code"])
        for (backend, code), n in sorted(dict(self.requests).items()):
            requests.add_metric([backend, code], n)
        yield requests
        for name, (doc, _) in HISTOGRAMS.items():
            family = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=["backend"])
            for backend, h in sorted(dict(self.hists[name]).items()):
                family.add_metric([backend], h.buckets(), sum_value=h.sum)
            yield family
        restarts = CounterMetricFamily(f"{PREFIX}_worker_restarts", "Worker exits nobody asked for, by cause "
                                       "(crash, killed, load_failed, recycled)", labels=["backend", "reason"])
        for (backend, cause), n in sorted(dict(self.restarts).items()):
            restarts.add_metric([backend, cause], n)
        yield restarts

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

