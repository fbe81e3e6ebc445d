"""Who uses which cache entry, when it was last used, and least-recently-used pruning under a size limit.

A process serving a model *holds* its cache entry: a shared ``flock`` on ``.<entry>.use`` in the cache
root for as long as the model is loaded (the kernel drops it when the process dies, so a crashed worker
never pins an entry). Holding also touches that file: its mtime is the entry's last use.

:func:`prune` removes the least recently used entries until the cache fits a byte budget; it skips an
entry when it cannot take, without waiting, the exclusive lock on ``.<entry>.use`` (in use), on
``.<entry>.lock`` (being downloaded or removed) or on any ``onnx/.*.lock`` / ``mlx/.*.lock`` (an
export or conversion being written).
Other processes therefore agree with it through the same lock files as :mod:`akidb_embed.models.cache`.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

from akidb_embed.models.cache import _dir_size, _export_entry, cache_root, read_marker

log = logging.getLogger(__name__)


class Held:
    """A shared hold on one cache entry; ``close()`` (or process exit) releases it."""

    def __init__(self, fh: IO[str] | None) -> None:
        self._fh = fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()   # closing the file drops the flock
            self._fh = None

    def __del__(self) -> None:  # a backend dropped without close() (in-process use) releases it too
        self.close()


class CacheEntry(NamedTuple):
    path: Path
    size_bytes: int
    last_used: float           # Unix time
    in_use: bool


def _use_file(entry: Path) -> Path:
    return entry.parent / f".{entry.name}.use"


def entry_of(model_dir: Path, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache entry that holds ``model_dir``'s files or exports."""
    return _export_entry(Path(model_dir).resolve(), cache_root(cache_dir))


def hold(model_dir: Path, *, cache_dir: str | os.PathLike[str] | None = None) -> Held:
    """Mark ``model_dir``'s cache entry used now and in use until the returned object is closed."""
    entry = entry_of(model_dir, cache_dir)
    use = _use_file(entry)
    try:
        use.parent.mkdir(parents=True, exist_ok=True)
        fh = open(use, "a+")  # noqa: SIM115 - held open: the flock lasts as long as the model is loaded
        fcntl.flock(fh, fcntl.LOCK_SH)
        os.utime(use)
    except OSError as exc:  # a read-only cache still serves; it just cannot be pruned safely by us
        log.warning("cannot mark %s in use: %s", entry, exc)
        return Held(None)
    return Held(fh)


@contextlib.contextmanager
def _try_exclusive(path: Path) -> Iterator[bool]:
    """Yield True while holding an exclusive flock on ``path`` (taken without waiting), else False."""
    try:
        fh = open(path, "a+")  # noqa: SIM115 - closed by the with below
    except OSError:
        yield False
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _last_used(entry: Path) -> float:
    use = _use_file(entry)
    if use.exists():
        return use.stat().st_mtime
    marker = read_marker(entry)
    if marker is not None and isinstance(marker.get("created"), (int, float)):
        return float(marker["created"])
    return entry.stat().st_mtime


def _in_use(entry: Path) -> bool:
    with _try_exclusive(_use_file(entry)) as free:
        return not free


def entries(*, cache_dir: str | os.PathLike[str] | None = None) -> list[CacheEntry]:
    """Every cache entry (complete or not, exports-only included), least recently used first."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    found = [CacheEntry(p, _dir_size(p), _last_used(p), _in_use(p))
             for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda e: e.last_used)


def prune(max_bytes: int, *, cache_dir: str | os.PathLike[str] | None = None,
          keep: tuple[Path, ...] = ()) -> list[Path]:
    """Remove least recently used entries until the cache holds at most ``max_bytes``; returns them.

    Entries in use, being written, or in ``keep`` are never removed (the cache may stay over budget).
    """
    listed = entries(cache_dir=cache_dir)
    total = sum(e.size_bytes for e in listed)
    kept = {Path(k).resolve() for k in keep}
    removed: list[Path] = []
    for entry in listed:
        if total <= max_bytes:
            break
        if entry.in_use or entry.path.resolve() in kept:
            continue
        if _remove_if_idle(entry.path):
            total -= entry.size_bytes
            removed.append(entry.path)
    if total > max_bytes:
        log.warning("model cache %s holds %.2f GB, over its %.2f GB limit: the rest is in use",
                    cache_root(cache_dir), total / 1e9, max_bytes / 1e9)
    return removed


def _remove_if_idle(entry: Path) -> bool:
    with contextlib.ExitStack() as stack:
        locks = [_use_file(entry), entry.parent / f".{entry.name}.lock", *sorted(entry.glob("*/.*.lock"))]
        for lock in locks:
            if not stack.enter_context(_try_exclusive(lock)):
                return False
        log.info("model cache: removing %s (least recently used)", entry)
        trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(entry, trash)   # atomic: readers see the entry or nothing
    shutil.rmtree(trash, ignore_errors=True)
    return True


def enforce_limit(max_gb: float | None, *, cache_dir: str | os.PathLike[str] | None = None,
                  keep: tuple[Path, ...] = ()) -> list[Path]:
    """:func:`prune` to ``max_gb`` (None or <= 0: no limit)."""
    if not max_gb or max_gb <= 0:
        return []
    return prune(int(max_gb * 1e9), cache_dir=cache_dir, keep=keep)
