"""Shared test helpers: start a real supervisor (real worker subprocesses) from a TOML snippet."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AKIDB_CACHE_DIR", str(REPO / ".cache" / "test-models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def poll_until(condition: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    """Return the first truthy value of condition() within timeout, else fail the test."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {timeout} s: {getattr(condition, '__name__', condition)}")
        time.sleep(interval)


class Server:
    """A running `akidb-embed serve` subprocess."""

    def __init__(self, tmp: Path, config_body: str, env: dict[str, str] | None = None) -> None:
        self.endpoint = f"ipc://{tmp / ('s-' + uuid.uuid4().hex[:8] + '.sock')}"
        self.config_path = tmp / "config.toml"
        body = textwrap.dedent(config_body)
        if "[server]" in body:
            body = body.replace("[server]", f'[server]\nendpoint = "{self.endpoint}"', 1)
        else:
            body = f'[server]\nendpoint = "{self.endpoint}"\n' + body
        self.config_path.write_text(body)
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config",
                                      str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.ps = psutil.Process(self.proc.pid)

    def client(self, **kw):
        from akidb_embed import Client
        return Client(self.endpoint, **kw)

    def wait_ready(self, timeout: float = 60.0, backends: list[str] | None = None) -> None:
        from akidb_embed import EmbedError

        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with self.client() as c:
                    states = c.health()["backends"]
            except EmbedError:
                return False
            names = backends or list(states)
            return all(states[n] == "READY" for n in names)
        poll_until(ready, timeout, 0.02)

    def status(self) -> dict:
        with self.client() as c:
            return c.status()

    def worker_pids(self, backend: str) -> list[int]:
        return [w["pid"] for w in self.status()["backends"][backend]["workers"] if w["state"] == "READY"]

    def children(self) -> list[psutil.Process]:
        try:
            return self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def shutdown(self) -> None:
        """Stop the server and make sure none of its workers outlives the test."""
        children = self.children()
        self.stop()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def raw_dealer(endpoint: str):
    """A bare DEALER socket on the client endpoint, for frames the Client library would never send."""
    import zmq
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def recv_answer(sock, timeout_s: float = 10.0) -> dict:
    """The next answer on a raw socket: exactly one msgpack frame, decoded."""
    from akidb_embed.protocol.codec import unpack
    assert sock.poll(timeout_s * 1000), "no answer from the supervisor"
    frames = sock.recv_multipart()
    assert len(frames) == 1, frames
    return unpack(frames[0])


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """serve(config_toml, ready=True) -> Server; every server and its workers are stopped afterwards."""
    servers: list[Server] = []

    def start(config_body: str, ready: bool = True, env: dict[str, str] | None = None,
              timeout: float = 60.0) -> Server:
        d = tmp_path / f"srv{len(servers)}"
        d.mkdir()
        server = Server(d, config_body, env)
        servers.append(server)
        if ready:
            server.wait_ready(timeout)
        return server

    yield start
    for server in servers:
        server.shutdown()


@contextlib.contextmanager
def running_server(tmp: Path, config_body: str, timeout: float = 60.0) -> Iterator[Server]:
    """A ready server for a module-scoped fixture; shut down (with its workers) on exit."""
    server = Server(tmp, config_body)
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.shutdown()


