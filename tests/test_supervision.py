"""Regressions of issue 9: faults the supervisor did not survive, each with a real supervisor and workers
(or, for a bug that no input can trigger, the supervisor's own loop in-process)."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from akidb_embed import EmbedError
from akidb_embed.protocol.codec import unpack
from akidb_embed.protocol.messages import request_frame
from conftest import poll_until, raw_dealer, recv_answer

pytestmark = pytest.mark.timeout(180)


def backend(server, name: str = "m") -> dict:
    return server.status()["backends"][name]


def call(server, texts: list[str], **kw) -> tuple[str, float]:
    """(code or "OK", seconds) of one embed call."""
    t0 = time.monotonic()
    try:
        with server.client() as c:
            c.embed(texts, **kw)
        return "OK", time.monotonic() - t0
    except EmbedError as exc:
        return exc.code.value, time.monotonic() - t0


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(v=fn(*args, **kw)), daemon=True)
    t.start()
    return t, out


# ---- 1. a crash loop slower than restart_window_s, and the backoff overflow ---------------------------

def test_slow_start_crash_loop_marks_the_backend_failed(serve):
    """Each start crashes after loading for a while, so crashes never pile up in restart_window_s:
    the limit on consecutive failed starts must still end the loop."""
    server = serve("""
        [backends.m]
        kind = "mock"
        startup_delay_ms = 300
        startup_crash = true
        restart_max = 2
        restart_window_s = 0.1
        restart_backoff_min_s = 0.05
        failed_cooldown_s = 120
    """, ready=False)
    poll_until(lambda: backend(server)["state"] == "FAILED", 30, 0.1)
    code, _ = call(server, ["x"], timeout=5)
    assert code == "BACKEND_UNAVAILABLE"
    assert server.proc.poll() is None


def test_backoff_never_overflows_however_long_the_crash_loop():
    from akidb_embed.supervisor.config import Policy
    from akidb_embed.supervisor.policy import RestartPolicy

    policy = RestartPolicy(Policy(restart_max=10**9, restart_window_s=0.0, restart_backoff_max_s=10.0))
    delays = [policy.record_crash(float(i)) for i in range(1100)]     # crash 1025 raised OverflowError
    assert max(d for d in delays if d is not None) == 10.0


# ---- 2. a replacement that cannot load ----------------------------------------------------------------

def test_failed_replacement_leaves_the_old_worker_serving_and_is_retried(serve, tmp_path):
    flag = tmp_path / "cannot-load"
    server = serve(f"""
        [backends.m]
        kind = "mock"
        dim = 4
        load_fail_file = "{flag}"
        failed_cooldown_s = 1
    """)
    [old] = server.worker_pids("m")
    flag.touch()
    with server.client() as c:
        c.restart("m")
    poll_until(lambda: "could not load" in (backend(server)["last_exit"] or ""), 20)
    assert backend(server)["state"] == "READY"
    assert call(server, ["still served"], timeout=10)[0] == "OK"
    assert server.worker_pids("m") == [old]
    flag.unlink()                                   # the model is back: the replacement is retried
    poll_until(lambda: server.worker_pids("m") not in ([], [old]), 30, 0.1)
    assert backend(server)["state"] == "READY"
    assert call(server, ["new worker"], timeout=10)[0] == "OK"


# ---- 3. hang detection on what the worker actually runs -------------------------------------------------

@pytest.mark.slow   # a multi-second fault scenario
def test_tiny_deadline_behind_a_long_batch_does_not_kill_the_worker(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 4
        delay_ms = 2500
        hang_grace_s = 0.3
    """)
    [pid] = server.worker_pids("m")
    long_call, out = in_thread(call, server, ["long"], timeout=30)
    poll_until(lambda: backend(server)["in_flight"] == 1, 10)
    sock = raw_dealer(server.endpoint)
    try:
        for i in range(3):      # timeout_ms = 1: handed to the busy worker, queued behind its pass
            sock.send(request_frame(i, "embed", texts=[f"tiny {i}"], timeout_ms=1))
        answers = [recv_answer(sock) for _ in range(3)]
    finally:
        sock.close(0)
    assert all(a["error"]["code"] == "TIMEOUT" for a in answers), answers
    long_call.join(30)
    assert out["v"][0] == "OK", out
    assert server.worker_pids("m") == [pid]
    assert backend(server)["restarts"] == 0


