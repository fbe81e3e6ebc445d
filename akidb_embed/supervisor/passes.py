"""How much work goes into a worker's next forward pass, and how work is measured (estimated tokens).

The supervisor never tokenizes: it estimates a text's tokens from its length (about four characters
per token for English subword vocabularies, plus the special tokens), which is all the scheduler
needs to compare work. It learns the backend's speed (seconds per estimated token, an exponentially
weighted mean over the passes it has timed) and sizes passes in time:

* while queries are around (small requests from clients with little else waiting, seen within
  ``interactive_window_s``), a bulk pass holds about ``latency_pass_ms`` of work, so a newly arriving
  query never waits behind more than that; about ``high_latency_pass_ms`` while high-priority
  queries are around;
* otherwise passes grow to ``max_batch_tokens``, the most efficient size.
"""
from __future__ import annotations

from typing import Protocol, TypeVar

from akidb_embed.supervisor.fairqueue import FairQueue

CHARS_PER_TOKEN = 4
SPECIAL_TOKENS = 2
EWMA_WEIGHT = 0.2
MIN_TIMED_TOKENS = 64    # shorter passes are mostly fixed per-pass cost: they would skew the rate


def estimate_tokens(text: str, max_tokens: int = 512) -> int:
    return min(max_tokens, len(text) // CHARS_PER_TOKEN + SPECIAL_TOKENS)


class PassSizer:
    def __init__(self, max_batch_tokens: int, latency_pass_ms: float, interactive_window_s: float,
                 high_latency_pass_ms: float | None = None) -> None:
        self.max_batch_tokens = max_batch_tokens
        self.latency_pass_s = latency_pass_ms / 1000.0
        self.high_latency_pass_s = (latency_pass_ms if high_latency_pass_ms is None else high_latency_pass_ms) / 1000.0
        self.window_s = interactive_window_s
        self.s_per_token: float | None = None       # learned from timed passes
        self.interactive_until = float("-inf")      # monotonic time until which passes stay short
        self.high_until = float("-inf")             # ... and until which they stay shorter

    def observe(self, tokens: int, seconds: float) -> None:
        """A pass of ``tokens`` estimated tokens took ``seconds`` from hand-over to its last answer."""
        if tokens < MIN_TIMED_TOKENS or seconds <= 0:
            return
        rate = seconds / tokens
        self.s_per_token = rate if self.s_per_token is None else (
            (1 - EWMA_WEIGHT) * self.s_per_token + EWMA_WEIGHT * rate)

    def note_interactive(self, now: float, high: bool = False) -> None:
        self.interactive_until = now + self.window_s
        if high:
            self.high_until = now + self.window_s

    def budget(self, now: float) -> int:
        """Estimated tokens the next pass may hold (a pass always holds at least one unit)."""
        if now >= self.interactive_until or self.s_per_token is None:
            return self.max_batch_tokens
        seconds = self.high_latency_pass_s if now < self.high_until else self.latency_pass_s
        return max(1, min(self.max_batch_tokens, int(seconds / self.s_per_token)))

    def interactive(self, now: float) -> bool:
        return now < self.interactive_until


class Work(Protocol):
    """What a pass is made of: a queued unit (see fairqueue.Unit) with its size and kind."""
    @property
    def peer(self) -> bytes: ...
    @property
    def priority(self) -> int: ...
    @property
    def cost(self) -> int: ...             # estimated tokens
    @property
    def n_texts(self) -> int: ...
    @property
    def interactive(self) -> bool: ...   # a small request from a client with little else queued (a query)

    def alive(self) -> bool: ...


W = TypeVar("W", bound=Work)


def compose_pass(queue: FairQueue[W], sizer: PassSizer, now: float, max_texts: int,
                 max_units: int = 1 << 30) -> list[W]:
    """The units of the next pass, in the queue's order. A pass holds one kind of work: queries
    together (up to the efficient size: they are all waited for), or bulk work sized by
    :meth:`PassSizer.budget`; the first unit of the other kind ends it, and runs next. At most
    ``max_units`` units (what the worker may still hold under ``max_inflight``)."""
    if max_units < 1:
        return []
    first = queue.pop()
    if first is None:
        return []
    units, tokens, texts = [first], first.cost, first.n_texts
    budget = sizer.max_batch_tokens if first.interactive else sizer.budget(now)
    while True:
        nxt = queue.peek()
        if (nxt is None or nxt.interactive != first.interactive or tokens + nxt.cost > budget
                or texts + nxt.n_texts > max_texts or len(units) >= max_units):
            return units
        queue.pop()
        units.append(nxt)
        tokens += nxt.cost
        texts += nxt.n_texts


def plan_bulk_window(queue: FairQueue[W], max_texts: int, max_tokens: int, window_passes: int) -> list[list[W]]:
    """With no query around: the next ``window_passes`` passes' worth of bulk units of one priority
    (in texts and in tokens), sorted by length per text and cut into passes. Texts of similar length
    share a pass, so little of it is padding (the sort the worker can do within one pass, done over
    several). Work arriving later waits behind at most the window."""
    units: list[W] = []
    texts = tokens = 0
    while True:
        nxt = queue.peek()
        if (nxt is None or nxt.interactive or (units and nxt.priority != units[0].priority)
                or (units and (texts + nxt.n_texts > window_passes * max_texts
                               or tokens + nxt.cost > window_passes * max_tokens))):
            break
        queue.pop()
        units.append(nxt)
        texts += nxt.n_texts
        tokens += nxt.cost
    units.sort(key=lambda u: u.cost / max(1, u.n_texts))
    passes: list[list[W]] = []
    current: list[W] = []
    n = tokens = 0
    for u in units:
        if current and (n + u.n_texts > max_texts or tokens + u.cost > max_tokens):
            passes.append(current)
            current, n, tokens = [], 0, 0
        current.append(u)
        n += u.n_texts
        tokens += u.cost
    if current:
        passes.append(current)
    return passes


def top_up(units: list[W], queue: FairQueue[W], max_texts: int, max_tokens: int, max_units: int) -> list[W]:
    """A planned bulk pass that is not full (the short end of a window) filled up, at hand-over time,
    with bulk units of its priority that arrived since it was planned, in the queue's order: a pass
    of 6 texts where 16 fit would waste most of a forward pass's fixed cost."""
    texts = sum(u.n_texts for u in units)
    tokens = sum(u.cost for u in units)
    while len(units) < max_units:
        nxt = queue.peek()
        if (nxt is None or nxt.interactive or nxt.priority != units[0].priority
                or texts + nxt.n_texts > max_texts or tokens + nxt.cost > max_tokens):
            break
        queue.pop()
        units.append(nxt)
        texts += nxt.n_texts
        tokens += nxt.cost
    return units
