"""``akidb-embed bench``: the same backend measured in-process and through the supervisor, in one run.

What runs, in order (every phase is capped by ``--requests`` and by ``--duration`` seconds):

* **in-process**: ``create_backend(kind, model, options).load()`` in this process, then
  ``embed([text])`` one text per call: short texts (single-text latency) and medium texts
  (sequential single-text throughput). In-process has one model and no queue, so its figure for
  "N concurrent clients" *is* the sequential single-text throughput; the table says so.
* **bridge**: a supervisor, either running (``--endpoint``) or started here (a temp config.toml and
  ``python -m akidb_embed.cli serve --config ...``, stopped with SIGTERM afterwards). Short texts one at
  a time with the blocking :class:`Client` (latency), then 1, 16 and 64 concurrent clients sending one
  medium text per request with :class:`AsyncClient` (N tasks on one socket: what a host application does).
* **http** (``--http URL``): the same workloads against an OpenAI-shaped ``/v1/embeddings`` endpoint
  (stdlib ``http.client``, one keep-alive connection per thread).

The load generator of the bridge and http phases runs in a *separate, fresh process*
(``python -m akidb_embed.bench _loadgen``) that imports no model runtime: the measuring process never
holds an idle ONNX thread pool or the in-process phase's garbage, and the client-side CPU it costs
(it shares the machine's cores with the worker, as a real client would) is the same for every target.
That process also takes the supervisor's ``status`` right before and after each measured window, so
the supervisor's CPU per request is ``delta(cpu_s) / requests`` over exactly that window. A sampler
thread here samples the peak RSS of the supervisor and of each worker with psutil every 0.5 s.

The corpus is deterministic: short (5-20 tokens) and medium (35-100 tokens) English texts drawn
from the word list below with a fixed seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

SEED = 20240611
CORPUS_SIZE = 4096
CONCURRENCY = (1, 16, 64)
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
STATUS_SAMPLE_S = 0.5

# Common English words, each one WordPiece token in BERT-style vocabularies, so a text of n words is
# about n + 3 tokens ([CLS], the final period, [SEP]).
WORDS = """
the of and to in is was for on that with as by at from his her they this which are be had not have
one were their all there been has when who more will would into its time only other new some could
these two may first then any like now over such our man me even most made after also did many before
must through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being under
never day same another know while last might us great old year off come since against go came right
used take three states himself few house use during without again place american around however home
small found thought went say part once general high upon school every does got united left number
course war until always away something fact though water less public put think almost hand enough far
took head yet government system better set told nothing night end why called didn find look asked
later point knew city next program business give group toward young days let room president side
social given present several order national possible rather second face per among form important often
things looked early white case john become large big need four within felt along children saw best
church ever least power development light thought family interest want members mind country area others
done turned although open god service problem kind sense began help means certain whole air today
question across road river music market library garden morning window teacher doctor letter story
""".split()

SHORT_WORDS = (3, 17)     # + [CLS], period, [SEP]: 6-20 tokens
MEDIUM_WORDS = (33, 96)   # 36-99 tokens


# ---------------------------------------------------------------- corpus

def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def corpus(kind: str, n: int = CORPUS_SIZE, seed: int = SEED) -> list[str]:
    """``n`` deterministic texts: ``kind`` is "short" (5-20 tokens) or "medium" (35-100 tokens)."""
    lo, hi = {"short": SHORT_WORDS, "medium": MEDIUM_WORDS}[kind]
    rng = random.Random(f"{seed}:{kind}")
    return [_sentence(rng, lo, hi) for _ in range(n)]


# ---------------------------------------------------------------- statistics

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def summarize(latencies_s: list[float], errors: int, elapsed_s: float, *, clients: int | str,
              note: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
    lat = sorted(x * 1000.0 for x in latencies_s)
    ok = len(lat)
    out = {"clients": clients, "requests": ok + errors, "ok": ok, "errors": errors,
           "elapsed_s": round(elapsed_s, 4),
           "texts_per_s": round(ok / elapsed_s, 2) if elapsed_s > 0 else None,
           "p50_ms": round(percentile(lat, 50), 3), "p95_ms": round(percentile(lat, 95), 3),
           "p99_ms": round(percentile(lat, 99), 3),
           "mean_ms": round(sum(lat) / ok, 3) if ok else None, "max_ms": round(lat[-1], 3) if lat else None,
           "note": note, "latencies_ms": [round(x, 4) for x in lat]}
    if extra:
        out.update(extra)
    return out


# ---------------------------------------------------------------- load generator (separate process)

def _loadgen_main() -> int:
    """``python -m akidb_embed.bench _loadgen``: spec JSON on stdin, result JSON on stdout."""
    spec = json.load(sys.stdin)
    if spec["target"] == "http":
        result = _http_phase(spec)
    elif spec["concurrency"] == 0:
        result = _bridge_sequential(spec)
    else:
        import asyncio
        result = asyncio.run(_bridge_concurrent(spec))
    json.dump(result, sys.stdout)
    return 0


def _sup_cpu(status: dict[str, Any]) -> float:
    return float(status["supervisor"]["cpu_s"])


def _bridge_sequential(spec: dict[str, Any]) -> dict[str, Any]:
    """One blocking client, one text per request, back to back."""
    from akidb_embed.client import Client

    texts, backend = spec["texts"], spec["backend"]
    with Client(spec["endpoint"]) as client:
        for i in range(spec["warmup"]):
            client.embed([texts[-1 - i % len(texts)]], backend=backend)
        before = client.status()
        lat: list[float] = []
        errors, samples = 0, []
        start = time.perf_counter()
        stop_at = start + spec["duration"]
        for i in range(spec["requests"]):
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            try:
                v = client.embed([texts[i % len(texts)]], backend=backend)
                if v.shape[0] != 1:
                    raise ValueError(f"expected 1 vector, got {v.shape}")
                lat.append(time.perf_counter() - t0)
            except Exception as exc:
                errors += 1
                samples.append(f"{type(exc).__name__}: {exc}"[:200])
        elapsed = time.perf_counter() - start
        after = client.status()
    return {"latencies_s": lat, "errors": errors, "error_samples": samples[:5], "elapsed_s": elapsed,
            "cpu_s": _sup_cpu(after) - _sup_cpu(before)}


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

        lat: list[float] = []
        errors, samples = 0, []
        counter = iter(range(spec["requests"]))
        before = await client.status()
        start = time.perf_counter()
        stop_at = start + spec["duration"]

        async def task() -> None:
            nonlocal errors
            for i in counter:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                try:
                    v = await client.embed([texts[i % len(texts)]], backend=backend)
                    if v.shape[0] != 1:
                        raise ValueError(f"expected 1 vector, got {v.shape}")
                    lat.append(time.perf_counter() - t0)
                except Exception as exc:
                    errors += 1
                    samples.append(f"{type(exc).__name__}: {exc}"[:200])
        await asyncio.gather(*(task() for _ in range(conc)))
        elapsed = time.perf_counter() - start
        after = await client.status()
    return {"latencies_s": lat, "errors": errors, "error_samples": samples[:5], "elapsed_s": elapsed,
            "cpu_s": _sup_cpu(after) - _sup_cpu(before)}


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
    lat: list[float] = []
    errors, samples = 0, []

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
        nonlocal errors
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
                            lat.append(time.perf_counter() - t0)
                except Exception as exc:
                    conn.close()
                    conn = conn_cls(url.hostname, url.port, timeout=60)
                    if record:
                        with lock:
                            errors += 1
                            samples.append(f"{type(exc).__name__}: {exc}"[:200])
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
    return {"latencies_s": lat, "errors": errors, "error_samples": samples[:5],
            "elapsed_s": time.perf_counter() - start, "cpu_s": None}


def _run_loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "akidb_embed.bench", "_loadgen"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=spec["duration"] + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


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


class SelfStarted:
    """``akidb-embed serve`` in a subprocess, on a private ipc endpoint, stopped with SIGTERM."""

    def __init__(self, args: argparse.Namespace, options: dict[str, Any]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="akidb-bench-"))
        self.endpoint = f"ipc://{self.dir / 'bench.sock'}"
        self.backend = args.kind
        batching = {"max_batch_size": args.max_batch_size, "max_batch_tokens": args.max_batch_tokens,
                    "max_inflight": args.max_inflight}
        self.config = self.dir / "config.toml"
        self.config.write_text(server_config(self.endpoint, self.backend, args.kind, args.model, options, batching))
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
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


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
    res = _run_loadgen({**base, "texts": short, "concurrency": 0, "warmup": args.warmup})
    out["short_seq"] = _phase_from_loadgen(res, 1, "sequential, one short text per request")
    for c in args.concurrency:
        print(f"{target}: {c} concurrent clients, medium texts ...", file=sys.stderr, flush=True)
        res = _run_loadgen({**base, "texts": medium, "concurrency": c, "warmup": max(args.warmup, 2 * c)})
        out[f"c{c}"] = _phase_from_loadgen(res, c, "one medium text per request")
    return out


# ---------------------------------------------------------------- report

def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(inproc: dict[str, Any], remote: dict[str, Any], concurrency: Sequence[int]) -> dict[str, Any]:
    out = {"short_p50": _ratio(remote["short_seq"]["p50_ms"], inproc["short_seq"]["p50_ms"]),
           "short_p99": _ratio(remote["short_seq"]["p99_ms"], inproc["short_seq"]["p99_ms"]),
           "short_p50_delta_ms": round(remote["short_seq"]["p50_ms"] - inproc["short_seq"]["p50_ms"], 3),
           "short_p99_delta_ms": round(remote["short_seq"]["p99_ms"] - inproc["short_seq"]["p99_ms"], 3)}
    for c in concurrency:
        out[f"c{c}_throughput"] = _ratio(remote[f"c{c}"]["texts_per_s"], inproc["medium_seq"]["texts_per_s"])
    return out


def check_targets(result: dict[str, Any], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value, the bound and pass/miss."""
    inp, br = result.get("inprocess"), result.get("bridge")
    if not inp or not br:
        return []
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float | None, ok: bool | None, unit: str) -> None:
        rows.append({"target": name, "value": value, "bound": bound, "unit": unit,
                     "met": ok if value is not None and bound is not None else None})

    s_in, s_br = inp["short_seq"], br["short_seq"]
    add("short p50 <= in-process p50 + 0.5 ms", s_br["p50_ms"], round(s_in["p50_ms"] + 0.5, 3),
        s_br["p50_ms"] <= s_in["p50_ms"] + 0.5, "ms")
    add("short p99 <= in-process p99 + 1.5 ms", s_br["p99_ms"], round(s_in["p99_ms"] + 1.5, 3),
        s_br["p99_ms"] <= s_in["p99_ms"] + 1.5, "ms")
    c64 = br.get("c64")
    tput_in = inp["medium_seq"]["texts_per_s"]
    if c64:
        add("c64 throughput >= 0.95 x in-process", c64["texts_per_s"], round(0.95 * tput_in, 1),
            c64["texts_per_s"] >= 0.95 * tput_in, "texts/s")
        add("c64 errors == 0", c64["errors"], 0, c64["errors"] == 0, "")
        bound = 1.3 * 64 * 1000.0 / tput_in
        add("c64 p95 <= 1.3 x 64 x in-process time/text", c64["p95_ms"], round(bound, 1), c64["p95_ms"] <= bound,
            "ms")
        cpu = c64.get("supervisor_cpu_us_per_request")
        add("supervisor CPU/request (c64) <= 100 us", cpu, 100.0, cpu is not None and cpu <= 100.0, "us")
    sup = br.get("supervisor_peak_rss_mb")
    add("supervisor peak RSS <= 80 MB", sup, 80.0, sup is not None and sup <= 80.0, "MB")
    quant = (result["meta"].get("options") or {}).get("quantize")
    if quant and baseline and baseline.get("inprocess") and c64:
        fp32 = baseline["inprocess"]["medium_seq"]["texts_per_s"]
        add(f"{quant} c64 throughput >= 1.6 x fp32 in-process ({fp32:.1f}/s)", c64["texts_per_s"],
            round(1.6 * fp32, 1), c64["texts_per_s"] >= 1.6 * fp32, "texts/s")
        add(f"({quant} in-process single-text, same bound: information)", tput_in, round(1.6 * fp32, 1),
            tput_in >= 1.6 * fp32, "texts/s")
    return rows


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def format_report(result: dict[str, Any]) -> str:
    m = result["meta"]
    busy = [la[0] for la in (m.get("loadavg_start"), m.get("loadavg_end")) if la]
    warn = (f"  WARNING: load average {max(busy):.1f} on {m['cpus']} CPUs: other processes compete for the CPU; "
            "figures are pessimistic and noisy" if busy and max(busy) > (m["cpus"] or 1) else "")
    lines = [f"akidb-embed bench: kind={m['kind']} model={m['model']} options={json.dumps(m['options'])}",
             f"  machine: {m['cpus']} CPUs, {m['platform']}; caps: {m['requests']} requests / {m['duration_s']:g} s "
             f"per phase; warm-up {m['warmup']}",
             f"  bridge: {m.get('bridge_endpoint') or '-'} ({'self-started' if m.get('self_started') else 'running'}"
             f"{', ' + json.dumps(m['batching']) if m.get('self_started') else ''})",
             f"  load generator: {m['loadgen']}",
             f"  load average: start {m.get('loadavg_start')}, end {m.get('loadavg_end')}; nice {m.get('nice')}",
             *([warn] if warn else []), ""]
    header = ("WORKLOAD", "TARGET", "CLIENTS", "REQS", "ERRS", "TEXTS/S", "P50 MS", "P95 MS", "P99 MS",
              "SUP CPU/REQ")
    rows = []
    for target in ("inprocess", "bridge", "http"):
        r = result.get(target)
        if not r:
            continue
        label = {"inprocess": "in-process", "bridge": "bridge", "http": "http"}[target]
        ph = r["short_seq"]
        rows.append(("short, single text", label, "1 seq", ph["requests"], ph["errors"], _fmt(ph["texts_per_s"], 1),
                     _fmt(ph["p50_ms"], 3), _fmt(ph["p95_ms"], 3), _fmt(ph["p99_ms"], 3),
                     _fmt(ph.get("supervisor_cpu_us_per_request"), 1) + (" us" if "supervisor_cpu_us_per_request" in ph else "")))
    for target in ("inprocess", "bridge", "http"):
        r = result.get(target)
        if not r:
            continue
        if target == "inprocess":
            ph = r["medium_seq"]
            rows.append(("medium, 1 text/req", "in-process", "seq*", ph["requests"], ph["errors"],
                         _fmt(ph["texts_per_s"], 1), _fmt(ph["p50_ms"], 3), _fmt(ph["p95_ms"], 3),
                         _fmt(ph["p99_ms"], 3), "-"))
            continue
        for c in m["concurrency"]:
            ph = r[f"c{c}"]
            cpu = ph.get("supervisor_cpu_us_per_request")
            rows.append(("medium, 1 text/req", target, str(c), ph["requests"], ph["errors"], _fmt(ph["texts_per_s"], 1),
                         _fmt(ph["p50_ms"], 3), _fmt(ph["p95_ms"], 3), _fmt(ph["p99_ms"], 3),
                         f"{cpu:.1f} us" if cpu is not None else "-"))
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    if result.get("inprocess"):
        lines.append("  * in-process has one model and no queue: its figure for any number of clients is the "
                     "sequential single-text throughput")
    for target in ("bridge", "http"):
        rt = result.get("ratios", {}).get(target)
        if rt:
            conc = ", ".join(f"c{c} {_fmt(rt.get(f'c{c}_throughput'), 3)}x" for c in m["concurrency"])
            lines.append(f"{target}/in-process: short p50 {_fmt(rt['short_p50'], 3)}x ({rt['short_p50_delta_ms']:+.3f} ms), "
                         f"p99 {_fmt(rt['short_p99'], 3)}x ({rt['short_p99_delta_ms']:+.3f} ms); throughput {conc}")
    br = result.get("bridge")
    if br:
        lines.append(f"supervisor: CPU/request over the whole bridge run {_fmt(br.get('supervisor_cpu_us_per_request_run'), 1)} us"
                     f" ({_fmt(br.get('supervisor_cpu_s_run'), 3)} s / {br.get('requests_run')} requests, incl. a few status calls);"
                     f" peak RSS {_fmt(br.get('supervisor_peak_rss_mb'), 1)} MB")
        for wid, mb in (br.get("worker_peak_rss_mb") or {}).items():
            lines.append(f"worker {wid}: peak RSS {mb:.1f} MB")
        lines.append(f"rss samples: {br.get('rss_samples')} (every {STATUS_SAMPLE_S:g} s)")
    if result.get("inprocess"):
        lines.append(f"in-process (bench process) RSS after the in-process phase: {result['inprocess']['rss_mb']:.1f} MB")
    if result.get("targets"):
        lines.append("")
        lines.append("targets:")
        for t in result["targets"]:
            mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
            lines.append(f"  [{mark}] {t['target']}: {_fmt(t['value'], 3)} {t['unit']} (bound {_fmt(t['bound'], 3)})")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("akidb-embed bench: --plot needs matplotlib: pip install matplotlib  (or pip install "
              "'akidb-embed[plot]')", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for target in ("inprocess", "bridge", "http"):
        r = result.get(target)
        if not r:
            continue
        lat = r["short_seq"]["latencies_ms"]
        if lat:
            ax1.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=target)
        phases = [("medium_seq", "in-process seq")] if target == "inprocess" else [
            (f"c{c}", f"{target} c{c}") for c in result["meta"]["concurrency"]]
        for key, label in phases:
            lat = r[key]["latencies_ms"]
            if lat:
                ax2.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=label)
    for ax, title in ((ax1, "single short text (sequential)"), (ax2, "one medium text per request")):
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests <= x")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = result["meta"]
    fig.suptitle(f"akidb-embed bench: {m['kind']} {m['model']} {json.dumps(m['options'])}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)


# ---------------------------------------------------------------- command

def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _concurrency(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("concurrency levels must be positive integers")
    return values


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure a backend in-process and through the supervisor",
                              description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kind", default="onnx", help="backend kind (onnx, mock, sentence-transformers, mlx)")
    p.add_argument("--model", help=f"model (default: {DEFAULT_MODEL}; 'mock' for the mock kind)")
    p.add_argument("--threads", type=int, help="backend option threads")
    p.add_argument("--quantize", choices=["int8"], help="backend option quantize")
    p.add_argument("--providers", help="backend option providers, comma-separated")
    p.add_argument("--graph-optimization", help="backend option graph_optimization")
    p.add_argument("--option", action="append", type=_parse_option, default=[], metavar="KEY=VALUE",
                   help="any other backend option (value parsed as JSON when it is JSON)")
    p.add_argument("--endpoint", help="use this running supervisor instead of starting one")
    p.add_argument("--backend", help="with --endpoint: the configured backend name (default: its default)")
    p.add_argument("--http", metavar="URL", help="also run the workloads against an OpenAI-shaped "
                   "/v1/embeddings endpoint (POST {input: [text], model})")
    p.add_argument("--http-model", help="model name sent to --http (default: --model)")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process phases")
    p.add_argument("--no-bridge", action="store_true", help="skip the supervisor phases")
    p.add_argument("--requests", type=int, default=2000, help="cap on measured requests per phase")
    p.add_argument("--duration", type=float, default=10.0, help="cap on seconds per phase")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured requests before each phase")
    p.add_argument("--concurrency", type=_concurrency, default=list(CONCURRENCY), help="client counts, e.g. 1,16,64")
    p.add_argument("--max-batch-size", type=int, help="self-started server: backend max_batch_size")
    p.add_argument("--max-batch-tokens", type=int, help="self-started server: backend max_batch_tokens")
    p.add_argument("--max-inflight", type=int, help="self-started server: backend max_inflight")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the backend to be READY")
    p.add_argument("--json-out", metavar="FILE", help="default: bench-results/bench-<kind>[-<quantize>].json")
    p.add_argument("--baseline", metavar="FILE", help="an fp32 result JSON for the int8 target (default: "
                   "bench-results/bench-<kind>.json when --quantize is given and it exists)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the latency distributions (needs matplotlib)")
    return p


def run_bench(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.duration <= 0:
        print("akidb-embed bench: --requests and --duration must be positive", file=sys.stderr)
        return 2
    args.model = args.model or ("mock" if args.kind == "mock" else DEFAULT_MODEL)
    options: dict[str, Any] = dict(args.option)
    for key, value in (("threads", args.threads), ("quantize", args.quantize),
                       ("graph_optimization", args.graph_optimization),
                       ("providers", args.providers.split(",") if args.providers else None)):
        if value is not None:
            options[key] = value
    suffix = f"-{args.quantize}" if args.quantize else ""
    json_out = Path(args.json_out or f"bench-results/bench-{args.kind}{suffix}.json")
    short, medium = corpus("short"), corpus("medium")
    result: dict[str, Any] = {"meta": {
        "kind": args.kind, "model": args.model, "options": options, "cpus": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "requests": args.requests, "duration_s": args.duration, "warmup": args.warmup,
        "concurrency": args.concurrency, "seed": SEED,
        "corpus": {"short_words": SHORT_WORDS, "medium_words": MEDIUM_WORDS},
        "loadgen": "a separate fresh process (python -m akidb_embed.bench _loadgen): blocking Client for the "
                   "sequential phase, one AsyncClient (one socket) with N asyncio tasks for N clients"
                   + ("; http: N threads, one keep-alive connection each" if args.http else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": _loadavg(),
        "nice": os.nice(0) if hasattr(os, "nice") else None}}

    server: SelfStarted | None = None
    try:
        if not args.no_bridge:
            if args.endpoint:
                from akidb_embed.client import Client
                with Client(args.endpoint) as client:
                    info = client.info()
                backend = args.backend or info["default_backend"]
                endpoint = args.endpoint
            else:
                print(f"bridge: starting a supervisor ({args.kind}) ...", file=sys.stderr, flush=True)
                server = SelfStarted(args, options)
                endpoint, backend = server.endpoint, server.backend
                result["meta"]["batching"] = {k: v for k, v in (("max_batch_size", args.max_batch_size),
                                              ("max_batch_tokens", args.max_batch_tokens),
                                              ("max_inflight", args.max_inflight)) if v is not None} or "defaults"
                server.wait_ready(args.startup_timeout)
            result["meta"].update(bridge_endpoint=endpoint, bridge_backend=backend, self_started=server is not None)
        if not args.no_inprocess:
            result["inprocess"] = run_inprocess(args, options, short, medium)
        if not args.no_bridge:
            from akidb_embed.client import Client
            sampler = RssSampler(endpoint, backend)
            with Client(endpoint) as client:
                cpu0 = _sup_cpu(client.status())
                sampler.refresh(client)
                sampler.sample()
            sampler.start()
            try:
                bridge = run_remote("bridge", args, short, medium, endpoint=endpoint, backend=backend)
            finally:
                sampler.stop()
            with Client(endpoint) as client:
                cpu1 = _sup_cpu(client.status())
            phases = [bridge["short_seq"]] + [bridge[f"c{c}"] for c in args.concurrency]
            n = sum(ph["requests"] for ph in phases)
            bridge.update(supervisor_cpu_s_run=round(cpu1 - cpu0, 3), requests_run=n,
                          supervisor_cpu_us_per_request_run=round((cpu1 - cpu0) / max(1, n) * 1e6, 1),
                          supervisor_peak_rss_mb=sampler.supervisor_mb, worker_peak_rss_mb=sampler.workers,
                          rss_samples=sampler.samples)
            result["bridge"] = bridge
    except RuntimeError as exc:
        print(f"akidb-embed bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    if args.http:
        result["http"] = run_remote("http", args, short, medium)
    if result.get("inprocess"):
        result["ratios"] = {t: ratios(result["inprocess"], result[t], args.concurrency)
                            for t in ("bridge", "http") if result.get(t)}
    baseline = None
    base_path = Path(args.baseline) if args.baseline else (
        Path(f"bench-results/bench-{args.kind}.json") if args.quantize else None)
    if base_path is not None and base_path.is_file() and base_path.resolve() != json_out.resolve():
        baseline = json.loads(base_path.read_text())
        result["meta"]["baseline"] = str(base_path)
    result["meta"]["loadavg_end"] = _loadavg()
    result["targets"] = check_targets(result, baseline)
    report = format_report(result)
    print(report)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"results written to {json_out}", file=sys.stderr)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["_loadgen"]:
        sys.exit(_loadgen_main())
    from akidb_embed.cli import main
    sys.exit(main(["bench", *sys.argv[1:]]))
