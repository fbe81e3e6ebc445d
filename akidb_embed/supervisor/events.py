"""Typed events from the supervisor's request table and worker lifecycle; subscribers (logs, metrics,
traces) register callables. Emitting never raises: a failing subscriber is logged and skipped."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Union

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestAnswered:
    backend: str            # backend name ("" when the request never reached one, e.g. UNKNOWN_BACKEND)
    code: str | None        # None = ok, else the ErrorCode value
    texts: int
    tokens: int | None      # total tokens when the worker reported them
    queue_s: float          # from arrival to first hand-over to a worker (whole life if never handed over)
    run_s: float            # from last hand-over to the answer (0 when never handed over)
    total_s: float          # from arrival to the answer


@dataclass(frozen=True)
class BatchRun:            # one forward pass reported by a worker
    backend: str
    wid: str
    texts: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class WorkerStarted:
    backend: str
    wid: str
    pid: int | None


@dataclass(frozen=True)
class WorkerReady:
    backend: str
    wid: str
    pid: int | None
    startup_s: float


@dataclass(frozen=True)
class WorkerExited:
    backend: str
    wid: str
    pid: int | None
    reason: str             # human text, e.g. "killed by SIGKILL", "no heartbeat for 5.1 s"
    cause: str              # stable label: "planned" | "crash" | "killed" | "load_failed" | "recycled"
    uptime_s: float


@dataclass(frozen=True)
class BackendStateChanged:
    backend: str
    old: str                # BState value
    new: str


Event = Union[RequestAnswered, BatchRun, WorkerStarted, WorkerReady, WorkerExited, BackendStateChanged]
Subscriber = Callable[[Event], None]


class Events:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> None:
        self._subscribers.append(fn)

    def emit(self, event: Event) -> None:
        for fn in self._subscribers:
            try:
                fn(event)
            except Exception:  # a subscriber's bug must never reach the event loop
                log.exception("event subscriber %r failed on %s", fn, type(event).__name__)
