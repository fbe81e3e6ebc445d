"""``akidb-embed bench``: the same backend measured in-process and through the supervisor, in one run.

This module is the command itself: its argument parser (:func:`add_bench_parser`, whose description
is the paragraph above) and :func:`run_bench`, which runs the phases in order, then writes the
report and the result JSON. See :mod:`akidb_embed.bench` for what each phase measures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from akidb_embed.bench.workload import MEDIUM_WORDS, SEED, SHORT_WORDS, corpus
from akidb_embed.bench.phases import (
    RssSampler, SelfStarted, StandaloneHttp, free_port, run_inprocess, run_remote, wait_http,
)
from akidb_embed.bench.report import check_targets, format_report, http_vs_bridge, plot, ratios

CONCURRENCY = (1, 16, 64)
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


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
                   "/v1/embeddings endpoint (POST {input: [text], model}); 'self': our own HTTP front, on the "
                   "self-started supervisor (or in front of --endpoint), measured in the same run as the bridge")
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
    p.add_argument("--mixed", action="store_true", help="instead of the phases above: searches during a bulk "
                   "ingest (queries alone, bulk alone, both, both with priorities; --duration s each)")
    p.add_argument("--bulk-texts", type=int, default=64, help="--mixed: medium texts per bulk request")
    p.add_argument("--bulk-inflight", type=int, default=4, help="--mixed: bulk requests kept in flight")
    p.add_argument("--plot", metavar="FILE.png", help="draw the latency distributions (needs matplotlib)")
    return p


def run_bench(args: argparse.Namespace) -> int:
    if args.mixed and args.no_bridge:
        print("akidb-embed bench: --mixed needs the bridge (drop --no-bridge)", file=sys.stderr)
        return 2
    if args.requests < 1 or args.duration <= 0 or args.bulk_texts < 1 or args.bulk_inflight < 1:
        print("akidb-embed bench: --requests, --duration, --bulk-texts and --bulk-inflight must be positive",
              file=sys.stderr)
        return 2
    args.model = args.model or ("mock" if args.kind == "mock" else DEFAULT_MODEL)
    options: dict[str, Any] = dict(args.option)
    for key, value in (("threads", args.threads), ("quantize", args.quantize),
                       ("graph_optimization", args.graph_optimization),
                       ("providers", args.providers.split(",") if args.providers else None)):
        if value is not None:
            options[key] = value
    suffix = f"-{args.quantize}" if args.quantize else ""
    if args.mixed:
        suffix += "-mixed"
        args.no_inprocess = True
    json_out = Path(args.json_out or f"bench-results/bench-{args.kind}{suffix}.json")
    short, medium = corpus("short"), corpus("medium")
    result: dict[str, Any] = {"meta": {
        "kind": args.kind, "model": args.model, "options": options, "cpus": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "requests": args.requests, "duration_s": args.duration, "warmup": args.warmup,
        "concurrency": args.concurrency, "seed": SEED,
        "corpus": {"short_words": SHORT_WORDS, "medium_words": MEDIUM_WORDS},
        "loadgen": "a separate fresh process (python -m akidb_embed.bench.loadgen): blocking Client for the "
                   "sequential phase, one AsyncClient (one socket) with N asyncio tasks for N clients"
                   + ("; http: N threads, one keep-alive connection each" if args.http else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": _loadavg(),
        "nice": os.nice(0) if hasattr(os, "nice") else None}}

    server: SelfStarted | None = None
    front: StandaloneHttp | None = None
    own_http = args.http == "self"
    self_listen = f"127.0.0.1:{free_port()}" if own_http and not args.endpoint and not args.no_bridge else None
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
                server = SelfStarted(args, options, self_listen)
                endpoint, backend = server.endpoint, server.backend
                result["meta"]["batching"] = {k: v for k, v in (("max_batch_size", args.max_batch_size),
                                              ("max_batch_tokens", args.max_batch_tokens),
                                              ("max_inflight", args.max_inflight)) if v is not None} or "defaults"
                server.wait_ready(args.startup_timeout)
            result["meta"].update(bridge_endpoint=endpoint, bridge_backend=backend, self_started=server is not None)
            if own_http:
                if self_listen is None:
                    front = StandaloneHttp(endpoint)
                listen = self_listen or front.listen  # type: ignore[union-attr]
                wait_http(f"http://{listen}/ready", 60, front.proc if front else None)
                args.http = f"http://{listen}/v1/embeddings"
                args.http_model = args.http_model or backend
                result["meta"]["http_front"] = "our own (supervised by the server)" if self_listen else \
                    "our own (akidb-embed http, standalone)"
        elif own_http:
            raise RuntimeError("--http self needs the bridge (a self-started server or --endpoint)")
        if not args.no_inprocess:
            result["inprocess"] = run_inprocess(args, options, short, medium)
        if args.mixed:
            from akidb_embed.bench.mixed import run_mixed
            result["mixed"] = run_mixed(args, endpoint, backend)
        elif not args.no_bridge:
            from akidb_embed.bench.loadgen import sup_cpu
            from akidb_embed.client import Client
            sampler = RssSampler(endpoint, backend)
            with Client(endpoint) as client:
                cpu0 = sup_cpu(client.status())
                sampler.refresh(client)
                sampler.sample()
            sampler.start()
            try:
                bridge = run_remote("bridge", args, short, medium, endpoint=endpoint, backend=backend)
            finally:
                sampler.stop()
            with Client(endpoint) as client:
                cpu1 = sup_cpu(client.status())
            phases = [bridge["short_seq"]] + [bridge[f"c{c}"] for c in args.concurrency]
            n = sum(ph["requests"] for ph in phases)
            bridge.update(supervisor_cpu_s_run=round(cpu1 - cpu0, 3), requests_run=n,
                          supervisor_cpu_us_per_request_run=round((cpu1 - cpu0) / max(1, n) * 1e6, 1),
                          supervisor_peak_rss_mb=sampler.supervisor_mb, worker_peak_rss_mb=sampler.workers,
                          rss_samples=sampler.samples)
            result["bridge"] = bridge
        if args.http:   # while the server still runs: `--http self` measures our front in the same run
            result["http"] = run_remote("http", args, short, medium)
    except RuntimeError as exc:
        print(f"akidb-embed bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if front is not None:
            front.stop()
        if server is not None:
            server.stop()
    if args.mixed:
        return _finish_mixed(args, result, json_out)
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
    result["targets"] = check_targets(result, baseline) + http_vs_bridge(result, args.concurrency)
    report = format_report(result)
    print(report)
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"results written to {json_out}", file=sys.stderr)
    if args.plot:
        plot(result, args.plot)
    return 0


def _finish_mixed(args: argparse.Namespace, result: dict[str, Any], json_out: Path) -> int:
    from akidb_embed.bench.mixed import format_mixed, mixed_targets, plot_mixed
    from akidb_embed.bench.report import format_targets

    result["meta"]["loadavg_end"] = _loadavg()
    result["meta"]["mixed"] = {"bulk_texts": args.bulk_texts, "bulk_inflight": args.bulk_inflight}
    report = format_report(result).splitlines() + format_mixed(result["mixed"])
    result["targets"] = mixed_targets(result["mixed"])
    print("\n".join(report + format_targets(result["targets"])))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"results written to {json_out}", file=sys.stderr)
    if args.plot:
        plot_mixed(result, args.plot)
    return 0 if result["mixed"] else 1