@pytest.mark.slow   # a multi-second fault scenario
def test_hang_inside_a_batch_of_requests_is_found_and_quarantined(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 4
        delay_ms = 300
        hang_on = "stuck"
        hang_grace_s = 0.3
        restart_backoff_min_s = 0.05
        restart_max = 20
    """)
    sock = raw_dealer(server.endpoint)
    try:
        # sent in a burst, they reach the worker together (or behind "warm"): one forward pass
        for name in ("warm", "a", "stuck", "b"):
            sock.send(request_frame(name, "embed", texts=[name], timeout_ms=1000))
        answers = {m["id"]: m for m in (recv_answer(sock, 15) for _ in range(4))}
        assert answers["stuck"]["error"]["code"] == "TIMEOUT"
        poll_until(lambda: server.status()["supervisor"]["quarantined"] >= 1, 60, 0.2)
        assert not sock.poll(300), unpack(sock.recv())   # the re-runs that found it answered nobody again
    finally:
        sock.close(0)
    poll_until(lambda: backend(server)["state"] == "READY", 30, 0.1)
    assert call(server, ["stuck"], timeout=5)[0] == "POISON_INPUT"
    assert call(server, ["a"], timeout=10)[0] == "OK"
    assert call(server, ["b"], timeout=10)[0] == "OK"


# ---- 4. guarded loop paths --------------------------------------------------------------------------------

@pytest.fixture
def bound_sup(tmp_path):
    from akidb_embed.supervisor.app import Supervisor
    from akidb_embed.supervisor.config import build_config

    endpoint = f"ipc://{tmp_path / 'g.sock'}"
    s = Supervisor(build_config({"server": {"endpoint": endpoint}, "backends": {"m": {"kind": "mock"}}}, "t"))
    s._bind()
    yield s
    s._close()


def test_a_bug_in_housekeeping_costs_that_step_not_the_supervisor(bound_sup, monkeypatch):
    calls = []

    def broken_tick(now):
        calls.append(now)
        raise RuntimeError("bug in tick")

    def broken_expire(now):
        raise KeyError("bug in expire")

    monkeypatch.setattr(bound_sup.pools["m"], "tick", broken_tick)
    monkeypatch.setattr(bound_sup.table, "expire", broken_expire)
    stopper = threading.Timer(1.0, lambda: setattr(bound_sup, "_stop_requested", True))
    stopper.start()
    bound_sup._loop()           # raised out of the loop (ending the supervisor) before
    stopper.join()
    assert len(calls) >= 2      # housekeeping kept running after the first failure


def test_internal_error_answer_carries_the_request_id(bound_sup, monkeypatch):
    replies = []
    monkeypatch.setattr(bound_sup.table, "_reply", lambda route, frame: replies.append(unpack(frame)))
    monkeypatch.setattr(bound_sup, "_reply", lambda route, frame: replies.append(unpack(frame)))

    def broken(*a):
        raise RuntimeError("bug")

    monkeypatch.setattr(bound_sup, "_submit", broken)
    bound_sup._on_client_frames([b"client", request_frame(42, "embed", texts=["x"])])
    assert [(r["id"], r["error"]["code"]) for r in replies] == [(42, "INTERNAL")]


# ---- 5. a crash while draining ------------------------------------------------------------------------------

def test_worker_crashing_while_draining_answers_its_requests_at_once(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 4
        delay_ms = 4000
    """)
    [pid] = server.worker_pids("m")
    slow, out = in_thread(call, server, ["slow"], timeout=60)
    poll_until(lambda: backend(server)["in_flight"] == 1, 10)
    with server.client() as c:
        c.stop("m")                              # the worker drains: it finishes "slow", then exits
    os.kill(pid, signal.SIGKILL)                 # ... but it crashes first
    slow.join(60)
    code, seconds = out["v"]
    assert code == "WORKER_DIED", out            # not TIMEOUT after 60 s
    assert seconds < 30
    assert "SIGKILL" in backend(server)["last_exit"]


