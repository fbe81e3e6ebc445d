"""The HTTP front (`serve --http`, `[http] listen`, `akidb-embed http`): REST, OpenAI, probes, errors, keys."""
from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from conftest import Server, poll_until

pytestmark = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn", "orjson")),
                                reason="the http extra is not installed")

MOCK = """
    [backends.mock]
    kind = "mock"
    dim = 32
"""
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: Any = None, headers: dict[str, str] | None = None, method: str | None = None,
         raw: bytes | None = None, timeout: float = 30.0) -> tuple[int, dict[str, str], Any]:
    """(status, headers, decoded JSON or text) of one HTTP request; never raises on HTTP errors."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, hdrs, payload = exc.code, dict(exc.headers), exc.read()
    kind = hdrs.get("content-type", "")
    return status, {k.lower(): v for k, v in hdrs.items()}, json.loads(payload) if "json" in kind else payload.decode()


class Front:
    """A supervisor started with an HTTP front on a free loopback port."""

    def __init__(self, server: Server, port: int) -> None:
        self.server, self.url = server, f"http://127.0.0.1:{port}"

    def wait_up(self, timeout: float = 60.0) -> None:
        def up() -> bool:
            try:
                return call(self.url + "/health", timeout=2)[0] == 200
            except OSError:
                return False
        poll_until(up, timeout, 0.1)

    def front_pid(self) -> int | None:
        return self.server.status()["fronts"][0]["pid"]


def start_front(serve: Any, body: str, http_extra: str = "", ready: bool = True) -> Front:
    port = free_port()
    server = serve(body + f'\n[http]\nlisten = "127.0.0.1:{port}"\n{http_extra}\n', ready=ready)
    front = Front(server, port)
    front.wait_up()
    return front


# ---- with all-MiniLM-L6-v2 on onnx: the seed's curl body and the official openai client --------------------

@pytest.fixture(scope="module")
def onnx_front(tmp_path_factory: pytest.TempPathFactory):
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("openai") is None:
        pytest.skip("onnxruntime and openai are needed")
    port = free_port()
    server = Server(tmp_path_factory.mktemp("onnx"), f"""
        [backends.onnx]
        kind = "onnx"
        model = "{MODEL}"
        threads = 1
        [http]
        listen = "127.0.0.1:{port}"
    """)
    try:
        server.wait_ready(300)
        front = Front(server, port)
        front.wait_up()
        yield front
    finally:
        server.shutdown()


def test_seed_curl_body_returns_384_unit_floats(onnx_front: Front) -> None:
    status, _, body = call(onnx_front.url + "/api/v1/embed",
                           {"model": MODEL, "inputs": ["Hello, world!"], "normalize": True})
    assert status == 200, body
    assert body["model"] == MODEL and body["dimension"] == 384 and body["backend"] == "onnx"
    vec = np.asarray(body["embeddings"][0], dtype=np.float64)
    assert vec.shape == (384,) and abs(np.linalg.norm(vec) - 1.0) < 1e-4
    with onnx_front.server.client() as c:
        ref = c.embed(["Hello, world!"])[0]
    assert float(vec @ ref) >= 0.9999


def test_openai_client_matches_client_embed(onnx_front: Front) -> None:
    import openai

    api = openai.OpenAI(base_url=onnx_front.url + "/v1", api_key="unused", max_retries=0)
    texts = ["The quick brown fox", "jumps over the lazy dog", "Hello, world!"]
    with onnx_front.server.client() as c:
        ref = c.embed(texts)
    one = api.embeddings.create(model=MODEL, input=texts[0])
    assert len(one.data) == 1 and float(np.asarray(one.data[0].embedding) @ ref[0]) >= 0.9999
    many = api.embeddings.create(model="onnx", input=texts)          # a backend name selects too
    got = np.asarray([d.embedding for d in sorted(many.data, key=lambda d: d.index)])
    assert got.shape == (3, 384) and np.all(np.sum(got * ref, axis=1) >= 0.9999)
    # base64: the client decodes it itself when it asked for floats; ask for base64 explicitly to see the bytes
    b64 = api.embeddings.create(model=MODEL, input=texts, encoding_format="base64")
    raw = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in b64.data])  # type: ignore[arg-type]
    assert raw.shape == (3, 384) and np.array_equal(raw, ref)
    # dimensions: the model's own size is accepted; another size is refused (the model declares no Matryoshka dims)
    same = api.embeddings.create(model=MODEL, input=texts[0], dimensions=384)
    assert len(same.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as exc:
        api.embeddings.create(model=MODEL, input=texts[0], dimensions=128)
    assert "dimensions" in str(exc.value)
    models = {m.id for m in api.models.list()}
    assert {MODEL, "onnx"} <= models


def test_openai_usage_counts_the_tokenizers_tokens(onnx_front: Front) -> None:
    import asyncio

    import openai
    from tokenizers import Tokenizer

    from akidb_embed.client import AsyncClient
    from akidb_embed.models.cache import packaged_model_dir

    texts = ["The quick brown fox", "jumps over the lazy dog"]

    async def raw() -> dict:
        async with AsyncClient(onnx_front.server.endpoint) as c:
            return await c.request("embed", 30, texts=texts)
    assert len(asyncio.run(raw())["tokens"]) == len(texts)   # per-text counts in the answer (issue 13)
    api = openai.OpenAI(base_url=onnx_front.url + "/v1", api_key="unused", max_retries=0)
    usage = api.embeddings.create(model=MODEL, input=texts).usage
    tok = Tokenizer.from_file(str(packaged_model_dir(MODEL) / "tokenizer.json"))
    tok.no_padding()   # the packaged tokenizer.json pads every text to a fixed length
    expected = sum(len(e.ids) for e in tok.encode_batch(texts))
    assert usage.prompt_tokens == usage.total_tokens == expected > 0


# ---- mock backend: routes, errors, keys, readiness, supervision --------------------------------------------

def test_rest_and_openai_routes_answer_the_documented_shapes(serve) -> None:
    front = start_front(serve, MOCK)
    with front.server.client() as c:
        ref = c.embed(["a", "b"])
    status, _, body = call(front.url + "/api/v1/embed", {"inputs": ["a", "b"]})   # no model: default backend
    assert status == 200 and body["dimension"] == 32 and body["model"] == "mock" and body["truncated"] == 0
    assert np.allclose(np.asarray(body["embeddings"]), ref, atol=1e-6)
    status, _, body = call(front.url + "/v1/embeddings", {"model": "mock", "input": ["a", "b"]})
    assert status == 200 and body["object"] == "list" and body["model"] == "mock"
    assert [d["index"] for d in body["data"]] == [0, 1] and body["usage"].keys() == {"prompt_tokens", "total_tokens"}
    status, _, body = call(front.url + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["mock"] and body["data"][0]["dimension"] == 32
    assert call(front.url + "/health")[:3:2] == (200, {"status": "ok"})


@pytest.mark.parametrize("code,status,kind", [
    ("BAD_REQUEST", 400, "invalid_request_error"), ("UNAUTHORIZED", 401, "authentication_error"),
    ("UNKNOWN_BACKEND", 404, "invalid_request_error"), ("PAYLOAD_TOO_LARGE", 413, "invalid_request_error"),
    ("OVERLOADED", 429, "rate_limit_error"), ("BACKEND_UNAVAILABLE", 503, "server_error"),
    ("SERVER_UNAVAILABLE", 503, "server_error"), ("SHUTTING_DOWN", 503, "server_error"),
    ("TIMEOUT", 504, "timeout_error"), ("INTERNAL", 500, "server_error"), ("SOMETHING_NEW", 500, "server_error"),
])
def test_each_error_code_maps_to_its_http_status_and_openai_body(code: str, status: int, kind: str) -> None:
    from akidb_embed.fronts.http import error_response
    resp = error_response(code, "why")
    assert resp.status_code == status
    assert json.loads(resp.body) == {"error": {"message": "why", "type": kind, "code": code}}
    assert ("retry-after" in resp.headers) == (status in (429, 503))


def test_errors_from_live_requests(serve) -> None:
    front = start_front(serve, """
        [backends.mock]
        kind = "mock"
        dim = 8
        delay_ms = 1500
        max_queue = 1
        max_inflight = 1
        max_batch_size = 1
    """)
    url = front.url + "/v1/embeddings"
    cases = [
        ({"model": "mock"}, 400, "BAD_REQUEST"),
        ({"model": "mock", "input": [[1, 2, 3]]}, 400, "BAD_REQUEST"),                # token ids
        ({"model": "mock", "input": "x", "encoding_format": "int8"}, 400, "BAD_REQUEST"),
        ({"model": "mock", "input": "x", "dimensions": 4}, 400, "BAD_REQUEST"),
        ({"model": "nope", "input": "x"}, 404, "UNKNOWN_BACKEND"),
    ]
    for body, status, code in cases:
        got = call(url, body)
        assert (got[0], got[2]["error"]["code"]) == (status, code), (body, got)
    got = call(url, raw=b"{not json")
    assert (got[0], got[2]["error"]["code"]) == (400, "BAD_REQUEST")
    # a body announced past the limit is refused before it is read
    conn = http.client.HTTPConnection("127.0.0.1", int(front.url.rsplit(":", 1)[1]), timeout=30)
    conn.putrequest("POST", "/v1/embeddings")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(33 * 2**20))
    conn.endheaders(b'{"model": "mock", "input": "')
    resp = conn.getresponse()
    assert (resp.status, json.loads(resp.read())["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")
    conn.close()
    # deadline from the header and from the query parameter: the supervisor answers TIMEOUT
    for extra, headers in (("", {"X-Request-Timeout": "0.2"}), ("?timeout=0.2", {})):
        got = call(url + extra, {"model": "mock", "input": "slow"}, headers)
        assert (got[0], got[2]["error"]["code"]) == (504, "TIMEOUT"), got
    assert "request timeout" in front.server.log()
    # OVERLOADED: one in flight + one queued, the rest refused at once with Retry-After
    results: list[tuple[int, dict[str, str], Any]] = []

    def post(i: int) -> None:
        results.append(call(url, {"model": "mock", "input": f"t{i}"}))
    threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    refused = [r for r in results if r[0] == 429]
    assert refused and all(r[2]["error"]["code"] == "OVERLOADED" and r[1]["retry-after"] for r in refused), results
    assert any(r[0] == 200 for r in results)
    # BACKEND_UNAVAILABLE: a stopped backend
    with front.server.client() as c:
        c.stop("mock")
    got = call(url, {"model": "mock", "input": "x"})
    assert (got[0], got[2]["error"]["code"]) == (503, "BACKEND_UNAVAILABLE") and got[1]["retry-after"]


def test_readiness_follows_the_default_backends_state(serve, tmp_path) -> None:
    crash = tmp_path / "crash"
    front = start_front(serve, f"""
        [supervisor]
        restart_max = 1
        restart_window_s = 60
        restart_backoff_min_s = 0.05
        failed_cooldown_s = 3600
        [backends.mock]
        kind = "mock"
        dim = 8
        startup_crash_file = "{crash}"
    """)
    assert call(front.url + "/ready")[0] == 200
    assert call(front.url + "/health?ready=1")[0] == 200
    with front.server.client() as c:
        c.stop("mock")
    status, _, body = call(front.url + "/ready")
    assert status == 503 and body["backends"] == {"mock": "STOPPED"}
    assert call(front.url + "/health")[0] == 200          # liveness: the front itself answers
    crash.write_text("")
    with front.server.client() as c:
        c.start("mock")
    poll_until(lambda: call(front.url + "/ready")[2].get("backends") == {"mock": "FAILED"}, 60)
    assert call(front.url + "/ready")[0] == 503
    crash.unlink()
    with front.server.client() as c:
        c.start("mock")
    poll_until(lambda: call(front.url + "/ready")[0] == 200, 60)


def test_api_key_required_when_configured(serve, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsecret-one\nsecret-two\n")
    front = start_front(serve, MOCK, f'api_keys_file = "{keys}"')
    url = front.url + "/v1/embeddings"
    body = {"model": "mock", "input": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer secret-on"}):
        got = call(url, body, headers)
        assert (got[0], got[2]["error"]["code"]) == (401, "UNAUTHORIZED"), headers
    assert call(url, body, {"Authorization": "Bearer secret-two"})[0] == 200
    assert call(url, body, {"X-API-Key": "secret-one"})[0] == 200
    assert call(front.url + "/v1/models")[0] == 401
    assert call(front.url + "/health")[0] == 200 and call(front.url + "/ready")[0] == 200   # probes stay open


def test_front_restarted_when_killed_and_stopped_with_the_supervisor(serve) -> None:
    import psutil

    front = start_front(serve, MOCK)
    pid = front.front_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    poll_until(lambda: front.front_pid() not in (None, pid), 30)
    front.wait_up()
    assert call(front.url + "/v1/embeddings", {"model": "mock", "input": "x"})[0] == 200
    new = front.front_pid()
    assert front.server.status()["fronts"][0]["restarts"] == 1
    out = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "status", "--endpoint", front.server.endpoint],
                         capture_output=True, text=True, timeout=60).stdout
    assert f"front http listen={front.url.removeprefix('http://')} pid={new} restarts=1" in out, out
    assert front.server.stop() == 0
    assert new is not None and not psutil.pid_exists(new) or psutil.Process(new).status() == psutil.STATUS_ZOMBIE
    assert "front exit: kind=http" in front.server.log()


def test_metrics_pass_through_when_the_supervisor_has_the_op(serve) -> None:
    front = start_front(serve, MOCK)
    status, headers, body = call(front.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "akidb_embed_" in body


def test_standalone_http_command_against_a_running_supervisor(serve, tmp_path) -> None:
    server = serve(MOCK)
    port = free_port()
    log = open(tmp_path / "http.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "http", "--endpoint", server.endpoint,
                             "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        front = Front(server, port)
        front.wait_up()
        status, _, body = call(front.url + "/api/v1/embed", {"model": "mock", "inputs": ["x"]})
        assert status == 200 and len(body["embeddings"][0]) == 32
        assert call(front.url + "/ready")[0] == 200
        server.stop()                        # the supervisor is gone: the front lives, but is not ready
        status, _, body = call(front.url + "/ready")
        assert status == 503 and body["status"] == "unavailable", body
        assert call(front.url + "/health")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log.close()


def test_front_config_is_checked_at_start(tmp_path) -> None:
    from akidb_embed.supervisor.config import ConfigError, build_config

    base = {"backends": {"m": {"kind": "mock"}}}
    cfg = build_config({**base, "http": {"listen": "127.0.0.1:8080"}, "grpc": {"listen": "[::1]:50051"}}, "t")
    assert (cfg.http.listen, cfg.grpc.listen) == ("127.0.0.1:8080", "[::1]:50051")
    assert build_config(base, "t").http is None
    for table, needle in (({"listen": "8080"}, "http.listen"), ({"listen": "h:99999"}, "http.listen"),
                          ({"listen": "h:1", "port": 1}, "unknown key http.port"),
                          ({"listen": "h:1", "api_keys_file": str(tmp_path / "none")}, "http.api_keys_file")):
        with pytest.raises(ConfigError, match=needle):
            build_config({**base, "http": table}, "t")
    proc = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "serve", "--http", "nowhere"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "http.listen" in proc.stderr


def test_in_flight_http_request_finishes_during_drain(serve) -> None:
    front = start_front(serve, """
        [backends.mock]
        kind = "mock"
        dim = 8
        delay_ms = 1500
    """)
    pid = front.front_pid()
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(call(front.url + "/v1/embeddings",
                                                           {"model": "mock", "input": "slow"})))
    t.start()
    poll_until(lambda: front.server.status()["supervisor"]["pending"] == 1, 10)
    front.server.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert result and result[0][0] == 200, result
    assert front.server.proc.wait(30) == 0
    import psutil
    assert pid is not None and (not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)


def test_dimensions_pass_through_only_when_the_model_declares_them() -> None:
    from akidb_embed.fronts.common import FrontError, Route, check_dimensions, _route

    plain = _route("onnx", {"model": "m", "dim": 384})
    assert check_dimensions(plain, None) is None and check_dimensions(plain, 384) is None
    with pytest.raises(FrontError, match="does not support"):
        check_dimensions(plain, 128)
    matryoshka = _route("g", {"model": "g", "dim": 768, "extra": {"matryoshka_dims": [768, 512, 256, 128]}})
    assert matryoshka.dimensions_ok and check_dimensions(matryoshka, 128) == 128
    with pytest.raises(FrontError, match="supports 'dimensions' in"):
        check_dimensions(matryoshka, 100)   # the worker would refuse it: refused here with the list
    assert isinstance(matryoshka, Route)
    for bad in (0, -1, True, "128"):
        with pytest.raises(FrontError, match="positive integer"):
            check_dimensions(matryoshka, bad)


def test_supervised_front_reaches_a_tcp_supervisor_over_its_private_ipc(tmp_path) -> None:
    """With server.endpoint on tcp (loopback, no CURVE) the front it starts connects over an ipc endpoint in the
    supervisor's private run directory, and embeds through it."""
    zport, hport = free_port(), free_port()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nendpoint = "tcp://127.0.0.1:{zport}"\n{MOCK}\n[http]\nlisten = "127.0.0.1:{hport}"\n')
    proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{hport}"

        def ready() -> bool:
            try:
                return call(url + "/ready", timeout=2)[0] == 200
            except OSError:
                return False
        poll_until(ready, 60, 0.1)
        status, _, body = call(url + "/v1/embeddings", {"model": "mock", "input": ["a b c"]})
        assert status == 200 and len(body["data"][0]["embedding"]) == 32 and body["usage"]["prompt_tokens"] == 3
        import psutil
        cmds = [" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children()]
        front_cmd = next(c for c in cmds if "akidb_embed.cli http " in c)
        assert "--endpoint ipc://" in front_cmd and "fronts.sock" in front_cmd, front_cmd
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
