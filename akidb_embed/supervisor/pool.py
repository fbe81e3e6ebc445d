"""One backend's workers: its state, their starts, restarts, replacements and liveness checks.

Which worker runs which request is the scheduler's job (scheduler.py); answering is the request
table's (requests.py). The pool reports worker lifecycle transitions and state changes as events.
"""
from __future__ import annotations

import logging
import signal
import time
from collections import deque
from enum import Enum
from typing import Any, Protocol

from akidb_embed.protocol.errors import BackendUnavailable
from akidb_embed.supervisor.config import BackendConfig
from akidb_embed.supervisor.events import (
    BackendStateChanged, BatchRun, Events, WorkerExited, WorkerReady, WorkerStarted,
)
from akidb_embed.supervisor.policy import RestartPolicy
from akidb_embed.supervisor.process import WorkerProcess, WState, describe_exit
from akidb_embed.supervisor.quarantine import Quarantine
from akidb_embed.supervisor.jobs import Job
from akidb_embed.supervisor.requests import Request, RequestTable
from akidb_embed.supervisor.scheduler import Scheduler

log = logging.getLogger(__name__)

MEMORY_CHECK_S = 1.0


class BState(str, Enum):
    STARTING = "STARTING"
    READY = "READY"
    DEGRADED = "DEGRADED"
    RESTARTING = "RESTARTING"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class Host(Protocol):
    """What a pool needs from the supervisor that owns the sockets."""
    worker_endpoint: str
    quarantine: Quarantine
    table: RequestTable
    events: Events

    def send_jobs(self, w: WorkerProcess, jobs: list[Job]) -> None: ...
    def send_stop(self, w: WorkerProcess) -> None: ...
    def watch(self, w: WorkerProcess) -> None: ...
    def unwatch(self, w: WorkerProcess) -> None: ...


