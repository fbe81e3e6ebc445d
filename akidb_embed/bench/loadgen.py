"""The load generator of the bridge and http phases: ``python -m akidb_embed.bench.loadgen``.

It runs in a separate, fresh process spawned for each phase by :mod:`akidb_embed.bench.phases`:
spec JSON on stdin, result JSON (latencies, errors, elapsed time, supervisor CPU over the measured
window) on stdout. It imports no model runtime (the client imports numpy; nothing else here does).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any


def main() -> int:
    """Spec JSON on stdin, result JSON on stdout."""
    spec = json.load(sys.stdin)
    if spec["target"] == "http":
        result = _http_phase(spec)
    elif spec["target"] == "mixed":
        import asyncio

        from akidb_embed.bench.mixed import run_mixed_loadgen
        result = asyncio.run(run_mixed_loadgen(spec))
    elif spec["concurrency"] == 0:
        result = _bridge_sequential(spec)
    else:
        import asyncio
        result = asyncio.run(_bridge_concurrent(spec))
    json.dump(result, sys.stdout)
    return 0


def sup_cpu(status: dict[str, Any]) -> float:
    """The supervisor's CPU seconds so far, from a ``status`` reply."""
    return float(status["supervisor"]["cpu_s"])


class _Tally:
    """Latencies and errors of one phase (the HTTP phase's threads call it under their lock)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.samples: list[str] = []

    def ok(self, t0: float, vectors: Any = None) -> None:
        if vectors is not None and vectors.shape[0] != 1:
            self.fail(ValueError(f"expected 1 vector, got {vectors.shape}"))
        else:
            self.latencies.append(time.perf_counter() - t0)

    def fail(self, exc: BaseException) -> None:
        self.errors += 1
        self.samples.append(f"{type(exc).__name__}: {exc}"[:200])

    def result(self, elapsed_s: float, cpu_s: float | None) -> dict[str, Any]:
        return {"latencies_s": self.latencies, "errors": self.errors, "error_samples": self.samples[:5],
                "elapsed_s": elapsed_s, "cpu_s": cpu_s}


def _bridge_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    """One blocking client, one text per request, back to back."""
    from akidb_embed.client import Client

    texts, backend = spec["texts"], spec["backend"]
    with Client(spec["endpoint"]) as client:
        for i in range(spec["warmup"]):
            client.embed([texts[-1 - i % len(texts)]], backend=backend)
        before = client.status()
        tally = _Tally()
        start = time.perf_counter()
        stop_at = start + spec["duration"]
        for i in range(spec["requests"]):
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            try:
                tally.ok(t0, client.embed([texts[i % len(texts)]], backend=backend))
            except Exception as exc:
                tally.fail(exc)
        elapsed = time.perf_counter() - start
        after = client.status()
    return tally.result(elapsed, sup_cpu(after) - sup_cpu(before))


async def _bridge_concurrent(spec: dict[str, Any]) -> dict[str, Any]:
    """``concurrency`` asyncio tasks on one AsyncClient (one socket), one text per request."""
    import asyncio

    from akidb_embed.client import AsyncClient

    texts, backend, conc = spec["texts"], spec["backend"], spec["concurrency"]
    async with AsyncClient(spec["endpoint"]) as client:
        warm = iter(range(spec["warmup"]))

        async def warm_task() -> None:
            for i in warm:
                await client.embed([texts[-1 - i % len(texts)]], backend=backend)
        await asyncio.gather(*(warm_task() for _ in range(conc)))

        tally = _Tally()
        counter = iter(range(spec["requests"]))
        before = await client.status()
        start = time.perf_counter()
        stop_at = start + spec["duration"]

        async def task() -> None:
            for i in counter:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    tally.ok(t0, await client.embed([texts[i % len(texts)]], backend=backend))
                except Exception as exc:
                    tally.fail(exc)
        await asyncio.gather(*(task() for _ in range(conc)))
        elapsed = time.perf_counter() - start
        after = await client.status()
    return tally.result(elapsed, sup_cpu(after) - sup_cpu(before))


def _http_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """``concurrency`` threads (0 = one, sequential), each with its own keep-alive HTTP connection."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(spec["url"])
    path = url.path if url.path not in ("", "/") else "/v1/embeddings"
    conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    texts, model = spec["texts"], spec["model"]
    lock = threading.Lock()
    tally = _Tally()

    def post(conn: Any, text: str) -> None:
        body = json.dumps({"input": [text], "model": model}).encode()
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:120]!r}")
        if len(json.loads(data)["data"]) != 1:
            raise ValueError("expected one embedding")

    def worker(indices: Any, stop_at: float | None, record: bool) -> None:
        conn = conn_cls(url.hostname, url.port, timeout=60)
        try:
            while True:
                with lock:
                    i = next(indices, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                if stop_at is not None and t0 >= stop_at:
                    return
                try:
                    post(conn, texts[i % len(texts)])
                    if record:
                        with lock:
                            tally.ok(t0)
                except Exception as exc:
                    conn.close()
                    conn = conn_cls(url.hostname, url.port, timeout=60)
                    if record:
                        with lock:
                            tally.fail(exc)
        finally:
            conn.close()

    n_threads = max(1, spec["concurrency"])

    def run(indices: Any, stop_at: float | None, record: bool) -> None:
        threads = [threading.Thread(target=worker, args=(indices, stop_at, record)) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run(iter(range(len(texts) - spec["warmup"], len(texts))), None, False)
    start = time.perf_counter()
    run(iter(range(spec["requests"])), start + spec["duration"], True)
    return tally.result(time.perf_counter() - start, None)


if __name__ == "__main__":
    sys.exit(main())
