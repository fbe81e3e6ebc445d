"""Requests the supervisor holds: their deadlines, retries, and the quarantine of poison inputs."""
from __future__ import annotations

import hashlib
import heapq
import time
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class Pending:
    seq: int                    # supervisor-wide id used on the worker channel
    route: list[bytes]          # ROUTER envelope to answer the client with (identity[, b""])
    rid: Any                    # the client's request id
    frame: bytes                # the client's request frame, forwarded to the worker unchanged
    texts: list[str]
    backend: str
    deadline: float             # wall clock (time.time()); travels to the worker
    attempts: int = 0           # dispatches so far
    answered: bool = False
    worker: str | None = None   # wid holding it now
    arrived: float = 0.0        # monotonic times, for the metrics' RequestAnswered event:
    handed_first: float = 0.0   # first hand-over to a worker (0 = never)
    handed_last: float = 0.0    # latest hand-over


class DeadlineHeap:
    """Pending requests ordered by deadline; answered ones are dropped lazily."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Pending]] = []

    def push(self, p: Pending) -> None:
        heapq.heappush(self._heap, (p.deadline, p.seq, p))

    def __len__(self) -> int:
        return len(self._heap)

    def compact(self) -> None:
        """Drop every answered entry, not only those on top of the heap."""
        self._heap = [entry for entry in self._heap if not entry[2].answered]
        heapq.heapify(self._heap)

    def next_deadline(self) -> float | None:
        while self._heap and self._heap[0][2].answered:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def pop_expired(self, now: float) -> list[Pending]:
        out = []
        while self._heap and (self._heap[0][2].answered or self._heap[0][0] <= now):
            _, _, p = heapq.heappop(self._heap)
            if not p.answered:
                out.append(p)
        return out


def fingerprint(texts: list[str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


class Quarantine:
    """Fingerprints of inputs that crashed a worker, refused until they expire.

    A one-text request that crashed a worker quarantines that text wherever it appears again; a
    multi-text request quarantines the exact list.
    """

    def __init__(self) -> None:
        self._until: dict[str, tuple[float, str]] = {}   # fingerprint -> (expiry, reason)

    def add(self, texts: list[str], seconds: float, reason: str) -> None:
        self._until[fingerprint(texts)] = (time.monotonic() + seconds, reason)

    def check(self, texts: list[str]) -> str | None:
        """The reason the input is quarantined, or None. Costs nothing while the quarantine is empty."""
        if not self._until:
            return None
        now = time.monotonic()
        for key in [k for k, (until, _) in self._until.items() if until <= now]:
            del self._until[key]
        for key in [fingerprint(texts)] + ([fingerprint([t]) for t in texts] if len(texts) > 1 else []):
            hit = self._until.get(key)
            if hit:
                return f"{hit[1]}; refused for another {hit[0] - now:.0f} s"
        return None

    def __len__(self) -> int:
        return len(self._until)
