"""Pass sizing: short passes while interactive work is around, efficient ones otherwise."""
from __future__ import annotations

from dataclasses import dataclass

from akidb_embed.supervisor.fairqueue import FairQueue
from akidb_embed.supervisor.passes import PassSizer, compose_pass, estimate_tokens, plan_bulk_window, top_up


@dataclass(eq=False)
class W:
    """A queued unit as the pass functions see it."""
    peer: bytes
    cost: int
    n_texts: int = 1
    interactive: bool = False
    priority: int = 1

    def alive(self) -> bool:
        return True


def test_token_estimate_grows_with_length_and_is_capped() -> None:
    assert estimate_tokens("") == 2
    assert estimate_tokens("x" * 400) == 102
    assert estimate_tokens("x" * 100_000, max_tokens=512) == 512


def test_passes_are_full_size_until_interactive_work_is_seen() -> None:
    s = PassSizer(max_batch_tokens=4096, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(1000, 0.2)                       # 0.2 ms per token
    assert s.budget(now=10.0) == 4096
    s.note_interactive(now=10.0)
    assert s.budget(now=10.5) == 150           # 30 ms / 0.2 ms
    assert s.budget(now=12.0) == 4096          # the window has passed


def test_short_passes_do_not_teach_the_rate_and_the_rate_is_a_moving_mean() -> None:
    s = PassSizer(max_batch_tokens=4096, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(8, 0.05)                         # one short query: fixed cost, ignored
    assert s.s_per_token is None
    s.observe(100, 0.1)
    s.observe(100, 0.2)
    assert s.s_per_token is not None and 0.001 < s.s_per_token < 0.002
    s.note_interactive(0.0)
    assert 1 <= s.budget(0.0) <= 30


def test_a_pass_holds_one_kind_of_work_within_its_budget() -> None:

    s = PassSizer(max_batch_tokens=1000, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(1000, 0.3)                       # 0.3 ms per token: a short pass is 100 tokens
    q: FairQueue[W] = FairQueue(quantum=10_000)
    for _ in range(20):
        q.push(W(b"bulk", 40, 1, False))
    assert len(compose_pass(q, s, now=0.0, max_texts=16)) == 16          # no queries: efficient size (texts cap)
    s.note_interactive(0.0)
    assert len(compose_pass(q, s, now=0.0, max_texts=16)) == 2           # queries around: 100 tokens
    q.push(W(b"q1", 5, 1, True))
    q.push(W(b"q2", 5, 1, True))
    got = compose_pass(q, s, now=0.0, max_texts=16)
    assert [w.peer for w in got] == [b"q1", b"q2"]                       # new peers first, queries together
    assert all(not w.interactive for w in compose_pass(q, s, now=0.0, max_texts=16))
    q.push(W(b"q3", 5, 1, True))
    q.push(W(b"q4", 5, 1, True))
    q.push(W(b"q5", 5, 1, True))
    assert [w.peer for w in compose_pass(q, s, now=0.0, max_texts=16, max_units=2)] == [b"q3", b"q4"]
    assert compose_pass(q, s, now=0.0, max_texts=16, max_units=0) == []   # the worker holds max_inflight
    assert [w.peer for w in compose_pass(q, s, now=0.0, max_texts=16, max_units=1)] == [b"q5"]


def test_estimates_are_capped_at_512_by_default() -> None:
    assert estimate_tokens("x" * 2036) == 511
    assert estimate_tokens("x" * 2040) == 512
    assert estimate_tokens("x" * 2044) == 512


def test_passes_of_64_tokens_or_more_are_timed() -> None:
    s = PassSizer(max_batch_tokens=1000, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(63, 1.0)
    assert s.s_per_token is None
    s.observe(64, 0.64)
    assert s.s_per_token == 0.01


def test_high_priority_queries_use_the_shorter_pass() -> None:
    s = PassSizer(max_batch_tokens=1000, latency_pass_ms=40, interactive_window_s=2.0, high_latency_pass_ms=20)
    s.observe(1000, 1.0)                       # 1 ms per token
    assert s.interactive(0.0) is False
    s.note_interactive(0.0)
    assert s.interactive(1.9) is True and s.interactive(2.0) is False
    assert s.budget(0.0) == 40 and s.high_until == float("-inf")
    s.note_interactive(0.0, high=True)
    assert s.budget(0.0) == 20
    assert s.budget(2.5) == 1000               # nothing seen for the window: full passes again
    same = PassSizer(max_batch_tokens=1000, latency_pass_ms=40, interactive_window_s=2.0)
    same.observe(1000, 1.0)
    same.note_interactive(0.0, high=True)
    assert same.budget(0.0) == 40              # no high_latency_pass_ms: the latency pass


def test_an_empty_queue_composes_an_empty_pass() -> None:
    from akidb_embed.supervisor.fairqueue import FairQueue
    from akidb_embed.supervisor.passes import compose_pass
    s = PassSizer(max_batch_tokens=1000, latency_pass_ms=30, interactive_window_s=2.0)
    assert compose_pass(FairQueue(), s, now=0.0, max_texts=16) == []


def test_a_pass_timed_at_zero_seconds_teaches_nothing() -> None:
    s = PassSizer(max_batch_tokens=1000, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(100, 0.0)
    assert s.s_per_token is None


def test_the_rate_is_a_weighted_mean_and_a_pass_holds_at_least_one_token() -> None:
    s = PassSizer(max_batch_tokens=1000, latency_pass_ms=30, interactive_window_s=2.0)
    s.observe(100, 1.0)
    s.observe(100, 2.0)
    assert abs(s.s_per_token - (0.8 * 0.01 + 0.2 * 0.02)) < 1e-12
    s.observe(100, 1000.0)                     # very slow: the budget stays one token, not zero
    s.note_interactive(0.0)
    assert s.budget(0.0) == 1


def test_a_pass_is_filled_up_to_its_budget_exactly() -> None:

    s = PassSizer(max_batch_tokens=100, latency_pass_ms=30, interactive_window_s=2.0)
    q: FairQueue[W] = FairQueue(quantum=10_000)
    for _ in range(3):
        q.push(W(b"p", 50))
    assert len(compose_pass(q, s, now=0.0, max_texts=16)) == 2       # 50 + 50 == 100 fits


def test_the_high_priority_window_ends_before_the_query_window() -> None:
    s = PassSizer(max_batch_tokens=1000, latency_pass_ms=40, interactive_window_s=2.0, high_latency_pass_ms=20)
    s.observe(1000, 1.0)
    s.note_interactive(0.0, high=True)
    s.note_interactive(1.0)
    assert s.budget(1.99) == 20 and s.budget(2.0) == 40      # high ends at 2.0; queries stay around until 3.0


def test_bulk_window_sorts_by_length_and_stops_at_a_query_or_another_priority() -> None:

    q: FairQueue[W] = FairQueue(quantum=10**9)
    for cost in (90, 10, 50, 20, 80, 30, 70, 40):
        q.push(W(b"bulk", cost))
    passes = plan_bulk_window(q, max_texts=2, max_tokens=10**6, window_passes=3)
    assert [[w.cost for w in p] for p in passes] == [[10, 20], [30, 50], [80, 90]]
    assert [w.cost for w in plan_bulk_window(q, 2, 10**6, 3)[0]] == [40, 70]   # the rest, next time
    q.push(W(b"bulk", 5))
    q.push(W(b"bulk", 6, priority=2))
    assert [[w.cost for w in p] for p in plan_bulk_window(q, 2, 10**6, 3)] == [[5]]


def test_a_short_planned_pass_is_topped_up_with_bulk_work_of_its_priority_up_to_every_limit() -> None:
    q: FairQueue[W] = FairQueue(quantum=10**9)
    planned = [W(b"a", 10), W(b"a", 20)]
    for cost in (30, 40, 50, 60):
        q.push(W(b"b", cost))
    assert [w.cost for w in top_up(list(planned), q, max_texts=4, max_tokens=10**6, max_units=10)] == [10, 20, 30, 40]
    assert [w.cost for w in top_up(list(planned), q, max_texts=9, max_tokens=130, max_units=10)] == [10, 20, 50]
    assert [w.cost for w in top_up(list(planned), q, max_texts=9, max_tokens=10**6, max_units=2)] == [10, 20]
    q.push(W(b"c", 1, interactive=True))   # a query next ends it (it runs in a pass of queries) ...
    assert [w.cost for w in top_up(list(planned), q, 9, 10**6, 10)] == [10, 20] and len(q) == 2
    assert q.pop().interactive
    q.push(W(b"c", 1, priority=2))          # ... and so does work of another priority
    assert [w.cost for w in top_up(list(planned), q, 9, 10**6, 10)] == [10, 20, 60] and len(q) == 1


def test_a_pass_is_topped_up_to_its_token_budget_exactly() -> None:
    q: FairQueue[W] = FairQueue(quantum=10**9)
    for cost in (30, 40):
        q.push(W(b"b", cost))
    assert [w.cost for w in top_up([W(b"a", 30)], q, max_texts=9, max_tokens=100, max_units=10)] == [30, 30, 40]


def test_bulk_passes_are_cut_at_their_token_budget_exactly_and_an_oversized_unit_runs_alone() -> None:
    q: FairQueue[W] = FairQueue(quantum=10**9)
    for cost in (50, 50, 50, 300):
        q.push(W(b"bulk", cost))
    passes = plan_bulk_window(q, max_texts=16, max_tokens=100, window_passes=5)
    assert [[w.cost for w in p] for p in passes] == [[50, 50], [50], [300]]   # no empty pass before the big one


def test_bulk_work_is_sorted_by_tokens_per_text() -> None:
    q: FairQueue[W] = FairQueue(quantum=10**9)
    q.push(W(b"bulk", 10, n_texts=1))    # 10 per text
    q.push(W(b"bulk", 18, n_texts=3))    # 6 per text: shorter texts, first
    q.push(W(b"bulk", 8, n_texts=2))     # 4 per text
    passes = plan_bulk_window(q, max_texts=2, max_tokens=10**6, window_passes=4)
    assert [[w.cost for w in p] for p in passes] == [[8], [18], [10]]


def test_nothing_is_planned_when_no_bulk_work_is_next() -> None:
    q: FairQueue[W] = FairQueue(quantum=10**9)
    assert plan_bulk_window(q, 16, 10**6, 4) == []
    q.push(W(b"q", 5, interactive=True))
    assert plan_bulk_window(q, 16, 10**6, 4) == [] and len(q) == 1


def test_every_bulk_pass_of_a_window_gets_the_whole_token_budget() -> None:
    q: FairQueue[W] = FairQueue(quantum=10**9)
    for cost in (50, 50, 50, 50, 50, 51):
        q.push(W(b"bulk", cost))
    passes = plan_bulk_window(q, max_texts=16, max_tokens=100, window_passes=4)
    assert [[w.cost for w in p] for p in passes] == [[50, 50], [50, 50], [50], [51]]


def test_a_window_of_short_passes_holds_as_many_passes_as_a_window_of_long_ones():
    """Regression: a window was capped in texts only, so with 2-text passes (queries around) it held
    32 of them, and new work of its priority from another client waited behind all of them."""
    q: FairQueue[W] = FairQueue(quantum=10_000)
    for _ in range(100):
        q.push(W(b"ingest", 100))
    passes = plan_bulk_window(q, max_texts=16, max_tokens=200, window_passes=4)
    assert [len(p) for p in passes] == [2, 2, 2, 2] and len(q) == 92
