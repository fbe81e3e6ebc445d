"""The worker's job loop in-process (no sockets): expired jobs are skipped, answers are per request,
one failing input fails alone, malformed jobs are dropped. Real workers are covered by test_bridge."""
from __future__ import annotations

import numpy as np
import pytest

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
