"""Start and stop: signals end the server cleanly, no worker outlives it, the socket file goes away."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest

from akidb_embed import Client, EmbedError
from akidb_embed.workers.backends.mock import mock_vector
from conftest import poll_until

CONFIG = """
    [backends.a]
    kind = "mock"
    dim = 8
    replicas = 2

    [backends.b]
    kind = "mock"
    dim = 4
"""


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _ipc_path(endpoint: str) -> Path:
    assert endpoint.startswith("ipc://")
    return Path(endpoint[len("ipc://"):])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly(serve, sig):
    server = serve(CONFIG)
    sock_path = _ipc_path(server.endpoint)
    assert sock_path.exists()
    with server.client() as c:
        assert c.embed(["before"], backend="a").shape == (1, 8)
    children = server.children()
    worker_pids = {p for b in server.status()["backends"].values() for p in b["pids"]}
    assert len(worker_pids) == 3 and worker_pids <= {c.pid for c in children}
    server.proc.send_signal(sig)
    assert server.proc.wait(30) == 0, server.log()
    poll_until(lambda: not _alive(children), 10)
    assert not sock_path.exists()
    log = server.log()
    assert "Traceback" not in log and "supervisor stopped" in log


def test_sigterm_lets_a_request_in_flight_finish(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 8
        delay_ms = 600
    """)
    children = server.children()
    outcome: dict[str, object] = {}

    def call() -> None:
        with server.client() as c:
            try:
                outcome["v"] = c.embed(["draining"], timeout=10)
            except EmbedError as exc:
                outcome["err"] = exc

    t = threading.Thread(target=call)
    t.start()
    poll_until(lambda: server.status()["supervisor"]["pending"] == 1, 5)
    server.proc.send_signal(signal.SIGTERM)
    t.join(20)
    assert not t.is_alive()
    assert "v" in outcome, outcome.get("err")
    expected = mock_vector("draining", 8)
    assert np.allclose(outcome["v"][0], expected / np.linalg.norm(expected), atol=1e-6)
    assert server.proc.wait(30) == 0
    poll_until(lambda: not _alive(children), 10)
    assert not _ipc_path(server.endpoint).exists()


# ---- servers with an endpoint of our choosing -------------------------------------------------------

@pytest.fixture
def spawn(tmp_path: Path):
    """spawn(full_config_text) -> Popen of `akidb-embed serve`; killed with its children afterwards."""
    started: list[tuple[subprocess.Popen, list[psutil.Process]]] = []

    def start(text: str) -> subprocess.Popen:
        path = tmp_path / f"cfg{len(started)}.toml"
        path.write_text(text)
        log = open(tmp_path / f"log{len(started)}.txt", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        started.append((proc, []))
        return proc

    yield start
    for proc, _ in started:
        try:
            kids = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for k in kids:
            try:
                k.kill()
            except psutil.Error:
                pass


def _wait_ready(endpoint: str, proc: subprocess.Popen) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with Client(endpoint) as c:
                return c.health()["status"] == "ok"
        except EmbedError:
            return False
    poll_until(ready, 30, 0.1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_endpoint(spawn):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = spawn(f'[server]\nendpoint = "{endpoint}"\n\n[backends.m]\nkind = "mock"\ndim = 6\n')
    _wait_ready(endpoint, proc)
    with Client(endpoint) as c:
        v = c.embed(["over tcp"])
        assert c.info()["backends"]["m"]["dim"] == 6
    expected = mock_vector("over tcp", 6)
    assert np.allclose(v[0], expected / np.linalg.norm(expected), atol=1e-6)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    poll_until(lambda: not _alive(children), 10)


def test_supervisor_sigkill_takes_workers_down_and_stale_socket_is_reused(spawn, tmp_path: Path):
    sock_path = tmp_path / f"k-{uuid.uuid4().hex[:8]}.sock"
    endpoint = f"ipc://{sock_path}"
    config = f'[server]\nendpoint = "{endpoint}"\n\n[backends.m]\nkind = "mock"\ndim = 6\n'
    first = spawn(config)
    _wait_ready(endpoint, first)
    children = psutil.Process(first.pid).children(recursive=True)
    assert children
    first.kill()
    first.wait(10)
    poll_until(lambda: not _alive(children), 10)       # the lifeline ends every worker
    assert sock_path.exists()                            # a killed supervisor leaves its socket file
    second = spawn(config)                               # ... which the next one replaces
    _wait_ready(endpoint, second)
    with Client(endpoint) as c:
        assert c.embed(["again"]).shape == (1, 6)
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0
    assert not sock_path.exists()


def test_second_server_on_a_live_endpoint_does_not_steal_it(serve, tmp_path: Path):
    server = serve('[backends.m]\nkind = "mock"\ndim = 6\n')
    path = tmp_path / "second.toml"
    path.write_text(f'[server]\nendpoint = "{server.endpoint}"\n\n[backends.m]\nkind = "mock"\ndim = 6\n')
    try:
        r = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(path)],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a second server bound an endpoint already in use")
    assert r.returncode == 2, r.stderr
    assert "in use" in r.stderr and server.endpoint in r.stderr and str(path) in r.stderr
    assert "Traceback" not in r.stderr and "worker start" not in r.stderr
    assert _ipc_path(server.endpoint).exists()
    with server.client() as c:
        assert c.embed(["still mine"]).shape == (1, 6)
    assert server.proc.poll() is None


def test_tcp_port_in_use_is_a_clear_error(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        endpoint = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
        path = tmp_path / "busy.toml"
        path.write_text(f'[server]\nendpoint = "{endpoint}"\n\n[backends.m]\nkind = "mock"\n')
        r = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(path)],
                           capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert endpoint in r.stderr and "cannot listen" in r.stderr and "Traceback" not in r.stderr
    assert "worker start" not in r.stderr
