"""Package hygiene a user relies on: the public names, what the supervisor imports, JSON logs."""
from __future__ import annotations

import json
import subprocess
import sys

import akidb_embed
from akidb_embed.protocol.errors import EmbedError, ErrorCode


def test_public_names_resolve():
    # the names the README uses, each the object it documents
    from akidb_embed.client import AsyncClient, Client, EmbedResult
    assert (akidb_embed.Client, akidb_embed.AsyncClient, akidb_embed.EmbedResult) == (Client, AsyncClient, EmbedResult)
    assert akidb_embed.EmbedError is EmbedError and akidb_embed.ErrorCode is ErrorCode
    for name in akidb_embed.__all__:
        assert hasattr(akidb_embed, name), name
    # every error code has its exception class exported
    exported = {getattr(akidb_embed, n).code for n in akidb_embed.__all__
                if isinstance(getattr(akidb_embed, n), type) and issubclass(getattr(akidb_embed, n), EmbedError)
                and getattr(akidb_embed, n) is not EmbedError}
    assert exported == set(ErrorCode)


def test_supervisor_imports_no_model_runtime_nor_numpy():
    code = ("import sys\n"
            "from akidb_embed.cli import build_parser\n"
            "from akidb_embed.supervisor import Supervisor, load_config\n"
            "build_parser()\n"
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'torch', 'mlx', 'tokenizers', "
            "'sentence_transformers', 'transformers', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_json_logs_one_object_per_line(serve):
    server = serve("""
        [backends.m]
        kind = "mock"
        dim = 4
    """, env={"AKIDB_LOG_FORMAT": "json"})
    with server.client() as c:
        c.embed(["x"], backend="m")
    server.stop()
    lines = [line for line in server.log().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]     # every line parses: nothing but JSON objects
    messages = [d["msg"] for d in docs]
    assert any(m.startswith("worker start: backend=m") for m in messages), messages
    assert any(m.startswith("supervisor listening") for m in messages), messages
    assert all({"ts", "level", "logger", "pid", "msg"} <= set(d) for d in docs)
