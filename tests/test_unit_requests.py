"""The request table (deadlines, the one answer point, parts assembled), the quarantine, and the
scheduler's queue bound and retry-once rule, as pure logic (no sockets, no processes)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from akidb_embed.protocol.codec import unpack
from akidb_embed.protocol.errors import Overloaded, Timeout
from akidb_embed.protocol.messages import embed_response, error_response, request_frame
from akidb_embed.supervisor.config import BackendConfig
from akidb_embed.supervisor.events import Events
from akidb_embed.supervisor.quarantine import Quarantine, fingerprint
from akidb_embed.supervisor.requests import Request, RequestTable, RState
from akidb_embed.supervisor.scheduler import Scheduler


class Table:
    """A RequestTable whose answers are collected, decoded."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.table = RequestTable(lambda route, frame: self.sent.append(unpack(frame)), Events())

    def req(self, deadline: float, texts: list[str] | None = None, add: bool = True) -> Request:
        texts = texts or ["t"]
        r = self.table.create([b"c"], None, b"", texts, "m", 0.0, 0.0)
        r.rid, r.deadline, r.frame = r.seq, deadline, request_frame(r.seq, "embed", texts=texts)
        r.budget_s = 60.0
        if add:
            self.table.add(r)
        return r

    def codes(self) -> list[tuple[int, str | None]]:
        return [(m["id"], None if m.get("ok") else m["error"]["code"]) for m in self.sent]


# ---- deadlines -------------------------------------------------------------------------------------

def test_next_deadline_is_the_earliest_unanswered():
    t = Table()
    assert t.table.next_deadline() is None
    a, b, c = t.req(30.0), t.req(10.0), t.req(20.0)
    assert t.table.next_deadline() == 10.0
    t.table.fail(b, Timeout("x"))
    assert t.table.next_deadline() == 20.0
    t.table.fail(c, Timeout("x"))
    t.table.fail(a, Timeout("x"))
    assert t.table.next_deadline() is None


def test_expire_answers_due_unanswered_requests_timeout_in_deadline_order():
    t = Table()
    rs = [t.req(d) for d in (5.0, 1.0, 3.0, 9.0)]
    t.table.answer(rs[2], error_response(rs[2].rid, Timeout("early")), "X")   # deadline 3.0, answered already
    t.sent.clear()
    t.table.expire(0.5)
    assert t.sent == []
    t.table.expire(5.0)                                   # 5.0 is due exactly at its deadline
    assert t.codes() == [(rs[1].seq, "TIMEOUT"), (rs[0].seq, "TIMEOUT")]
    assert t.table.next_deadline() == 9.0
    t.table.expire(8.99)
    assert len(t.sent) == 2
    t.table.expire(100.0)
    assert t.codes()[-1] == (rs[3].seq, "TIMEOUT") and len(t.sent) == 3
    assert len(t.table) == 0 and t.table.heap_size == 0


def test_an_answered_entry_behind_the_top_does_not_expire_the_top():
    t = Table()
    top, later = t.req(1.0), t.req(9.0)
    t.table.fail(later, Timeout("x"))
    t.sent.clear()
    t.table.expire(0.5)
    assert t.sent == [] and not top.answered
    assert t.table.next_deadline() == 1.0


def test_add_drops_answered_entries_once_the_heap_outgrows_the_live_requests():
    t = Table()
    long_lived = t.req(1e9)                               # an early entry that stays: answered ones pile up behind
    for i in range(200):
        t.table.fail(t.req(1000.0 + i), Timeout("x"))
    assert t.table.heap_size <= 2 * len(t.table) + 64 + 1
    assert t.table.next_deadline() == 1e9 and not long_lived.answered


def test_compaction_restores_the_heap_order():
    t = Table()
    keep = {d: t.req(float(d)) for d in (50, 20, 60, 70, 30, 40)}
    for _ in range(72):                                   # answered entries with the earliest deadlines
        t.table.fail(t.req(1.0), Timeout("x"))
    assert t.table.heap_size == 78                        # not over 2 x 7 live + 64 yet
    keep[25] = t.req(25.0)                                # this add compacts
    assert t.table.heap_size == 7
    t.sent.clear()
    assert t.table.next_deadline() == 20.0
    t.table.expire(1000.0)
    assert [m["id"] for m in t.sent] == [keep[d].seq for d in sorted(keep)]


# ---- the answer point ------------------------------------------------------------------------------

def test_a_new_request_is_queued_and_not_handed_over():
    r = Table().req(10.0, add=False)
    assert (r.state, r.answered, r.worker, r.handed_at) == (RState.QUEUED, False, None, None)


