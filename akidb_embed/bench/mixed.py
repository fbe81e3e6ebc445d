"""``akidb-embed bench --mixed``: searches while a bulk ingest runs (a vector database's day).

One load-generator process (``python -m akidb_embed.bench.loadgen``, spec ``target = "mixed"``) runs
two clients on two sockets, so the supervisor sees two peers:

* **bulk**: one :class:`AsyncClient` keeping ``--bulk-inflight`` requests of ``--bulk-texts`` medium
  texts in flight, back to back (an ingest that saturates the backend);
* **query**: one :class:`AsyncClient` sending one short text at a time, back to back (a person
  searching).

Four windows of ``--duration`` seconds each: bulk alone, queries alone (idle), both with no
``priority`` field (fair share alone must protect the queries), and both with the queries sent as
``priority = "high"`` and the ingest as ``"low"``. Query latencies and bulk texts/s are reported per
window, with the targets of issue 10 printed MET/MISS.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

# window name -> (run bulk?, run queries?, bulk priority, query priority)
WINDOWS: dict[str, tuple[bool, bool, str | None, str | None]] = {
    "bulk_alone": (True, False, None, None),
    "query_idle": (False, True, None, None),
    "mixed": (True, True, None, None),
    "mixed_priority": (True, True, "low", "high"),
}


async def _bulk(client: Any, spec: dict[str, Any], priority: str | None, stop_at: float,
                tally: dict[str, Any]) -> None:
    texts, n = spec["bulk_corpus"], spec["bulk_texts"]

    async def lane(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            batch = [texts[(i * n + j) % len(texts)] for j in range(n)]
            i += spec["bulk_inflight"]
            try:
                await client.embed(batch, backend=spec["backend"], priority=priority)
                if time.perf_counter() <= stop_at:
                    tally["texts"] += n
            except Exception as exc:
                tally["errors"] += 1
                tally["samples"].append(f"{type(exc).__name__}: {exc}"[:200])
    await asyncio.gather(*(lane(k) for k in range(spec["bulk_inflight"])))


async def _queries(client: Any, spec: dict[str, Any], priority: str | None, stop_at: float,
                   tally: dict[str, Any]) -> None:
    texts = spec["query_corpus"]
    i = 0
    while time.perf_counter() < stop_at and i < spec["requests"]:
        t0 = time.perf_counter()
        try:
            await client.embed([texts[i % len(texts)]], backend=spec["backend"], priority=priority)
            tally["latencies_s"].append(time.perf_counter() - t0)
        except Exception as exc:
            tally["errors"] += 1
            tally["samples"].append(f"{type(exc).__name__}: {exc}"[:200])
        i += 1


async def run_mixed_loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """The load generator's side: every window in order, on two sockets."""
    from akidb_embed.client import AsyncClient

    out: dict[str, Any] = {}
    async with AsyncClient(spec["endpoint"]) as bulk, AsyncClient(spec["endpoint"]) as query:
        for i in range(spec["warmup"]):
            await query.embed([spec["query_corpus"][-1 - i]], backend=spec["backend"])
            await bulk.embed(spec["bulk_corpus"][:8], backend=spec["backend"])
        # the warm-up's queries keep bulk passes short for a while (interactive_window_s): let that pass,
        # so "bulk alone" measures the ingest's own speed
        await asyncio.sleep(spec["quiet_s"])
        for name, (run_bulk, run_query, bulk_prio, query_prio) in WINDOWS.items():
            btally: dict[str, Any] = {"texts": 0, "errors": 0, "samples": []}
            qtally: dict[str, Any] = {"latencies_s": [], "errors": 0, "samples": []}
            start = time.perf_counter()
            stop_at = start + spec["duration"]
            tasks = []
            if run_bulk:
                tasks.append(_bulk(bulk, spec, bulk_prio, stop_at, btally))
            if run_query:
                # let the ingest fill the queue first: queries measure the steady state under load
                tasks.append(_delayed(_queries(query, spec, query_prio, stop_at, qtally),
                                      spec["settle_s"] if run_bulk else 0.0))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
            out[name] = {"bulk": {**btally, "elapsed_s": elapsed} if run_bulk else None,
                         "query": qtally if run_query else None,
                         "bulk_priority": bulk_prio, "query_priority": query_prio}
    return out


async def _delayed(coro: Any, seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)
    await coro


# ---------------------------------------------------------------- the bench process's side

