"""The worker's job loop in-process (no sockets): expired jobs are skipped, answers are per request,
one failing input fails alone, malformed jobs are dropped. Real workers are covered by test_bridge."""
from __future__ import annotations

import numpy as np
import pytest
import zmq

from akidb_embed.workers.request_options import ModelLimits

from akidb_embed.protocol import codec, messages
from akidb_embed.protocol.errors import InternalError
from akidb_embed.workers import loop as loop_mod
from akidb_embed.workers.backends.base import EmbedOutput
from akidb_embed.workers.backends.mock import MockBackend, mock_vector
from akidb_embed.workers.loop import Job, Worker, WorkerSettings

DIM = 4


class FakeSock:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.messages: list[list[bytes]] = []

    def send(self, part: bytes, flags: int = 0) -> None:
        self.parts.append(part)
        if not flags:
            self.messages.append(self.parts)
            self.parts = []


class CountingMock(MockBackend):
    def __init__(self, options, clock=None) -> None:
        super().__init__("mock", options)
        self.calls: list[list[str]] = []
        self.clock = clock

    def embed(self, texts, truncate="end"):
        self.calls.append(list(texts))
        out = super().embed(texts, truncate)
        if self.clock is not None:
            self.clock[0] += 10.0          # each forward pass takes 10 (fake) seconds
        return out


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(loop_mod.time, "monotonic", lambda: now[0])
    return now


_made: list[Worker] = []


@pytest.fixture(autouse=True)
def _close_sockets():
    yield
    while _made:
        _made.pop().heartbeat._sock.close(0)


def make_worker(tmp_path, backend, max_batch_size=16, max_batch_tokens=4096) -> tuple[Worker, FakeSock]:
    w = Worker(WorkerSettings(backend="m", kind="mock", model="mock", wid="m.1",
                              endpoint=f"ipc://{tmp_path / 'none.sock'}", max_batch_size=max_batch_size,
                              max_batch_tokens=max_batch_tokens))
    _made.append(w)
    w.sock.close(0)
    w.sock = FakeSock()
    w.backend = backend
    w.info = backend.load()
    w.limits = ModelLimits.from_info(w.info, {})    # what Worker.run sets up after the model loads
    return w, w.sock


def job(seq: int, texts: list[str], deadline: float, **kw) -> Job:
    req = messages.parse_request(messages.request_frame(seq * 10, "embed", texts=texts, **kw))
    return Job(seq=seq, deadline=deadline, request=req)


def answers(sock: FakeSock) -> dict[int, dict]:
    """seq -> decoded client response, over every message sent."""
    out = {}
    for msg in sock.messages:
        assert len(msg) % 2 == 0
        for i in range(0, len(msg), 2):
            header = messages.parse_header(msg[i])
            assert header["t"] == "done"
            resp = codec.unpack(msg[i + 1])
            assert header["seq"] not in out, "answered twice"
            out[header["seq"]] = {"code": header["code"], **resp}
    return out


def vectors(resp: dict) -> np.ndarray:
    return codec.blob_to_vectors(resp["data"], resp["shape"], resp["dtype"])


def test_each_request_gets_its_own_vectors_in_order(tmp_path, clock):
    backend = CountingMock({"dim": DIM})
    w, sock = make_worker(tmp_path, backend, max_batch_size=2)
    jobs = [job(1, ["a b c", "x"], 2000.0, normalize=False), job(2, ["y"], 2000.0),
            job(3, ["longer text here now"], 2000.0, dtype="float16", normalize=False)]
    w._process(jobs)
    out = answers(sock)
    assert set(out) == {1, 2, 3} and all(r["ok"] and r["code"] is None for r in out.values())
    assert out[1]["id"] == 10 and out[2]["id"] == 20
    assert np.allclose(vectors(out[1]), [mock_vector("a b c", DIM), mock_vector("x", DIM)])
    v2 = vectors(out[2])
    assert np.allclose(v2[0], mock_vector("y", DIM) / np.linalg.norm(mock_vector("y", DIM)), atol=1e-6)
    assert out[3]["dtype"] == "float16"
    assert np.allclose(vectors(out[3])[0], mock_vector("longer text here now", DIM), atol=1e-2)
    assert out[1]["backend"] == "m" and out[1]["truncated"] == 0
    assert all(len(call) <= 2 for call in backend.calls) and sum(map(len, backend.calls)) == 4


