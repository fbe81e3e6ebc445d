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
        poll_until(ready, timeout, 0.1)

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