def run_mixed(args: Any, endpoint: str, backend: str) -> dict[str, Any]:
    """Drive the load generator through the four windows; summarize each."""
    import sys

    from akidb_embed.bench.phases import run_loadgen
    from akidb_embed.bench.workload import corpus, summarize

    spec = {"target": "mixed", "endpoint": endpoint, "backend": backend, "duration": args.duration,
            "requests": args.requests, "warmup": min(args.warmup, 20), "bulk_texts": args.bulk_texts,
            "bulk_inflight": args.bulk_inflight, "settle_s": min(1.0, args.duration / 4), "quiet_s": 3.0,
            "bulk_corpus": corpus("medium"), "query_corpus": corpus("short")}
    print(f"mixed: 4 windows of {args.duration:g} s (bulk {args.bulk_inflight} x {args.bulk_texts} medium texts "
          "in flight; one short query at a time) ...", file=sys.stderr, flush=True)
    raw = run_loadgen(spec, timeout=4 * args.duration + 300)
    out: dict[str, Any] = {}
    for name, window in raw.items():
        entry: dict[str, Any] = {"bulk_priority": window["bulk_priority"], "query_priority": window["query_priority"]}
        q = window.get("query")
        if q is not None:
            entry["query"] = summarize(q["latencies_s"], q["errors"], 0.0, clients=1, note="one short text",
                                       extra={"error_samples": q["samples"][:5]})
        b = window.get("bulk")
        if b is not None:
            entry["bulk"] = {"texts": b["texts"], "errors": b["errors"], "elapsed_s": round(b["elapsed_s"], 3),
                             "texts_per_s": round(b["texts"] / b["elapsed_s"], 2) if b["elapsed_s"] > 0 else None,
                             "error_samples": b["samples"][:5]}
        out[name] = entry
    return out


def mixed_targets(mixed: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 10's targets for the mixed scenario, MET/MISS."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float, ok: bool, unit: str) -> None:
        rows.append({"target": name, "value": value, "bound": bound, "unit": unit,
                     "met": ok if value is not None else None})

    plain, prio = mixed["mixed"]["query"]["p99_ms"], mixed["mixed_priority"]["query"]["p99_ms"]
    add("query p99 under bulk ingest, no priority <= 60 ms", plain, 60.0, plain <= 60.0, "ms")
    add("query p99 under bulk ingest, high vs low <= 40 ms", prio, 40.0, prio <= 40.0, "ms")
    alone = mixed["bulk_alone"]["bulk"]["texts_per_s"] or 0.0
    for window in ("mixed", "mixed_priority"):
        tput = mixed[window]["bulk"]["texts_per_s"] or 0.0
        ratio = round(tput / alone, 3) if alone else None
        add(f"bulk texts/s while queries run ({window}) >= 0.85 x bulk alone", ratio, 0.85,
            ratio is not None and ratio >= 0.85, "x")
    errors = sum((w.get("query") or {}).get("errors", 0) + (w.get("bulk") or {}).get("errors", 0)
                 for w in mixed.values())
    add("no errors in any window", errors, 0, errors == 0, "")
    return rows


def format_mixed(mixed: dict[str, Any]) -> list[str]:
    lines = ["", "mixed: searches during a bulk ingest",
             "  WINDOW          BULK PRIO  QUERY PRIO  QUERIES  Q P50 MS  Q P95 MS  Q P99 MS  BULK TEXTS/S  ERRS"]
    for name, w in mixed.items():
        q, b = w.get("query") or {}, w.get("bulk") or {}
        errs = q.get("errors", 0) + b.get("errors", 0)

        def f(v: Any) -> str:
            return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"  {name:<15} {f(w['bulk_priority']):<10} {f(w['query_priority']):<11} "
                     f"{f(q.get('ok')):<8} {f(q.get('p50_ms')):<9} {f(q.get('p95_ms')):<9} {f(q.get('p99_ms')):<9} "
                     f"{f(b.get('texts_per_s')):<13} {errs}")
    return lines


def plot_mixed(result: dict[str, Any], path: str) -> None:
    """Query latency distributions per window (and bulk throughput in the legend)."""
    import sys
    from pathlib import Path
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("akidb-embed bench: --plot needs matplotlib: pip install 'akidb-embed[plot]'", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, w in result["mixed"].items():
        q = w.get("query")
        if not q or not q["latencies_ms"]:
            continue
        lat = q["latencies_ms"]
        bulk = (w.get("bulk") or {}).get("texts_per_s")
        label = name + (f" (bulk {bulk:.0f} texts/s)" if bulk else "")
        ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("query latency (ms)")
    ax.set_ylabel("fraction of queries <= x")
    ax.set_title("searches during a bulk ingest")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot written to {path}", file=sys.stderr)
