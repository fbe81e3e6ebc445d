"""The bridge spine end to end: real supervisor, real worker processes, mock backends."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest

from akidb_embed import AsyncClient, Client, EmbedError, ErrorCode, Timeout, UnknownBackend
from akidb_embed.protocol.codec import blob_to_vectors
from akidb_embed.protocol.messages import request_frame
from akidb_embed.workers.backends.mock import mock_vector
from conftest import poll_until, raw_dealer, recv_answer


def expected(text: str, dim: int, normalize: bool = True) -> np.ndarray:
    v = mock_vector(text, dim)
    return v / np.linalg.norm(v) if normalize else v


TWO_BACKENDS = """
    [server]
    default_backend = "small"

    [backends.small]
    kind = "mock"
    dim = 8

    [backends.big]
    kind = "mock"
    dim = 48
"""


# ---- 1. round trip ----------------------------------------------------------------------------

def test_round_trip_shape_dtype_and_norm(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 16
    """)
    texts = ["hello", "world", "a longer sentence with several words"]
    with server.client() as c:
        res = c.embed_result(texts)
        raw = c.embed(texts, normalize=False)
    v = res.vectors
    assert v.shape == (3, 16) and v.dtype == np.float32
    assert res.backend == "m" and res.model == "mock" and res.truncated == 0
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    for i, t in enumerate(texts):
        assert np.allclose(v[i], expected(t, 16), atol=1e-6)
    # normalize=False returns the mock's raw vector, which is not unit length
    assert raw.shape == (3, 16) and raw.dtype == np.float32
    norms = np.linalg.norm(raw, axis=1)
    assert np.all(np.abs(norms - 1.0) > 0.1), norms
    for i, t in enumerate(texts):
        assert np.array_equal(raw[i], expected(t, 16, normalize=False))


def test_round_trip_float16_is_close(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 32
    """)
    with server.client() as c:
        full = c.embed(["half precision", "second"])
        half = c.embed(["half precision", "second"], dtype="float16")
    assert half.shape == (2, 32) and half.dtype == np.float32   # the client widens to float32
    assert not np.array_equal(full, half)                          # really went through float16
    assert np.allclose(full, half, atol=2e-3)


def test_float16_travels_as_two_bytes_per_value(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 10
    """)
    sock = raw_dealer(server.endpoint)
    try:
        sock.send(request_frame("h", "embed", texts=["x", "y"], dtype="float16"))
        msg = recv_answer(sock)
    finally:
        sock.close(0)
    assert msg["ok"] is True and msg["id"] == "h" and msg["dtype"] == "float16"
    assert msg["shape"] == [2, 10] and len(msg["data"]) == 2 * 10 * 2
    got = blob_to_vectors(msg["data"], msg["shape"], "float16")
    assert np.allclose(got[1], expected("y", 10), atol=2e-3)


def test_determinism_across_two_server_processes(serve):
    body = """
        [backends.m]
        kind = "mock"
        dim = 24
    """
    a, b = serve(body), serve(body)
    assert a.proc.pid != b.proc.pid and a.endpoint != b.endpoint
    texts = ["same text", "another one", ""]
    with a.client() as ca, b.client() as cb:
        va, vb = ca.embed(texts), cb.embed(texts)
        ra, rb = ca.embed(texts, normalize=False), cb.embed(texts, normalize=False)
    assert np.array_equal(va, vb)
    assert np.array_equal(ra, rb)
    assert not np.array_equal(va[0], va[1])


# ---- 2. many requests in flight ------------------------------------------------------------------

def test_threads_with_own_clients_and_async_client_many_in_flight(serve):
    dim = 12
    server = serve(f"""
        [backends.m]
        kind = "mock"
        dim = {dim}
        replicas = 2
    """)
    errors: list[BaseException] = []
    results: dict[int, int] = {}

    def worker(n: int) -> None:
        try:
            with Client(server.endpoint, timeout=20) as c:
                ok = 0
                for i in range(25):
                    texts = [f"thread {n} req {i} item {k}" for k in range(1 + i % 3)]
                    v = c.embed(texts)
                    assert v.shape == (len(texts), dim)
                    for row, t in zip(v, texts):
                        assert np.allclose(row, expected(t, dim), atol=1e-6), t
                    ok += 1
                results[n] = ok
        except BaseException as exc:  # reported below, in the main thread
            errors.append(exc)

    async def many() -> list[np.ndarray]:
        async with AsyncClient(server.endpoint, timeout=20) as ac:
            return await asyncio.gather(*(ac.embed([f"async {i}"]) for i in range(200)))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    answers = asyncio.run(asyncio.wait_for(many(), 60))
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert results == {n: 25 for n in range(4)}
    assert len(answers) == 200
    for i, v in enumerate(answers):
        assert v.shape == (1, dim)
        assert np.allclose(v[0], expected(f"async {i}", dim), atol=1e-6), i
    status = server.status()["backends"]["m"]
    assert status["served"] >= 4 * 25 + 200 and status["state"] == "READY"


# ---- 3. out-of-order completion --------------------------------------------------------------

