"""Configuration: every mistake stops `serve` at once, naming the file and the key; no worker starts."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from akidb_embed.supervisor.config import DEFAULT_MODEL, ConfigError, build_config, load_config

MOCK = '[backends.x]\nkind = "mock"\n'

# (case, config text or None for a missing file, what the message must name)
BAD = [
    ("unknown kind", '[backends.x]\nkind = "magic"\n', ["backends.x.kind", "magic", "mock"]),
    ("missing kind", '[backends.x]\nmodel = "m"\n', ["backends.x.kind", "missing"]),
    ("unknown key in backend", MOCK + 'colour = "red"\n', ["backends.x.colour", "unknown key"]),
    ("replicas zero", MOCK + "replicas = 0\n", ["backends.x.replicas", "positive integer"]),
    ("replicas a string", MOCK + 'replicas = "2"\n', ["backends.x.replicas"]),
    ("negative timeout", MOCK + "timeout_s = -1\n", ["backends.x.timeout_s"]),
    ("default_backend names nothing", '[server]\ndefault_backend = "nope"\n' + MOCK,
     ["server.default_backend", "nope", "configured: x"]),
    ("endpoint not ipc/tcp", '[server]\nendpoint = "http://localhost:80"\n' + MOCK,
     ["server.endpoint", "http://localhost:80", "ipc://", "tcp://"]),
    ("unknown server key", '[server]\nport = 5\n' + MOCK, ["server.port", "unknown key"]),
    ("unknown supervisor key", '[supervisor]\nrestart_maxx = 5\n' + MOCK, ["supervisor.restart_maxx"]),
    ("unknown section", '[srever]\nendpoint = "ipc:///tmp/x"\n' + MOCK, ["srever", "unknown key"]),
    ("bad supervisor value", '[supervisor]\nrequest_timeout_s = "soon"\n' + MOCK,
     ["supervisor.request_timeout_s"]),
    ("missing file", None, ["no such config file"]),
    ("invalid TOML", "[backends.x\nkind = mock\n", ["not valid TOML"]),
    ("python path does not exist", MOCK + 'python = "/nonexistent/bin/python3"\n',
     ["backends.x.python", "/nonexistent/bin/python3"]),
    ("embedding and backends both", '[embedding]\nprovider = "mock"\n' + MOCK, ["[embedding]", "[backends"]),
    ("embedding unknown provider", '[embedding]\nprovider = "gpt"\n', ["embedding.provider", "gpt"]),
]


def _workers_with(marker: str) -> list[psutil.Process]:
    """Live processes that inherited our marker: anything the server started."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("AKIDB_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


