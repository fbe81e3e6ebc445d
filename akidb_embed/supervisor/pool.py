"""One backend's workers: its state, queue, dispatch, restarts, recycling and liveness checks."""
from __future__ import annotations

import logging
import signal
import time
from collections import deque
from enum import Enum
from typing import Any, Protocol

from akidb_embed.protocol.errors import (
    BackendUnavailable, EmbedError, Overloaded, PoisonInput, WorkerDied,
)
from akidb_embed.supervisor.config import BackendConfig
from akidb_embed.supervisor.events import BackendStateChanged, Events, WorkerExited, WorkerReady, WorkerStarted
from akidb_embed.supervisor.pending import Pending, Quarantine
from akidb_embed.supervisor.policy import RestartPolicy
from akidb_embed.supervisor.process import WorkerProcess, WState, describe_exit

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
    events: Events

    def send_jobs(self, w: WorkerProcess, jobs: list[Pending]) -> None: ...
    def send_stop(self, w: WorkerProcess) -> None: ...
    def answer_error(self, p: Pending, err: EmbedError) -> None: ...
    def watch(self, w: WorkerProcess) -> None: ...
    def unwatch(self, w: WorkerProcess) -> None: ...


class BackendPool:
    def __init__(self, cfg: BackendConfig, host: Host) -> None:
        self.cfg, self.host = cfg, host
        self.policy = RestartPolicy(cfg.policy)
        self.workers: dict[str, WorkerProcess] = {}
        self.queue: deque[Pending] = deque()
        self.suspects: deque[Pending] = deque()      # rerun one at a time to find a poison input
        self.respawn_at: list[float] = []            # monotonic times of scheduled starts
        self.replace_queue: deque[tuple[str, str]] = deque()  # (wid, reason) waiting for a rolling replacement
        self.replacing: dict[str, str] = {}          # new wid -> old wid it replaces
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
        self._noted_state = BState.STARTING          # last state reported as an event

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

    def _note_state(self) -> None:
        """Emit BackendStateChanged when the state differs from the last one reported (events hook)."""
        state = self.state
        if state != self._noted_state:
            old, self._noted_state = self._noted_state, state
            self.host.events.emit(BackendStateChanged(self.cfg.name, old.value, state.value))

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers.values() if w.state in (WState.STARTING, WState.READY)]

    # ---- starting and stopping workers ---------------------------------------------------
    def start(self) -> None:
        for _ in range(self.cfg.replicas):
            self._spawn()

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
        self.host.events.emit(WorkerStarted(self.cfg.name, w.wid, w.pid))   # events hook
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

    def _drain(self, w: WorkerProcess) -> None:
        if w.state in (WState.STARTING, WState.READY):
            w.state = WState.DRAINING

    def stop(self) -> None:
        """Operator stop (or shutdown): refuse new work, answer the queue, drain every worker."""
        self.stopped = True
        self._fail_waiting(BackendUnavailable(f"backend {self.cfg.name!r} is stopped"))
        self.respawn_at.clear()
        self.replace_queue.clear()
        for w in list(self.workers.values()):
            self._drain(w)
        self._note_state()

    def start_op(self) -> None:
        """Operator start: from STOPPED or FAILED, bring the replicas up again."""
        self.stopped = False
        self.failed_until = None
        self.policy.reset()
        missing = self.cfg.replicas - len(self.live_workers()) - len(self.respawn_at)
        for _ in range(max(0, missing)):
            self._spawn()
        self._note_state()

    def restart(self) -> None:
        """Rolling restart: each live worker is replaced by a new one that is ready before it goes."""
        if self.stopped or self.failed_until is not None or not any(
                w.state == WState.READY for w in self.workers.values()):
            for w in list(self.workers.values()):
                self._drain(w) if w.state == WState.READY else self._kill(w, "restart requested")
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
    def submit(self, p: Pending) -> None:
        """Queue a request (raises when it must be refused at once), then dispatch what can go."""
        if self.stopped:
            raise BackendUnavailable(f"backend {self.cfg.name!r} is stopped; start it with `akidb-embed start "
                                     f"{self.cfg.name}`")
        if self.failed_until is not None:
            wait = self.failed_until - time.monotonic()
            raise BackendUnavailable(f"backend {self.cfg.name!r} is FAILED ({self.last_exit}); "
                                     f"next attempt in {max(0.0, wait):.1f} s")
        if len(self.queue) >= self.cfg.max_queue:  # requests already answered TIMEOUT no longer count
            self.queue = deque(q for q in self.queue if not q.answered)
        if len(self.queue) >= self.cfg.max_queue:
            raise Overloaded(f"backend {self.cfg.name!r} has {len(self.queue)} requests waiting "
                             f"(max_queue = {self.cfg.max_queue}); retry later")
        self.queue.append(p)
        self.pump()

    def pump(self) -> None:
        ready = [w for w in self.workers.values() if w.state == WState.READY]
        if not ready:
            return
        outbox: dict[WorkerProcess, list[Pending]] = {}   # one multipart message per worker per pump
        lane = None
        if self.suspects:  # keep one worker free of new work so suspects can run alone on it
            lane = next((w for w in ready if w.isolating), None) or min(ready, key=lambda w: len(w.inflight))
            while self.suspects and not lane.inflight:
                p = self.suspects.popleft()
                if not p.answered:
                    lane.isolating = True
                    self._assign(lane, p, outbox)
        # a worker running a suspect alone gets nothing else until it is done, even when it is no longer the lane
        others = [w for w in ready if w is not lane and not w.isolating]
        limit = self.cfg.max_inflight
        while self.queue and others:
            w = min(others, key=lambda w: len(w.inflight))
            if len(w.inflight) >= limit:
                break
            p = self.queue.popleft()
            if not p.answered:
                self._assign(w, p, outbox)
        for w, jobs in outbox.items():
            self.host.send_jobs(w, jobs)

    @staticmethod
    def _assign(w: WorkerProcess, p: Pending, outbox: dict[WorkerProcess, list[Pending]]) -> None:
        p.handed_last = time.monotonic()      # for the metrics' queue and run durations
        if not p.handed_first:
            p.handed_first = p.handed_last
        p.attempts += 1
        p.worker = w.wid
        w.inflight[p.seq] = p
        outbox.setdefault(w, []).append(p)

    def on_done(self, w: WorkerProcess, seq: int, pump: bool = True) -> Pending | None:
        p = w.inflight.pop(seq, None)
        if p is None:
            return None
        if w.isolating and not w.inflight:
            w.isolating = False
        w.served += 1
        self.served += 1
        limit = self.cfg.max_requests_per_worker
        if limit and w.served >= limit and w.state == WState.READY:
            self._replace(w, f"served {w.served} requests (max_requests_per_worker = {limit})")
        if pump:
            self.pump()
        return p

    def _fail_waiting(self, err: EmbedError) -> None:
        for waiting in (self.queue, self.suspects):
            while waiting:
                p = waiting.popleft()
                if not p.answered:
                    self.host.answer_error(p, err)

    # ---- worker events -----------------------------------------------------------------------
    def on_ready(self, w: WorkerProcess, info: dict[str, Any]) -> None:
        if w.state != WState.STARTING:
            return
        w.state = WState.READY
        w.info = self.model_info = info
        self.ever_ready = True
        self.policy.record_ready()
        log.info("worker ready: backend=%s wid=%s pid=%s startup=%.2fs", self.cfg.name, w.wid, w.pid, w.uptime())
        self.host.events.emit(WorkerReady(self.cfg.name, w.wid, w.pid, w.uptime()))   # events hook
        self._note_state()
        old = self.workers.get(self.replacing.pop(w.wid, ""))
        if old is not None:
            self._drain(old)
        self._next_replacement()
        self.pump()

    def on_load_failed(self, w: WorkerProcess, error: dict[str, Any]) -> None:
        """The model or runtime is missing: no point in a crash loop; FAILED until the cool-down."""
        w.load_error = error
        self._mark_failed(f"{w.wid} could not load: {error.get('message', error)}")

    def _mark_failed(self, reason: str) -> None:
        self.last_exit = reason
        self.failed_until = time.monotonic() + self.cfg.policy.failed_cooldown_s
        log.error("backend failed: backend=%s reason=%s retry_in=%.0fs", self.cfg.name, reason,
                  self.cfg.policy.failed_cooldown_s)
        self.respawn_at.clear()
        self._fail_waiting(BackendUnavailable(f"backend {self.cfg.name!r} is unavailable: {reason}"))
        for other in list(self.workers.values()):
            self._drain(other)
        self._note_state()

    def on_exit(self, w: WorkerProcess, code: int | None) -> None:
        self.workers.pop(w.wid, None)
        self.host.unwatch(w)
        reason = w.kill_reason or (f"load failed: {w.load_error.get('message')}" if w.load_error
                                   else describe_exit(code))
        planned = w.kill_reason is None and w.state in (WState.DRAINING, WState.STOPPING)
        log.log(logging.INFO if planned else logging.WARNING, "worker exit: backend=%s wid=%s pid=%s reason=%s "
                "uptime=%.1fs held=%d", self.cfg.name, w.wid, w.pid, reason, w.uptime(), len(w.inflight))
        cause = ("recycled" if w.recycle_reason else "planned") if planned else (
            "load_failed" if w.load_error else "killed" if w.kill_reason else "crash")
        self.host.events.emit(WorkerExited(self.cfg.name, w.wid, w.pid, reason, cause, w.uptime()))  # events hook
        self._rescue(w, reason)
        if w.wid in self.replacing:       # a replacement that died: the old worker keeps serving
            self.replacing.pop(w.wid)
            self._next_replacement()
        if planned and w.recycle_reason:
            self.recycles += 1
            self.last_exit = f"{w.wid}: recycled ({w.recycle_reason}); {reason}"
        if planned or w.load_error or self.stopped or self.failed_until is not None:
            self.pump()
            self._note_state()
            return
        self.last_exit = f"{w.wid}: {reason}"
        delay = self.policy.record_crash(time.monotonic())
        if delay is None:
            p = self.cfg.policy
            self._mark_failed(f"{p.restart_max} restarts within {p.restart_window_s:.0f} s; last: {reason}")
        elif len(self.live_workers()) + len(self.respawn_at) < self.cfg.replicas:
            self.restarts += 1
            self.respawn_at.append(time.monotonic() + delay)
            log.info("worker restart scheduled: backend=%s in=%.2fs", self.cfg.name, delay)
        self.pump()
        self._note_state()

    def _rescue(self, w: WorkerProcess, reason: str) -> None:
        """Answer or re-run every request the dead worker held; find the poison input if there is one."""
        held = list(w.inflight.values())
        w.inflight.clear()
        # Isolated = it ran alone: a suspect re-run on its own, or the one request of a hung worker (a hang
        # is not re-run: its client already had TIMEOUT, so there is no second chance to isolate it).
        if (w.isolating or w.hung) and len(held) == 1 and not (w.kill_reason is None and w.state == WState.DRAINING):
            p = held[0]
            seconds = self.cfg.policy.quarantine_s
            what = "hung" if w.hung else "crashed"
            self.host.quarantine.add(p.texts, seconds, f"this input {what} a {self.cfg.name} worker ({reason})")
            log.warning("poison input: backend=%s request=%r texts=%d quarantined=%.0fs reason=%s",
                        self.cfg.name, p.rid, len(p.texts), seconds, reason)
            if not p.answered:
                self.host.answer_error(p, PoisonInput(
                    f"this input {what} the {self.cfg.name} worker{'' if w.hung else ' twice'} ({reason}); "
                    f"it is refused for {seconds:.0f} s"))
            return
        now = time.time()
        for p in sorted((p for p in held if not p.answered), key=lambda p: p.seq, reverse=True):
            if p.attempts >= 2 or p.deadline <= now:
                self.host.answer_error(p, WorkerDied(f"the {self.cfg.name} worker died holding this request "
                                                     f"({reason})"))
            elif w.kill_reason is None and w.state in (WState.DRAINING, WState.STOPPING):
                self.queue.appendleft(p)   # a planned stop: not a suspect
            else:
                self.suspects.appendleft(p)

    # ---- timers ------------------------------------------------------------------------------------
    def tick(self, now: float, wall: float) -> None:
        if self.failed_until is not None and now >= self.failed_until and not self.stopped:
            log.info("backend retry after cool-down: backend=%s", self.cfg.name)
            self.start_op()
        due = [t for t in self.respawn_at if t <= now]
        if due:
            self.respawn_at = [t for t in self.respawn_at if t > now]
            for _ in due:
                if len(self.live_workers()) < self.cfg.replicas:
                    self._spawn()
        check_memory = self.cfg.memory_limit_mb is not None and now >= self._next_memory_check
        if check_memory:
            self._next_memory_check = now + MEMORY_CHECK_S
        for w in list(self.workers.values()):
            self._check_worker(w, now, wall, check_memory)
        self._note_state()

    def _check_worker(self, w: WorkerProcess, now: float, wall: float, check_memory: bool) -> None:
        p = self.cfg.policy
        if w.state == WState.STARTING and w.uptime() > p.startup_timeout_s:
            self._kill(w, f"not ready within startup_timeout_s = {p.startup_timeout_s:g}")
        elif w.state in (WState.READY, WState.DRAINING) and now - w.last_heartbeat > p.heartbeat_timeout_s:
            self._kill(w, f"no heartbeat for {now - w.last_heartbeat:.1f} s (stopped or deadlocked)")
        elif w.state in (WState.READY, WState.DRAINING) and any(
                q.deadline + p.hang_grace_s < wall for q in w.inflight.values()):
            # heartbeats still arrive, so its main thread is stuck on the input (not a stopped process)
            w.hung = now - w.last_heartbeat <= max(1.0, 3 * p.heartbeat_interval_s)
            self._kill(w, f"held a request more than hang_grace_s = {p.hang_grace_s:g} past its deadline")
        elif w.state == WState.DRAINING and not w.inflight:
            w.state = WState.STOPPING
            w.stop_stage_at = now
            self.host.send_stop(w)
        elif w.state == WState.STOPPING and w.stop_stage_at is not None and now - w.stop_stage_at > p.stop_timeout_s:
            w.signal(signal.SIGKILL if w.kill_reason or now - w.stop_stage_at > 2 * p.stop_timeout_s
                     else signal.SIGTERM)
        elif check_memory and w.state == WState.READY:
            rss_mb = w.measure_rss() / 2**20
            if rss_mb > self.cfg.memory_limit_mb:
                self._replace(w, f"RSS {rss_mb:.0f} MB over memory_limit_mb = {self.cfg.memory_limit_mb:g}")

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
            "queue": len(self.queue) + len(self.suspects),
            "in_flight": sum(len(w.inflight) for w in workers), "served": self.served,
            "rss_mb": round(sum(w.rss for w in workers) / 2**20, 1),
        }
