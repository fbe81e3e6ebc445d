"""Per-peer bounds (issue 11): a peer that never reads, a burst of big frames and a flood from one peer
keep the supervisor's memory bounded and leave other peers served."""
from __future__ import annotations

import time

import zmq
from conftest import poll_until, raw_dealer, recv_answer

from akidb_embed.protocol.codec import unpack
from akidb_embed.protocol.messages import request_frame

MB = 2**20


def peak_rss(server, seconds: float, start: float = 0.0) -> float:
    """Highest supervisor RSS seen over ``seconds`` (sampled every 20 ms), in bytes."""
    peak = start
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, server.ps.memory_info().rss)
        time.sleep(0.02)
    return peak


def test_never_reading_peer_is_bounded_by_answer_hwm(serve):
    # 100 texts of dim 3,840: answers of 1.5 MB; 100 of them would be 150 MB held for a peer that never reads
    # (few wide vectors rather than many narrow ones: the same bytes for a tenth of the mock's work)
    server = serve("""
        [server]
        answer_hwm = 8
        [backends.m]
        kind = "mock"
        dim = 3840
    """)
    rss0 = server.ps.memory_info().rss
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)      # push back as soon as it can
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(server.endpoint)
    texts = [f"text number {i} " * 8 for i in range(100)]
    try:
        peak = rss0
        for i in range(100):
            sock.send(request_frame(i, "embed", texts=texts))
            peak = max(peak, server.ps.memory_info().rss)
        poll_until(lambda: "answers dropped" in server.log(), 60, 0.1)
        peak = peak_rss(server, 2.0, peak)
        with server.client() as c:     # another peer is served meanwhile
            assert c.embed(["other"], backend="m").shape == (1, 3840)
            # its backlog (cut into parts by the scheduler) still runs to the end, its answers dropped
            def drained() -> bool:
                nonlocal peak
                peak = max(peak, server.ps.memory_info().rss)
                return c.status()["supervisor"]["pending"] == 0
            poll_until(drained, 120, 0.1)
    finally:
        sock.close(0)
    grown = (peak - rss0) / MB
    print(f"never-reading peer: supervisor RSS {rss0 / MB:.0f} MB -> peak {peak / MB:.0f} MB (+{grown:.0f} MB)")
    assert grown < 100, grown        # far below the 150 MB of answers it was sent
    assert server.log().count("answers dropped") <= 5


def test_big_frame_burst_is_refused_and_bounded(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
    """)
    rss0 = server.ps.memory_info().rss
    sock = raw_dealer(server.endpoint)
    big = request_frame("big", "embed", texts=["x" * (9 * MB)])   # over the 8 MiB default
    try:
        for _ in range(16):
            sock.send(big, copy=False)
        answers = [recv_answer(sock, 60) for _ in range(16)]
        peak = peak_rss(server, 0.5, server.ps.memory_info().rss)
    finally:
        sock.close(0)
    assert all(a["id"] == "big" and a["error"]["code"] == "PAYLOAD_TOO_LARGE" for a in answers)
    print(f"16 frames of 9 MiB: supervisor RSS {rss0 / MB:.0f} MB -> {peak / MB:.0f} MB afterwards")
    with server.client() as c:
        assert c.embed(["after the burst"]).shape == (1, 8)
    poll_until(lambda: server.ps.memory_info().rss < rss0 + 64 * MB, 10)


def test_one_peers_flood_leaves_another_peer_served(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 100
        max_queue = 20
        max_inflight = 2
    """)
    flood = raw_dealer(server.endpoint)
    try:
        for i in range(300):
            flood.send(request_frame(i, "embed", texts=[f"flood {i}"]))
        first = [recv_answer(flood, 10) for _ in range(250)]   # the excess is refused at once
        overloaded = [a for a in first if not a["ok"]]
        assert overloaded and all(a["error"]["code"] == "OVERLOADED" for a in overloaded)
        assert "share of max_queue" in overloaded[0]["error"]["message"]
        with server.client() as c:   # while the flood's share is still queued
            assert c.status()["backends"]["m"]["queue"] > 0
            assert c.embed(["me too"], timeout=10).shape == (1, 8)
    finally:
        flood.close(0)


def test_stalled_peer_gets_overloaded_not_silence(serve):
    server = serve("""
        [server]
        answer_hwm = 2
        [backends.m]
        kind = "mock"
        dim = 384
    """)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(server.endpoint)
    texts = ["y " * 200] * 500
    try:
        for i in range(30):
            sock.send(request_frame(i, "embed", texts=texts))
        poll_until(lambda: "answers dropped" in server.log(), 60, 0.1)
        got = []
        while sock.poll(500) and len(got) < 40:   # now it reads: what arrives is whole, then it is served again
            got.append(unpack(sock.recv()))
        assert got and all(isinstance(a["ok"], bool) for a in got)
        time.sleep(1.1)   # STALL_RETRY_S: a stalled peer is tried again after this long
        sock.send(request_frame("again", "embed", texts=["x"]))
        poll_until(lambda: sock.poll(100) and unpack(sock.recv()).get("id") == "again", 10)
    finally:
        sock.close(0)