def test_expired_jobs_are_answered_timeout_without_running(tmp_path, clock):
    backend = CountingMock({"dim": DIM})
    w, sock = make_worker(tmp_path, backend)
    w._process([job(1, ["late"], 1000.0), job(2, ["live"], 1000.5)])   # deadline == now counts as passed
    out = answers(sock)
    assert out[1]["ok"] is False and out[1]["code"] == "TIMEOUT" and out[1]["error"]["code"] == "TIMEOUT"
    assert "before the worker started" in out[1]["error"]["message"]
    assert out[2]["ok"] is True
    assert backend.calls == [["live"]]


def test_a_job_whose_deadline_passes_while_waiting_in_the_worker_is_not_run(tmp_path, clock):
    backend = CountingMock({"dim": DIM}, clock=clock)
    w, sock = make_worker(tmp_path, backend, max_batch_size=1)
    # after the first pass the clock reads 1010: job 2's deadline is exactly now (passed), job 3's later
    w._process([job(1, ["a"], 1005.0), job(2, ["bb bb"], 1010.0), job(3, ["c c c"], 5000.0)])
    out = answers(sock)
    assert out[1]["ok"] is True
    assert out[2]["code"] == "TIMEOUT" and "waited in the worker" in out[2]["error"]["message"]
    assert out[3]["ok"] is True
    assert backend.calls == [["a"], ["c c c"]]


def test_only_the_request_with_a_failing_input_fails(tmp_path, clock):
    backend = CountingMock({"dim": DIM, "fail_on": "BAD"})
    w, sock = make_worker(tmp_path, backend)
    w._process([job(1, ["ok one"], 2000.0), job(2, ["BAD", "fine"], 2000.0), job(3, ["ok two"], 2000.0)])
    out = answers(sock)
    assert out[1]["ok"] and out[3]["ok"]
    assert out[2]["ok"] is False and out[2]["code"] == "INTERNAL" and "fail_on" in out[2]["error"]["message"]


def test_two_requests_in_a_failing_pass_are_isolated(tmp_path, clock):
    backend = CountingMock({"dim": DIM, "fail_on": "BAD"})
    w, sock = make_worker(tmp_path, backend)
    w._process([job(1, ["BAD"], 2000.0), job(2, ["fine"], 2000.0)])
    out = answers(sock)
    assert out[1]["code"] == "INTERNAL" and out[2]["ok"] is True
    assert backend.calls == [["BAD", "fine"], ["BAD"], ["fine"]]     # then each request's texts on their own


def test_the_other_texts_of_a_failed_request_are_not_run(tmp_path, clock):
    backend = CountingMock({"dim": DIM, "fail_on": "BAD"})
    w, sock = make_worker(tmp_path, backend, max_batch_size=1)
    w._process([job(1, ["BAD", "xx"], 2000.0)])
    out = answers(sock)
    assert out[1]["code"] == "INTERNAL"
    assert backend.calls == [["BAD"]]


def test_an_embed_error_from_the_backend_keeps_its_code(tmp_path, clock):
    from akidb_embed.protocol.errors import BadRequest

    class Picky(CountingMock):
        def embed(self, texts, truncate="end"):
            raise BadRequest("cannot embed this")
    w, sock = make_worker(tmp_path, Picky({"dim": DIM}))
    w._process([job(1, ["a"], 2000.0)])
    out = answers(sock)[1]
    assert out["code"] == "BAD_REQUEST" and out["error"] == {"code": "BAD_REQUEST", "message": "cannot embed this",
                                                             "retryable": False}


