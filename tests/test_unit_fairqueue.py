"""The fair queue's order: priority classes with guaranteed shares, new peers first, DRR by tokens."""
from __future__ import annotations

from dataclasses import dataclass

from akidb_embed.supervisor.fairqueue import HIGH, LOW, NORMAL, FairQueue


@dataclass(eq=False)
class U:
    peer: bytes
    cost: int
    priority: int = NORMAL
    name: str = ""
    answered: bool = False

    def alive(self) -> bool:
        return not self.answered


def drain(q: FairQueue[U], n: int = 10_000) -> list[str]:
    out = []
    for _ in range(n):
        u = q.pop()
        if u is None:
            break
        out.append(u.name)
    return out


def test_a_new_peer_with_one_small_unit_goes_before_a_backlogged_peer() -> None:
    q: FairQueue[U] = FairQueue(quantum=512)
    for i in range(100):
        q.push(U(b"bulk", 300, name=f"b{i}"))
    assert q.pop().name == "b0"          # bulk is being served ...
    q.push(U(b"query", 10, name="q"))    # ... when a query arrives
    assert q.pop().name == "q"


def test_backlogged_peers_share_tokens_not_requests() -> None:
    q: FairQueue[U] = FairQueue(quantum=100)
    for _ in range(50):
        q.push(U(b"big", 100, name="big"))
        q.push(U(b"small", 10, name="small"))
    order = drain(q, 40)
    # per turn: one 100-token unit from big, ten 10-token units from small
    assert order.count("small") >= 8 * order.count("big") // 2
    assert order.count("big") >= 2


def test_priority_order_high_normal_low() -> None:
    q: FairQueue[U] = FairQueue()
    q.push(U(b"a", 10, LOW, "low"))
    q.push(U(b"b", 10, NORMAL, "normal"))
    q.push(U(b"c", 10, HIGH, "high"))
    assert drain(q) == ["high", "normal", "low"]
    for _ in range(3):
        for name, prio in (("low", LOW), ("normal", NORMAL), ("high", HIGH)):
            q.push(U(name.encode(), 10, prio, name))
    assert drain(q) == ["high"] * 3 + ["normal"] * 3 + ["low"] * 3


def test_low_is_never_starved_by_a_stream_of_high() -> None:
    q: FairQueue[U] = FairQueue(patience={NORMAL: 10, LOW: 20})
    for i in range(100):
        q.push(U(b"bulk", 10, LOW, f"low{i}"))
    served_low = 0
    for _ in range(420):
        q.push(U(b"query", 10, HIGH, "high"))
        if q.pop().name.startswith("low"):
            served_low += 1
    # one low unit after every 20 high ones: 20 of 420
    assert served_low == 20


def test_answered_units_are_skipped_and_clear_returns_only_alive_ones() -> None:
    q: FairQueue[U] = FairQueue()
    units = [U(b"p", 5, name=str(i)) for i in range(5)]
    for u in units:
        q.push(u)
    units[0].answered = units[3].answered = True
    assert q.pop().name == "1"
    alive = q.clear()
    assert sorted(u.name for u in alive) == ["2", "4"]
    assert q.pop() is None and len(q) == 0


def test_fifo_within_one_peer() -> None:
    q: FairQueue[U] = FairQueue(quantum=1)
    for i in range(10):
        q.push(U(b"p", 7, name=str(i)))
    assert drain(q) == [str(i) for i in range(10)]


def test_peek_shows_what_pop_returns() -> None:
    q: FairQueue[U] = FairQueue(quantum=50)
    for i in range(30):
        q.push(U(b"a", 40, NORMAL, f"a{i}"))
        q.push(U(b"b", 10, [HIGH, NORMAL, LOW][i % 3], f"b{i}"))
    q.classes[NORMAL].queues[b"a"][3].answered = True
    for _ in range(60):
        seen = q.peek()
        got = q.pop()
        assert seen is got
        if got is None:
            break


def test_peer_tokens_follow_pushes_pops_and_dropped_units() -> None:
    q: FairQueue[U] = FairQueue()
    a, b = U(b"p", 30), U(b"p", 20, LOW)
    q.push(a)
    q.push(b)
    q.push_front(U(b"x", 7))
    assert q.peer_tokens(b"p") == 50 and q.peer_tokens(b"x") == 7
    a.answered = True
    assert q.pop().peer == b"x"          # pushed to the front of a new peer: first
    assert q.pop() is b and q.peer_tokens(b"p") == 0 and q.peer_tokens(b"nobody") == 0


def test_default_patience_normal_after_10_high_low_after_20() -> None:
    q: FairQueue[U] = FairQueue()
    for _ in range(50):
        q.push(U(b"n", 10, NORMAL, "normal"))
        q.push(U(b"l", 10, LOW, "low"))
    order = []
    for _ in range(60):
        q.push(U(b"h", 10, HIGH, "high"))
        order.append(q.pop().name)
    # normal is passed over 10 times, then served; low after 20 units of the higher classes
    served = [(i, n) for i, n in enumerate(order) if n != "high"][:3]
    assert served == [(10, "normal"), (20, "low"), (22, "normal")]