def test_worker_crashing_while_replaced_has_its_requests_retried(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 4
        delay_ms = 1500
    """)
    [pid] = server.worker_pids("m")
    slow, out = in_thread(call, server, ["slow"], timeout=60)
    poll_until(lambda: backend(server)["in_flight"] == 1, 10)
    with server.client() as c:
        c.restart("m")                           # rolling: the old worker drains once the new one is ready
    poll_until(lambda: any(w["state"] == "DRAINING" for w in backend(server)["workers"]), 20, 0.05)
    os.kill(pid, signal.SIGKILL)
    slow.join(60)
    assert out["v"][0] == "OK", out              # retried on the new worker
    assert out["v"][1] < 30


# ---- 6. signals to the whole process group -------------------------------------------------------------------

class GroupServer:
    """`akidb-embed serve` as the leader of its own process group, as under systemd or in a terminal."""

    def __init__(self, tmp: Path, body: str, endpoint: str | None = None) -> None:
        self.endpoint = endpoint or f"ipc://{tmp / ('g-' + uuid.uuid4().hex[:8] + '.sock')}"
        cfg = tmp / "config.toml"
        cfg.write_text(f'[server]\nendpoint = "{self.endpoint}"\n' + textwrap.dedent(body))
        self.log_path = tmp / "server.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(cfg)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)

    def client(self, **kw):
        from akidb_embed import Client
        return Client(self.endpoint, **kw)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def killpg(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def close(self) -> None:
        children = self.ps.children(recursive=True) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def group_server(tmp_path):
    servers: list[GroupServer] = []

    def start(body: str, endpoint: str | None = None, ready: bool = True) -> GroupServer:
        d = tmp_path / f"g{len(servers)}"
        d.mkdir()
        server = GroupServer(d, body, endpoint)
        servers.append(server)

        def is_ready() -> bool:
            assert server.proc.poll() is None, server.log()
            try:
                return server.status()["backends"]["m"]["state"] == "READY"
            except EmbedError:
                return False
        if ready:
            poll_until(is_ready, 60, 0.02)
        return server

    yield start
    for server in servers:
        server.close()


def test_sigterm_to_the_process_group_drains_in_order(group_server):
    server = group_server("""
        [backends.m]
        kind = "mock"
        dim = 4
        delay_ms = 1000
    """)
    slow, out = in_thread(call, server, ["in flight"], timeout=30)
    poll_until(lambda: server.status()["backends"]["m"]["in_flight"] == 1, 10)
    server.killpg(signal.SIGTERM)           # what systemd (KillMode=control-group) and docker stop do
    slow.join(30)
    assert server.proc.wait(30) == 0
    assert out["v"][0] == "OK", out         # the worker did not die mid-request
    log = server.log()
    assert "restart scheduled" not in log and "Traceback" not in log, log


def test_second_signal_during_the_drain_stops_at_once(group_server):
    server = group_server("""
        [supervisor]
        drain_timeout_s = 120

        [backends.m]
        kind = "mock"
        dim = 4
        delay_ms = 60000
    """)
    slow, out = in_thread(call, server, ["long"], timeout=100)
    poll_until(lambda: server.status()["backends"]["m"]["in_flight"] == 1, 10)
    server.killpg(signal.SIGINT)            # Ctrl-C ...
    poll_until(lambda: "supervisor draining" in server.log(), 10)
    t0 = time.monotonic()
    server.killpg(signal.SIGINT)            # ... and Ctrl-C again: stop now
    assert server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 15       # not the 60 s pass nor the 120 s drain
    slow.join(10)
    assert out["v"][0] == "SHUTTING_DOWN", out


# ---- 7. deadlines are not wall-clock readings ------------------------------------------------------------------

def test_supervisor_wall_clock_far_off_changes_nothing(serve, tmp_path):
    """The supervisor's wall clock is an hour behind its worker's (a clock step, or a worker on
    another host): absolute deadlines on the worker channel made every request TIMEOUT at once."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, sys, time
        if os.environ.get("AKIDB_TEST_WALL_SKEW_S") and "akidb_embed.workers" not in sys.orig_argv:
            _real, _skew = time.time, float(os.environ["AKIDB_TEST_WALL_SKEW_S"])
            time.time = lambda: _real() + _skew
    """))
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 4
    """, env={"PYTHONPATH": path, "AKIDB_TEST_WALL_SKEW_S": "-3600"})
    skewed = subprocess.run([sys.executable, "-c", "import time; print(time.time())"], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": path, "AKIDB_TEST_WALL_SKEW_S": "-3600"})
    assert float(skewed.stdout) < time.time() - 3000          # the skew is in effect
    sock = raw_dealer(server.endpoint)
    try:
        sock.send(request_frame(1, "embed", texts=["x"], timeout_ms=5000))
        answer = recv_answer(sock)
    finally:
        sock.close(0)
    assert answer["ok"] is True, answer
    assert shutil.which(sys.executable)


# ---- 8. a client whose server is gone ---------------------------------------------------------------------------

MOCK_SLOW = """
    [backends.m]
    kind = "mock"
    dim = 4
    delay_ms = 30000
"""


def test_blocking_call_on_a_killed_server_fails_fast_and_the_client_reconnects(group_server):
    server = group_server(MOCK_SLOW)
    from akidb_embed import Client, ServerUnavailable
    client = Client(server.endpoint)
    try:
        assert client.health()["status"] == "ok"
        waiting, out = in_thread(lambda: _outcome(lambda: client.embed(["never answered"], timeout=60)))
        poll_until(lambda: server.status()["backends"]["m"]["in_flight"] == 1, 10)
        t0 = time.monotonic()
        server.killpg(signal.SIGKILL)
        waiting.join(30)
        err, seconds = out["v"]
        assert isinstance(err, ServerUnavailable) and err.retryable, err
        assert time.monotonic() - t0 < 10                        # not the 60 s timeout (+2 s)
        back = group_server(MOCK_SLOW.replace("delay_ms = 30000", ""), endpoint=server.endpoint)
        assert client.embed(["after restart"], timeout=10).shape == (1, 4)      # same object
        assert back.status()["backends"]["m"]["served"] == 1
    finally:
        client.close()


def test_requests_made_while_no_server_listens_fail_and_are_never_computed(group_server, tmp_path):
    from akidb_embed import AsyncClient, Client, ServerUnavailable
    endpoint = f"ipc://{tmp_path / 'later.sock'}"
    client = Client(endpoint)
    try:
        for i in range(3):
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailable):
                client.embed([f"nobody {i}"], timeout=0.3)      # never blocks past its timeout
            assert time.monotonic() - t0 < 2

        async def async_calls() -> list:
            async with AsyncClient(endpoint) as ac:
                return await asyncio.gather(*(ac.embed([f"async nobody {i}"], timeout=0.3) for i in range(3)),
                                            return_exceptions=True)
        errors = asyncio.run(async_calls())
        assert all(isinstance(e, ServerUnavailable) for e in errors), errors
        server = group_server("""
            [backends.m]
            kind = "mock"
            dim = 4
        """, endpoint=endpoint)
        assert client.embed(["now served"], timeout=10).shape == (1, 4)
        assert server.status()["backends"]["m"]["served"] == 1   # nothing sent during the outage ran
    finally:
        client.close()


