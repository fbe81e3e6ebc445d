"""The measured phases, run from the bench process: in-process, and bridge/http via the load generator.

Also what the bridge phases need here: the self-started supervisor (:class:`SelfStarted`, its
config from :func:`server_config`) and :class:`RssSampler`, which keeps the peak RSS of the
supervisor and of its workers.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from akidb_embed.bench.workload import summarize

if TYPE_CHECKING:
    import argparse

STATUS_SAMPLE_S = 0.5


# ---------------------------------------------------------------- in-process

def _inprocess_phase(backend: Any, texts: list[str], requests: int, duration: float) -> tuple[list[float], float]:
    lat: list[float] = []
    start = time.perf_counter()
    stop_at = start + duration
    for i in range(requests):
        t0 = time.perf_counter()
        if t0 >= stop_at:
            break
        backend.embed([texts[i % len(texts)]])
        lat.append(time.perf_counter() - t0)
    return lat, time.perf_counter() - start


def run_inprocess(args: argparse.Namespace, options: dict[str, Any], short: list[str],
                  medium: list[str]) -> dict[str, Any]:
    import gc

    import psutil

    from akidb_embed.workers.backends import create_backend

    print(f"in-process: loading {args.kind} {args.model} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    backend = create_backend(args.kind, args.model, options)
    info = backend.load()
    load_s = time.perf_counter() - t0
    for i in range(args.warmup):
        backend.embed([short[-1 - i]])
        backend.embed([medium[-1 - i]])
    out: dict[str, Any] = {"load_s": round(load_s, 3), "info": info.to_wire()}
    lat, el = _inprocess_phase(backend, short, args.requests, args.duration)
    out["short_seq"] = summarize(lat, 0, el, clients=1, note="sequential, one short text per call")
    lat, el = _inprocess_phase(backend, medium, args.requests, args.duration)
    out["medium_seq"] = summarize(lat, 0, el, clients="seq",
                                  note="one model, no queue: sequential single-text throughput")
    out["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    backend.close()
    del backend
    gc.collect()
    return out


# ---------------------------------------------------------------- supervisor

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def server_config(endpoint: str, name: str, kind: str, model: str, options: dict[str, Any],
                  batching: dict[str, Any]) -> str:
    lines = ["[server]", f"endpoint = {_toml_value(endpoint)}", "", f"[backends.{name}]",
             f"kind = {_toml_value(kind)}", f"model = {_toml_value(model)}"]
    for key, value in {**batching, **options}.items():
        if value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a supervisor drains, a front stops), then SIGKILL if it is still there after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class SelfStarted:
    """``akidb-embed serve`` in a subprocess, on a private ipc endpoint, stopped with SIGTERM."""

    def __init__(self, args: argparse.Namespace, options: dict[str, Any], http_listen: str | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="akidb-bench-"))
        self.endpoint = f"ipc://{self.dir / 'bench.sock'}"
        self.backend = args.kind
        batching = {"max_batch_size": args.max_batch_size, "max_batch_tokens": args.max_batch_tokens,
                    "max_inflight": args.max_inflight}
        self.config = self.dir / "config.toml"
        text = server_config(self.endpoint, self.backend, args.kind, args.model, options, batching)
        if http_listen:   # `bench --http self`: our own HTTP front, started and supervised by this server
            text += f"\n[http]\nlisten = {_toml_value(http_listen)}\n"
        self.config.write_text(text)
        self.log_path = self.dir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "serve", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float) -> None:
        from akidb_embed.client import Client
        from akidb_embed.protocol.errors import EmbedError

        end = time.monotonic() + timeout
        with Client(self.endpoint) as client:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the supervisor exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    states = client._call("health", 1.0)["backends"]
                    if states.get(self.backend) == "READY":
                        return
                    if states.get(self.backend) == "FAILED":
                        raise RuntimeError(f"backend {self.backend} FAILED to load:\n{self.log_tail()}")
                except EmbedError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"backend {self.backend} not READY within {timeout:g} s:\n{self.log_tail()}")

    def stop(self) -> None:
        terminate(self.proc)
        self._log.close()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until GET url answers 200 (our front's /ready), or RuntimeError."""
    import urllib.error
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the HTTP front exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g} s")