@pytest.mark.parametrize("name,text,words", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_quickly_naming_file_and_key(tmp_path: Path, name, text, words):
    path = tmp_path / "bad-config.toml"
    if text is not None:
        path.write_text(text)
    marker = uuid.uuid4().hex
    env = {**os.environ, "AKIDB_TEST_MARKER": marker}
    for key in [k for k in env if k.startswith("AKIDB_EMBEDDING_")]:
        del env[key]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    children: set[int] = set()
    end = t0 + 20
    while proc.poll() is None and time.monotonic() < end:   # watch for any child while it runs
        try:
            children.update(c.pid for c in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=10)
    elapsed = time.monotonic() - t0
    stderr = err.decode()
    assert proc.returncode == 2, (proc.returncode, stderr)
    assert elapsed < 10, elapsed
    assert "config error" in stderr
    assert str(path) in stderr, stderr
    for word in words:
        assert word in stderr, (word, stderr)
    assert "Traceback" not in stderr
    assert not children, f"serve started processes: {children}"
    assert "worker start" not in stderr + out.decode()
    assert not _workers_with(marker)


def test_bad_config_error_is_one_line(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text(MOCK + "replicas = 0\n")
    r = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith(f"akidb-embed: config error: {path}: backends.x.replicas")


# ---- load_config / build_config directly ------------------------------------------------------

def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_load_config_full_form(tmp_path: Path):
    path = _write(tmp_path, """
        [server]
        endpoint = "tcp://127.0.0.1:5999"
        default_backend = "b"

        [supervisor]
        request_timeout_s = 7
        drain_timeout_s = 3
        restart_max = 2

        [backends.a]
        kind = "mock"
        dim = 4
        replicas = 2

        [backends.b]
        kind = "mock"
        timeout_s = 1.5
        restart_max = 9
        delay_ms = 10
    """)
    cfg = load_config(path, env={})
    assert cfg.source == str(path) and cfg.endpoint == "tcp://127.0.0.1:5999"
    assert cfg.default_backend == "b" and list(cfg.backends) == ["a", "b"]
    assert cfg.drain_timeout_s == 3.0 and cfg.policy.request_timeout_s == 7.0
    a, b = cfg.backends["a"], cfg.backends["b"]
    assert a.kind == "mock" and a.model == "mock" and a.replicas == 2 and dict(a.options) == {"dim": 4}
    assert a.policy.restart_max == 2 and a.policy.request_timeout_s == 7.0   # inherits [supervisor]
    assert b.timeout_s == 1.5 and b.policy.restart_max == 9 and dict(b.options) == {"delay_ms": 10}


def test_default_backend_is_first_when_not_named(tmp_path: Path):
    cfg = load_config(_write(tmp_path, """
        [backends.zeta]
        kind = "mock"
        [backends.alpha]
        kind = "mock"
    """), env={})
    assert cfg.default_backend == "zeta"


def test_embedding_single_provider_form(tmp_path: Path):
    cfg = load_config(_write(tmp_path, """
        [embedding]
        provider = "mock"
        model = "my-mock"
    """), env={})
    assert list(cfg.backends) == ["mock"] and cfg.default_backend == "mock"
    b = cfg.backends["mock"]
    assert b.kind == "mock" and b.model == "my-mock"


def test_embedding_env_overrides_file(tmp_path: Path):
    path = _write(tmp_path, """
        [embedding]
        provider = "onnx"
        model = "from-file"
    """)
    cfg = load_config(path, env={"AKIDB_EMBEDDING_PROVIDER": "mock"})
    assert list(cfg.backends) == ["mock"] and cfg.backends["mock"].kind == "mock"
    assert cfg.backends["mock"].model == "from-file"
    cfg = load_config(path, env={"AKIDB_EMBEDDING_PROVIDER": "mock", "AKIDB_EMBEDDING_MODEL": "from-env"})
    assert cfg.backends["mock"].model == "from-env"
    # without the override the file's provider stands
    assert list(load_config(path, env={}).backends) == ["onnx"]


def test_embedding_env_alone_without_file_section():
    cfg = build_config({}, "<test>", env={"AKIDB_EMBEDDING_PROVIDER": "mock"})
    assert list(cfg.backends) == ["mock"] and cfg.backends["mock"].kind == "mock"
    assert cfg.backends["mock"].model == "mock"
    cfg = build_config({}, "<test>", env={"AKIDB_EMBEDDING_PROVIDER": "python-bridge"})
    assert cfg.backends["python-bridge"].kind == "onnx"


def test_embedding_env_python_path_is_checked():
    with pytest.raises(ConfigError) as ei:
        build_config({}, "<env>", env={"AKIDB_EMBEDDING_PROVIDER": "mock",
                                       "AKIDB_EMBEDDING_PYTHON_PATH": "/no/such/python"})
    assert "/no/such/python" in str(ei.value) and "python" in str(ei.value)
    cfg = build_config({}, "<env>", env={"AKIDB_EMBEDDING_PROVIDER": "mock",
                                         "AKIDB_EMBEDDING_PYTHON_PATH": sys.executable})
    assert cfg.backends["mock"].python == sys.executable


def test_embedding_env_bad_provider():
    with pytest.raises(ConfigError) as ei:
        build_config({}, "<env>", env={"AKIDB_EMBEDDING_PROVIDER": "nonsense"})
    assert "AKIDB_EMBEDDING_PROVIDER" in str(ei.value) and "nonsense" in str(ei.value)


def test_embedded_default_without_file():
    cfg = load_config(None, env={})
    assert cfg.source == "<embedded default>" and list(cfg.backends) == ["onnx"]
    assert cfg.backends["onnx"].model == DEFAULT_MODEL
    assert cfg.endpoint.startswith("ipc://")


def test_build_config_errors_name_source_and_key():
    cases = [
        ({"backends": {"x": {"kind": "mock", "replicas": 0}}}, "backends.x.replicas"),
        ({"backends": {"x": {"kind": "mock", "bogus": 1}}}, "backends.x.bogus"),
        ({"backends": {"x": {"kind": "mock"}}, "server": {"endpoint": "udp://x"}}, "server.endpoint"),
        ({"backends": {}}, "[backends]"),
        ({"backends": {"x": "mock"}}, "[backends.x]"),
    ]
    for doc, key in cases:
        with pytest.raises(ConfigError) as ei:
            build_config(doc, "/etc/akidb.toml", env={})
        assert str(ei.value).startswith("/etc/akidb.toml: ") and key in str(ei.value), (doc, str(ei.value))
