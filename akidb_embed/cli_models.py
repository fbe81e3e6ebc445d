"""``akidb-embed models ...``: list, pull, export, remove and prune models in the local cache.

Wire into the main CLI with ``add_models_parser(subparsers)``; the handler is ``run_models(args)``.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from akidb_embed import models


def add_models_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``models`` (with list / pull / export / rm) on an argparse subparsers object."""
    parser = subparsers.add_parser("models", help="list, download, export and remove models",
                                   description=__doc__)
    parser.add_argument("--cache-dir", default=None,
                        help="model cache (default: $AKIDB_CACHE_DIR or ~/.cache/akidb/models)")
    sub = parser.add_subparsers(dest="models_command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("list", help="models shipped in packages and in the cache")
    pull = sub.add_parser("pull", help="download a model into the cache (no-op if already present)")
    pull.add_argument("name", help="hub id (org/name), short name, or local directory")
    export = sub.add_parser("export", help="export a model to another format (runs torch in a subprocess)")
    export.add_argument("name")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--quantize", choices=["int8"], default=None)
    rm = sub.add_parser("rm", help="delete a model's cache entry (downloads and exports)")
    rm.add_argument("name")
    prune = sub.add_parser("prune", help="delete least recently used cache entries until the cache fits a size "
                                         "(entries in use by a running worker or being written are kept)")
    prune.add_argument("--max-gb", type=float, required=True, help="size to fit in, in GB (0: remove every idle entry)")
    parser.set_defaults(handler=run_models)
    return parser


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # unreachable


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _last_use(when: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when)) if when else "-"


def _list(cache_dir: str | None) -> int:
    entries = models.list_models(cache_dir=cache_dir)
    root = models.cache_root(cache_dir)
    usage = {e.path.resolve(): e for e in models.entries(cache_dir=cache_dir)}
    if entries:
        rows = [("NAME", "SIZE", "LAST USE", "IN USE", "FORMATS", "PATH")]
        for e in entries:
            use = usage.get(e.path.resolve()) or usage.get((root / models.entry_dirname(e.name)).resolve())
            rows.append((e.name, human_size(e.size_bytes), _last_use(use.last_used if use else None),
                         "yes" if use and use.in_use else "no", ",".join(e.formats) or "-", str(e.path)))
        print(_table(rows))
    else:
        print(f"no models (cache: {root})")
    print("\nshort names:")
    print(_table([("ALIAS", "MODEL")] + sorted(models.NAME_ALIASES.items())))
    total = sum(e.size_bytes for e in usage.values())
    print(f"\ncache: {root} ({human_size(total)})")
    return 0


def _prune(max_gb: float, cache_dir: str | None) -> int:
    removed = models.prune(int(max_gb * 1e9), cache_dir=cache_dir)
    for path in removed:
        print(f"removed {path}")
    left = sum(e.size_bytes for e in models.entries(cache_dir=cache_dir))
    print(f"cache: {models.cache_root(cache_dir)} ({human_size(left)})")
    return 0 if left <= max_gb * 1e9 else 1


def _rm(name: str, cache_dir: str | None) -> int:
    removed = models.remove(name, cache_dir=cache_dir)
    for path in removed:
        print(f"removed {path}")
    packaged = models.packaged_model_dir(name)
    if packaged is not None:
        module = models.PACKAGED_MODELS[models.canonical_name(name)]
        print(f"{name} is shipped by the installed package {module.replace('_', '-')} ({packaged}); "
              f"pip uninstall it to remove those files")
    elif not removed:
        print(f"{name}: not in the cache ({models.cache_root(cache_dir)})", file=sys.stderr)
        return 1
    return 0


def run_models(args: argparse.Namespace) -> int:
    """Run one ``models`` subcommand; returns the process exit code."""
    cache_dir = getattr(args, "cache_dir", None)
    try:
        if args.models_command == "list":
            return _list(cache_dir)
        if args.models_command == "rm":
            return _rm(args.name, cache_dir)
        if args.models_command == "prune":
            return _prune(args.max_gb, cache_dir)
        path = models.pull(args.name, cache_dir=cache_dir)
        if args.models_command == "pull":
            print(f"{args.name}: {path}")
            return 0
        out = models.onnx_path(path, quantize=args.quantize, cache_dir=cache_dir)
        print(f"{args.name} ({args.format}{', ' + args.quantize if args.quantize else ''}): {out}")
        return 0
    except models.ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry (``python -m akidb_embed.cli_models list``) until the main CLI wires it in."""
    parser = argparse.ArgumentParser(prog="akidb-embed")
    add_models_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_models(args)


if __name__ == "__main__":
    sys.exit(main())