class StandaloneHttp:
    """``akidb-embed http --endpoint E`` on a free loopback port, for `bench --endpoint E --http self`."""

    def __init__(self, endpoint: str) -> None:
        self.listen = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen([sys.executable, "-m", "akidb_embed.cli", "http", "--endpoint", endpoint,
                                      "--listen", self.listen], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        terminate(self.proc)


class RssSampler(threading.Thread):
    """Keeps the peak RSS of the supervisor and of each worker, read with psutil.

    The pids come from one ``status`` call (refreshed every few seconds, in case a worker restarts),
    so the sampling itself adds next to nothing to the supervisor's CPU time being measured.
    """

    def __init__(self, endpoint: str, backend: str) -> None:
        super().__init__(daemon=True, name="bench-rss")
        self.endpoint, self.backend = endpoint, backend
        self.supervisor_mb = 0.0
        self.workers: dict[str, float] = {}
        self.samples = 0
        self._procs: dict[str, Any] = {}
        self._halt = threading.Event()

    def refresh(self, client: Any) -> None:
        import psutil
        st = client.status()
        procs = {"supervisor": psutil.Process(st["supervisor"]["pid"])}
        for w in st["backends"].get(self.backend, {}).get("workers", []):
            procs[f"{w['wid']} (pid {w['pid']})"] = psutil.Process(w["pid"])
        self._procs = procs

    def sample(self) -> None:
        for key, proc in list(self._procs.items()):
            try:
                mb = proc.memory_info().rss / 2**20
            except Exception:
                continue
            if key == "supervisor":
                self.supervisor_mb = max(self.supervisor_mb, round(mb, 1))
            else:
                self.workers[key] = max(self.workers.get(key, 0.0), round(mb, 1))
        self.samples += 1

    def run(self) -> None:
        from akidb_embed.client import Client
        with Client(self.endpoint) as client:
            ticks = 0
            while not self._halt.wait(STATUS_SAMPLE_S):
                ticks += 1
                try:
                    if ticks % 20 == 0:
                        self.refresh(client)
                    self.sample()
                except Exception:
                    pass
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


# ---------------------------------------------------------------- bridge and http (load generator)

def run_loadgen(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "akidb_embed.bench.loadgen"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout or spec["duration"] + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def _phase_from_loadgen(res: dict[str, Any], clients: int | str, note: str) -> dict[str, Any]:
    ok = len(res["latencies_s"])
    extra: dict[str, Any] = {"error_samples": res["error_samples"]}
    if res.get("cpu_s") is not None:
        extra["supervisor_cpu_s"] = round(res["cpu_s"], 3)
        extra["supervisor_cpu_us_per_request"] = round(res["cpu_s"] / max(1, ok + res["errors"]) * 1e6, 1)
    return summarize(res["latencies_s"], res["errors"], res["elapsed_s"], clients=clients, note=note, extra=extra)


def run_remote(target: str, args: argparse.Namespace, short: list[str], medium: list[str], *,
               endpoint: str | None = None, backend: str | None = None) -> dict[str, Any]:
    """Sequential short-text latency, then each concurrency with medium texts, via the load generator."""
    base = {"target": target, "endpoint": endpoint, "backend": backend, "url": args.http,
            "model": args.http_model or args.model, "duration": args.duration, "requests": args.requests}
    out: dict[str, Any] = {}
    print(f"{target}: short texts, sequential ...", file=sys.stderr, flush=True)
    res = run_loadgen({**base, "texts": short, "concurrency": 0, "warmup": args.warmup})
    out["short_seq"] = _phase_from_loadgen(res, 1, "sequential, one short text per request")
    for c in args.concurrency:
        print(f"{target}: {c} concurrent clients, medium texts ...", file=sys.stderr, flush=True)
        res = run_loadgen({**base, "texts": medium, "concurrency": c, "warmup": max(args.warmup, 2 * c)})
        out[f"c{c}"] = _phase_from_loadgen(res, c, "one medium text per request")
    return out