def test_a_non_embed_error_from_the_backend_is_internal(tmp_path, clock):
    class Broken(CountingMock):
        def embed(self, texts, truncate="end"):
            raise RuntimeError("segfault-ish")
    w, sock = make_worker(tmp_path, Broken({"dim": DIM}))
    w._process([job(1, ["a"], 2000.0)])
    out = answers(sock)
    assert out[1]["code"] == "INTERNAL" and "RuntimeError" in out[1]["error"]["message"]


def test_truncated_inputs_are_counted_per_request(tmp_path, clock):
    backend = CountingMock({"dim": DIM, "max_tokens": 2})
    w, sock = make_worker(tmp_path, backend)
    w._process([job(1, ["a b c", "d"], 2000.0), job(2, ["e f g h", "i j k"], 2000.0)])
    out = answers(sock)
    assert out[1]["truncated"] == 1 and out[2]["truncated"] == 2


def test_truncated_count_without_row_flags_from_a_single_owner(tmp_path, clock):
    class NoRows(CountingMock):
        def embed(self, texts, truncate="end"):
            out = super().embed(texts, truncate)
            return EmbedOutput(out.vectors, out.truncated, None)
    w, sock = make_worker(tmp_path, NoRows({"dim": DIM, "max_tokens": 2}), max_batch_size=2)
    w._process([job(1, ["a b c", "d e f"], 2000.0), job(2, ["g h i j"], 2000.0)])   # two passes, one owner each
    out = answers(sock)
    assert out[1]["truncated"] == 2 and out[2]["truncated"] == 1


def test_token_length_failure_falls_back_to_an_estimate(tmp_path, clock):
    class NoLengths(CountingMock):
        def token_counts(self, texts):
            raise InternalError("no tokenizer")
    w, sock = make_worker(tmp_path, NoLengths({"dim": DIM}))
    w._process([job(1, ["a"], 2000.0)])
    assert answers(sock)[1]["ok"] is True


def test_accept_reads_jobs_and_stop_and_drops_malformed_frames(tmp_path, clock):
    w, _ = make_worker(tmp_path, CountingMock({"dim": DIM}))
    frame = messages.request_frame(5, "embed", texts=["a"])
    j = w._accept(messages.embed_job(3, 12500, frame))   # budget relative to receipt (monotonic 1000.0)
    assert j is not None and j.seq == 3 and j.deadline == 1012.5 and j.request.texts == ["a"]
    assert w._accept([codec.pack({"t": "embed", "seq": 3, "budget_ms": 1000})]) is None   # no request frame
    assert w._accept([messages.worker_header("ready"), frame]) is None
    assert w._accept([codec.pack({"t": "ready", "seq": 3, "budget_ms": 1000}), frame]) is None   # not a job
    assert w._accept([b"\xc1", frame]) is None
    assert w._accept([codec.pack({"t": "embed", "seq": 3, "budget_ms": 1000}),
                      messages.request_frame(5, "info")]) is None
    assert w.stopping is False
    assert w._accept([messages.worker_header("stop")]) is None
    assert w.stopping is True


# ---- what the worker tells the supervisor: heartbeat, done headers, passes -------------------------

def headers(sock: FakeSock) -> list[list[dict]]:
    """The done headers of every message sent, message by message."""
    return [[messages.parse_header(msg[i]) for i in range(0, len(msg), 2)] for msg in sock.messages]


class Beat:
    """Stands in for the heartbeat thread: records what the main thread tells it."""

    def __init__(self, real) -> None:
        self._sock = real._sock            # closed by _close_sockets
        self.history: list[tuple[str, object]] = []
        self._busy, self._running = False, []

    @property
    def busy(self) -> bool:
        return self._busy

    @busy.setter
    def busy(self, value: bool) -> None:
        self._busy = value
        self.history.append(("busy", value))

    @property
    def running(self) -> list[int]:
        return self._running

    @running.setter
    def running(self, value: list[int]) -> None:
        self._running = value
        self.history.append(("running", list(value)))


