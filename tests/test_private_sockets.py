"""Private sockets: the run directory is 0700, socket files 0600 whatever the umask (issue 11)."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import poll_until

CONFIG = """
[backends.m]
kind = "mock"
dim = 8
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def start(tmp: Path, config: str, env: dict[str, str], umask: int, inherit: bool = True) -> subprocess.Popen:
    cfg = tmp / "config.toml"
    cfg.write_text(config)
    old = os.umask(umask)   # inherited by the server, as a user's shell would
    try:
        with open(tmp / "server.log", "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(cfg)],
                                    stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env} if inherit else env)
    finally:
        os.umask(old)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


def serving(endpoint: str) -> bool:
    from akidb_embed import Client, EmbedError
    try:
        with Client(endpoint, timeout=2) as c:
            return c.health()["status"] == "ok"
    except EmbedError:
        return False


@pytest.mark.parametrize("umask", [0o000, 0o002])
def test_default_endpoint_is_private_under_xdg_runtime_dir(tmp_path, umask):
    runtime = tmp_path / "run"
    runtime.mkdir()
    proc = start(tmp_path, CONFIG, {"XDG_RUNTIME_DIR": str(runtime)}, umask)
    try:
        sock = runtime / "akidb-embed" / "akidb-embed.sock"
        poll_until(lambda: serving(f"ipc://{sock}"), 60, 0.1)
        assert mode(sock.parent) == 0o700
        assert mode(sock) == 0o600
        worker = psutil.Process(proc.pid).children()[0].cmdline()
        wsock = Path(worker[worker.index("--endpoint") + 1][len("ipc://"):])
        assert mode(wsock.parent) == 0o700 and mode(wsock) == 0o600
    finally:
        stop(proc)
    assert not sock.exists()


@pytest.mark.parametrize("umask", [0o000, 0o002])
def test_default_without_xdg_is_a_per_user_directory(tmp_path, umask):
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env["TMPDIR"] = str(tmp_path)
    proc = start(tmp_path, CONFIG, env, umask, inherit=False)
    try:
        sock = tmp_path / f"akidb-embed-{os.getuid()}" / "akidb-embed.sock"
        poll_until(lambda: serving(f"ipc://{sock}"), 60, 0.1)
        assert mode(sock.parent) == 0o700 and mode(sock) == 0o600
    finally:
        stop(proc)


def test_configured_socket_is_0600_under_umask_000(tmp_path):
    d = tmp_path / "sockets"
    endpoint = f"ipc://{d / 'x.sock'}"
    proc = start(tmp_path, f'[server]\nendpoint = "{endpoint}"\n' + CONFIG, {}, 0o000)
    try:
        poll_until(lambda: serving(endpoint), 60, 0.1)
        assert mode(d / "x.sock") == 0o600
    finally:
        stop(proc)


def test_socket_mode_opens_it_to_the_group(tmp_path):
    endpoint = f"ipc://{tmp_path / 'g.sock'}"
    proc = start(tmp_path, f'[server]\nendpoint = "{endpoint}"\nsocket_mode = "660"\n' + CONFIG, {}, 0o022)
    try:
        poll_until(lambda: serving(endpoint), 60, 0.1)
        assert mode(tmp_path / "g.sock") == 0o660
    finally:
        stop(proc)


def test_world_writable_directory_is_refused(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    proc = start(tmp_path, f'[server]\nendpoint = "ipc://{d / "x.sock"}"\n' + CONFIG, {}, 0o022)
    assert proc.wait(30) == 2
    out = (tmp_path / "server.log").read_text()
    assert "writable by every user" in out and "private directory" in out


def test_run_directory_taken_by_another_user_is_refused(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    runtime = tmp_path / "run"
    runtime.mkdir()
    taken = runtime / "akidb-embed"
    taken.mkdir(mode=0o777)
    os.chown(taken, 12345, 12345)
    proc = start(tmp_path, CONFIG, {"XDG_RUNTIME_DIR": str(runtime)}, 0o022)
    assert proc.wait(30) == 2
    assert "belongs to uid 12345" in (tmp_path / "server.log").read_text()


def test_own_run_directory_left_too_open_is_narrowed(tmp_path):
    runtime = tmp_path / "run"
    (runtime / "akidb-embed").mkdir(parents=True)
    os.chmod(runtime / "akidb-embed", 0o755)
    proc = start(tmp_path, CONFIG, {"XDG_RUNTIME_DIR": str(runtime)}, 0o022)
    try:
        poll_until(lambda: serving(f"ipc://{runtime / 'akidb-embed' / 'akidb-embed.sock'}"), 60, 0.1)
        assert mode(runtime / "akidb-embed") == 0o700
    finally:
        stop(proc)
