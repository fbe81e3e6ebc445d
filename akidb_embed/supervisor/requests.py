"""The request table: one record per request, its deadline, and the one function that answers it.

State machine of a request (``Request.state``)::

    QUEUED --hand_to(w)--> RUNNING --(worker died, retry)--> QUEUED | RETRYING (suspect, runs alone)
       \\                     |                                   |
        \\                    +--done / error / timeout / --------+--> ANSWERED (only via RequestTable.answer)
         +--timeout / backend stopped or failed / shutdown ----------> ANSWERED

A request runs as one job, or as several when it is large (jobs.py): the states above describe its
jobs together (RUNNING once any of them was handed to a worker). Every other container (a
backend's queue, a worker's in-flight map) holds jobs that refer to these records and skips those
already ANSWERED; only :meth:`RequestTable.answer` sets that state, and :meth:`job_answered`
assembles a split request's answer from its parts' answers.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Protocol

from akidb_embed.protocol.errors import EmbedError, Timeout
from akidb_embed.protocol.messages import assemble_embed_parts, error_response
from akidb_embed.supervisor.events import Events, RequestAnswered

log = logging.getLogger(__name__)

Reply = Callable[[list[bytes], bytes], None]


class PeerBook(Protocol):
    """Per-peer accounting kept in step with the table (supervisor/peers.py): every request the table
    records is added, and released at the one answer point."""
    def add(self, req: "Request") -> None: ...
    def release(self, req: "Request") -> None: ...


class RState(str, Enum):
    QUEUED = "queued"        # waiting in its backend's queue
    RUNNING = "running"      # handed to worker ``Request.worker``
    RETRYING = "retrying"    # its worker died holding it: waits to run alone on a worker (poison search)
    ANSWERED = "answered"    # the client has its answer; late results are dropped


@dataclass(eq=False, slots=True)
class Request:
    seq: int                    # supervisor-wide id, also used on the worker channel
    route: list[bytes]          # ROUTER envelope to answer the client with (identity[, b""])
    rid: Any                    # the client's request id
    frame: bytes                # the client's request frame, forwarded to the worker unchanged
    texts: list[str]
    backend: str
    arrived: float              # monotonic
    deadline: float             # monotonic; the worker gets what is left of it as a budget
    budget_s: float             # the time it was given (a re-run probe gets as much again)
    state: RState = RState.QUEUED
    worker: str | None = None   # wid of the worker it runs on (RUNNING)
    handed_at: float | None = None   # first hand-over (monotonic)
    last_handed: float | None = None
    est_tokens: int = 0         # estimated tokens of its texts (set when its jobs are made)
    parts: list[bytes | None] | None = None   # a split request: its parts' answers as they arrive
    parts_left: int = 0
    part_tokens: int = 0        # tokens the parts' answers reported so far

    @property
    def peer(self) -> bytes:
        """The client connection it came from (its ZeroMQ identity): for per-client accounting."""
        return self.route[0]

    @property
    def answered(self) -> bool:
        return self.state is RState.ANSWERED

    def expect_parts(self, n: int) -> None:
        self.parts = [None] * n
        self.parts_left = n

    def hand_to(self, wid: str, now: float) -> None:
        """One of its jobs went to worker ``wid``."""
        if self.state is not RState.ANSWERED:   # a probe stays answered: its result goes to nobody
            self.state = RState.RUNNING
        self.worker = wid
        self.last_handed = now
        if self.handed_at is None:
            self.handed_at = now

    def back_to_queue(self, suspect: bool) -> None:
        if not self.answered:
            self.state = RState.RETRYING if suspect else RState.QUEUED
        self.worker = None



class RequestTable:
    """Owns every request from arrival to answer; the deadlines; the answer point."""

    def __init__(self, reply: Reply, events: Events, peers: PeerBook | None = None) -> None:
        self._reply = reply
        self._events = events
        self._peers = peers
        self.live: dict[int, Request] = {}
        self.peer_tokens: dict[bytes, int] = {}   # estimated tokens of each client's live requests
        self.total_tokens = 0                     # ... and of every client's
        self._heap: list[tuple[float, int, Request]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self.live)

    def create(self, route: list[bytes], rid: Any, frame: bytes, texts: list[str], backend: str,
               timeout_s: float, now: float) -> Request:
        """A new record (not yet in the table: add it once its backend accepted it)."""
        self._seq += 1
        return Request(seq=self._seq, route=route, rid=rid, frame=frame, texts=texts, backend=backend,
                       arrived=now, deadline=now + timeout_s, budget_s=timeout_s)

    def add(self, req: Request) -> None:
        self.live[req.seq] = req
        self.peer_tokens[req.peer] = self.peer_tokens.get(req.peer, 0) + req.est_tokens
        self.total_tokens += req.est_tokens
        if self._peers is not None:
            self._peers.add(req)
        heapq.heappush(self._heap, (req.deadline, req.seq, req))
        if len(self._heap) > 2 * len(self.live) + 64:
            # answered entries leave the heap only from its top: behind one long-lived earlier deadline
            # they (and their request frames) would pile up; drop them all now and then (amortized O(1))
            self._heap = [e for e in self._heap if not e[2].answered]
            heapq.heapify(self._heap)

    @property
    def heap_size(self) -> int:
        return len(self._heap)

    # ---- the answer point ------------------------------------------------------------------
    def answer(self, req: Request, frame: bytes, code: str | None, tokens: int | None = None) -> bool:
        """Send ``frame`` to the client unless the request is answered already. The only place that
        answers a request the table holds. Returns whether it answered."""
        if req.state is RState.ANSWERED:
            return False
        req.state = RState.ANSWERED
        req.parts = None
        if self.live.pop(req.seq, None) is not None:
            self.total_tokens -= req.est_tokens
            left = self.peer_tokens.get(req.peer, 0) - req.est_tokens
            if left > 0:
                self.peer_tokens[req.peer] = left
            else:
                self.peer_tokens.pop(req.peer, None)
        if self._peers is not None:
            self._peers.release(req)
        self._reply(req.route, frame)
        now = time.monotonic()
        handed = req.handed_at
        self._events.emit(RequestAnswered(
            backend=req.backend, code=code, texts=len(req.texts), tokens=tokens,
            queue_s=(handed if handed is not None else now) - req.arrived,
            run_s=now - req.last_handed if req.last_handed is not None else 0.0, total_s=now - req.arrived))
        return True

    def job_answered(self, req: Request, index: int, frame: bytes, code: str | None, tokens: int | None) -> bool:
        """A worker's answer to one job of ``req``: the answer itself when the request is whole or the
        part failed; otherwise kept until every part is in, then assembled in order (vectors stay bytes)."""
        if req.parts is None or code is not None:
            return self.answer(req, frame, code, tokens)
        if req.state is RState.ANSWERED:
            return False
        if req.parts[index] is None:
            req.parts_left -= 1
            req.part_tokens += tokens or 0
        req.parts[index] = frame
        if req.parts_left:
            return False
        parts = [p for p in req.parts if p is not None]
        req.parts = None
        return self.answer(req, assemble_embed_parts(req.rid, parts), None, req.part_tokens)

    def others_tokens(self, peer: bytes) -> int:
        """Estimated tokens of every other client's live requests."""
        return self.total_tokens - self.peer_tokens.get(peer, 0)

    def fail(self, req: Request, err: EmbedError) -> bool:
        return self.answer(req, error_response(req.rid, err), err.code.value)

    def refuse(self, route: list[bytes], rid: Any, err: EmbedError, backend: str = "", texts: int = 0) -> None:
        """Answer a request that never entered the table (refused on arrival)."""
        self._reply(route, error_response(rid, err))
        self._events.emit(RequestAnswered(backend=backend, code=err.code.value, texts=texts, tokens=None,
                                          queue_s=0.0, run_s=0.0, total_s=0.0))

    def fail_all(self, err: EmbedError) -> None:
        for req in list(self.live.values()):
            self.fail(req, err)

    # ---- deadlines -------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].answered:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire(self, now: float) -> None:
        heap = self._heap
        while heap and (heap[0][2].answered or heap[0][0] <= now):
            _, _, req = heapq.heappop(heap)
            if req.answered:
                continue
            where = f"in worker {req.worker}" if req.state is RState.RUNNING else "waiting in queue"
            log.warning("request timeout: backend=%s id=%r texts=%d %s", req.backend, req.rid, len(req.texts),
                        where)
            self.fail(req, Timeout(f"no answer from backend {req.backend!r} within the deadline ({where})"))