class BackendPool:
    def __init__(self, cfg: BackendConfig, host: Host) -> None:
        self.cfg, self.host = cfg, host
        self.events = host.events
        self.scheduler = Scheduler(cfg, host.table, host.quarantine)
        self.policy = RestartPolicy(cfg.policy)
        self.workers: dict[str, WorkerProcess] = {}
        self.respawn_at: list[float] = []            # monotonic times of scheduled starts
        self.replace_queue: deque[tuple[str, str]] = deque()  # (wid, reason) waiting for a rolling replacement
        self.replacing: dict[str, str] = {}          # new wid -> old wid it replaces
        self.replace_retry: list[tuple[float, str, str]] = []  # (when, old wid, reason): after a failed replacement
        self.stopped = False
        self.failed_until: float | None = None
        self.last_exit: str | None = None
        self.ever_ready = False
        self.restarts = 0
        self.recycles = 0                            # workers replaced gracefully (memory, max requests, restart)
        self.served = 0
        self.model_info: dict[str, Any] | None = None
        self._gen = 0
        self._next_memory_check = 0.0
        self._state = self.state

    # ---- state ----------------------------------------------------------------------------
    @property
    def state(self) -> BState:
        if self.stopped:
            return BState.STOPPED
        if self.failed_until is not None:
            return BState.FAILED
        ready = sum(1 for w in self.workers.values() if w.state == WState.READY)
        if ready >= self.cfg.replicas:
            return BState.READY
        if ready:
            return BState.DEGRADED
        return BState.RESTARTING if self.ever_ready else BState.STARTING

    def note_state(self) -> None:
        """Emit BackendStateChanged when the state value changed since the last call."""
        new = self.state
        if new is not self._state:
            old, self._state = self._state, new
            self.events.emit(BackendStateChanged(self.cfg.name, old.value, new.value))

    def serving(self) -> bool:
        return not self.stopped and self.failed_until is None

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.state in (WState.STARTING, WState.READY)]

    # ---- starting and stopping workers ---------------------------------------------------
    def start(self) -> None:
        for _ in range(self.cfg.replicas):
            self._spawn()
        self.note_state()

    def _spawn(self) -> WorkerProcess | None:
        self._gen += 1
        w = WorkerProcess(self.cfg, f"{self.cfg.name}.{self._gen}", self.host.worker_endpoint)
        try:
            w.spawn()
        except OSError as exc:  # interpreter gone, no fds or memory left: a crash like any other
            self._start_failed(f"{w.wid} could not be started: {exc}")
            return None
        self.workers[w.wid] = w
        self.host.watch(w)
        self.events.emit(WorkerStarted(self.cfg.name, w.wid, w.pid))
        return w

    def _start_failed(self, reason: str) -> None:
        log.error("worker start failed: backend=%s reason=%s", self.cfg.name, reason)
        self.last_exit = reason
        delay = self.policy.record_crash(time.monotonic())
        if delay is None:
            self._mark_failed(reason)
        else:
            self.respawn_at.append(time.monotonic() + delay)

    def _kill(self, w: WorkerProcess, reason: str) -> None:
        """End a worker that misbehaves: SIGTERM now (SIGCONT so a stopped one sees it), SIGKILL later."""
        if w.kill_reason:
            return
        log.warning("worker kill: backend=%s wid=%s pid=%s reason=%s", self.cfg.name, w.wid, w.pid, reason)
        w.kill_reason = reason
        w.state = WState.STOPPING
        w.stop_stage_at = time.monotonic()
        w.signal(signal.SIGTERM)
        w.signal(signal.SIGCONT)

    @staticmethod
    def _retire(w: WorkerProcess) -> None:
        """No new work; it is sent STOP once it holds nothing (see _check_worker)."""
        if w.state in (WState.STARTING, WState.READY):
            w.state = WState.DRAINING

    def stop(self) -> None:
        """Operator stop: refuse new work, answer the queue, retire every worker."""
        self.stopped = True
        self.scheduler.fail_waiting(BackendUnavailable(f"backend {self.cfg.name!r} is stopped"))
        self.respawn_at.clear()
        self.replace_queue.clear()
        self.replace_retry.clear()
        for w in list(self.workers.values()):
            self._retire(w)
        self.note_state()

    def start_op(self) -> None:
        """Operator start: from STOPPED or FAILED, bring the replicas up again."""
        self.stopped = False
        self.failed_until = None
        self.policy.reset()
        missing = self.cfg.replicas - len(self.live_workers()) - len(self.respawn_at)
        for _ in range(max(0, missing)):
            self._spawn()
        self.note_state()

    def restart(self) -> None:
        """Rolling restart: each live worker is replaced by a new one that is ready before it goes."""
        if not self.serving() or not any(w.state == WState.READY for w in self.workers.values()):
            for w in list(self.workers.values()):
                self._retire(w) if w.state == WState.READY else self._kill(w, "restart requested")
            self.respawn_at.clear()
            self.start_op()
            return
        for w in self.live_workers():
            self.replace_queue.append((w.wid, "restart requested"))
        self._next_replacement()

    def _replace(self, w: WorkerProcess, reason: str) -> None:
        if w.wid in self.replacing.values() or any(wid == w.wid for wid, _ in self.replace_queue):
            return
        self.replace_queue.append((w.wid, reason))
        self._next_replacement()

    def _next_replacement(self) -> None:
        while not self.replacing and self.replace_queue:
            wid, reason = self.replace_queue.popleft()
            old = self.workers.get(wid)
            if old is None or old.state not in (WState.STARTING, WState.READY):
                continue
            log.info("worker recycle: backend=%s wid=%s reason=%s", self.cfg.name, wid, reason)
            old.recycle_reason = reason
            new = self._spawn()
            if new is not None:
                self.replacing[new.wid] = wid

    # ---- requests ----------------------------------------------------------------------------
    def admit(self, req: Request, priority: str | None = None) -> None:
        """Accept a request for this backend (raises when it must be refused at once)."""
        if self.stopped:
            raise BackendUnavailable(f"backend {self.cfg.name!r} is stopped; start it with `akidb-embed start "
                                     f"{self.cfg.name}`")
        if self.failed_until is not None:
            wait = self.failed_until - time.monotonic()
            raise BackendUnavailable(f"backend {self.cfg.name!r} is FAILED ({self.last_exit}); "
                                     f"next attempt in {max(0.0, wait):.1f} s")
        self.scheduler.admit(req, priority)

    def pump(self) -> None:
        ready = [w for w in self.workers.values() if w.state == WState.READY]
        for w, jobs in self.scheduler.assign(ready).items():
            self.host.send_jobs(w, jobs)

    def job_done(self, w: WorkerProcess, seq: int) -> Job | None:
        job = self.scheduler.finished(w, seq)
        if job is None:
            return None
        if job.index == 0:    # a request counts once, however many parts it has
            w.served += 1
            self.served += 1
        limit = self.cfg.max_requests_per_worker
        if limit and w.served >= limit and w.state == WState.READY:
            self._replace(w, f"served {w.served} requests (max_requests_per_worker = {limit})")
        return job

    def batches_run(self, w: WorkerProcess, passes: Any) -> None:
        """The forward passes a worker reported with its answers: [[texts, tokens, seconds], ...]."""
        if not isinstance(passes, list):
            return
        for p in passes[:1024]:
            if isinstance(p, list) and len(p) == 3 and all(isinstance(x, (int, float)) for x in p):
                self.events.emit(BatchRun(self.cfg.name, w.wid, int(p[0]), int(p[1]), float(p[2])))

    # ---- worker events -----------------------------------------------------------------------
    def on_ready(self, w: WorkerProcess, info: dict[str, Any]) -> None:
        if w.state != WState.STARTING:
            return
        w.state = WState.READY
        w.info = self.model_info = info
        self.ever_ready = True
        self.policy.record_ready()
        self.events.emit(WorkerReady(self.cfg.name, w.wid, w.pid, w.uptime()))
        old = self.workers.get(self.replacing.pop(w.wid, ""))
        if old is not None:
            self._retire(old)
        self._next_replacement()
        self.pump()
        self.note_state()

    def on_load_failed(self, w: WorkerProcess, error: dict[str, Any]) -> None:
        """The model or runtime is missing: no point in a crash loop; FAILED until the cool-down.
        A replacement that cannot load leaves the worker it was to replace serving; retried later."""
        w.load_error = error
        reason = f"{w.wid} could not load: {error.get('message', error)}"
        old_wid = self.replacing.pop(w.wid, None)
        old = self.workers.get(old_wid or "")
        if old is not None and old.state in (WState.STARTING, WState.READY):
            retry_s = self.cfg.policy.failed_cooldown_s
            log.error("worker replacement failed: backend=%s wid=%s keeps serving; retry_in=%.0fs reason=%s",
                      self.cfg.name, old.wid, retry_s, reason)
            self.last_exit = reason
            self.replace_retry.append((time.monotonic() + retry_s, old.wid, old.recycle_reason or "retry"))
            old.recycle_reason = None
            self._next_replacement()
            return
        self._mark_failed(reason)

    def _mark_failed(self, reason: str) -> None:
        self.last_exit = reason
        self.failed_until = time.monotonic() + self.cfg.policy.failed_cooldown_s
        log.error("backend failed: backend=%s reason=%s retry_in=%.0fs", self.cfg.name, reason,
                  self.cfg.policy.failed_cooldown_s)
        self.respawn_at.clear()
        self.scheduler.fail_waiting(BackendUnavailable(f"backend {self.cfg.name!r} is unavailable: {reason}"))
        for other in list(self.workers.values()):
            self._retire(other)
        self.note_state()

    def on_exit(self, w: WorkerProcess, code: int | None) -> None:
        self.workers.pop(w.wid, None)
        self.host.unwatch(w)
        reason = w.kill_reason or (f"load failed: {w.load_error.get('message')}" if w.load_error
                                   else describe_exit(code))
        # planned: it was told to stop and exited cleanly (or we had to signal it at the end of its stop);
        # a worker that crashes while draining is a crash like any other
        planned = w.kill_reason is None and w.state in (WState.DRAINING, WState.STOPPING) and (
            code == 0 or w.stop_signalled)
        cause = ("planned" if not w.recycle_reason else "recycled") if planned else (
            "killed" if w.kill_reason else "load_failed" if w.load_error else "crash")
        self.events.emit(WorkerExited(self.cfg.name, w.wid, w.pid, reason, cause, w.uptime()))
        log.log(logging.INFO if planned else logging.WARNING, "worker exit: backend=%s wid=%s pid=%s reason=%s "
                "uptime=%.1fs held=%d", self.cfg.name, w.wid, w.pid, reason, w.uptime(), len(w.inflight))
        self.scheduler.rescue(w, reason, planned=planned, can_retry=self.serving())
        if w.wid in self.replacing:       # a replacement that died: the old worker keeps serving
            self.replacing.pop(w.wid)
            self._next_replacement()
        if planned and w.recycle_reason:
            self.recycles += 1
            self.last_exit = f"{w.wid}: recycled ({w.recycle_reason}); {reason}"
        if not (planned or w.load_error):
            self._crashed(w, reason)
        self.pump()
        self.note_state()

    def _crashed(self, w: WorkerProcess, reason: str) -> None:
        self.last_exit = f"{w.wid}: {reason}"
        if not self.serving():
            return
        delay = self.policy.record_crash(time.monotonic())
        if delay is None:
            p = self.cfg.policy
            self._mark_failed(f"{p.restart_max} restarts within {p.restart_window_s:.0f} s, or as many failed "
                              f"starts in a row; last: {reason}")
        elif len(self.live_workers()) + len(self.respawn_at) < self.cfg.replicas:
            self.restarts += 1
            self.respawn_at.append(time.monotonic() + delay)
            log.info("worker restart scheduled: backend=%s in=%.2fs", self.cfg.name, delay)

    # ---- timers ------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.failed_until is not None and now >= self.failed_until and not self.stopped:
            log.info("backend retry after cool-down: backend=%s", self.cfg.name)
            self.start_op()
        due = [t for t in self.respawn_at if t <= now]
        if due:
            self.respawn_at = [t for t in self.respawn_at if t > now]
            for _ in due:
                if len(self.live_workers()) < self.cfg.replicas:
                    self._spawn()
        for when, wid, reason in [r for r in self.replace_retry if r[0] <= now]:
            self.replace_retry.remove((when, wid, reason))
            w = self.workers.get(wid)
            if w is not None and w.state == WState.READY:
                self._replace(w, reason)
        check_memory = self.cfg.memory_limit_mb is not None and now >= self._next_memory_check
        if check_memory:
            self._next_memory_check = now + MEMORY_CHECK_S
        for w in list(self.workers.values()):
            self._check_worker(w, now, check_memory)
        self.note_state()

    def _check_worker(self, w: WorkerProcess, now: float, check_memory: bool) -> None:
        p = self.cfg.policy
        if w.state == WState.STARTING and w.uptime() > p.startup_timeout_s:
            self._kill(w, f"not ready within startup_timeout_s = {p.startup_timeout_s:g}")
        elif w.state in (WState.READY, WState.DRAINING) and now - w.last_heartbeat > p.heartbeat_timeout_s:
            self._kill(w, f"no heartbeat for {now - w.last_heartbeat:.1f} s (stopped or deadlocked)")
        elif w.state in (WState.READY, WState.DRAINING) and self._running_past_deadline(w, now):
            # heartbeats still arrive, so its main thread is stuck on the input (not a stopped process)
            w.hung = now - w.last_heartbeat <= max(1.0, 3 * p.heartbeat_interval_s)
            self._kill(w, f"ran a batch more than hang_grace_s = {p.hang_grace_s:g} past every deadline in it")
        elif w.state == WState.DRAINING and not w.inflight:
            w.state = WState.STOPPING
            w.stop_stage_at = now
            self.host.send_stop(w)
        elif w.state == WState.STOPPING and w.stop_stage_at is not None and now - w.stop_stage_at > p.stop_timeout_s:
            w.stop_signalled = True
            w.signal(signal.SIGKILL if w.kill_reason or now - w.stop_stage_at > 2 * p.stop_timeout_s
                     else signal.SIGTERM)
        elif check_memory and w.state == WState.READY and self.cfg.memory_limit_mb is not None:
            rss_mb = w.measure_rss() / 2**20
            if rss_mb > self.cfg.memory_limit_mb:
                self._replace(w, f"RSS {rss_mb:.0f} MB over memory_limit_mb = {self.cfg.memory_limit_mb:g}")

    def _running_past_deadline(self, w: WorkerProcess, now: float) -> bool:
        """Hung: the forward pass it reports running (not merely jobs queued behind it) is past every
        one of its requests' deadlines by hang_grace_s. A tiny deadline waiting behind a long batch
        never makes a healthy worker look hung."""
        deadlines = [w.inflight[s].deadline for s in w.running if s in w.inflight]
        return bool(deadlines) and max(deadlines) + self.cfg.policy.hang_grace_s < now

    # ---- reporting ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        workers = sorted(self.workers.values(), key=lambda w: w.wid)
        return {
            "state": self.state.value, "kind": self.cfg.kind, "model": self.cfg.model,
            "replicas": self.cfg.replicas,
            "workers": [{"wid": w.wid, "pid": w.pid, "state": w.state.value, "uptime_s": round(w.uptime(), 3),
                         "in_flight": len(w.inflight), "served": w.served, "rss_mb": round(w.measure_rss() / 2**20, 1)}
                        for w in workers],
            "pids": [w.pid for w in workers],
            "uptime_s": round(max((w.uptime() for w in workers if w.state == WState.READY), default=0.0), 3),
            "restarts": self.restarts, "recycles": self.recycles, "last_exit": self.last_exit,
            "queue": self.scheduler.waiting(),
            "in_flight": sum(len(w.inflight) for w in workers), "served": self.served,
            "rss_mb": round(sum(w.rss for w in workers) / 2**20, 1),
        }
