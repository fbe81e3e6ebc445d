"""DeadlineHeap and Quarantine as pure logic."""
from __future__ import annotations

import time

import pytest

# The one place this file names production classes (the supervisor rebuild only changes this import).
from akidb_embed.supervisor.pending import (
    DeadlineHeap,
    Pending,
    Quarantine,
    fingerprint,
)


def pending(seq: int, deadline: float) -> Pending:
    return Pending(seq=seq, route=[b"c"], rid=seq, frame=b"", texts=[f"t{seq}"], backend="m", deadline=deadline)


# ---- DeadlineHeap ----------------------------------------------------------------------------------

def test_next_deadline_is_the_earliest_unanswered():
    h = DeadlineHeap()
    assert h.next_deadline() is None
    a, b, c = pending(1, 30.0), pending(2, 10.0), pending(3, 20.0)
    for p in (a, b, c):
        h.push(p)
    assert h.next_deadline() == 10.0
    b.answered = True
    assert h.next_deadline() == 20.0
    c.answered = True
    a.answered = True
    assert h.next_deadline() is None


def test_pop_expired_returns_due_unanswered_requests_in_deadline_order():
    h = DeadlineHeap()
    ps = [pending(i, d) for i, d in enumerate([5.0, 1.0, 3.0, 9.0])]
    for p in ps:
        h.push(p)
    ps[2].answered = True                      # deadline 3.0, already answered: not returned
    assert h.pop_expired(0.5) == []
    assert [p.deadline for p in h.pop_expired(5.0)] == [1.0, 5.0]   # 5.0 is due exactly at its deadline
    assert h.next_deadline() == 9.0
    assert h.pop_expired(8.99) == []
    assert [p.seq for p in h.pop_expired(100.0)] == [3]
    assert len(h) == 0


def test_an_answered_entry_behind_the_top_does_not_expire_the_top():
    h = DeadlineHeap()
    top, later = pending(1, 1.0), pending(2, 9.0)
    h.push(top)
    h.push(later)
    later.answered = True
    assert h.pop_expired(0.5) == []
    assert h.next_deadline() == 1.0


def test_compact_drops_every_answered_entry():
    h = DeadlineHeap()
    ps = [pending(i, 100.0 - i) for i in range(10)]
    for p in ps:
        h.push(p)
    for p in ps:
        p.answered = p.seq % 2 == 1           # the top of the heap (seq 9) is answered too
    h.compact()
    assert len(h) == 5
    assert [p.seq for p in h.pop_expired(1000.0)] == [8, 6, 4, 2, 0]


def test_compact_restores_the_heap_order():
    h = DeadlineHeap()
    ps = {d: pending(d, float(d)) for d in (1, 5, 2, 6, 7, 3, 4)}   # heap array [1, 5, 2, 6, 7, 3, 4]
    for d in (1, 5, 2, 6, 7, 3, 4):
        h.push(ps[d])
    ps[1].answered = True
    h.compact()                                   # [5, 2, 6, ...] is no heap until re-heapified
    assert h.next_deadline() == 2.0
    assert [p.deadline for p in h.pop_expired(100.0)] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_a_new_pending_request_is_undispatched_and_unanswered():
    p = pending(1, 10.0)
    assert (p.attempts, p.answered, p.worker) == (0, False, None)


# ---- Quarantine ------------------------------------------------------------------------------------

def test_quarantine_refuses_the_input_then_expires(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    q = Quarantine()
    assert q.check(["bad"]) is None
    q.add(["bad"], 5.0, "this input crashed a worker")
    reason = q.check(["bad"])
    assert reason and "crashed a worker" in reason and "5 s" in reason
    assert q.check(["good"]) is None
    assert len(q) == 1
    now[0] = 1004.9
    assert q.check(["bad"]) is not None
    now[0] = 1005.0                              # expired exactly at its end
    assert q.check(["bad"]) is None
    assert len(q) == 0


def test_quarantined_single_text_is_refused_inside_a_multi_text_request():
    q = Quarantine()
    q.add(["bad"], 60.0, "r")
    assert q.check(["ok", "bad"]) is not None
    assert q.check(["ok", "fine"]) is None


def test_quarantined_list_is_refused_only_as_that_list():
    q = Quarantine()
    q.add(["a", "b"], 60.0, "r")
    assert q.check(["a", "b"]) is not None
    assert q.check(["a"]) is None
    assert q.check(["b"]) is None
    assert q.check(["b", "a"]) is None


def test_fingerprint_separates_texts():
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint(["x"]) == fingerprint(["x"])


@pytest.mark.parametrize("seconds", [0.0, -1.0])
def test_quarantine_of_zero_seconds_refuses_nothing(seconds):
    q = Quarantine()
    q.add(["bad"], seconds, "r")
    assert q.check(["bad"]) is None
