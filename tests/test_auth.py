"""Authentication and authorization (issue 11): CURVE with a fail-closed ZAP handler on tcp, operators only
on the private admin socket or with a key in curve_admins, and operator commands bounded in workers."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import zmq
from conftest import REPO, Server, poll_until, raw_dealer, recv_answer
from zmq.utils.monitor import recv_monitor_message

from akidb_embed import EmbedError
from akidb_embed.keys import generate, load
from akidb_embed.protocol.messages import request_frame

MOCK = """
[backends.m]
kind = "mock"
dim = 8
"""

FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for sub in ("server", "clients", "admins", "other"):
        (d / sub).mkdir()
    generate(d / "server", "server")
    generate(d / "clients", "app")
    generate(d / "admins", "ops")
    generate(d / "other", "stranger")
    return d


@pytest.fixture(scope="module")
def curve_server(tmp_path_factory, keys):
    port = free_port()
    config = f"""
        [server]
        curve_secret_key = "{keys / 'server' / 'server.key_secret'}"
        curve_clients = "{keys / 'clients'}"
        curve_admins = "{keys / 'admins'}"
    """ + MOCK
    tmp = tmp_path_factory.mktemp("curve")
    srv = TcpServer(tmp, f"tcp://127.0.0.1:{port}", config, keys)
    try:
        srv.wait_ready(60)
        yield srv
    finally:
        srv.shutdown()


class TcpServer(Server):
    """A server on a tcp endpoint whose client() speaks CURVE with an allowed client key."""

    def __init__(self, tmp, endpoint: str, config: str, keys) -> None:
        self.endpoint, self.keys = endpoint, keys
        self.config_path = tmp / "config.toml"
        self.config_path.write_text(textwrap.dedent(config).replace("[server]", f'[server]\nendpoint = "{endpoint}"'))
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115  closed by Server.stop
        self.proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config",
                                      str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)

    def client(self, **kw):
        from akidb_embed import Client
        return Client(self.endpoint, server_key=self.keys / "server" / "server.key",
                      client_key=self.keys / "clients" / "app.key_secret", **kw)


def handshake(endpoint: str, server_key=None, client_key=None) -> tuple[int, zmq.Socket]:
    """Connect a DEALER and return the first handshake event (succeeded or failed) and the socket."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if server_key is not None:
        mine = load(client_key, need_secret=True)
        sock.curve_serverkey = load(server_key, need_secret=False).public
        sock.curve_publickey, sock.curve_secretkey = mine.public, mine.secret
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                  | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    sock.connect(endpoint)
    try:
        assert mon.poll(15_000), "no handshake event"
        return recv_monitor_message(mon)["event"], sock
    finally:
        sock.disable_monitor()
        mon.close(0)


def send_nowait(sock: zmq.Socket, frame: bytes) -> None:
    try:   # a DEALER without an authenticated peer has nowhere to queue it
        sock.send(frame, zmq.NOBLOCK)
    except zmq.Again:
        pass


def test_right_key_is_served(curve_server, keys):
    with curve_server.client() as c:
        assert c.embed(["over curve"], backend="m").shape == (1, 8)


def test_no_key_is_refused(curve_server):
    event, sock = handshake(curve_server.endpoint)
    try:
        assert event in FAILED
        send_nowait(sock, request_frame(1, "health"))
        assert not sock.poll(300), "a client without a key got an answer"
    finally:
        sock.close(0)


def test_unknown_key_is_refused_by_zap(curve_server, keys):
    event, sock = handshake(curve_server.endpoint, keys / "server" / "server.key",
                            keys / "other" / "stranger.key_secret")
    try:
        assert event == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        send_nowait(sock, request_frame(1, "health"))
        assert not sock.poll(300), "a client with an unknown key got an answer"
    finally:
        sock.close(0)
    assert "CURVE client refused" in curve_server.log()


def test_wrong_server_key_gets_nothing(curve_server, keys):
    event, sock = handshake(curve_server.endpoint, keys / "other" / "stranger.key",
                            keys / "clients" / "app.key_secret")
    sock.close(0)
    assert event in FAILED


def curve_request(endpoint: str, keys, who: str, frame: bytes) -> dict:
    event, sock = handshake(endpoint, keys / "server" / "server.key", keys / who)
    try:
        assert event == zmq.EVENT_HANDSHAKE_SUCCEEDED
        sock.send(frame)
        return recv_answer(sock)
    finally:
        sock.close(0)


