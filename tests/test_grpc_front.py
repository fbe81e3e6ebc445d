"""The gRPC front (`serve --grpc`, `[grpc] listen`, `akidb-embed grpc`): Embed/Info/Health, status codes, health."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from conftest import poll_until

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("grpc", "grpc_health")),
                                reason="the grpc extra is not installed")

MOCK = """
    [backends.mock]
    kind = "mock"
    dim = 16
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rpc:
    """A channel to a gRPC front, with the Embedder and grpc.health.v1 stubs."""

    def __init__(self, port: int) -> None:
        import grpc
        from grpc_health.v1 import health_pb2_grpc

        from akidb_embed.fronts import embed_pb2_grpc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = embed_pb2_grpc.EmbedderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_up(self, timeout: float = 60.0) -> None:
        import grpc

        def up() -> bool:
            try:
                return self.stub.Health(self.request("HealthRequest"), timeout=2).status != ""
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAUTHENTICATED   # it answers: up, with keys
        poll_until(up, timeout, 0.1)

    @staticmethod
    def request(name: str, **fields: Any) -> Any:
        from akidb_embed.fronts import embed_pb2
        return getattr(embed_pb2, name)(**fields)

    def check(self, service: str = "") -> int:
        from grpc_health.v1 import health_pb2
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


@pytest.fixture
def rpc_front(serve):
    def start(body: str = MOCK, extra: str = "") -> tuple[Any, Rpc]:
        port = free_port()
        server = serve(body + f'\n[grpc]\nlisten = "127.0.0.1:{port}"\n{extra}\n')
        rpc = Rpc(port)
        rpc.wait_up()
        return server, rpc
    return start


def vectors(resp: Any) -> np.ndarray:
    return np.frombuffer(resp.data, dtype="<f4").reshape(tuple(resp.shape))


def test_stub_embeds_like_the_client(rpc_front) -> None:
    server, rpc = rpc_front()
    texts = ["alpha", "beta", "gamma"]
    resp = rpc.stub.Embed(rpc.request("EmbedRequest", texts=texts, model="mock"), timeout=30)
    with server.client() as c:
        ref = c.embed(texts)
    assert list(resp.shape) == [3, 16] and (resp.backend, resp.model) == ("mock", "mock")
    assert np.array_equal(vectors(resp), ref)
    raw = rpc.stub.Embed(rpc.request("EmbedRequest", texts=texts, normalize=False), timeout=30)  # default backend
    with server.client() as c:
        assert np.array_equal(vectors(raw), c.embed(texts, normalize=False))
    info = rpc.stub.Info(rpc.request("InfoRequest"), timeout=10)
    assert info.default_backend == "mock" and [(b.name, b.dimension, b.state) for b in info.backends] == [
        ("mock", 16, "READY")]
    health = rpc.stub.Health(rpc.request("HealthRequest"), timeout=10)
    assert health.status == "ok" and dict(health.backends) == {"mock": "READY"}


def test_status_codes_for_unknown_backend_bad_request_and_deadline(rpc_front) -> None:
    import grpc

    server, rpc = rpc_front("""
        [backends.mock]
        kind = "mock"
        dim = 16
        delay_ms = 3000
    """)
    with pytest.raises(grpc.RpcError) as exc:
        rpc.stub.Embed(rpc.request("EmbedRequest", texts=["x"], model="nope"), timeout=30)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "UNKNOWN_BACKEND" in exc.value.details()
    with pytest.raises(grpc.RpcError) as exc:
        rpc.stub.Embed(rpc.request("EmbedRequest", texts=[]), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as exc:
        rpc.stub.Embed(rpc.request("EmbedRequest", texts=["x"], dimensions=8), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dimensions" in exc.value.details()
    # the call's deadline is the request's deadline: the supervisor times it out, not only the caller
    with pytest.raises(grpc.RpcError) as exc:
        rpc.stub.Embed(rpc.request("EmbedRequest", texts=["slow"]), timeout=0.5)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    poll_until(lambda: "request timeout: backend=mock" in server.log(), 10)
    with server.client() as c:
        c.stop("mock")
    with pytest.raises(grpc.RpcError) as exc:
        rpc.stub.Embed(rpc.request("EmbedRequest", texts=["x"]), timeout=30)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "BACKEND_UNAVAILABLE" in exc.value.details()


@pytest.mark.parametrize("code,status", [
    ("BAD_REQUEST", "INVALID_ARGUMENT"), ("UNAUTHORIZED", "UNAUTHENTICATED"), ("UNKNOWN_BACKEND", "NOT_FOUND"),
    ("PAYLOAD_TOO_LARGE", "RESOURCE_EXHAUSTED"), ("OVERLOADED", "RESOURCE_EXHAUSTED"),
    ("BACKEND_UNAVAILABLE", "UNAVAILABLE"), ("SERVER_UNAVAILABLE", "UNAVAILABLE"), ("SHUTTING_DOWN", "UNAVAILABLE"),
    ("TIMEOUT", "DEADLINE_EXCEEDED"), ("INTERNAL", "INTERNAL"),
])
def test_each_error_code_has_a_grpc_status(code: str, status: str) -> None:
    import grpc

    from akidb_embed.fronts.common import error_status
    assert getattr(grpc.StatusCode, error_status(code)[2]) == getattr(grpc.StatusCode, status)


def test_grpc_health_follows_the_backend_state(rpc_front) -> None:
    from grpc_health.v1 import health_pb2
    S = health_pb2.HealthCheckResponse
    server, rpc = rpc_front()
    assert rpc.check("") == S.SERVING and rpc.check("akidb_embed.v1.Embedder") == S.SERVING
    assert rpc.check("mock") == S.SERVING
    with server.client() as c:
        c.stop("mock")
    assert rpc.check("") == S.NOT_SERVING and rpc.check("mock") == S.NOT_SERVING
    with server.client() as c:
        c.start("mock")
    poll_until(lambda: rpc.check("") == S.SERVING, 30)
    import grpc
    with pytest.raises(grpc.RpcError) as exc:
        rpc.check("no-such-service")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    watch = rpc.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(watch).status == S.SERVING
    watch.cancel()


def test_api_key_in_metadata(rpc_front, tmp_path) -> None:
    import grpc

    keys = tmp_path / "keys"
    keys.write_text("k1\n")
    server, rpc = rpc_front(extra=f'api_keys_file = "{keys}"')
    with pytest.raises(grpc.RpcError) as exc:
        rpc.stub.Embed(rpc.request("EmbedRequest", texts=["x"]), timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    resp = rpc.stub.Embed(rpc.request("EmbedRequest", texts=["x"]), timeout=10,
                          metadata=[("authorization", "Bearer k1")])
    assert list(resp.shape) == [1, 16]


def test_grpc_front_restarted_when_killed(rpc_front) -> None:
    server, rpc = rpc_front()
    pid = server.status()["fronts"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    poll_until(lambda: server.status()["fronts"][0]["pid"] not in (None, pid), 30)
    rpc.wait_up()
    assert list(rpc.stub.Embed(rpc.request("EmbedRequest", texts=["x"]), timeout=30).shape) == [1, 16]


def test_standalone_grpc_command(serve, tmp_path) -> None:
    server = serve(MOCK)
    port = free_port()
    log = open(tmp_path / "grpc.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "grpc", "--endpoint", server.endpoint,
                             "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        rpc = Rpc(port)
        rpc.wait_up()
        assert list(rpc.stub.Embed(rpc.request("EmbedRequest", texts=["x", "y"]), timeout=30).shape) == [2, 16]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