def test_a_request_is_answered_exactly_once():
    t = Table()
    r = t.req(10.0)
    assert t.table.answer(r, error_response(r.rid, Timeout("a")), "TIMEOUT") is True
    assert t.table.answer(r, error_response(r.rid, Timeout("b")), "TIMEOUT") is False
    assert t.table.fail(r, Timeout("c")) is False
    assert len(t.sent) == 1 and r.answered and len(t.table) == 0
    t.table.expire(100.0)
    assert len(t.sent) == 1


def _part(rows: list[float], rid: int = 0) -> bytes:
    return embed_response(rid, np.array([[x, x] for x in rows], dtype=np.float32), dtype="float32", backend="m",
                          model="mock", truncated=0)


def test_parts_are_assembled_in_order_whatever_order_they_arrive_in():
    t = Table()
    r = t.req(10.0, texts=["a", "b", "c"])
    r.expect_parts(3)
    assert t.table.job_answered(r, 2, _part([3.0]), None, 1) is False
    assert t.table.job_answered(r, 0, _part([1.0]), None, 1) is False
    assert t.table.job_answered(r, 0, _part([1.0]), None, 1) is False     # a duplicate counts once
    assert t.sent == []
    events: list = []
    t.table._events.subscribe(events.append)
    assert t.table.job_answered(r, 1, _part([2.0]), None, 1) is True
    assert [(e.code, e.tokens, e.texts) for e in events] == [(None, 3, 3)]    # the parts' tokens, summed
    [out] = t.sent
    assert out["ok"] and out["id"] == r.rid and out["shape"] == [3, 2]
    assert np.frombuffer(out["data"], "<f4").reshape(3, 2)[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert t.table.job_answered(r, 1, _part([2.0]), None, 1) is False     # late: answered already


def test_a_failed_part_answers_the_request_at_once():
    t = Table()
    r = t.req(10.0, texts=["a", "b"])
    r.expect_parts(2)
    t.table.job_answered(r, 0, _part([1.0]), None, 1)
    assert t.table.job_answered(r, 1, error_response(r.rid, Timeout("x")), "TIMEOUT", None) is True
    assert t.codes() == [(r.rid, "TIMEOUT")]


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


# ---- Scheduler: the queue bound, retry once, isolation ----------------------------------------------

def scheduler(**kw) -> tuple[Scheduler, Table]:
    t = Table()
    return Scheduler(BackendConfig(name="m", kind="mock", **kw), t.table, Quarantine()), t


@dataclass(eq=False)
class FakeWorker:
    """What the scheduler reads of a WorkerProcess."""
    wid: str
    inflight: dict = field(default_factory=dict)
    isolating: bool = False
    hung: bool = False
    running: list = field(default_factory=list)


def worker(wid: str = "m.1") -> FakeWorker:
    return FakeWorker(wid)


def queued(s: Scheduler, t: Table, texts: list[str] | None = None) -> Request:
    r = t.req(time.monotonic() + 60.0, texts)
    s.admit(r, None)
    return r


def test_max_queue_is_the_exact_number_of_waiting_requests():
    s, t = scheduler(max_queue=3)
    for _ in range(3):
        queued(s, t)
    with pytest.raises(Overloaded):
        queued(s, t)
    assert s.waiting() == 3
    t.table.fail(next(iter(t.table.live.values())), Timeout("x"))   # an answered request frees its place
    queued(s, t)
    assert s.waiting() == 3


def test_a_request_retried_once_gets_worker_died_when_its_worker_dies_again():
    s, t = scheduler()
    a, b = queued(s, t, ["a"]), queued(s, t, ["b"])
    w1 = worker("m.1")
    s.assign([w1])
    assert sorted(j.req.seq for j in w1.inflight.values()) == [a.seq, b.seq]
    s.rescue(w1, "killed", planned=True, can_retry=True)        # a planned exit: back to the queue, not suspect
    w2 = worker("m.2")
    s.assign([w2])
    assert all(j.attempts == 2 for j in w2.inflight.values())
    s.rescue(w2, "SIGKILL", planned=False, can_retry=True)       # a crash after the one retry
    assert sorted(t.codes()) == sorted([(a.rid, "WORKER_DIED"), (b.rid, "WORKER_DIED")])


def test_requests_of_a_crashed_worker_are_rerun_alone_and_the_poison_one_is_quarantined():
    s, t = scheduler()
    a, b = queued(s, t, ["good"]), queued(s, t, ["poison"])
    w1 = worker("m.1")
    s.assign([w1])
    s.rescue(w1, "SIGKILL", planned=False, can_retry=True)
    assert t.sent == [] and [j.req for j in s.suspects] == [a, b]     # retried once each, in order, alone
    w2 = worker("m.2")
    s.assign([w2])
    assert [j.req for j in w2.inflight.values()] == [a] and w2.isolating
    [job] = w2.inflight.values()
    assert s.finished(w2, job.seq) is job and not w2.isolating
    t.table.job_answered(a, 0, _part([1.0], a.rid), None, 1)
    s.assign([w2])
    assert [j.req for j in w2.inflight.values()] == [b] and w2.isolating
    s.rescue(w2, "SIGKILL", planned=False, can_retry=True)
    assert t.codes() == [(a.rid, None), (b.rid, "POISON_INPUT")]
    assert s.quarantine.check(["poison"]) is not None and s.quarantine.check(["good"]) is None


def test_no_retry_when_the_backend_no_longer_serves():
    s, t = scheduler()
    a = queued(s, t)
    w1 = worker()
    s.assign([w1])
    s.rescue(w1, "SIGKILL", planned=False, can_retry=False)
    assert t.codes() == [(a.rid, "WORKER_DIED")]


def test_a_worker_never_holds_more_than_max_inflight_jobs():
    s, t = scheduler(max_inflight=2)
    for i in range(5):
        queued(s, t, [f"{i}" + "x" * 4000])          # bulk: a pass of 8 planned, max_inflight is the limit
    w = worker()
    s.assign([w])
    assert len(w.inflight) == 2
    s.assign([w])
    assert len(w.inflight) == 2                      # full: nothing more until it answers
    for seq in list(w.inflight):
        s.finished(w, seq)
    s.assign([w])
    assert len(w.inflight) == 2 and s.waiting() == 1


# ---- a request's record and the table's bookkeeping --------------------------------------------------

def test_create_numbers_requests_from_one_and_sets_the_deadline_from_now():
    t = Table()
    a = t.table.create([b"c", b""], 1, b"", ["x"], "m", 2.5, 100.0)
    b = t.table.create([b"c"], 2, b"", ["x"], "m", 2.5, 100.0)
    assert (a.seq, b.seq) == (1, 2)
    assert (a.arrived, a.deadline, a.budget_s) == (100.0, 102.5, 2.5)
    assert a.peer == b"c" and len(t.table) == 0              # not in the table until added


def test_hand_over_and_back_to_the_queue():
    r = Table().req(10.0)
    r.hand_to("m.1", 5.0)
    assert (r.state, r.worker, r.handed_at, r.last_handed) == (RState.RUNNING, "m.1", 5.0, 5.0)
    r.back_to_queue(suspect=True)
    assert (r.state, r.worker) == (RState.RETRYING, None)
    r.hand_to("m.2", 7.0)
    assert (r.state, r.worker, r.handed_at, r.last_handed) == (RState.RUNNING, "m.2", 5.0, 7.0)
    r.back_to_queue(suspect=False)
    assert r.state is RState.QUEUED


def test_an_answered_request_stays_answered_when_rerun_as_a_probe():
    t = Table()
    r = t.req(10.0)
    t.table.fail(r, Timeout("x"))
    r.hand_to("m.1", 5.0)
    assert r.state is RState.ANSWERED and r.worker == "m.1"
    r.back_to_queue(suspect=True)
    assert r.state is RState.ANSWERED and r.worker is None


def test_each_answer_is_one_event_with_its_times(monkeypatch):
    import akidb_embed.supervisor.requests as requests_mod
    now = [10.0]
    monkeypatch.setattr(requests_mod.time, "monotonic", lambda: now[0])
    t = Table()
    events: list = []
    t.table._events.subscribe(events.append)
    r = t.table.create([b"c"], 1, b"", ["a", "b"], "m", 60.0, 1.0)
    t.table.add(r)
    r.hand_to("m.1", 3.0)
    r.hand_to("m.2", 6.0)
    t.table.answer(r, b"\x80", None, 9)
    never = t.table.create([b"c"], 2, b"", ["a"], "m", 60.0, 4.0)
    t.table.add(never)
    t.table.fail(never, Timeout("x"))
    assert [(e.backend, e.code, e.texts, e.tokens) for e in events] == [("m", None, 2, 9), ("m", "TIMEOUT", 1, None)]
    assert (events[0].queue_s, events[0].run_s, events[0].total_s) == (2.0, 4.0, 9.0)
    assert (events[1].queue_s, events[1].run_s, events[1].total_s) == (6.0, 0.0, 6.0)


def test_refused_requests_are_answered_and_counted_without_a_record():
    t = Table()
    events: list = []
    t.table._events.subscribe(events.append)
    t.table.refuse([b"c"], 9, Overloaded("full"))
    assert t.codes() == [(9, "OVERLOADED")] and len(t.table) == 0
    assert [(e.backend, e.code, e.texts, e.total_s) for e in events] == [("", "OVERLOADED", 0, 0.0)]


def test_fail_all_answers_every_live_request_once():
    t = Table()
    rs = [t.req(10.0 + i) for i in range(3)]
    t.table.fail(rs[1], Timeout("x"))
    t.table.fail_all(Overloaded("bye"))
    assert sorted(t.codes()) == sorted([(rs[1].rid, "TIMEOUT"), (rs[0].rid, "OVERLOADED"), (rs[2].rid, "OVERLOADED")])
    assert len(t.table) == 0


def test_a_timeout_says_whether_the_request_was_in_a_worker_or_waiting():
    t = Table()
    queued_one, running = t.req(1.0), t.req(2.0)
    running.hand_to("m.7", 0.5)
    t.table.expire(5.0)
    msgs = {m["id"]: m["error"]["message"] for m in t.sent}
    assert "waiting in queue" in msgs[queued_one.rid] and "in worker m.7" in msgs[running.rid]


def test_an_answered_split_request_drops_its_parts_and_parts_without_tokens_count_zero():
    t = Table()
    r = t.req(10.0, texts=["a", "b", "c"])
    r.expect_parts(3)
    events: list = []
    t.table._events.subscribe(events.append)
    t.table.job_answered(r, 0, _part([1.0]), None, None)
    t.table.job_answered(r, 1, _part([1.0]), None, 4)
    t.table.job_answered(r, 2, _part([1.0]), None, None)
    assert events[0].tokens == 4
    r2 = t.req(10.0, texts=["a", "b"])
    r2.expect_parts(2)
    t.table.job_answered(r2, 0, _part([1.0]), None, 1)
    t.table.fail(r2, Timeout("x"))
    assert r2.parts is None                                  # the parts' answers are not kept after the answer


def test_with_no_ready_worker_nothing_is_handed_out_even_to_suspects():
    s, t = scheduler()
    queued(s, t)
    w = worker()
    s.assign([w])
    s.rescue(w, "SIGKILL", planned=False, can_retry=True)
    assert s.assign([]) == {} and len(s.suspects) == 1


def test_one_pass_per_worker_and_a_query_pass_alone():
    s, t = scheduler()
    for i in range(20):
        queued(s, t, [f"{i}" + "x" * 4000])                 # 512 estimated tokens each: bulk, 8 per pass
    w = worker()
    s.assign([w])
    assert len(s.passes[w.wid]) == 1 and len(w.inflight) == 8
    s.assign([w])
    assert len(s.passes[w.wid]) == 1 and len(w.inflight) == 8      # the rest waits here, not in the worker
    s2, t2 = scheduler()
    queued(s2, t2, ["a short query"])
    for i in range(20):
        queued(s2, t2, [f"{i}" + "x" * 4000])
    w2 = worker()
    s2.assign([w2])
    assert len(s2.passes[w2.wid]) == 1 and len(w2.inflight) == 1    # the query's pass alone
    queued(s2, t2, ["another query"])
    s2.assign([w2])
    assert len(s2.passes[w2.wid]) == 1 and len(w2.inflight) == 1    # nothing more until that pass ends


def test_a_long_request_id_is_clipped_in_logs():
    from akidb_embed.supervisor.scheduler import clip_id
    assert clip_id(7) == "7"
    long = clip_id("x" * 200)
    assert len(long) == 80 and long.endswith("...")
    assert clip_id("y" * 78) == repr("y" * 78)              # 80 characters: kept whole
    assert len(clip_id("y" * 79)) == 80                      # 81: clipped


def test_handed_jobs_are_running_on_their_worker_and_a_rescue_forgets_the_worker():
    s, t = scheduler()
    a, b = queued(s, t, ["a"]), queued(s, t, ["b"])
    w = worker()
    s.assign([w])
    assert (a.state, a.worker, b.state, b.worker) == (RState.RUNNING, "m.1", RState.RUNNING, "m.1")
    assert w.wid in s.passes
    s.rescue(w, "SIGKILL", planned=False, can_retry=True)
    assert w.inflight == {} and w.wid not in s.passes and w.wid not in s._pass_end
    assert (a.state, a.worker) == (RState.RETRYING, None)
    assert s.waiting() == 2                                  # the suspects still wait


def test_a_hung_worker_blames_only_what_was_running_the_rest_is_requeued():
    s, t = scheduler()
    a, b = queued(s, t, ["hangs"]), queued(s, t, ["innocent"])
    w = worker()
    s.assign([w])
    w.hung, w.running = True, [j.seq for j in w.inflight.values() if j.req is a]
    s.rescue(w, "hung", planned=False, can_retry=True)
    assert t.codes() == [(a.rid, "POISON_INPUT")] and "hung" in t.sent[0]["error"]["message"]
    assert s.quarantine.check(["hangs"]) is not None and s.quarantine.check(["innocent"]) is None
    assert (b.state, b.worker) == (RState.QUEUED, None) and not s.suspects and s.waiting() == 1
    w2 = worker("m.2")
    s.assign([w2])
    assert [j.req for j in w2.inflight.values()] == [b] and not w2.isolating


def test_a_hang_inside_a_batch_reruns_each_running_job_alone_answered_ones_as_probes():
    s, t = scheduler()
    a, b = queued(s, t, ["a"]), queued(s, t, ["b"])
    w = worker()
    s.assign([w])
    t.table.fail(a, Timeout("its deadline passed while the worker hung"))
    w.hung, w.running = True, [j.seq for j in w.inflight.values()]
    s.rescue(w, "hung", planned=False, can_retry=True)
    assert [j.req for j in s.suspects] == [a, b]
    assert [j.probe for j in s.suspects] == [True, False]
    assert s.suspects[0].deadline > time.monotonic() + 30    # a probe gets the request's whole budget again
    s.fail_waiting(Overloaded("stopped"))
    assert t.codes() == [(a.rid, "TIMEOUT"), (b.rid, "OVERLOADED")]    # nobody waits for a probe's answer
    assert not s.suspects and s.waiting() == 0


def test_fail_waiting_answers_the_queue_and_the_suspects():
    s, t = scheduler()
    a = queued(s, t, ["a"])
    w = worker()
    s.assign([w])
    s.rescue(w, "SIGKILL", planned=False, can_retry=True)
    b = queued(s, t, ["b"])
    s.fail_waiting(Overloaded("stopped"))
    assert sorted(t.codes()) == sorted([(a.rid, "OVERLOADED"), (b.rid, "OVERLOADED")])
    assert s.waiting() == 0 and s.assign([worker("m.2")]) == {}


def test_finished_passes_teach_the_sizer_the_backend_speed(monkeypatch):
    import akidb_embed.supervisor.scheduler as sched_mod
    now = [100.0]
    monkeypatch.setattr(sched_mod.time, "monotonic", lambda: now[0])
    s, t = scheduler()
    for i in range(20):
        queued(s, t, [f"{i}" + "x" * 4000])                  # 512 estimated tokens each: 8 per pass
    w = worker()
    s.assign([w])
    [p1] = list(s.passes[w.wid])
    now[0] = 102.048
    for seq in sorted(p1.seqs):
        s.finished(w, seq)
    assert s.sizer.s_per_token == pytest.approx(2.048 / p1.tokens)
    assert s._pass_end[w.wid] == 102.048


def test_a_suspect_answered_meanwhile_is_not_rerun():
    s, t = scheduler()
    a, b = queued(s, t, ["a"]), queued(s, t, ["b"])
    w = worker()
    s.assign([w])
    s.rescue(w, "SIGKILL", planned=False, can_retry=True)
    t.table.fail(a, Timeout("deadline"))
    c = queued(s, t, ["c"])
    w2 = worker("m.2")
    s.assign([w2])
    assert [j.req for j in w2.inflight.values()] == [b] and w2.isolating    # alone: c waits
    w3 = worker("m.3")
    s.assign([w2, w3])
    assert [j.req for j in w2.inflight.values()] == [b] and [j.req for j in w3.inflight.values()] == [c]


def test_suspects_run_one_at_a_time_on_the_least_loaded_worker():
    s2, t2 = scheduler()
    x, y = queued(s2, t2, ["x"]), queued(s2, t2, ["y"])
    w = worker("m.1")
    s2.assign([w])
    s2.rescue(w, "SIGKILL", planned=False, can_retry=True)
    z = queued(s2, t2, ["z"])
    loaded, free = worker("m.2"), worker("m.3")
    loaded.inflight[999] = s2.suspects[0]            # pretend it holds something already
    s2.assign([loaded, free])
    assert [j.req for j in free.inflight.values()] == [x] and free.isolating
    assert [j.req for j in loaded.inflight.values()][1:] == [z]
    other = worker("m.4")
    s2.assign([free, other])                         # the lane is busy: y waits, no second lane
    assert [j.req for j in s2.suspects] == [y] and not other.isolating


def _admitted(s: Scheduler, t: Table, peer: bytes, text: str, priority: str | None = None) -> Request:
    r = t.table.create([peer], None, b"", [text], "m", 60.0, time.monotonic())
    s.admit(r, priority)
    t.table.add(r)                                   # the supervisor's order: admitted, then recorded
    return r


def _bulk_from_another_client(s: Scheduler, t: Table, tokens: int) -> None:
    _admitted(s, t, b"ingest", "x" * 4 * tokens, "normal")


def test_a_query_shortens_passes_only_while_another_client_holds_bulk_work():
    s, t = scheduler()
    s.admit(t.req(time.monotonic() + 60.0, ["q"]), "normal")   # alone: short passes would help nobody
    assert not s.sizer.interactive(time.monotonic())
    _bulk_from_another_client(s, t, s.cfg.interactive_tokens - 2)   # as small as a query: still not bulk
    s.admit(t.req(time.monotonic() + 60.0, ["q"]), "normal")
    assert not s.sizer.interactive(time.monotonic())
    _bulk_from_another_client(s, t, 4)
    s.admit(t.req(time.monotonic() + 60.0, ["q"]), "normal")
    assert s.sizer.interactive(time.monotonic())


def test_high_priority_queries_shorten_passes_further():
    s, t = scheduler()
    _bulk_from_another_client(s, t, 1000)
    r = t.req(time.monotonic() + 60.0, ["q"])
    s.admit(r, "normal")
    assert s.sizer.interactive(time.monotonic()) and s.sizer.high_until == float("-inf")
    r = t.req(time.monotonic() + 60.0, ["q"])
    s.admit(r, "high")
    assert s.sizer.high_until > time.monotonic()


def test_the_suspects_lane_gets_no_new_work_while_it_is_busy():
    s, t = scheduler()
    a = queued(s, t, ["a"])
    w1 = worker("m.1")
    s.assign([w1])
    s.rescue(w1, "SIGKILL", planned=False, can_retry=True)
    busy = worker("m.2")
    busy.inflight[999] = s.suspects[0]               # holds something: the suspect waits for it to be free
    queued(s, t, ["b"])
    s.assign([busy])
    assert list(busy.inflight) == [999] and [j.req for j in s.suspects] == [a]


def test_suspects_answered_meanwhile_no_longer_count_as_waiting():
    s, t = scheduler()
    a = queued(s, t, ["a"])
    queued(s, t, ["b"])
    w = worker()
    s.assign([w])
    s.rescue(w, "SIGKILL", planned=False, can_retry=True)
    assert s.waiting() == 2
    t.table.fail(a, Timeout("deadline"))
    assert s.waiting() == 1


def _handed(s: Scheduler, w: FakeWorker) -> list:
    s.assign([w])
    return list(w.inflight.values())


def _finish(s: Scheduler, w: FakeWorker) -> None:
    for seq in list(w.inflight):
        s.finished(w, seq)


def test_bulk_passes_are_sorted_by_length_and_sized_for_the_queries_around():
    s, t = scheduler()
    s.sizer.s_per_token = 0.035 / 400                # learned: 35 ms (latency_pass_ms) = 400 tokens
    s.sizer.observe = lambda tokens, seconds: None   # and kept (these passes take no time)
    _admitted(s, t, b"ingest", "x" * 4 * 500)      # from then on the ingest's requests are not queries
    for n in (90, 30, 70, 10, 50, 80, 20, 60, 40) * 3:   # estimated tokens: n + 2
        _admitted(s, t, b"ingest", "x" * 4 * n)
    w = worker()
    first = [j.cost for j in _handed(s, w)]           # no query around: a full pass, the shortest texts
    assert first == sorted(first) and len(first) == 8 and first[0] == 12
    query = _admitted(s, t, b"search", "what is a vector database?")
    for n in (25, 5, 15):                            # more ingest, shorter than what waits
        _admitted(s, t, b"ingest", "x" * 4 * n)
    _finish(s, w)
    assert [j.req for j in _handed(s, w)] == [query]            # the query next, alone
    _finish(s, w)
    costs = [j.cost for j in _handed(s, w)]
    assert costs == sorted(costs) and costs[:3] == [7, 17, 27] and sum(costs) <= 400   # one short pass, sorted


def test_passes_planned_before_a_high_priority_query_are_planned_again_shorter():
    s, t = scheduler()
    s.sizer.s_per_token = 0.035 / 400                # 400 tokens in 35 ms; 251 in 22 ms (high_latency_pass_ms)
    s.sizer.observe = lambda tokens, seconds: None
    _admitted(s, t, b"ingest", "x" * 4 * 500)
    for _ in range(40):
        _admitted(s, t, b"ingest", "x" * 392)        # 100 estimated tokens each
    w = worker()
    assert sum(j.cost for j in _handed(s, w)) == 800           # no query around: 8 texts (max_batch_size)
    query = _admitted(s, t, b"search", "q")
    _finish(s, w)
    assert [j.req for j in _handed(s, w)] == [query]
    _finish(s, w)
    assert sum(j.cost for j in _handed(s, w)) == 400 and s.staged   # planned again for 35 ms passes
    high = _admitted(s, t, b"search2", "urgent", "high")
    _finish(s, w)
    assert [j.req for j in _handed(s, w)] == [high]
    _finish(s, w)
    assert sum(j.cost for j in _handed(s, w)) == 200            # and again for 22 ms passes: two texts


def test_high_priority_bulk_goes_before_normal_passes_planned_earlier():
    s, t = scheduler()
    _admitted(s, t, b"ingest", "x" * 4 * 500)
    for _ in range(40):
        _admitted(s, t, b"ingest", "x" * 392)        # 100 estimated tokens each: windows of 8-text passes
    w = worker()
    assert len(_handed(s, w)) == 8 and s.staged      # more normal passes planned
    urgent = _admitted(s, t, b"ops", "x" * 4 * 400, "high")   # bulk (not a query), high priority
    _finish(s, w)
    assert [j.req for j in _handed(s, w)] == [urgent]  # next, not after the passes planned before it
    _finish(s, w)
    assert {j.req.peer for j in _handed(s, w)} == {b"ingest"}


def test_peer_tokens_count_each_clients_live_requests_and_are_released_at_the_answer_point():
    t = Table()
    tab = t.table
    a = tab.create([b"ingest"], 1, b"", ["x"], "m", 60.0, 0.0)
    a.est_tokens = 300
    b = tab.create([b"ingest"], 2, b"", ["x"], "m", 60.0, 0.0)
    b.est_tokens = 200
    c = tab.create([b"search"], 3, b"", ["x"], "m", 60.0, 0.0)
    c.est_tokens = 7
    for r in (a, b, c):
        tab.add(r)
    assert tab.peer_tokens == {b"ingest": 500, b"search": 7} and tab.total_tokens == 507
    assert tab.others_tokens(b"search") == 500 and tab.others_tokens(b"ingest") == 7
    assert tab.others_tokens(b"nobody") == 507
    tab.fail(a, Timeout("x"))
    assert tab.peer_tokens == {b"ingest": 200, b"search": 7} and tab.others_tokens(b"search") == 200
    tab.fail(a, Timeout("again"))                         # answered once: released once
    assert tab.total_tokens == 207
    tab.fail(b, Timeout("x"))
    assert tab.peer_tokens == {b"search": 7}              # a client with nothing left is forgotten
    assert tab.others_tokens(b"search") == 0 and tab.total_tokens == 7


def test_the_peer_book_gets_every_recorded_request_and_releases_it_once_at_the_answer():
    class Book:
        def __init__(self) -> None:
            self.log: list[tuple[str, int]] = []

        def add(self, req) -> None:
            self.log.append(("add", req.seq))

        def release(self, req) -> None:
            self.log.append(("release", req.seq))

    book, sent = Book(), []
    tab = RequestTable(lambda route, frame: sent.append(unpack(frame)), Events(), book)
    r = tab.create([b"c"], 1, b"", ["x"], "m", 60.0, 0.0)
    tab.add(r)
    assert book.log == [("add", r.seq)]
    tab.fail(r, Timeout("x"))
    tab.fail(r, Timeout("again"))
    assert book.log == [("add", r.seq), ("release", r.seq)] and len(sent) == 1


def _tokens(n: int) -> str:
    return "x" * 4 * (n - 2)                          # a text of n estimated tokens


def _ingest(s, t, costs):
    return [_admitted(s, t, b"ingest", _tokens(c)) for c in costs]


def test_bulk_is_sorted_over_windows_of_eight_passes():
    s, t = scheduler()
    _ingest(s, t, [500] + [100] * 63 + [10] * 16)    # 64 texts fill a window of 8 passes of 8
    w = worker()
    passes = []
    for _ in range(9):
        passes.append([j.cost for j in _handed(s, w)])
        _finish(s, w)
    assert [len(p) for p in passes] == [8] * 9
    assert all(min(p) >= 100 for p in passes[:8])     # the shorter texts queued later do not overtake ...
    assert passes[8] == [10] * 8                      # ... they lead the next window


def test_a_planned_pass_is_not_overtaken_by_shorter_bulk_arriving_later():
    s, t = scheduler()
    _ingest(s, t, [500] + [100] * 40)
    w = worker()
    assert [j.cost for j in _handed(s, w)] == [100] * 8
    _ingest(s, t, [10] * 16)                         # no query: the budget stays, so does the plan
    _finish(s, w)
    assert [j.cost for j in _handed(s, w)] == [100] * 8


def test_a_short_planned_pass_is_topped_up_at_hand_over_with_bulk_that_arrived_since():
    s, t = scheduler()
    _ingest(s, t, [500] + [100] * 11)                # passes of 8 and 4 planned
    w = worker()
    assert len(_handed(s, w)) == 8
    _ingest(s, t, [50] * 20)
    _finish(s, w)
    assert [j.cost for j in _handed(s, w)] == [100, 100, 100, 500] + [50] * 4    # 8 texts: full


def test_while_queries_are_around_topped_up_bulk_passes_stay_within_the_short_budget():
    s, t = scheduler()
    s.sizer.s_per_token = 0.035 / 400                # 35 ms (latency_pass_ms) = 400 tokens
    s.sizer.observe = lambda tokens, seconds: None
    _ingest(s, t, [500] + [100] * 99)
    w = worker()
    assert len(_handed(s, w)) == 8
    query = _admitted(s, t, b"search", "q")
    _finish(s, w)
    assert [j.req for j in _handed(s, w)] == [query]
    for _ in range(20):
        _finish(s, w)
        got = _handed(s, w)
        assert 0 < sum(j.cost for j in got) <= 500 and (len(got) == 1 or sum(j.cost for j in got) <= 400)


def test_the_plan_is_kept_at_three_quarters_of_its_budget_and_made_again_below():
    for latency_s, per_pass in ((3.0, 8), (3071 / 1024, 5)):
        s, t = scheduler()
        s.sizer.s_per_token = 1 / 1024               # exact: the budget is latency_s * 1024 tokens
        s.sizer.latency_pass_s = latency_s           # 3072 = 0.75 x 4096, then 3071
        s.sizer.observe = lambda tokens, seconds: None
        _ingest(s, t, [512] * 24)                    # 8 per full pass
        w = worker()
        assert len(_handed(s, w)) == 8
        query = _admitted(s, t, b"search", "q")
        _finish(s, w)
        assert [j.req for j in _handed(s, w)] == [query]
        _finish(s, w)
        assert len(_handed(s, w)) == per_pass


def test_answered_requests_in_planned_passes_are_not_handed_over():
    s, t = scheduler()
    reqs = _ingest(s, t, [500] + [100] * 40)
    w = worker()
    first = _handed(s, w)
    later = [r for r in reqs if r not in {j.req for j in first}]
    for r in later[:20]:                             # the whole next planned pass and some of the one after
        t.table.fail(r, Timeout("deadline"))
    _finish(s, w)
    got = _handed(s, w)
    assert got and all(not j.req.answered for j in got)


def test_fail_waiting_answers_the_requests_of_planned_passes_too():
    s, t = scheduler()
    reqs = _ingest(s, t, [500] + [100] * 40)
    w = worker()
    handed = {j.req for j in _handed(s, w)}
    assert s.staged                                  # passes planned, not handed over
    s.fail_waiting(Overloaded("stopped"))
    assert all(r.answered for r in reqs if r not in handed) and not any(r.answered for r in handed)
    assert [code for _, code in t.codes()] == ["OVERLOADED"] * (len(reqs) - len(handed))
    assert s.assign([worker("m.2")]) == {}


def test_a_request_of_exactly_interactive_tokens_from_a_client_with_nothing_else_is_a_query():
    for tokens, query in ((256, True), (257, False)):
        s, t = scheduler()                           # interactive_tokens = 256
        _ingest(s, t, [500])
        _admitted(s, t, b"search", _tokens(tokens))
        assert s.sizer.interactive(time.monotonic()) is query   # a query meeting bulk shortens passes
        assert [j.interactive for j in s.queue.units() if j.peer == b"search"] == [query]


def test_a_worker_offered_nothing_still_gets_the_next_request():
    s, t = scheduler()
    late = queued(s, t, ["a"])
    t.table.fail(late, Timeout("deadline"))          # what waited was answered meanwhile
    w = worker()
    assert s.assign([w]) == {} and not w.inflight
    fresh = queued(s, t, ["b"])
    assert [j.req for j in _handed(s, w)] == [fresh]


def test_queries_between_low_bulk_passes_go_next_however_many_come():
    """Regression: passes planned ahead did not count for low's guaranteed share, so after 20 high
    queries low's patience ran out and every planned low pass went before the next query (300 ms)."""
    s, t = scheduler()
    s.queue.patience = {1: 10, 2: 3}                 # low's patience shorter than a window of planned passes
    s.sizer.s_per_token = 0.022 / 200                # 22 ms (high_latency_pass_ms) = 200 tokens
    s.sizer.observe = lambda tokens, seconds: None
    _admitted(s, t, b"ingest", _tokens(500), "low")
    for _ in range(200):
        _admitted(s, t, b"ingest", _tokens(100), "low")
    w = worker()
    _handed(s, w)
    for i in range(40):                              # a search client: one high query at a time
        query = _admitted(s, t, b"search", f"query {i}", "high")
        _finish(s, w)
        assert [j.req for j in _handed(s, w)] == [query], i
        _finish(s, w)
        assert {j.req.peer for j in _handed(s, w)} == {b"ingest"}, i   # the ingest runs between them

