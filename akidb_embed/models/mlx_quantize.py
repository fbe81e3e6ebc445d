"""MLX low-bit conversion of a model folder, made once into the cache (``quantize = "4bit"`` on mlx).

The folder is loaded with mlx-embeddings, every Linear/Embedding whose input width is a multiple of
the group size is quantized with ``mlx.nn.quantize`` (affine, group size 64), and the result is written
as an mlx-embeddings folder: ``model.safetensors`` (Dense module weights folded in, as the
mlx-community conversions do), ``config.json`` with a ``quantization`` block, and every other file
(tokenizer, modules.json, pooling and Dense configs, prompts) copied. ``mlx`` is imported only inside.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from akidb_embed.models.cache import _export_entry, _locked, cache_root

log = logging.getLogger(__name__)

QUANTIZE_BITS = {"4bit": 4, "8bit": 8}
GROUP_SIZE = 64


def quantized_dir(model_dir: Path, quantize: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ``quantize`` ("4bit" | "8bit") conversion of ``model_dir``, made on first use; returns its folder."""
    if quantize not in QUANTIZE_BITS:
        raise ValueError(f"quantize must be one of {sorted(QUANTIZE_BITS)} on mlx, not {quantize!r}")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization"):
        return model_dir                       # already quantized (an mlx-community folder): as is
    out = _export_entry(model_dir.resolve(), cache_root(cache_dir)) / "mlx" / f"model-{quantize}"
    if (out / "config.json").is_file():
        return out
    with _locked(out.parent / f".model-{quantize}.lock"):
        if not (out / "config.json").is_file():   # made by another process while we waited
            _convert(model_dir, out, QUANTIZE_BITS[quantize])
    return out


def _quantizable(group_size: int):  # -> predicate for nn.quantize
    def predicate(path: str, module) -> bool:  # type: ignore[no-untyped-def]
        weight = getattr(module, "weight", None)
        return hasattr(module, "to_quantized") and weight is not None and weight.shape[-1] % group_size == 0
    return predicate


def _convert(model_dir: Path, out: Path, bits: int) -> None:
    import mlx.core as mx
    from mlx import nn
    from mlx.utils import tree_flatten
    from mlx_embeddings.utils import load as mlx_load

    log.info("quantizing %s to %d bits for mlx into %s", model_dir, bits, out)
    model, _ = mlx_load(str(model_dir))
    nn.quantize(model, group_size=GROUP_SIZE, bits=bits, class_predicate=_quantizable(GROUP_SIZE))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _copy_except_weights(model_dir, tmp)
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": bits}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.rename(tmp, out)   # under the lock: nobody else writes it
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_except_weights(src: Path, dst: Path) -> None:
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if rel.parts[0] in ("onnx", "mlx") or rel.name.startswith(".") or path.is_dir():
            continue
        if path.suffix in (".safetensors", ".bin", ".onnx", ".h5", ".msgpack") or rel.name.endswith(".index.json"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)
