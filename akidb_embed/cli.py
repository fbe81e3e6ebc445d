"""The ``akidb-embed`` command: serve, embed, info, health, status, restart/stop/start, models, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from akidb_embed.protocol.errors import EmbedError

log = logging.getLogger("akidb_embed.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    from akidb_embed.logs import setup_logging
    from akidb_embed.supervisor import ConfigError, Supervisor, load_config

    setup_logging()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"akidb-embed: config error: {exc}", file=sys.stderr)
        return 2
    from dataclasses import replace
    if args.endpoint:
        config = replace(config, endpoint=args.endpoint)
    try:
        config = _with_fronts(config, args)
    except ConfigError as exc:
        print(f"akidb-embed: {exc}", file=sys.stderr)
        return 2
    try:
        return Supervisor(config).run()
    except ConfigError as exc:  # e.g. the endpoint is already served by another supervisor
        print(f"akidb-embed: {exc}", file=sys.stderr)
        return 2


def _with_fronts(config: Any, args: argparse.Namespace) -> Any:
    """``serve --http HOST:PORT`` / ``--grpc HOST:PORT``: override [http] / [grpc] listen."""
    from dataclasses import replace

    from akidb_embed.supervisor.config import front_config
    for kind in ("http", "grpc"):
        listen = getattr(args, kind)
        if listen:
            old = getattr(config, kind)
            table = {"listen": listen, "api_keys_file": old.api_keys_file if old else None}
            config = replace(config, **{kind: front_config(f"--{kind}", kind, {k: v for k, v in table.items() if v})})
    return config


def _client(args: argparse.Namespace) -> Any:
    from akidb_embed.client import Client
    try:  # issue 11: CURVE keys (else $AKIDB_EMBED_SERVER_KEY / $AKIDB_EMBED_CLIENT_KEY)
        return Client(args.endpoint, server_key=args.server_key, client_key=args.client_key)
    except ValueError as exc:
        raise SystemExit(f"akidb-embed: {exc}") from exc


def cmd_keys(args: argparse.Namespace) -> int:
    """issue 11: `akidb-embed keys generate NAME` -> NAME.key (public) and NAME.key_secret (0600)."""
    from akidb_embed.keys import generate
    try:
        public, secret = generate(args.dir, args.name)
    except FileExistsError as exc:
        print(f"akidb-embed: {exc}", file=sys.stderr)
        return 2
    print(f"public key: {public}  (give it to the other side: a server's curve_clients/curve_admins directory, "
          f"or a client's --server-key)\nsecret key: {secret}  (mode 0600; keep it: curve_secret_key or "
          "--client-key)")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.embed_result(args.texts, backend=args.backend, normalize=not args.no_normalize,
                                     timeout=args.timeout, priority=args.priority, prompt_name=args.prompt_name,
                                     prompt=args.prompt, dimensions=args.dimensions, truncate=args.truncate)
    vectors = result.vectors
    if args.json:
        print(json.dumps({"backend": result.backend, "model": result.model, "truncated": result.truncated,
                          "tokens": result.tokens, "truncated_rows": result.truncated_rows,
                          "embeddings": vectors.tolist()}))
        return 0
    for text, vec in zip(args.texts, vectors):
        head = ", ".join(f"{x:+.4f}" for x in vec[:6])
        print(f"{text[:40]!r:44} dim={vec.shape[0]} [{head}, ...]")
    print(f"backend={result.backend} model={result.model} truncated={result.truncated}")
    return 0


def _print_json(obj: Any) -> None:
    obj = {k: v for k, v in obj.items() if k not in ("v", "id", "ok")}
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.info()
    if args.json:
        _print_json(info)
        return 0
    print(f"akidb-embed {info['version']} (protocol v{info['protocol']}), default backend: {info['default_backend']}")
    rows = [(name, b["kind"], b["state"], str(b["dim"]), str(b["max_tokens"]), b["model"])
            for name, b in info["backends"].items()]
    _table(("BACKEND", "KIND", "STATE", "DIM", "MAX_TOKENS", "MODEL"), rows)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        health = client.health()
    print(health["status"], " ".join(f"{k}={v}" for k, v in health["backends"].items()))
    return 0 if health["status"] == "ok" else 1


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        _print_json(status)
        return 0
    sup = status["supervisor"]
    print(f"supervisor pid={sup['pid']} uptime={sup['uptime_s']:.0f}s rss={sup['rss_mb']}MB cpu={sup['cpu_s']}s "
          f"pending={sup['pending']} quarantined={sup['quarantined']} endpoint={sup['endpoint']}")
    rows = []
    for name, b in status["backends"].items():
        rows.append((name, b["state"], ",".join(str(p) for p in b["pids"]) or "-", f"{b['uptime_s']:.0f}s",
                     str(b["restarts"]), str(b["queue"]), str(b["in_flight"]), str(b["served"]),
                     f"{b['rss_mb']}MB", b["last_exit"] or "-"))
    _table(("BACKEND", "STATE", "PIDS", "UPTIME", "RESTARTS", "QUEUE", "IN_FLIGHT", "SERVED", "RSS", "LAST_EXIT"),
           rows)
    for front in status.get("fronts") or []:
        print(f"front {front['kind']} listen={front['listen']} pid={front['pid'] or '-'} restarts={front['restarts']}")
    return 0


def _control(op: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        with _client(args) as client:
            result = getattr(client, op)(args.backend)
        print(f"{op} {result['backend']}: {result['state']}")
        return 0
    return run


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="akidb-embed", description="Text embeddings through a supervised bridge.")
    sub = parser.add_subparsers(dest="command", required=True)
    client_opts = argparse.ArgumentParser(add_help=False)
    client_opts.add_argument("--endpoint", help="server endpoint (default: $AKIDB_EMBED_ENDPOINT, else the "
                             "default ipc path)")
    client_opts.add_argument("--server-key", help="CURVE: the server's public key file (.key) or Z85 text "
                             "(default: $AKIDB_EMBED_SERVER_KEY)")
    client_opts.add_argument("--client-key", help="CURVE: this client's key pair (.key_secret file; default: "
                             "$AKIDB_EMBED_CLIENT_KEY)")

    p = sub.add_parser("serve", help="run the supervisor in the foreground")
    p.add_argument("--config", help="config.toml (default: embedded default: all-MiniLM-L6-v2 on onnx)")
    p.add_argument("--endpoint", help="override [server] endpoint")
    p.add_argument("--http", metavar="HOST:PORT", help="also run the HTTP front here (overrides [http] listen)")
    p.add_argument("--grpc", metavar="HOST:PORT", help="also run the gRPC front here (overrides [grpc] listen)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("embed", parents=[client_opts], help="embed texts and print the vectors")
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--backend")
    p.add_argument("--timeout", type=float, help="deadline in seconds")
    p.add_argument("--priority", choices=["high", "normal", "low"], help="default: the backend's default_priority")
    p.add_argument("--no-normalize", action="store_true")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt-name", help="a prompt the model defines, e.g. query or document")
    prompts.add_argument("--prompt", help="a literal prefix for every text")
    p.add_argument("--dimensions", type=int, help="keep the first N dims (Matryoshka models)")
    p.add_argument("--truncate", choices=["end", "start", "none"],
                   help="cut too-long texts at the end (default) or start, or refuse them (none)")
    p.add_argument("--json", action="store_true", help="print full vectors as JSON")
    p.set_defaults(func=cmd_embed)

    for name, func, text in (("info", cmd_info, "backends, models and dimensions"),
                             ("status", cmd_status, "per-backend state, pids, restarts, queue, RSS")):
        p = sub.add_parser(name, parents=[client_opts], help=text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    p = sub.add_parser("health", parents=[client_opts], help="ok / degraded / unavailable (exit 0 only when ok)")
    p.set_defaults(func=cmd_health)
    for op, text in (("restart", "rolling restart of one backend"), ("stop", "stop one backend"),
                     ("start", "start a stopped or failed backend")):
        p = sub.add_parser(op, parents=[client_opts], help=text)
        p.add_argument("backend")
        p.set_defaults(func=_control(op))
    p = sub.add_parser("keys", help="CURVE key pairs for tcp (see README, Security)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    g = keys_sub.add_parser("generate", help="write NAME.key and NAME.key_secret")
    g.add_argument("name")
    g.add_argument("--dir", default=".", help="where to write them (default: the current directory)")
    g.set_defaults(func=cmd_keys)
    _add_optional(sub)
    return parser


def _add_optional(sub: Any) -> None:
    """Subcommands living in their own modules (imported here so --help lists them)."""
    try:
        from akidb_embed.cli_models import add_models_parser, run_models
        add_models_parser(sub).set_defaults(func=run_models)
    except ImportError:
        pass
    try:
        from akidb_embed.fronts.cli import add_front_parsers
        add_front_parsers(sub)
    except ImportError:
        pass
    try:
        from akidb_embed.bench import add_bench_parser, run_bench
        add_bench_parser(sub).set_defaults(func=run_bench)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EmbedError as exc:
        print(f"akidb-embed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