# Supervisor scenarios that take about a second or more on the 2-core box (measured with --durations; most wait
# on a deadline, a drain, a restart or a front's process): `slow`, so that `-m "not slow"` stays under a minute.
# Kept here rather than as decorators in each file; a name listed here that its file no longer defines fails
# the run (below), so the list cannot rot silently.
SLOW_SCENARIOS: dict[str, set[str]] = {
    "test_auth.py": {
        "test_anonymous_operator_command_refused_and_owner_cli_obeyed",
        "test_operator_flood_starts_at_most_replicas_plus_one_workers",
    },
    "test_batching.py": {
        "test_async_client_many_requests_in_flight",
        "test_each_request_gets_its_own_vectors_in_order",
    },
    "test_behaviour.py": {
        "test_hung_worker_ignoring_sigterm_is_sigkilled_and_replaced",
        "test_info_dim_appears_once_loaded",
        "test_info_dim_is_nil_until_a_worker_has_loaded_then_startup_timeout_kills_it",
        "test_new_requests_during_a_drain_get_shutting_down_and_in_flight_ones_finish",
        "test_operator_start_or_restart_of_a_failed_backend_brings_it_back_at_once",
        "test_quarantine_expires",
        "test_request_of_a_worker_killed_once_is_retried_and_succeeds",
        "test_requests_left_at_drain_timeout_get_shutting_down",
        "test_timeout_is_answered_at_the_deadline_not_at_the_next_housekeeping_tick",
        "test_worker_ignoring_sigterm_is_sigkilled_after_stop_timeout",
    },
    "test_bridge.py": {
        "test_determinism_across_two_server_processes",
        "test_out_of_order_completion_each_answer_carries_its_id",
        "test_per_backend_timeout_and_supervisor_default_apply",
    },
    "test_faults.py": {
        "test_fail_on_fails_only_that_request",
        "test_poison_input_is_isolated_and_quarantined",
    },
    "test_grpc_front.py": {
        "test_api_key_in_metadata",
        "test_grpc_front_restarted_when_killed",
        "test_grpc_health_follows_the_backend_state",
        "test_standalone_grpc_command",
        "test_status_codes_for_unknown_backend_bad_request_and_deadline",
        "test_stub_embeds_like_the_client",
    },
    "test_http_front.py": {
        "test_errors_from_live_requests",
        "test_front_restarted_when_killed_and_stopped_with_the_supervisor",
        "test_in_flight_http_request_finishes_during_drain",
        "test_openai_client_matches_client_embed",
        "test_readiness_follows_the_default_backends_state",
        "test_rest_and_openai_routes_answer_the_documented_shapes",
        "test_standalone_http_command_against_a_running_supervisor",
        "test_supervised_front_reaches_a_tcp_supervisor_over_its_private_ipc",
    },
    "test_lifecycle.py": {
        "test_second_server_on_a_live_endpoint_does_not_steal_it",
        "test_signal_stops_cleanly",
        "test_sigterm_lets_a_request_in_flight_finish",
        "test_supervisor_sigkill_takes_workers_down_and_stale_socket_is_reused",
    },
    "test_ops.py": {
        "test_rolling_restart_under_load_loses_nothing",
        "test_stop_and_start_one_backend",
    },
    "test_peer_bounds.py": {
        "test_big_frame_burst_is_refused_and_bounded",
        "test_never_reading_peer_is_bounded_by_answer_hwm",
        "test_stalled_peer_gets_overloaded_not_silence",
    },
    "test_private_sockets.py": {
        "test_default_endpoint_is_private_under_xdg_runtime_dir",
        "test_default_without_xdg_is_a_per_user_directory",
    },
    "test_scheduling.py": {
        "test_a_4096_text_request_split_into_parts_equals_one_pass",
        "test_a_query_is_served_after_about_one_pass_of_a_flood",
        "test_backend_default_priority_applies_to_requests_that_name_none",
        "test_high_before_normal_before_low_when_the_worker_is_busy",
        "test_low_still_completes_while_high_work_keeps_arriving",
        "test_split_request_survives_a_worker_kill_and_isolates_a_poison_part",
    },
    "test_strict_decoding.py": {
        "test_same_id_on_two_connections_is_fine",
    },
    "test_supervision.py": {
        "test_a_bug_in_housekeeping_costs_that_step_not_the_supervisor",
        "test_blocking_call_on_a_killed_server_fails_fast_and_the_client_reconnects",
        "test_failed_replacement_leaves_the_old_worker_serving_and_is_retried",
        "test_requests_made_while_no_server_listens_fail_and_are_never_computed",
        "test_sigterm_to_the_process_group_drains_in_order",
        "test_slow_start_crash_loop_marks_the_backend_failed",
        "test_worker_crashing_while_replaced_has_its_requests_retried",
    },
    "test_unit_client_ids.py": {
        "test_blocking_client_keeps_waiting_after_a_stray_answer",
        "test_blocking_client_waits_its_whole_wait_then_times_out",
    },
    "test_worker_channel.py": {
        "test_spoofed_worker_is_ignored_and_gets_no_texts",
    },
}


@pytest.hookimpl(tryfirst=True)    # before -m / -k deselect: every collected test is seen
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict[str, set[str]] = {}
    for item in items:
        file = item.path.name
        name = item.originalname if isinstance(item, pytest.Function) else item.name
        seen.setdefault(file, set()).add(name)
        if name in SLOW_SCENARIOS.get(file, ()):
            item.add_marker(pytest.mark.slow)
    if any("::" in a for a in config.args):
        return    # node ids named: not every test of a file was collected
    stale = {f: sorted(names - seen[f]) for f, names in SLOW_SCENARIOS.items() if f in seen and names - seen[f]}
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW_SCENARIOS names tests that do not exist: {stale}")
