"""One backend's scheduling: its queue, which worker runs what, retries and the search for poison inputs.

The scheduler decides; it answers only through the request table (``RequestTable.fail``). The unit it
hands to a worker is a job: today one job is one whole request (``Request.seq`` is the job id on the
worker channel); splitting a request into several jobs would keep this interface.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Iterable

from akidb_embed.protocol.errors import EmbedError, Overloaded, PoisonInput, WorkerDied
from akidb_embed.supervisor.config import BackendConfig
from akidb_embed.supervisor.process import WorkerProcess
from akidb_embed.supervisor.quarantine import Quarantine
from akidb_embed.supervisor.requests import Request, RequestTable

log = logging.getLogger(__name__)


class JobQueue:
    """Requests waiting for a worker, oldest first. Answered ones are skipped, never handed out."""

    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def push(self, req: Request) -> None:
        self._q.append(req)

    def push_front(self, req: Request) -> None:
        self._q.appendleft(req)

    def pop_for(self, w: WorkerProcess) -> Request | None:
        """The next request for worker ``w`` (today: the oldest still unanswered one)."""
        q = self._q
        while q:
            req = q.popleft()
            if not req.answered:
                return req
        return None

    def waiting(self) -> int:
        """Unanswered requests (drops the answered ones it still references)."""
        self._q = deque(r for r in self._q if not r.answered)
        return len(self._q)

    def take_all(self) -> list[Request]:
        out = [r for r in self._q if not r.answered]
        self._q.clear()
        return out


class Scheduler:
    def __init__(self, cfg: BackendConfig, table: RequestTable, quarantine: Quarantine) -> None:
        self.cfg, self.table, self.quarantine = cfg, table, quarantine
        self.queue = JobQueue()
        self.suspects: deque[Request] = deque()   # run one at a time, alone on a worker, to find a poison input

    def waiting(self) -> int:
        return len(self.queue) + len(self.suspects)

    def admit(self, req: Request) -> None:
        """Queue a new request; raises OVERLOADED when the backend's queue is full."""
        if len(self.queue) >= self.cfg.max_queue and self.queue.waiting() >= self.cfg.max_queue:
            raise Overloaded(f"backend {self.cfg.name!r} has {len(self.queue)} requests waiting "
                             f"(max_queue = {self.cfg.max_queue}); retry later")
        self.queue.push(req)

    def assign(self, ready: list[WorkerProcess]) -> dict[WorkerProcess, list[Request]]:
        """Hand waiting requests to ready workers; returns what to send, one message per worker."""
        outbox: dict[WorkerProcess, list[Request]] = {}
        if not ready:
            return outbox
        now = time.monotonic()
        lane = None
        if self.suspects:  # keep one worker free of new work so suspects can run alone on it
            lane = next((w for w in ready if w.isolating), None) or min(ready, key=lambda w: len(w.inflight))
            while self.suspects and not lane.inflight:
                req = self.suspects.popleft()
                if req.probe or not req.answered:
                    lane.isolating = True
                    self._hand(lane, req, now, outbox)
        # a worker running a suspect alone gets nothing else until it is done, even when it is no longer the lane
        others = [w for w in ready if w is not lane and not w.isolating]
        limit = self.cfg.max_inflight
        while self.queue and others:
            w = min(others, key=lambda w: len(w.inflight))
            if len(w.inflight) >= limit:
                break
            nxt = self.queue.pop_for(w)
            if nxt is None:
                break
            self._hand(w, nxt, now, outbox)
        return outbox

    @staticmethod
    def _hand(w: WorkerProcess, req: Request, now: float, outbox: dict[WorkerProcess, list[Request]]) -> None:
        req.hand_to(w.wid, now)
        w.inflight[req.seq] = req
        outbox.setdefault(w, []).append(req)

    def finished(self, w: WorkerProcess, seq: int) -> Request | None:
        """The worker returned job ``seq``: it no longer holds it."""
        req = w.inflight.pop(seq, None)
        if req is not None and w.isolating and not w.inflight:
            w.isolating = False
        return req

    def fail_waiting(self, err: EmbedError) -> None:
        for req in self.queue.take_all() + [r for r in self.suspects if not r.answered]:
            self.table.fail(req, err)
        self.suspects.clear()

    # ---- a worker died holding requests -------------------------------------------------------
    def rescue(self, w: WorkerProcess, reason: str, *, planned: bool, can_retry: bool) -> None:
        """Answer or re-run every request the dead worker held; find the poison input if there is one."""
        held = sorted(w.inflight.values(), key=lambda r: r.seq)
        w.inflight.clear()
        for req in held:
            req.back_to_queue(suspect=False)
        if planned:   # it exited cleanly while draining: not a suspect, nothing ran wrongly
            self._retry(reversed(held), can_retry, reason, suspect=False)
            return
        if w.hung:    # only what the last heartbeat said was running is suspect; the rest never started
            running = [r for r in held if r.seq in w.running]
            waited = [r for r in held if r.seq not in w.running]
            self._retry(reversed(waited), can_retry, reason, suspect=False)
            held = running
        if (w.isolating or w.hung) and len(held) == 1:
            self._quarantine(held[0], "hung" if w.hung else "crashed", reason, hung=w.hung)
            return
        if w.hung and can_retry:  # a hang inside a batch: re-run each request alone (as a probe if already answered)
            now = time.monotonic()
            for req in reversed(held):
                if req.answered:
                    req.probe, req.deadline = True, now + req.budget_s
                self.suspects.appendleft(req)
            return
        self._retry(reversed(held), can_retry, reason, suspect=True)

    def _retry(self, reqs: Iterable[Request], can_retry: bool, reason: str, *, suspect: bool) -> None:
        now = time.monotonic()
        for req in reqs:
            if req.answered:
                continue
            if not can_retry or (suspect and req.attempts >= 2) or req.deadline <= now:
                self.table.fail(req, WorkerDied(f"the {self.cfg.name} worker died holding this request ({reason})"))
            elif suspect:
                req.back_to_queue(suspect=True)
                self.suspects.appendleft(req)
            else:
                self.queue.push_front(req)

    def _quarantine(self, req: Request, what: str, reason: str, *, hung: bool) -> None:
        seconds = self.cfg.policy.quarantine_s
        self.quarantine.add(req.texts, seconds, f"this input {what} a {self.cfg.name} worker ({reason})")
        log.warning("poison input: backend=%s request=%r texts=%d quarantined=%.0fs reason=%s",
                    self.cfg.name, req.rid, len(req.texts), seconds, reason)
        self.table.fail(req, PoisonInput(
            f"this input {what} the {self.cfg.name} worker{'' if hung else ' twice'} ({reason}); "
            f"it is refused for {seconds:.0f} s"))
