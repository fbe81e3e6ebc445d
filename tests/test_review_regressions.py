"""Regressions found in a reliability review: each test failed before its fix."""
from __future__ import annotations

import asyncio
import shutil
import time

import msgpack
import pytest
import zmq

from akidb_embed import AsyncClient, EmbedError
from akidb_embed.protocol.codec import unpack
from akidb_embed.protocol.messages import request_frame
from akidb_embed.supervisor.app import Supervisor
from akidb_embed.supervisor.config import build_config
from akidb_embed.supervisor.process import WorkerProcess, WState

pytestmark = pytest.mark.timeout(120)

MOCK = """
    [backends.m]
    kind = "mock"
    dim = 8
"""


def pk(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.fixture
def sup():
    """A Supervisor that is constructed but not bound: its handlers can be called directly."""
    s = Supervisor(build_config({"backends": {"m": {"kind": "mock"}}}, "<test>"))
    yield s
    s.ctx.term()
    shutil.rmtree(s._rundir, ignore_errors=True)


def fake_worker(sup: Supervisor) -> WorkerProcess:
    pool = sup.pools["m"]
    w = WorkerProcess(pool.cfg, "m.1", sup.worker_endpoint)
    w.state = WState.READY
    req = sup.table.create([b"c"], 1, b"", ["x"], "m", 30.0, time.monotonic())
    req.seq = 7
    w.inflight[7] = req
    pool.workers[w.wid] = w
    sup._by_identity[w.identity] = w   # the worker channel knows workers by their secret identity
    return w


# A malformed worker frame used to raise out of the event loop (TypeError: unhashable seq,
# AttributeError: error not a map) and take the supervisor down with every request it held.
@pytest.mark.parametrize("header", [
    {"t": "done", "seq": [7]},
    {"t": "done", "seq": {"a": 1}},
    {"t": "fail", "error": "boom"},
    {"t": "ready", "info": ["not", "a", "map"]},
], ids=["seq-list", "seq-map", "fail-error-str", "ready-info-list"])
def test_malformed_worker_frame_does_not_escape_the_loop(sup, header, caplog):
    w = fake_worker(sup)
    w.state = WState.STARTING if header["t"] == "ready" else WState.READY
    sup._on_worker_frames([w.identity, pk(header), b"response"])   # must not raise
    # ... and not because a catch-all swallowed the error: the frame is validated before use
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert 7 in w.inflight                                    # nothing answered by a bad seq
    assert isinstance(sup.pools["m"].model_info or {}, dict)


# Answered entries left the deadline heap only from its top: behind one long-lived earlier deadline
# every later answered request (with its whole request frame) was kept until that deadline.
def test_deadline_heap_does_not_keep_answered_requests(sup, monkeypatch):
    monkeypatch.setattr(sup.pools["m"], "admit", lambda p, priority=None: None)
    monkeypatch.setattr(sup.pools["m"], "pump", lambda: None)
    monkeypatch.setattr(sup.table, "_reply", lambda route, frame: None)
    from akidb_embed.protocol.messages import parse_request
    sup._submit([b"c"], b"", parse_request(request_frame(0, "embed", texts=["stuck"], timeout_ms=10**12)))
    for i in range(1, 5000):
        sup._submit([b"c"], b"", parse_request(request_frame(i, "embed", texts=["t"], timeout_ms=10**12)))
        p = max(sup.table.live.values(), key=lambda r: r.seq)
        sup.table.fail(p, EmbedError("answered"))
    assert len(sup.table) == 1
    assert sup.table.heap_size <= 2 * len(sup.table) + 65


@pytest.mark.slow
def test_deadline_heap_memory_is_bounded_behind_a_hung_request(serve):
    from conftest import poll_until
    server = serve("[supervisor]\ndrain_timeout_s = 0.5\nstop_timeout_s = 0.5\n"
                   + MOCK + 'replicas = 2\nhang_on = "stuck"\n')
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        sock.send(request_frame("stuck", "embed", texts=["stuck"], timeout_ms=10**12))
        poll_until(lambda: server.status()["backends"]["m"]["in_flight"] == 1, 10)
        big = "x " * 100_000                     # ~200 KB per request frame
        rss0 = server.ps.memory_info().rss
        for i in range(500):                     # ~100 MB of frames if they were all kept
            sock.send(request_frame(i, "embed", texts=[big + str(i)], timeout_ms=10**12))
            assert sock.poll(10_000)
            assert unpack(sock.recv())["ok"] is True
        grown_mb = (server.ps.memory_info().rss - rss0) / 2**20
    finally:
        sock.close(0)
    assert grown_mb < 50, grown_mb


# A REQ client sending several frames got its BAD_REQUEST without the empty delimiter, which the REQ
# socket silently drops: the client waited forever.
def test_req_client_multiframe_request_gets_bad_request(serve):
    server = serve(MOCK)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        sock.send_multipart([request_frame(1, "health"), b"extra"])
        assert sock.poll(5_000), "REQ client got no answer"
        msg = unpack(sock.recv())
        sock.send(request_frame(2, "health"))      # the REQ socket is usable again
        assert sock.poll(5_000)
        assert unpack(sock.recv())["ok"] is True
    finally:
        sock.close(0)
    assert msg["ok"] is False and msg["error"]["code"] == "BAD_REQUEST"
    assert "got 2" in msg["error"]["message"]


# Client.embed(timeout=1e9) raised OverflowError from zmq_poll (int milliseconds) after sending.
def test_blocking_client_accepts_a_huge_timeout(serve):
    server = serve(MOCK)
    with server.client() as c:
        assert c.embed(["x"], timeout=1e9).shape == (1, 8)
        assert c.embed(["y"], timeout=3e6).shape == (1, 8)


# AsyncClient.close() left the futures of calls in flight pending: each caller hung for its whole
# wait (120 s by default) and then got a misleading TIMEOUT.
def test_async_client_close_fails_calls_in_flight(serve):
    server = serve("[supervisor]\ndrain_timeout_s = 0.1\nstop_timeout_s = 0.1\n" + MOCK   # a quick teardown
                   + "delay_ms = 20000\nhang_grace_s = 60\n")

    async def main():
        c = AsyncClient(server.endpoint)
        task = asyncio.ensure_future(c.embed(["slow"]))
        for _ in range(500):                     # until the request is in the worker's hands
            if (await c.status())["backends"]["m"]["in_flight"] == 1:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the request never reached the worker")
        await c.close()
        t0 = time.monotonic()
        with pytest.raises(EmbedError) as info:
            await asyncio.wait_for(task, 5)
        return time.monotonic() - t0, info.value

    seconds, err = asyncio.run(main())
    assert seconds < 5                           # at once, not after the 20 s the request still needs
    assert "closed" in err.message


def test_worker_that_cannot_be_spawned_counts_as_a_crash_not_a_supervisor_error():
    """Popen failing (interpreter deleted after start-up, no fds) must not escape the loop: the pool
    schedules a retry, and past the restart limit the backend is FAILED with the reason."""
    import time as _time
    from dataclasses import replace

    from akidb_embed.supervisor.config import build_config
    from akidb_embed.supervisor.events import Events
    from akidb_embed.supervisor.pool import BackendPool, BState
    from akidb_embed.supervisor.quarantine import Quarantine
    from akidb_embed.supervisor.requests import RequestTable

    cfg = replace(build_config({"backends": {"m": {"kind": "mock", "restart_max": 1}}}, "t").backends["m"],
                  python="/nonexistent/python")

    class Host:
        worker_endpoint = "ipc:///nonexistent.sock"
        quarantine = Quarantine()
        events = Events()
        table = RequestTable(lambda route, frame: None, events)
        def watch(self, w): raise AssertionError("a worker that never started is not watched")
        def unwatch(self, w): pass
        def send_jobs(self, w, jobs): pass
        def send_stop(self, w): pass

    pool = BackendPool(cfg, Host())
    pool.start()
    assert pool.state == BState.STARTING and len(pool.respawn_at) == 1
    assert "could not be started" in pool.last_exit
    pool.tick(_time.monotonic() + 60)          # the retry fails too: past restart_max
    assert pool.state == BState.FAILED and "/nonexistent/python" in pool.last_exit


@pytest.mark.slow
def test_timed_out_requests_free_their_place_in_the_queue(serve):
    """max_queue bounds requests still waiting: ones already answered TIMEOUT must not cause OVERLOADED."""
    import threading

    from akidb_embed import Client, Overloaded, Timeout
    from conftest import poll_until

    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 4
        delay_ms = 1500
        max_queue = 2
        max_inflight = 1
    """)
    def occupy() -> None:
        with Client(server.endpoint) as c:
            c.embed(["busy"], timeout=10)

    busy = threading.Thread(target=occupy, daemon=True)
    busy.start()
    poll_until(lambda: server.status()["backends"]["m"]["in_flight"] == 1, 5)
    for i in range(2):                       # fill the queue with requests that will time out there
        with pytest.raises(Timeout), Client(server.endpoint) as c:
            c.embed([f"late {i}"], timeout=0.2)
    with Client(server.endpoint) as c:       # the queue holds only answered requests: this one is accepted
        try:
            assert c.embed(["accepted"], timeout=10).shape == (1, 4)
        except Overloaded as exc:
            pytest.fail(f"refused although nothing is waiting: {exc}")
    busy.join(10)
    assert not busy.is_alive()
