"""The `akidb-embed` client commands, run as real subprocesses against a real server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from akidb_embed.workers.backends.mock import mock_vector
from conftest import poll_until

CONFIG = """
    [server]
    default_backend = "alpha"

    [backends.alpha]
    kind = "mock"
    dim = 8

    [backends.beta]
    kind = "mock"
    dim = 5
"""

SCRIPT = Path(sys.executable).parent / "akidb-embed"


def run(*args: str, endpoint_env: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AKIDB_EMBED_ENDPOINT"}
    if endpoint_env is not None:
        env["AKIDB_EMBED_ENDPOINT"] = endpoint_env
    return subprocess.run([sys.executable, "-m", "akidb_embed.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def expected(text: str, dim: int) -> np.ndarray:
    v = mock_vector(text, dim)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (each test leaves it READY as it found it)."""
    from conftest import running_server

    with running_server(tmp_path_factory.mktemp("cli"), CONFIG) as srv:
        yield srv


def test_embed_with_backend_and_endpoint(server):
    r = run("embed", "hello world", "second", "--backend", "beta", "--endpoint", server.endpoint)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("'hello world'") and "dim=5" in lines[0]
    assert lines[1].startswith("'second'") and "dim=5" in lines[1]
    first = expected("hello world", 5)
    assert f"{first[0]:+.4f}" in lines[0]
    assert lines[2] == "backend=beta model=mock truncated=0"


def test_embed_json_via_env_endpoint_matches_mock(server):
    r = run("embed", "via env", "--json", endpoint_env=server.endpoint)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "alpha" and doc["model"] == "mock" and doc["truncated"] == 0
    got = np.array(doc["embeddings"], dtype=np.float32)
    assert got.shape == (1, 8) and np.allclose(got[0], expected("via env", 8), atol=1e-6)
    r = run("embed", "raw", "--json", "--no-normalize", "--backend", "alpha", endpoint_env=server.endpoint)
    assert r.returncode == 0, r.stderr
    raw = np.array(json.loads(r.stdout)["embeddings"][0], dtype=np.float32)
    assert np.allclose(raw, mock_vector("raw", 8), atol=1e-6)


def test_endpoint_flag_beats_env(server):
    r = run("health", "--endpoint", server.endpoint, endpoint_env="ipc:///nonexistent/dir/none.sock")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_info_table_and_json(server):
    for how in ("env", "flag"):
        if how == "env":
            r = run("info", endpoint_env=server.endpoint)
        else:
            r = run("info", "--endpoint", server.endpoint)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert "default backend: alpha" in lines[0] and "protocol v1" in lines[0]
        assert lines[1].split() == ["BACKEND", "KIND", "STATE", "DIM", "MAX_TOKENS", "MODEL"]
        rows = {line.split()[0]: line.split() for line in lines[2:]}
        assert rows["alpha"] == ["alpha", "mock", "READY", "8", "512", "mock"]
        assert rows["beta"] == ["beta", "mock", "READY", "5", "512", "mock"]
    r = run("info", "--json", "--endpoint", server.endpoint)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["default_backend"] == "alpha" and doc["backends"]["beta"]["dim"] == 5
    assert "id" not in doc and "ok" not in doc


@pytest.mark.slow
def test_health_exit_codes_follow_backend_states(server):
    r = run("health", endpoint_env=server.endpoint)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "alpha=READY", "beta=READY"]
    r = run("stop", "beta", "--endpoint", server.endpoint)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "stop beta: STOPPED"
    r = run("health", "--endpoint", server.endpoint)
    assert r.returncode == 1
    assert r.stdout.split() == ["degraded", "alpha=READY", "beta=STOPPED"]
    r = run("embed", "x", "--backend", "beta", "--endpoint", server.endpoint)
    assert r.returncode == 1 and "BACKEND_UNAVAILABLE" in r.stderr and "beta" in r.stderr
    r = run("start", "beta", "--endpoint", server.endpoint)
    assert r.returncode == 0, r.stderr
    poll_until(lambda: run("health", "--endpoint", server.endpoint).returncode == 0, 15, 0.1)


def test_status_table(server):
    pids = {name: b["pids"] for name, b in server.status()["backends"].items()}
    r = run("status", endpoint_env=server.endpoint)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"supervisor pid={server.proc.pid} ")
    assert f"endpoint={server.endpoint}" in lines[0]
    header = lines[1].split()
    assert header[:3] == ["BACKEND", "STATE", "PIDS"] and "RESTARTS" in header and "LAST_EXIT" in header
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"alpha", "beta"}
    for name in ("alpha", "beta"):
        assert rows[name][1] == "READY"
        assert rows[name][2] == ",".join(str(p) for p in pids[name])
        assert rows[name][header.index("RESTARTS")] == "0"
    r = run("status", "--json", "--endpoint", server.endpoint)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backends"]["alpha"]["state"] == "READY"


def test_installed_script_and_client_error_exit(server):
    r = subprocess.run([str(SCRIPT), "embed", "x", "--backend", "nope", "--endpoint", server.endpoint],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "UNKNOWN_BACKEND" in r.stderr and "nope" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([str(SCRIPT), "health", "--endpoint", server.endpoint], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("ok")


@pytest.mark.slow
def test_no_server_is_a_clear_error(tmp_path: Path):
    """The real CLI, with the client's query wait (10 s) cut to 2 s so that the test does not sit out 10 s."""
    endpoint = f"ipc://{tmp_path / 'nobody.sock'}"
    patched = ("import sys, akidb_embed.client as c; c.QUERY_WAIT_S = 2.0; from akidb_embed.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", patched, "health", "--endpoint", endpoint], capture_output=True,
                       text=True, timeout=30, env={k: v for k, v in os.environ.items() if k != "AKIDB_EMBED_ENDPOINT"})
    elapsed = time.monotonic() - t0
    assert r.returncode == 1
    assert "no answer from the supervisor" in r.stderr and endpoint in r.stderr
    assert "within 2 s" in r.stderr     # the query wait, not the 120 s of an embed without a timeout
    assert "akidb-embed serve" in r.stderr and "Traceback" not in r.stderr
    assert elapsed < 10, elapsed


def test_embed_priority_flag(server):
    r = run("embed", "hello world", "--priority", "low", "--endpoint", server.endpoint)
    assert r.returncode == 0, r.stderr
    r = run("embed", "hello world", "--priority", "urgent", "--endpoint", server.endpoint)
    assert r.returncode == 2 and "priority" in r.stderr
