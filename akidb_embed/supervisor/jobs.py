"""Jobs: what a worker runs. A request is one job, or several when it is large (its parts).

A small request's job carries the client's frame unchanged, and its answer is forwarded unchanged.
A large request is cut into parts of about ``part_tokens`` estimated tokens, each a job with its own
frame; the request table assembles their answers, in order, into one answer. Parts are scheduled
like any other job, so a query arriving behind a 4,096-text ingest waits for one pass, not for the
whole ingest.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from akidb_embed.protocol.messages import embed_part_frames
from akidb_embed.supervisor.passes import estimate_tokens

if TYPE_CHECKING:
    from akidb_embed.supervisor.requests import Request

_seqs = itertools.count(1)


@dataclass(eq=False, slots=True)
class Job:
    seq: int                 # its id on the worker channel
    req: Request
    index: int               # which part of its request (0 when it is whole)
    frame: bytes             # what the worker gets: the client's frame, or the part's
    texts: list[str]
    cost: int                # estimated tokens
    priority: int            # 0 high, 1 normal, 2 low
    interactive: bool        # a query: a small request from a client with little else queued
    deadline: float          # monotonic: the request's (a probe gets a new one)
    attempts: int = 0        # hand-overs so far
    probe: bool = False      # its request was answered; re-run only to find the input that hung a worker

    @property
    def peer(self) -> bytes:
        return self.req.peer

    @property
    def n_texts(self) -> int:
        return len(self.texts)

    @property
    def answered(self) -> bool:
        return self.req.answered

    def alive(self) -> bool:
        """Still worth running (the fair queue drops the others when it reaches them)."""
        return self.probe or not self.req.answered

    def budget_ms(self, now: float) -> int:
        return max(1, int((self.deadline - now) * 1000))


def part_bounds(costs: list[int], part_tokens: int) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive texts of at most ``part_tokens`` each (at least one text)."""
    bounds: list[tuple[int, int]] = []
    start, acc = 0, 0
    for i, cost in enumerate(costs):
        if i > start and acc + cost > part_tokens:
            bounds.append((start, i))
            start, acc = i, 0
        acc += cost
    bounds.append((start, len(costs)))
    return bounds


def make_jobs(req: Request, part_tokens: int, priority: int, peer_held_tokens: int,
              interactive_tokens: int) -> list[Job]:
    """The jobs of a new request: one when it fits in a part, else one per part. It is a query when
    it and everything else its client has in the server fit in ``interactive_tokens``."""
    costs = [estimate_tokens(t) for t in req.texts]
    total = req.est_tokens = sum(costs)
    interactive = total + peer_held_tokens <= interactive_tokens
    if total <= part_tokens or len(costs) == 1:
        return [Job(next(_seqs), req, 0, req.frame, req.texts, total, priority, interactive, req.deadline)]
    bounds = part_bounds(costs, part_tokens)
    frames = embed_part_frames(req.frame, bounds)
    req.expect_parts(len(bounds))
    return [Job(next(_seqs), req, i, frame, req.texts[a:b], sum(costs[a:b]), priority, interactive, req.deadline)
            for i, ((a, b), frame) in enumerate(zip(bounds, frames))]