def test_operator_over_tcp_needs_an_admin_key(curve_server, keys):
    refused = curve_request(curve_server.endpoint, keys, "clients/app.key_secret", request_frame(1, "stop", backend="m"))
    assert refused["error"]["code"] == "UNAUTHORIZED" and "curve_admins" in refused["error"]["message"]
    assert curve_server.status()["backends"]["m"]["state"] == "READY"
    obeyed = curve_request(curve_server.endpoint, keys, "admins/ops.key_secret", request_frame(2, "restart", backend="m"))
    assert obeyed["ok"] is True and obeyed["backend"] == "m"
    # an admin key is also a client key
    served = curve_request(curve_server.endpoint, keys, "admins/ops.key_secret",
                           request_frame(3, "embed", texts=["x"], backend="m"))
    assert served["ok"] is True


def run(args: list[str], tmp, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "akidb_embed.cli", *args], capture_output=True, text=True, check=False,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=tmp)


def test_tcp_beyond_loopback_without_curve_is_a_config_error(tmp_path):
    (tmp_path / "c.toml").write_text(MOCK)
    out = run(["serve", "--config", "c.toml", "--endpoint", f"tcp://0.0.0.0:{free_port()}"], tmp_path)
    assert out.returncode == 2 and "curve_secret_key" in out.stderr and "127.0.0.1" in out.stderr


def test_curve_without_client_keys_is_a_config_error(tmp_path, keys):
    (tmp_path / "c.toml").write_text(f'[server]\ncurve_secret_key = "{keys / "server" / "server.key_secret"}"\n'
                                     + MOCK)
    out = run(["serve", "--config", "c.toml", "--endpoint", f"tcp://127.0.0.1:{free_port()}"], tmp_path)
    assert out.returncode == 2 and "curve_clients" in out.stderr


def test_keys_generate_cli(tmp_path):
    out = run(["keys", "generate", "alice", "--dir", "k"], tmp_path)
    assert out.returncode == 0, out.stderr
    secret = tmp_path / "k" / "alice.key_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pair = load(secret, need_secret=True)
    assert len(pair.public) == 40 and len(pair.secret) == 40
    assert load(tmp_path / "k" / "alice.key", need_secret=False).public == pair.public
    again = run(["keys", "generate", "alice", "--dir", "k"], tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr


def test_cli_with_keys_over_tcp(curve_server, keys, tmp_path):
    args = ["health", "--endpoint", curve_server.endpoint]
    out = run(args, tmp_path, AKIDB_EMBED_SERVER_KEY=str(keys / "server" / "server.key"),
              AKIDB_EMBED_CLIENT_KEY=str(keys / "clients" / "app.key_secret"))
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr
    out = run(args + ["--server-key", str(keys / "server" / "server.key"), "--client-key",
                      str(keys / "clients" / "app.key_secret")], tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


# ---- ipc: operators are the owner, through the private admin socket ---------------------------------

def test_anonymous_operator_command_refused_and_owner_cli_obeyed(serve, tmp_path):
    server = serve(MOCK)
    sock = raw_dealer(server.endpoint)
    try:
        for i, op in enumerate(("stop", "restart", "start")):
            sock.send(request_frame(i, op, backend="m"))
            msg = recv_answer(sock)
            assert msg["id"] == i and msg["error"]["code"] == "UNAUTHORIZED", msg
            assert msg["error"]["retryable"] is False
    finally:
        sock.close(0)
    assert server.status()["backends"]["m"]["state"] == "READY"
    out = run(["stop", "m", "--endpoint", server.endpoint], tmp_path)
    assert out.returncode == 0 and "stop m: STOPPED" in out.stdout, out.stderr
    out = run(["start", "m", "--endpoint", server.endpoint], tmp_path)
    assert out.returncode == 0, out.stderr
    server.wait_ready(30)


def test_operator_flood_starts_at_most_replicas_plus_one_workers(serve):
    server = serve(MOCK + "startup_delay_ms = 300\nreplicas = 1\n")
    peak = 0
    with server.client() as c:
        for _ in range(5):   # 15 commands: under the rate limit (20 per 10 s), so only the process bound refuses
            for op in (c.stop, c.start, c.restart):
                try:
                    op("m")
                except EmbedError as exc:  # OVERLOADED while old workers are still alive: the bound at work
                    assert "OVERLOADED" in str(exc), exc
                peak = max(peak, len(server.children()))
        end = time.monotonic() + 3
        while time.monotonic() < end:
            peak = max(peak, len(server.children()))
            time.sleep(0.02)
    assert peak <= 2, peak

    def started() -> bool:
        if len(server.children()) > 1:
            return False        # old processes still exiting: a start now would be refused and use up the rate
        with server.client() as c:
            try:
                c.start("m")    # refused (OVERLOADED) until the old processes have exited
            except EmbedError:
                return False
            return True
    poll_until(started, 30, 0.2)
    server.wait_ready(30)
