"""Operations against a real supervisor: status fields, stop/start, rolling restart under load, the CLI."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from akidb_embed import EmbedError
from conftest import poll_until

pytestmark = pytest.mark.timeout(120)

TWO_BACKENDS = """
    [backends.a]
    kind = "mock"
    dim = 8
    delay_ms = 20
    replicas = {replicas}

    [backends.b]
    kind = "mock"
    dim = 4
"""


class Load:
    """Threads sending embeds (each with its own Client) until stopped; counts ok and failures."""

    def __init__(self, server, backend: str, threads: int = 3) -> None:
        self.server, self.backend = server, backend
        self.ok = 0
        self.failures: list[EmbedError] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, n: int) -> None:
        with self.server.client() as c:
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    c.embed([f"load {n} {i}"], backend=self.backend, timeout=10)
                    with self._lock:
                        self.ok += 1
                except EmbedError as exc:
                    with self._lock:
                        self.failures.append(exc)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        poll_until(lambda: self.ok >= 10, 10)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)
        assert not any(t.is_alive() for t in self._threads), "a load thread is still running"


def backend(server, name: str) -> dict:
    return server.status()["backends"][name]


def test_status_fields(serve):
    server = serve(TWO_BACKENDS.format(replicas=2))
    with server.client() as c:
        for i in range(5):
            c.embed([f"s {i}"], backend="a")
    status = server.status()
    sup = status["supervisor"]
    assert sup["pid"] == server.proc.pid and sup["uptime_s"] > 0 and sup["rss_mb"] > 0
    assert sup["pending"] == 0 and sup["quarantined"] == 0 and sup["endpoint"] == server.endpoint
    a = status["backends"]["a"]
    for key in ("state", "pids", "uptime_s", "restarts", "last_exit", "queue", "in_flight", "served", "rss_mb"):
        assert key in a, key
    assert a["state"] == "READY" and a["replicas"] == 2 and len(a["pids"]) == 2
    assert sorted(a["pids"]) == sorted(p.pid for p in server.children() if "--backend a" in " ".join(p.cmdline()))
    assert a["uptime_s"] > 0 and a["restarts"] == 0 and a["last_exit"] is None
    assert a["queue"] == 0 and a["in_flight"] == 0 and a["served"] == 5 and a["rss_mb"] > 10
    assert sum(w["served"] for w in a["workers"]) == 5
    assert all(w["state"] == "READY" and w["rss_mb"] > 5 for w in a["workers"])
    assert status["backends"]["b"]["served"] == 0


def test_stop_and_start_one_backend(serve):
    server = serve(TWO_BACKENDS.format(replicas=1))
    [old] = server.worker_pids("a")
    with server.client() as c:
        assert c.stop("a")["state"] == "STOPPED"
        t0 = time.monotonic()
        with pytest.raises(EmbedError) as err:
            c.embed(["x"], backend="a")
        assert err.value.code.value == "BACKEND_UNAVAILABLE" and "stopped" in err.value.message
        assert time.monotonic() - t0 < 5        # refused at once, not after a deadline (order of magnitude)
        assert c.embed(["x"], backend="b").shape == (1, 4)          # the other backend keeps serving
        assert c.health()["status"] == "degraded"
        poll_until(lambda: backend(server, "a")["pids"] == [], 10)  # its worker drained and exited
        assert backend(server, "a")["state"] == "STOPPED"
        assert c.start("a")["backend"] == "a"
    poll_until(lambda: backend(server, "a")["state"] == "READY", 15)
    with server.client() as c:
        assert c.embed(["x"], backend="a").shape == (1, 8)
    b = backend(server, "a")
    assert b["pids"] != [old] and b["restarts"] == 0


@pytest.mark.parametrize("replicas", [2, 1])
def test_rolling_restart_under_load_loses_nothing(serve, replicas):
    server = serve(TWO_BACKENDS.format(replicas=replicas))
    old = set(server.worker_pids("a"))
    assert len(old) == replicas
    with Load(server, "a") as load:
        with server.client() as c:
            c.restart("a")
        poll_until(lambda: (b := backend(server, "a"))["state"] == "READY" and len(b["pids"]) == replicas
                   and not old & set(b["pids"]), 20)
        before = load.ok
        poll_until(lambda: load.ok >= before + 10, 10)              # still serving after the restart
    assert load.failures == [], load.failures[:3]
    b = backend(server, "a")
    assert b["restarts"] == 0 and b["recycles"] == replicas
    assert all(w["state"] == "READY" for w in b["workers"])


@pytest.mark.slow
def test_cli_status_restart_stop_start(serve):
    server = serve(TWO_BACKENDS.format(replicas=1))
    [old] = server.worker_pids("a")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "akidb_embed.cli", *args, "--endpoint", server.endpoint],
                              capture_output=True, text=True, timeout=30)

    out = cli("status")
    assert out.returncode == 0, out.stderr
    assert "BACKEND" in out.stdout and "RESTARTS" in out.stdout and str(old) in out.stdout
    out = cli("restart", "a")
    assert out.returncode == 0 and out.stdout.startswith("restart a:"), (out.stdout, out.stderr)
    poll_until(lambda: (b := backend(server, "a"))["state"] == "READY" and b["pids"] and old not in b["pids"], 15)
    out = cli("stop", "a")
    assert out.returncode == 0 and "STOPPED" in out.stdout, (out.stdout, out.stderr)
    out = cli("status", "--json")
    assert out.returncode == 0 and '"STOPPED"' in out.stdout
    out = cli("start", "a")
    assert out.returncode == 0 and out.stdout.startswith("start a:"), (out.stdout, out.stderr)
    poll_until(lambda: backend(server, "a")["state"] == "READY", 15)
    out = cli("stop", "nope")
    assert out.returncode == 1 and "UNKNOWN_BACKEND" in out.stderr
