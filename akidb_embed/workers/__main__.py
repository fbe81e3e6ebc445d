"""``python -m akidb_embed.workers --backend NAME ...``: one worker process (started by the supervisor)."""
from __future__ import annotations

import argparse
import json
import signal
import sys

from akidb_embed.logs import setup_logging
from akidb_embed.workers.channel_id import read_identity
from akidb_embed.workers.lifeline import die_with_parent
from akidb_embed.workers.loop import Worker, WorkerSettings


def parse_args(argv: list[str]) -> tuple[WorkerSettings, int | None]:
    p = argparse.ArgumentParser(prog="akidb_embed.workers", description=__doc__)
    p.add_argument("--backend", required=True, help="configured backend name (shown in ps)")
    p.add_argument("--kind", required=True)
    p.add_argument("--model", default="")
    p.add_argument("--wid", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--options", default="{}", help="backend options as JSON")
    p.add_argument("--heartbeat", type=float, default=WorkerSettings.heartbeat_s)
    p.add_argument("--max-batch-size", type=int, default=WorkerSettings.max_batch_size)
    p.add_argument("--max-batch-tokens", type=int, default=WorkerSettings.max_batch_tokens)
    p.add_argument("--lifeline-fd", type=int, default=None)
    a = p.parse_args(argv)
    settings = WorkerSettings(backend=a.backend, kind=a.kind, model=a.model, wid=a.wid, endpoint=a.endpoint,
                              options=json.loads(a.options), heartbeat_s=a.heartbeat,
                              max_batch_size=a.max_batch_size, max_batch_tokens=a.max_batch_tokens)
    return settings, a.lifeline_fd


def main(argv: list[str] | None = None) -> int:
    settings, lifeline_fd = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if lifeline_fd is not None:
        settings.identity = read_identity(lifeline_fd)  # issue 11 hook: the channel secret, never in argv/env
        die_with_parent(lifeline_fd)
    return Worker(settings).run()


if __name__ == "__main__":
    sys.exit(main())