def test_only_answered_units_left_means_nothing_to_pop() -> None:
    q: FairQueue[U] = FairQueue()
    dead = [U(b"a", 10, NORMAL, "a"), U(b"b", 10, LOW, "b")]
    for u in dead:
        q.push(u)
        u.answered = True
    assert q.peek() is None and q.pop() is None and len(q) == 0
    q2: FairQueue[U] = FairQueue()
    late = U(b"a", 10, NORMAL, "a")
    q2.push(late)
    late.answered = True
    assert q2.pop() is None and len(q2) == 0


def test_peer_tokens_drop_by_each_popped_unit_while_the_peer_has_more() -> None:
    q: FairQueue[U] = FairQueue()
    for cost in (30, 20, 10):
        q.push(U(b"p", cost))
    assert q.pop().cost == 30 and q.peer_tokens(b"p") == 30
    assert q.pop().cost == 20 and q.peer_tokens(b"p") == 10 and len(q) == 1


def test_a_peer_whose_queue_emptied_is_new_again_when_it_sends_more() -> None:
    q: FairQueue[U] = FairQueue(quantum=10_000)       # bulk keeps its turn: only the new-peer rule lets q2 in
    for i in range(50):
        q.push(U(b"bulk", 300, name=f"b{i}"))
    assert q.pop().name == "b0"
    q.push(U(b"query", 10, name="q1"))
    assert q.pop().name == "q1"
    assert q.pop().name == "b1"
    q.push(U(b"query", 10, name="q2"))
    assert q.pop().name == "q2"


def test_peek_looks_past_a_class_holding_only_answered_units() -> None:
    q: FairQueue[U] = FairQueue()
    dead = U(b"a", 5, HIGH, "dead")
    q.push(dead)
    q.push(U(b"b", 5, NORMAL, "alive"))
    dead.answered = True
    assert q.peek().name == "alive" and q.pop().name == "alive"


def test_pop_looks_past_a_class_holding_only_answered_units() -> None:
    q: FairQueue[U] = FairQueue()
    dead = U(b"a", 5, HIGH, "dead")
    q.push(dead)
    q.push(U(b"b", 5, NORMAL, "alive"))
    dead.answered = True
    assert q.pop().name == "alive"


def test_a_class_is_passed_over_only_while_it_has_work() -> None:
    q: FairQueue[U] = FairQueue(patience={NORMAL: 10, LOW: 20})
    for _i in range(30):
        q.push(U(b"h", 5, HIGH, "high"))
    for _ in range(25):
        assert q.pop().name == "high"      # low has nothing waiting: nobody is passed over
    q.push(U(b"l", 5, LOW, "low"))
    assert q.pop().name == "high"          # so low waits its turn like new work


def test_a_turn_ends_when_the_quantum_is_spent_exactly() -> None:
    q: FairQueue[U] = FairQueue(quantum=20)
    for _ in range(8):
        q.push(U(b"a", 10, name="a"))
        q.push(U(b"b", 10, name="b"))
    # each new peer first gets one unit; then two 10-token units per 20-token turn, never three
    assert "".join(drain(q)) == "ababaabbaabbaabb"


def test_a_peer_with_one_token_of_quantum_left_still_sends_its_next_unit():
    q: FairQueue[U] = FairQueue(quantum=21)
    for _ in range(6):
        q.push(U(b"a", 10, name="a"))
        q.push(U(b"b", 10, name="b"))
    # one unit each as new peers (21 -> 11 left), then 11 and 1 left are both "some": two units a turn
    assert "".join(drain(q)) == "ab" + "aabb" * 2 + "ab"


def test_a_class_without_patience_waits_for_the_higher_ones():
    q: FairQueue[U] = FairQueue(patience={NORMAL: 3})
    for _ in range(10):
        q.push(U(b"l", 10, LOW, "low"))
    order = []
    for _ in range(30):
        q.push(U(b"h", 10, HIGH, "high"))
        order.append(q.pop().name)
    assert "low" not in order


def test_a_unit_served_from_a_planned_pass_counts_for_the_guaranteed_share() -> None:
    q: FairQueue[U] = FairQueue(patience={LOW: 2})
    q.push(U(b"ingest", 100, LOW, "l"))
    for i in range(4):
        q.push(U(b"search", 5, HIGH, f"h{i}"))
    assert [q.pop().name, q.pop().name] == ["h0", "h1"]   # low passed over twice: its turn now
    q.served(LOW)                                           # a low pass planned earlier just ran
    assert q.pop().name == "h2"                             # so high goes first again
    q.served(HIGH)                                          # a high one ran: low was passed over
    assert q.pop().name == "l"
