"""``akidb-embed http`` and ``akidb-embed grpc``: run one front against a running supervisor."""
from __future__ import annotations

import argparse
import sys
from typing import Any



def add_front_parsers(sub: Any) -> None:
    for name, text, default in (("http", "serve REST /api/v1/embed and OpenAI /v1/embeddings", "127.0.0.1:8080"),
                                ("grpc", "serve the gRPC Embedder and grpc.health.v1 services", "127.0.0.1:50051")):
        p = sub.add_parser(name, help=f"{text} in front of a running supervisor")
        p.add_argument("--endpoint", help="supervisor endpoint (default: $AKIDB_EMBED_ENDPOINT, else the default "
                       "ipc path)")
        p.add_argument("--listen", default=default, metavar="HOST:PORT", help=f"address to listen on ({default})")
        p.add_argument("--api-keys-file", metavar="FILE", help="require one of these keys (one per line) as "
                       "'Authorization: Bearer KEY'")
        p.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)   # set by the supervisor that spawns us
        p.set_defaults(func=run_front, front=name)


def run_front(args: argparse.Namespace) -> int:
    from akidb_embed.client import resolve_endpoint
    from akidb_embed.fronts.common import ApiKeys, local_endpoint, parse_listen
    from akidb_embed.logs import setup_logging

    setup_logging()
    try:
        host, port = parse_listen(args.listen)
        keys = ApiKeys.load(args.api_keys_file)
    except (ValueError, OSError) as exc:
        print(f"akidb-embed {args.front}: {exc}", file=sys.stderr)
        return 2
    endpoint = local_endpoint(resolve_endpoint(args.endpoint))
    if args.front == "http":
        from akidb_embed.fronts.http import serve
    else:
        from akidb_embed.fronts.rpc import serve  # type: ignore[assignment]
    return serve(endpoint, host, port, keys, args.lifeline_fd)