class Watching(CountingMock):
    """Records, at each forward pass, its side, the heartbeat's state and how many messages were sent."""

    def __init__(self, options, worker_box: list, fake_pass_s: float | None = None) -> None:
        super().__init__(options)
        self.box = worker_box
        self.fake_pass_s = fake_pass_s
        self.seen: list[dict] = []

    def embed(self, texts, truncate="end"):
        w = self.box[0]
        self.seen.append({"texts": list(texts), "side": truncate, "running": list(w.heartbeat.running),
                          "busy": w.heartbeat.busy, "sent": len(w.sock.messages)})
        if self.fake_pass_s is not None:
            self.now[0] += self.fake_pass_s
        return super().embed(texts, truncate)


def watched_worker(tmp_path, monkeypatch, options=None, fake_pass_s=None, **kw) -> tuple[Worker, FakeSock, Watching]:
    box: list = []
    backend = Watching({"dim": DIM, **(options or {})}, box, fake_pass_s)
    w, sock = make_worker(tmp_path, backend, **kw)
    w.heartbeat = Beat(w.heartbeat)
    box.append(w)
    if fake_pass_s is not None:
        backend.now = [50.0]
        monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: backend.now[0])
    return w, sock, backend


def test_heartbeat_running_is_exactly_the_pass_under_way_and_empty_after_it(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, max_batch_size=2)
    # passes (shortest texts first): [job 1 "a", job 1 "b b"], then [job 2, job 3]; job 4 has expired
    w._process([job(1, ["a", "b b"], 2000.0), job(2, ["c c c"], 2000.0), job(3, ["d d d d"], 2000.0),
                job(4, ["e"], 999.0)])
    assert [s["running"] for s in backend.seen] == [[1], [2, 3]]
    assert all(s["busy"] is False for s in backend.seen)   # busy is _serve_once's to set, not _process's
    assert w.heartbeat.running == []
    assert [v for k, v in w.heartbeat.history if k == "running"] == [[1], [], [2, 3], []]


def test_heartbeat_running_is_emptied_after_a_failing_pass(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, options={"fail_on": "BAD"})
    w._process([job(1, ["BAD"], 2000.0), job(2, ["fine"], 2000.0)])
    assert [s["running"] for s in backend.seen] == [[1, 2], [1], [2]]   # the pass, then each request apart
    assert w.heartbeat.running == []
    assert answers(sock)[1]["code"] == "INTERNAL" and answers(sock)[2]["ok"] is True


def test_passes_are_reported_once_with_the_first_answer_of_a_message(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, options={"max_tokens": 3}, fake_pass_s=0.25)
    # one pass of 3 texts; tokens the model reads: 3 (5 cut at max_tokens 3) + 1 + 2
    w._process([job(1, ["a b c d e"], 2000.0), job(2, ["x", "y y"], 2000.0)])
    assert len(backend.seen) == 1
    [msg] = headers(sock)
    assert [h["seq"] for h in msg] == [2, 1]      # job 2's texts are the shorter ones
    assert msg[0]["passes"] == [[3, 6, 0.25]]
    assert "passes" not in msg[1]
    w._process([job(3, ["z"], 2000.0)])          # the next message reports only its own pass
    assert headers(sock)[1][0]["passes"] == [[1, 1, 0.25]]


def test_passes_that_finish_no_request_are_reported_with_the_next_answer(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, fake_pass_s=0.5, max_batch_size=1)
    w._process([job(1, ["a", "b b"], 2000.0)])   # two passes; the request is done after the second
    assert len(backend.seen) == 2
    [[header]] = headers(sock)
    assert header["passes"] == [[1, 1, 0.5], [1, 2, 0.5]]


def test_answers_of_a_pass_are_sent_together_before_the_next_pass_runs(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, max_batch_size=3)
    w._process([job(1, ["a"], 2000.0), job(2, ["b"], 2000.0), job(3, ["c"], 2000.0),
                job(4, ["d d d d"], 2000.0), job(5, ["e", "f f f f f"], 2000.0)])
    assert [s["texts"] for s in backend.seen] == [["a", "b", "c"], ["e", "d d d d", "f f f f f"]]
    assert [s["sent"] for s in backend.seen] == [0, 1]      # jobs 1-3 were answered before pass 2 ran
    assert [[h["seq"] for h in m] for m in headers(sock)] == [[1, 2, 3], [4, 5]]   # one message per pass


