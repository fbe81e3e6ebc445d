"""One backend's scheduling: its queue, which worker runs what, retries and the search for poison inputs.

The scheduler decides; it answers only through the request table (``RequestTable.fail``). The unit it
hands to a worker is a job (jobs.py): a whole request, or one part of a large one; ``Job.seq`` is the
job id on the worker channel. Which job goes next is the fair queue's choice (fairqueue.py); how
much goes into one pass is passes.py's.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from akidb_embed.protocol.errors import EmbedError, Overloaded, PoisonInput, WorkerDied
from akidb_embed.supervisor.config import BackendConfig
from akidb_embed.supervisor.fairqueue import HIGH, PRIORITY_CLASSES, FairQueue
from akidb_embed.supervisor.jobs import Job, make_jobs
from akidb_embed.supervisor.passes import PassSizer, compose_pass, plan_bulk_window, top_up
from akidb_embed.supervisor.process import WorkerProcess
from akidb_embed.supervisor.quarantine import Quarantine
from akidb_embed.supervisor.requests import Request, RequestTable

log = logging.getLogger(__name__)

BULK_WINDOW_PASSES = 8    # bulk work is sorted by length over this many passes' worth of texts (and tokens)
REPLAN_SHARE = 0.75       # planned passes are planned again when the pass budget falls below this share


@dataclass(eq=False)
class _Pass:
    seqs: set[int]      # its jobs not answered yet
    tokens: int         # estimated
    sent: float         # monotonic


class Scheduler:
    """Jobs waiting for a worker in a :class:`FairQueue` (priority classes, fair share between
    clients); each ready worker gets one pass of work at a time, so a newly arrived query waits
    behind one pass at most."""

    def __init__(self, cfg: BackendConfig, table: RequestTable, quarantine: Quarantine) -> None:
        self.cfg, self.table, self.quarantine = cfg, table, quarantine
        self.queue: FairQueue[Job] = FairQueue(quantum=cfg.fair_quantum_tokens)
        self.sizer = PassSizer(cfg.max_batch_tokens, cfg.latency_pass_ms, cfg.interactive_window_s,
                               cfg.high_latency_pass_ms)
        self.default_priority = PRIORITY_CLASSES[cfg.default_priority]
        self.suspects: deque[Job] = deque()   # run one at a time, alone on a worker, to find a poison input
        self.staged: deque[list[Job]] = deque()  # bulk passes planned ahead (sorted by length), not handed over yet
        self._staged_budget = cfg.max_batch_tokens   # the pass budget (estimated tokens) they were planned with
        self.passes: dict[str, deque[_Pass]] = {}   # wid -> passes handed over and not finished, oldest first
        self._queued: dict[int, Request] = {}  # requests with jobs in the queue (max_queue counts these)
        self._pass_end: dict[str, float] = {}  # wid -> when its last pass ended (monotonic)

    def waiting(self) -> int:
        """Requests waiting for a worker (answered ones are forgotten here)."""
        for seq in [seq for seq, req in self._queued.items() if req.answered]:
            del self._queued[seq]
        return len(self._queued) + sum(1 for j in self.suspects if j.alive())

    def admit(self, req: Request, priority: str | None) -> None:
        """Queue a new request's jobs; raises OVERLOADED when the backend's queue is full."""
        if len(self._queued) >= self.cfg.max_queue and self.waiting() >= self.cfg.max_queue:
            raise Overloaded(f"backend {self.cfg.name!r} has {len(self._queued)} requests waiting "
                             f"(max_queue = {self.cfg.max_queue}); retry later")
        cls = self.default_priority if priority is None else PRIORITY_CLASSES[priority]
        jobs = make_jobs(req, self.cfg.part_tokens, cls, self.table.peer_tokens.get(req.peer, 0),
                         self.cfg.interactive_tokens)
        if jobs[0].interactive and self.table.others_tokens(req.peer) > self.cfg.interactive_tokens:
            # a query while other clients hold bulk work: keep their passes short for a while, so the
            # next query does not wait behind a long one (without such work, short passes help nobody)
            self.sizer.note_interactive(time.monotonic(), high=cls == HIGH)
        for job in jobs:
            self.queue.push(job)
        self._queued[req.seq] = req

    def assign(self, ready: list[WorkerProcess]) -> dict[WorkerProcess, list[Job]]:
        """Hand waiting jobs to ready workers; returns what to send, one message per worker."""
        outbox: dict[WorkerProcess, list[Job]] = {}
        if not ready or not (self.queue or self.staged or self.suspects):
            return outbox
        now = time.monotonic()
        lane = None
        if self.suspects:  # keep one worker free of new work so suspects can run alone on it
            lane = next((w for w in ready if w.isolating), None) or min(ready, key=lambda w: len(w.inflight))
            while self.suspects and not lane.inflight:
                job = self.suspects.popleft()
                if job.alive():
                    lane.isolating = True
                    self._hand(lane, [job], now, outbox)
        # a worker running a suspect alone gets nothing else until it is done, even when it is no longer the lane
        # one pass per worker: what waits stays here, where a newly arrived query can still go first
        # (bulk passes are planned a few ahead, sorted by length, so holding them back costs no padding)
        for w in ready:
            if w is not lane and not w.isolating:
                if not self.passes.get(w.wid) and len(w.inflight) < self.cfg.max_inflight:
                    jobs = self._next_pass(now, self.cfg.max_inflight - len(w.inflight))
                    if not jobs:
                        return outbox
                    self._hand(w, jobs, now, outbox)
        return outbox

    def _next_pass(self, now: float, max_units: int) -> list[Job]:
        """Queries and higher priorities first; bulk work in passes planned a few ahead, sorted by length
        (little padding) and sized for the work around (short while queries are)."""
        budget = self.sizer.budget(now)
        if self.staged and budget < REPLAN_SHARE * self._staged_budget:
            self._unstage()   # queries came (or high-priority ones): the passes planned are too long now
        nxt = self.queue.peek()
        while self.staged:
            jobs = [j for j in self.staged[0] if j.alive()]
            if not jobs:
                self.staged.popleft()
                continue
            if nxt is not None and (nxt.interactive or nxt.priority < jobs[0].priority):
                break
            self.staged.popleft()
            self.queue.served(jobs[0].priority)   # the guaranteed share counts planned passes too
            return self._at_most(jobs, max_units)
        if nxt is not None and not nxt.interactive:
            self._staged_budget = budget
            # ahead of passes planned earlier: those stopped here for this work (higher priority)
            self.staged.extendleft(reversed(plan_bulk_window(self.queue, self.cfg.max_batch_size, budget,
                                                             BULK_WINDOW_PASSES)))
            if self.staged:
                return self._at_most(self.staged.popleft(), max_units)
        return compose_pass(self.queue, self.sizer, now, self.cfg.max_batch_size, max_units)

    def _unstage(self) -> None:
        """Planned passes back to the head of their queues, in order."""
        for jobs in reversed(self.staged):
            for job in reversed(jobs):
                self.queue.push_front(job)
        self.staged.clear()

    def _at_most(self, jobs: list[Job], max_units: int) -> list[Job]:
        """A planned pass cut to what the worker may still hold (max_inflight), the rest going next;
        or, when it is short, topped up with bulk work that arrived since it was planned."""
        if len(jobs) > max_units:
            self.staged.appendleft(jobs[max_units:])
            return jobs[:max_units]
        return top_up(jobs, self.queue, self.cfg.max_batch_size, self._staged_budget, max_units)

    def _hand(self, w: WorkerProcess, jobs: list[Job], now: float, outbox: dict[WorkerProcess, list[Job]]) -> None:
        for job in jobs:
            job.attempts += 1
            job.req.hand_to(w.wid, now)
            self._queued.pop(job.req.seq, None)
            w.inflight[job.seq] = job
        self.passes.setdefault(w.wid, deque()).append(_Pass({j.seq for j in jobs}, sum(j.cost for j in jobs), now))
        outbox.setdefault(w, []).extend(jobs)

    def finished(self, w: WorkerProcess, seq: int) -> Job | None:
        """The worker returned job ``seq``: it no longer holds it."""
        job = w.inflight.pop(seq, None)
        if job is None:
            return None
        if w.isolating and not w.inflight:
            w.isolating = False
        passes = self.passes.get(w.wid)
        if passes:
            self._pass_progress(w.wid, passes, seq)
        return job

    def _pass_progress(self, wid: str, passes: deque[_Pass], seq: int) -> None:
        for p in passes:
            p.seqs.discard(seq)
        now = time.monotonic()
        while passes and not passes[0].seqs:
            done = passes.popleft()
            # it started when it was handed over or when the pass before it ended, whichever came later
            self.sizer.observe(done.tokens, now - max(done.sent, self._pass_end.get(wid, 0.0)))
            self._pass_end[wid] = now

    def forget_worker(self, w: WorkerProcess) -> None:
        self.passes.pop(w.wid, None)
        self._pass_end.pop(w.wid, None)

    def fail_waiting(self, err: EmbedError) -> None:
        staged = [j for jobs in self.staged for j in jobs if j.alive()]
        self.staged.clear()
        for job in self.queue.clear() + staged + [j for j in self.suspects if j.alive()]:
            if not job.probe:
                self.table.fail(job.req, err)
        self.suspects.clear()
        self._queued.clear()

    # ---- a worker died holding jobs -------------------------------------------------------------
    def rescue(self, w: WorkerProcess, reason: str, *, planned: bool, can_retry: bool) -> None:
        """Answer or re-run every job the dead worker held; find the poison input if there is one."""
        held = sorted(w.inflight.values(), key=lambda j: j.seq)
        w.inflight.clear()
        self.forget_worker(w)
        for job in held:
            job.req.back_to_queue(suspect=False)
        if planned:   # it exited cleanly while draining: not a suspect, nothing ran wrongly
            self._retry(reversed(held), can_retry, reason, suspect=False)
            return
        if w.hung:    # only what the last heartbeat said was running is suspect; the rest never started
            running = [j for j in held if j.seq in w.running]
            waited = [j for j in held if j.seq not in w.running]
            self._retry(reversed(waited), can_retry, reason, suspect=False)
            held = running
        if (w.isolating or w.hung) and len(held) == 1:
            self._quarantine(held[0], "hung" if w.hung else "crashed", reason, hung=w.hung)
            return
        if w.hung and can_retry:  # a hang inside a batch: re-run each job alone (as a probe if already answered)
            now = time.monotonic()
            for job in reversed(held):
                if job.answered:
                    job.probe, job.deadline = True, now + job.req.budget_s
                self.suspects.appendleft(job)
            return
        self._retry(reversed(held), can_retry, reason, suspect=True)

    def _retry(self, jobs: Iterable[Job], can_retry: bool, reason: str, *, suspect: bool) -> None:
        now = time.monotonic()
        for job in jobs:
            if job.answered:
                continue
            if not can_retry or (suspect and job.attempts >= 2) or job.deadline <= now:
                self.table.fail(job.req, WorkerDied(f"the {self.cfg.name} worker died holding this request "
                                                    f"({reason})"))
            elif suspect:
                job.req.back_to_queue(suspect=True)
                self.suspects.appendleft(job)
            else:
                self.queue.push_front(job)
                self._queued[job.req.seq] = job.req

    def _quarantine(self, job: Job, what: str, reason: str, *, hung: bool) -> None:
        seconds = self.cfg.policy.quarantine_s
        self.quarantine.add(job.texts, seconds, f"this input {what} a {self.cfg.name} worker ({reason})")
        log.warning("poison input: backend=%s request=%r texts=%d quarantined=%.0fs reason=%s",
                    self.cfg.name, clip_id(job.req.rid), len(job.texts), seconds, reason)
        self.table.fail(job.req, PoisonInput(
            f"this input {what} the {self.cfg.name} worker{'' if hung else ' twice'} ({reason}); "
            f"it is refused for {seconds:.0f} s"))


def clip_id(rid: object) -> str:
    text = repr(rid)
    return text if len(text) <= 80 else text[:77] + "..."
