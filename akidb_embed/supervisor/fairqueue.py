"""Which waiting work goes next: priority classes, a guaranteed share for the lower ones, and fair
share between clients (peers) inside a class.

Inside a class, peers are served by deficit round robin on estimated tokens (each turn a peer may
spend ``quantum`` tokens), with the "new flows first" rule of FQ-CoDel: a peer that had nothing
waiting goes ahead of the peers that are already backlogged, for one unit. A client with one
short query is therefore served next, before a client that has thousands of texts queued, and a
client can no longer take the whole backend by sending more.

Between classes, the highest non-empty class goes first, except that a lower class that has been
passed over ``patience`` times in a row while it had work waiting is served now: ``low`` is never
starved while ``high`` keeps arriving (with the default patience of 20, it gets at least one unit in
21 while it has work).

Units are whatever the scheduler queues (a request, or one part of a split request); the queue
only reads ``peer``, ``priority`` (0 = high, 1 = normal, 2 = low), ``cost`` (estimated tokens) and
``alive()`` (False once the request was answered: such units are dropped when reached).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

HIGH, NORMAL, LOW = 0, 1, 2
PRIORITY_CLASSES = {"high": HIGH, "normal": NORMAL, "low": LOW}
DEFAULT_PATIENCE = {NORMAL: 10, LOW: 20}


class Unit(Protocol):
    @property
    def peer(self) -> bytes: ...
    @property
    def priority(self) -> int: ...
    @property
    def cost(self) -> int: ...

    def alive(self) -> bool: ...


U = TypeVar("U", bound=Unit)


class _Class(Generic[U]):
    """One priority class: a FIFO per peer, new peers ahead of backlogged ones, DRR between them."""

    def __init__(self, quantum: int) -> None:
        self.quantum = quantum
        self.queues: dict[bytes, deque[U]] = {}
        self.new: OrderedDict[bytes, None] = OrderedDict()
        self.old: OrderedDict[bytes, None] = OrderedDict()
        self.deficit: dict[bytes, int] = {}
        self.tokens: dict[bytes, int] = {}     # estimated tokens queued per peer
        self.count = 0

    def _queue_of(self, peer: bytes) -> deque[U]:
        q = self.queues.get(peer)
        if q is None:
            q = self.queues[peer] = deque()
            self.new[peer] = None
            self.deficit[peer] = self.quantum
            self.tokens[peer] = 0
        return q

    def push(self, unit: U) -> None:
        self._queue_of(unit.peer).append(unit)
        self.tokens[unit.peer] += unit.cost
        self.count += 1

    def push_front(self, unit: U) -> None:
        self._queue_of(unit.peer).appendleft(unit)
        self.tokens[unit.peer] += unit.cost
        self.count += 1

    def _select(self) -> bytes | None:
        """The peer whose first unit goes next. Dropping answered units and granting quanta here does
        not change the order, so selecting again right away gives the same peer (peek, then pop)."""
        # each peer turn either finds a unit or grants a quantum, so this ends after a bounded number of turns
        while self.new or self.old:
            ring = self.new if self.new else self.old
            peer = next(iter(ring))
            q = self.queues[peer]
            while q and not q[0].alive():
                self.tokens[peer] -= q.popleft().cost
                self.count -= 1
            if not q:
                self._forget(ring, peer)
                continue
            if self.deficit[peer] <= 0:
                # turn over: a fresh quantum, to the back of the backlogged peers
                self.deficit[peer] += self.quantum
                del ring[peer]
                self.old[peer] = None
                continue
            return peer
        return None

    def peek(self) -> U | None:
        peer = self._select()
        return None if peer is None else self.queues[peer][0]

    def pop(self) -> U | None:
        peer = self._select()
        if peer is None:
            return None
        ring = self.new if peer in self.new else self.old
        q = self.queues[peer]
        unit = q.popleft()
        self.count -= 1
        self.tokens[peer] -= unit.cost
        self.deficit[peer] -= max(1, unit.cost)
        if not q:
            self._forget(ring, peer)
        elif ring is self.new:   # a new peer's head start is one unit; then it queues with the others
            del ring[peer]
            self.old[peer] = None
        return unit
        return None

    def _forget(self, ring: OrderedDict[bytes, None], peer: bytes) -> None:
        del ring[peer]
        del self.queues[peer]
        del self.deficit[peer]
        del self.tokens[peer]

    def units(self) -> Iterator[U]:
        for q in self.queues.values():
            yield from q


class FairQueue(Generic[U]):
    def __init__(self, quantum: int = 512, patience: dict[int, int] | None = None) -> None:
        self.classes: list[_Class[U]] = [_Class(quantum) for _ in PRIORITY_CLASSES]
        self.patience = DEFAULT_PATIENCE if patience is None else patience
        self.passed_over = [0] * len(self.classes)   # units served from higher classes while this one waited

    def push(self, unit: U) -> None:
        self.classes[unit.priority].push(unit)

    def peek(self) -> U | None:
        """The unit :meth:`pop` would return now."""
        while True:
            cls = self._next_class()
            if cls is None:
                return None
            unit = self.classes[cls].peek()
            if unit is not None:
                return unit

    def pop(self) -> U | None:
        """The next unit to run, or None when nothing alive is waiting."""
        while True:
            cls = self._next_class()
            if cls is None:
                return None
            unit = self.classes[cls].pop()
            if unit is not None:
                self._account(cls)
                return unit

    def _next_class(self) -> int | None:
        """The highest class with work, unless a lower one with work has run out of patience."""
        first = None
        for c, q in enumerate(self.classes):
            if q.count:
                if first is None:
                    first = c
                elif self.passed_over[c] >= self.patience.get(c, 1 << 62):
                    return c
        return first

    def served(self, cls: int) -> None:
        """A unit of class ``cls`` ran without being popped here (a pass planned ahead from units popped
        earlier): it counts for the guaranteed share as if popped, so a lower class whose patience ran out
        is not served again and again while higher work waits."""
        self._account(cls)

    def _account(self, cls: int) -> None:
        self.passed_over[cls] = 0
        for c in range(cls + 1, len(self.classes)):
            if self.classes[c].count:
                self.passed_over[c] += 1

    def push_front(self, unit: U) -> None:
        """Back at the head of its peer's queue (a job whose worker stopped before running it)."""
        self.classes[unit.priority].push_front(unit)

    def peer_tokens(self, peer: bytes) -> int:
        """Estimated tokens ``peer`` has waiting, in every class."""
        return sum(q.tokens.get(peer, 0) for q in self.classes)

    def __len__(self) -> int:
        """Units waiting, including answered ones not reached yet (they are dropped when reached)."""
        return sum(q.count for q in self.classes)

    def units(self) -> Iterator[U]:
        for q in self.classes:
            yield from q.units()

    def clear(self) -> list[U]:
        """Remove and return every unit still alive (a stop or a FAILED backend answers them)."""
        alive = [u for u in self.units() if u.alive()]
        quantum = self.classes[0].quantum
        self.classes = [_Class(quantum) for _ in PRIORITY_CLASSES]
        return alive
