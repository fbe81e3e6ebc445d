"""`akidb-embed bench --http URL` drives an OpenAI-shaped /v1/embeddings server with the same workload."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.slow


class OpenAIShaped(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True      # headers and body go out in two writes
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        OpenAIShaped.seen.append({"path": self.path, **body})
        out = json.dumps({"object": "list", "model": body.get("model"),
                          "data": [{"object": "embedding", "index": i, "embedding": [0.5] * 4}
                                   for i in range(len(body["input"]))]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


class Backlogged(ThreadingHTTPServer):
    request_queue_size = 256   # 64 clients connect at once: the default listen backlog of 5 drops some on a busy box


def test_bench_http_runs_the_workload_against_an_openai_shaped_server(tmp_path) -> None:
    server = Backlogged(("127.0.0.1", 0), OpenAIShaped)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/embeddings"
    out = tmp_path / "bench.json"
    try:
        proc = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "bench", "--kind", "mock", "--no-bridge",
                               "--http", url, "--http-model", "m1", "--requests", "40", "--duration", "5",
                               "--warmup", "2", "--json-out", str(out)], capture_output=True, text=True, timeout=90)
    finally:
        server.shutdown()
        server.server_close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for phase in ("short_seq", "c1", "c16", "c64"):
        assert result["http"][phase]["errors"] == 0, result["http"][phase]
        assert result["http"][phase]["ok"] == 40
    requests = OpenAIShaped.seen
    assert requests and all(r["path"] == "/v1/embeddings" and r["model"] == "m1" for r in requests)
    assert all(isinstance(r["input"], list) and len(r["input"]) == 1 for r in requests)   # one text per request
    assert "http" in proc.stdout


def test_bench_http_self_measures_our_front_in_the_same_run_as_the_bridge(tmp_path, serve) -> None:
    import importlib.util

    import pytest
    if not all(importlib.util.find_spec(m) for m in ("starlette", "uvicorn", "orjson")):
        pytest.skip("the http extra is not installed")
    common = ["--no-inprocess", "--requests", "30", "--duration", "5", "--warmup", "2", "--concurrency", "1,4"]
    server = serve('[backends.mock]\nkind = "mock"\ndim = 8\n')
    for extra, out in ((["--kind", "mock"], tmp_path / "self.json"),                  # self-started supervisor + front
                       (["--kind", "mock", "--endpoint", server.endpoint], tmp_path / "endpoint.json")):  # standalone
        proc = subprocess.run([sys.executable, "-m", "akidb_embed.cli", "bench", *extra, "--http", "self", *common,
                               "--json-out", str(out)], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        for target in ("bridge", "http"):
            for phase in ("short_seq", "c1", "c4"):
                assert result[target][phase]["ok"] == 30 and result[target][phase]["errors"] == 0, (target, phase)
        assert result["meta"]["http_front"].startswith("our own")
        assert set(result["ratios"]["http_vs_bridge"]) == {"c1_throughput", "c4_throughput"}
        assert "http/bridge throughput" in proc.stdout and "http c4 throughput >= 0.9 x bridge c4" in proc.stdout