def test_out_of_order_completion_each_answer_carries_its_id(serve):
    server = serve("""
        [backends.slow]
        kind = "mock"
        dim = 8
        delay_ms = 400

        [backends.fast]
        kind = "mock"
        dim = 8
    """)
    sock = raw_dealer(server.endpoint)
    try:
        sock.send(request_frame("slow-1", "embed", texts=["slow text"], backend="slow"))
        sock.send(request_frame(2, "embed", texts=["fast text"], backend="fast"))
        first, second = recv_answer(sock), recv_answer(sock)
    finally:
        sock.close(0)
    assert first["ok"] and second["ok"]
    assert (first["id"], first["backend"]) == (2, "fast")
    assert (second["id"], second["backend"]) == ("slow-1", "slow")
    fv = blob_to_vectors(first["data"], first["shape"])
    sv = blob_to_vectors(second["data"], second["shape"])
    assert np.allclose(fv[0], expected("fast text", 8), atol=1e-6)
    assert np.allclose(sv[0], expected("slow text", 8), atol=1e-6)


# ---- 4. two backends side by side -------------------------------------------------------------

def test_two_backends_side_by_side_and_info(serve):
    server = serve(TWO_BACKENDS)
    with server.client() as c:
        default = c.embed_result(["x"])
        small = c.embed_result(["x"], backend="small")
        big = c.embed_result(["x"], backend="big")
        info = c.info()
    assert default.backend == "small" and default.vectors.shape == (1, 8)
    assert small.vectors.shape == (1, 8) and np.allclose(small.vectors[0], expected("x", 8), atol=1e-6)
    assert big.backend == "big" and big.vectors.shape == (1, 48)
    assert np.allclose(big.vectors[0], expected("x", 48), atol=1e-6)
    assert info["default_backend"] == "small" and info["protocol"] == 1
    assert set(info["backends"]) == {"small", "big"}
    assert info["backends"]["small"]["dim"] == 8 and info["backends"]["big"]["dim"] == 48
    for b in info["backends"].values():
        assert b["model"] == "mock" and b["kind"] == "mock" and b["state"] == "READY"


def test_unknown_backend_is_refused_and_server_keeps_serving(serve):
    server = serve(TWO_BACKENDS)
    with server.client() as c:
        with pytest.raises(UnknownBackend) as ei:
            c.embed(["x"], backend="nope")
        assert ei.value.code == ErrorCode.UNKNOWN_BACKEND and ei.value.retryable is False
        assert "nope" in ei.value.message and "small" in ei.value.message
        assert c.embed(["x"], backend="big").shape == (1, 48)


# ---- 6. a worker killed mid-request ----------------------------------------------------------

@pytest.mark.slow
def test_worker_sigkilled_mid_request_is_answered_and_replaced(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 1000
    """)
    [old_pid] = server.worker_pids("m")
    outcome: dict[str, object] = {}

    def call() -> None:
        with server.client() as c:
            try:
                outcome["vectors"] = c.embed(["victim"], timeout=30)
            except EmbedError as exc:
                outcome["error"] = exc

    t = threading.Thread(target=call)
    t.start()
    # the request is in the worker once the status shows it in flight
    poll_until(lambda: server.status()["backends"]["m"]["in_flight"] == 1, 15)
    os.kill(old_pid, signal.SIGKILL)
    t.join(40)
    assert not t.is_alive()
    # docs: a request whose worker dies is retried once, so one death costs nothing
    assert "vectors" in outcome, outcome.get("error")
    assert np.allclose(outcome["vectors"][0], expected("victim", 8), atol=1e-6)

    def replaced():
        b = server.status()["backends"]["m"]
        return b["state"] == "READY" and b["pids"] and b["pids"] != [old_pid] and b
    b = poll_until(replaced, 15)
    assert old_pid not in b["pids"] and b["restarts"] >= 1 and "SIGKILL" in (b["last_exit"] or "")
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    with server.client() as c:
        assert np.allclose(c.embed(["after"])[0], expected("after", 8), atol=1e-6)


# ---- 7. deadlines ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_deadline_exceeded_then_next_request_works(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 1000
    """)
    with server.client() as c:
        t0 = time.monotonic()
        with pytest.raises(Timeout) as ei:
            c.embed(["too slow"], timeout=0.2)
        elapsed = time.monotonic() - t0
        assert ei.value.code == ErrorCode.TIMEOUT and ei.value.retryable is True
        assert "deadline" in ei.value.message       # the server's answer, not the client's own wait
        assert elapsed < 1.0, elapsed
        v = c.embed(["in time"], timeout=10)
    assert np.allclose(v[0], expected("in time", 8), atol=1e-6)
    assert server.proc.poll() is None


def test_per_backend_timeout_and_supervisor_default_apply(serve):
    server = serve("""
        [supervisor]
        request_timeout_s = 0.3

        [backends.global]
        kind = "mock"
        dim = 8
        delay_ms = 1500

        [backends.own]
        kind = "mock"
        dim = 8
        delay_ms = 1500
        timeout_s = 0.2

        [backends.roomy]
        kind = "mock"
        dim = 8
        delay_ms = 400
        timeout_s = 5
    """)
    with server.client() as c:
        for name in ("global", "own"):
            t0 = time.monotonic()
            with pytest.raises(Timeout) as ei:
                c.embed(["default deadline"], backend=name)   # names no timeout
            elapsed = time.monotonic() - t0
            assert "deadline" in ei.value.message and repr(name) in ei.value.message
            assert elapsed < 1.2, (name, elapsed)
        # a backend's own timeout_s beats the shorter [supervisor] default
        assert c.embed(["room"], backend="roomy").shape == (1, 8)