@pytest.mark.slow   # a multi-second fault scenario
def test_async_calls_on_a_killed_server_fail_fast(group_server):
    from akidb_embed import AsyncClient, ServerUnavailable
    server = group_server(MOCK_SLOW)

    async def main():
        async with AsyncClient(server.endpoint) as ac:
            calls = [asyncio.ensure_future(ac.embed([f"lost {i}"], timeout=60)) for i in range(4)]
            # all four held by the server: one in the worker's hands, three queued behind its 30 s pass (waiting
            # for in_flight == 4 never happened and only cost 5 s before the kill)
            for _ in range(200):
                st = server.status()["backends"]["m"]
                if st["in_flight"] + st["queue"] == 4 and st["in_flight"] >= 1:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail(f"the four calls never reached the server: {st}")
            t0 = time.monotonic()
            server.killpg(signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
            return results, time.monotonic() - t0

    results, seconds = asyncio.run(main())
    assert all(isinstance(r, ServerUnavailable) for r in results), results
    assert seconds < 10


def _outcome(fn):
    t0 = time.monotonic()
    try:
        return fn(), time.monotonic() - t0
    except EmbedError as exc:
        return exc, time.monotonic() - t0


# ---- the events seam ----------------------------------------------------------------------------------------------

def test_events_report_answers_batches_and_worker_lifecycle(bound_sup):
    """A subscriber sees what metrics need: answers with their timings, forward passes, worker starts and
    exits with a cause, and backend state changes."""
    from akidb_embed import Client
    from akidb_embed.supervisor import events as ev

    seen: list = []
    bound_sup.events.subscribe(seen.append)
    bound_sup.events.subscribe(lambda e: 1 / 0)          # a broken subscriber must not matter
    out: dict = {}

    def client() -> None:
        try:
            with Client(bound_sup.config.endpoint) as c:
                out["v"] = c.embed(["one two three", "four"], timeout=30).shape
                try:
                    c.embed(["x"], backend="nope")
                except EmbedError as exc:
                    out["err"] = exc.code.value
        finally:
            bound_sup._stop_requested = True

    for pool in bound_sup.pools.values():
        pool.start()
    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        bound_sup._loop()
    finally:
        bound_sup._shutdown_workers()
    t.join(10)
    assert out == {"v": (2, 384), "err": "UNKNOWN_BACKEND"}
    assert any(isinstance(e, ev.WorkerStarted) and e.backend == "m" and e.pid for e in seen)
    ok = [e for e in seen if isinstance(e, ev.RequestAnswered) and e.code is None]
    assert len(ok) == 1 and ok[0].backend == "m" and ok[0].texts == 2 and ok[0].tokens == 3 + 1   # a mock token is a word
    assert 0 <= ok[0].queue_s <= ok[0].total_s and 0 <= ok[0].run_s <= ok[0].total_s
    assert any(isinstance(e, ev.RequestAnswered) and e.code == "UNKNOWN_BACKEND" for e in seen)
    assert any(isinstance(e, ev.BatchRun) and e.texts == 2 and e.tokens == 4 for e in seen)
    assert any(isinstance(e, ev.WorkerReady) and e.backend == "m" for e in seen)
    assert any(isinstance(e, ev.BackendStateChanged) and (e.old, e.new) == ("STARTING", "READY") for e in seen)