def test_done_header_tokens_are_counted_after_truncation(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, options={"max_tokens": 2})
    w._process([job(1, ["a b c", "d e"], 2000.0), job(2, ["f"], 2000.0)])
    hs = {h["seq"]: h for m in headers(sock) for h in m}
    assert hs[1]["tokens"] == 4 and hs[2]["tokens"] == 1
    out = answers(sock)
    assert out[1]["tokens"] == [2, 2] and out[1]["truncated"] == 1   # exactly max_tokens is not truncated
    assert out[1]["truncated_rows"] == [True, False]


def test_truncate_none_refuses_a_too_long_request_without_running_it(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, options={"max_tokens": 2})
    w._process([job(1, ["a", "b c d"], 2000.0, truncate="none"), job(2, ["e f"], 2000.0, truncate="none")])
    out = answers(sock)
    assert out[1]["code"] == "INPUT_TOO_LONG" and "texts[1] has 3 tokens" in out[1]["error"]["message"]
    assert out[2]["ok"] is True
    assert [s["texts"] for s in backend.seen] == [["e f"]]
    hs = {h["seq"]: h for m in headers(sock) for h in m}
    assert hs[1]["tokens"] == 3 and hs[2]["tokens"] == 2   # counted (cut at max_tokens) though refused
    assert hs[1]["code"] == "INPUT_TOO_LONG"


def test_an_expired_job_reports_no_tokens(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch)
    w._process([job(1, ["a b"], 1000.0)])
    w._flush()                                   # (_serve_once sends it at the end of the turn)
    [[header]] = headers(sock)
    assert header["code"] == "TIMEOUT" and header["tokens"] is None
    assert backend.seen == []


def test_each_pass_cuts_its_texts_at_the_requested_end(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch, options={"max_tokens": 2})
    w._process([job(1, ["a b c"], 2000.0, truncate="start", normalize=False),
                job(2, ["d e f"], 2000.0, normalize=False), job(3, ["g h i"], 2000.0, truncate="end", normalize=False)])
    assert [(s["texts"], s["side"]) for s in backend.seen] == [(["d e f", "g h i"], "end"), (["a b c"], "start")]
    out = answers(sock)
    assert np.allclose(vectors(out[1])[0], mock_vector("b c", DIM))
    assert np.allclose(vectors(out[2])[0], mock_vector("d e", DIM))


def test_the_prompt_is_put_in_front_of_every_text_and_counted(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch)
    w._process([job(1, ["a", "b c"], 2000.0, prompt="query: ", normalize=False), job(2, ["a"], 2000.0,
                                                                                      normalize=False)])
    out = answers(sock)
    assert np.allclose(vectors(out[1]), [mock_vector("query: a", DIM), mock_vector("query: b c", DIM)])
    assert np.allclose(vectors(out[2]), [mock_vector("a", DIM)])
    assert out[1]["tokens"] == [2, 3] and out[2]["tokens"] == [1]


def test_dimensions_keep_the_leading_dims_then_normalize(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch)
    w.limits = ModelLimits.from_info(w.info, {"allow_any_dimensions": True})
    w._process([job(1, ["a", "b"], 2000.0, dimensions=2), job(2, ["c"], 2000.0, dimensions=DIM)])
    out = answers(sock)
    assert out[1]["shape"] == [2, 2] and out[2]["shape"] == [1, DIM]
    cut = mock_vector("a", DIM)[:2]
    assert np.allclose(vectors(out[1])[0], cut / np.linalg.norm(cut), atol=1e-6)


