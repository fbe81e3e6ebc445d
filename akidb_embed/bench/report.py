"""The bench's report: ratios to in-process, the issue's targets, the text table and the latency plot."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from akidb_embed.bench.phases import STATUS_SAMPLE_S


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


def http_vs_bridge(result: dict[str, Any], concurrency: Sequence[int]) -> list[dict[str, Any]]:
    """HTTP front vs ZeroMQ at the highest client count, when both ran: the front should add little."""
    br, ht = result.get("bridge"), result.get("http")
    if not br or not ht or not concurrency:
        return []
    c = max(concurrency)
    value = _ratio(ht[f"c{c}"]["texts_per_s"], br[f"c{c}"]["texts_per_s"])
    result.setdefault("ratios", {})["http_vs_bridge"] = {
        f"c{n}_throughput": _ratio(ht[f"c{n}"]["texts_per_s"], br[f"c{n}"]["texts_per_s"]) for n in concurrency}
    return [{"target": f"http c{c} throughput >= 0.9 x bridge c{c}", "value": value, "bound": 0.9, "unit": "x",
             "met": value >= 0.9 if value is not None else None}]


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


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
    for row in (header, *rows) if rows else ():
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
    hb = result.get("ratios", {}).get("http_vs_bridge")
    if hb:
        lines.append("http/bridge throughput: " + ", ".join(f"{k.split('_')[0]} {_fmt(v, 3)}x" for k, v in hb.items()))
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
    lines += format_targets(result.get("targets") or [])
    return "\n".join(lines)


def format_targets(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["", "targets:"] if targets else []
    for t in targets:
        mark = {True: "MET ", False: "MISS", None: "n/a "}[t["met"]]
        lines.append(f"  [{mark}] {t['target']}: {_fmt(t['value'], 3)} {t['unit']} (bound {_fmt(t['bound'], 3)})")
    return lines


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
