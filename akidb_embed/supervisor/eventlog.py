"""The log as one subscriber of the supervisor's events (worker lifecycle and backend states)."""
from __future__ import annotations

import logging

from akidb_embed.supervisor.events import BackendStateChanged, Event, WorkerReady, WorkerStarted

log = logging.getLogger("akidb_embed.supervisor")


def log_event(event: Event) -> None:
    """Worker exits are logged where the held requests are known (pool.on_exit); answers are not logged."""
    if isinstance(event, WorkerStarted):
        log.info("worker start: backend=%s wid=%s pid=%s", event.backend, event.wid, event.pid)
    elif isinstance(event, WorkerReady):
        log.info("worker ready: backend=%s wid=%s pid=%s startup=%.2fs", event.backend, event.wid, event.pid,
                 event.startup_s)
    elif isinstance(event, BackendStateChanged):
        level = logging.WARNING if event.new in ("FAILED", "RESTARTING", "DEGRADED") else logging.INFO
        log.log(level, "backend state: backend=%s %s -> %s", event.backend, event.old, event.new)