def test_a_request_the_model_cannot_serve_is_refused_alone_and_not_run(tmp_path, clock, monkeypatch):
    w, sock, backend = watched_worker(tmp_path, monkeypatch)
    w._process([job(1, ["a"], 2000.0, prompt_name="nope"), job(2, ["b"], 2000.0, dimensions=2),
                job(3, ["c"], 2000.0)])
    out = answers(sock)
    assert out[1]["code"] == "BAD_REQUEST" and "prompt_name" in out[1]["error"]["message"]
    assert out[2]["code"] == "BAD_REQUEST" and "dimensions=2" in out[2]["error"]["message"]
    assert out[3]["ok"] is True
    assert [s["texts"] for s in backend.seen] == [["c"]]


# ---- one turn of the loop: read everything waiting, run it, answer ---------------------------------

class InSock(FakeSock):
    """FakeSock with an inbox: poll / EVENTS / recv_multipart as pyzmq's DEALER answers them."""

    def __init__(self, inbox: list[list[bytes]]) -> None:
        super().__init__()
        self.inbox = inbox
        self.polls: list[int] = []

    def poll(self, timeout: int) -> int:
        self.polls.append(timeout)
        return zmq.POLLIN if self.inbox else 0

    def get(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.inbox else 0

    def recv_multipart(self, flags: int = 0) -> list[bytes]:
        assert flags == zmq.NOBLOCK
        if not self.inbox:
            raise zmq.Again()
        return self.inbox.pop(0)


def serving(tmp_path, monkeypatch, inbox, **kw) -> tuple[Worker, InSock, Watching]:
    w, _, backend = watched_worker(tmp_path, monkeypatch, **kw)
    w.sock = InSock(inbox)
    return w, w.sock, backend


def embed_msg(*jobs: tuple[int, list[str]], budget_ms: int = 60000) -> list[bytes]:
    out: list[bytes] = []
    for seq, texts in jobs:
        out += messages.embed_job(seq, budget_ms, messages.request_frame(seq * 10, "embed", texts=texts))
    return out


def test_an_idle_turn_waits_in_poll_and_sends_nothing(tmp_path, clock, monkeypatch):
    w, sock, backend = serving(tmp_path, monkeypatch, [])
    w._serve_once()
    assert len(sock.polls) == 1 and sock.polls[0] > 0       # blocks for a while: no busy loop
    assert sock.messages == [] and backend.seen == [] and w.heartbeat.history == []


def test_a_turn_runs_everything_waiting_together(tmp_path, clock, monkeypatch, caplog):
    inbox = [embed_msg((1, ["a"]), (2, ["b b"])), embed_msg((3, ["c"]))]   # 2 jobs in one message, then 1
    w, sock, backend = serving(tmp_path, monkeypatch, inbox)
    with caplog.at_level("ERROR"):
        w._serve_once()
    assert caplog.records == []                              # nothing taken for a malformed job
    assert inbox == []
    assert [sorted(s["texts"]) for s in backend.seen] == [["a", "b b", "c"]]   # one pass
    assert backend.seen[0]["busy"] is True and backend.seen[0]["running"] == [1, 2, 3]
    assert [[h["seq"] for h in m] for m in headers(sock)] == [[1, 3, 2]]   # one message
    assert [v for k, v in w.heartbeat.history if k == "busy"] == [True, False]
    assert w.stopping is False


def test_a_turn_with_stop_and_a_malformed_frame_runs_nothing(tmp_path, clock, monkeypatch):
    inbox = [[codec.pack({"t": "embed", "seq": 1, "budget_ms": 1000}), b"\xc1"], [messages.worker_header("stop")]]
    w, sock, backend = serving(tmp_path, monkeypatch, inbox)
    w._serve_once()
    assert w.stopping is True and inbox == []
    assert backend.seen == [] and sock.messages == [] and w.heartbeat.history == []


def test_a_turn_answers_a_job_that_expired_on_its_way_in_the_same_turn(tmp_path, clock, monkeypatch):
    w, sock, backend = serving(tmp_path, monkeypatch, [embed_msg((1, ["a"]), budget_ms=0)])
    w._serve_once()
    [[header]] = headers(sock)
    assert header["seq"] == 1 and header["code"] == "TIMEOUT"
    assert backend.seen == [] and [v for k, v in w.heartbeat.history if k == "busy"] == [True, False]
