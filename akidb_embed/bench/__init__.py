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
(``python -m akidb_embed.bench.loadgen``) that imports no model runtime: the measuring process never
holds an idle ONNX thread pool or the in-process phase's garbage, and the client-side CPU it costs
(it shares the machine's cores with the worker, as a real client would) is the same for every target.
That process also takes the supervisor's ``status`` right before and after each measured window, so
the supervisor's CPU per request is ``delta(cpu_s) / requests`` over exactly that window. A sampler
thread in the bench process samples the peak RSS of the supervisor and of each worker with psutil every 0.5 s.

The corpus is deterministic: short (5-20 tokens) and medium (35-100 tokens) English texts drawn
from the word list in :mod:`.workload` with a fixed seed.

Modules: :mod:`.workload` (the corpus and latency statistics), :mod:`.phases` (in-process phase,
self-started supervisor, RSS sampler, driving the load generator), :mod:`.loadgen` (the load
generator process), :mod:`.report` (ratios, targets, table, plot), :mod:`.command` (the parser and
:func:`run_bench`). Importing this package must stay cheap (no numpy, no model runtime): the CLI
imports it to register the subcommand.
"""
from akidb_embed.bench.command import add_bench_parser, run_bench
from akidb_embed.bench.workload import corpus, percentile, summarize

__all__ = ["add_bench_parser", "corpus", "percentile", "run_bench", "summarize"]
