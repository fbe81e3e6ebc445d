"""Backend registry: kind name -> class, imported lazily so a worker loads only its own runtime."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from akidb_embed.workers.backends.base import Backend, EmbedOutput, ModelInfo

# kind -> "module:Class"; importing the module is what pulls in a runtime.
_REGISTRY: dict[str, str] = {
    "mock": "akidb_embed.workers.backends.mock:MockBackend",
    "onnx": "akidb_embed.workers.backends.onnx:OnnxBackend",
    "sentence-transformers": "akidb_embed.workers.backends.st:SentenceTransformersBackend",
    "mlx": "akidb_embed.workers.backends.mlx:MlxBackend",
}

ALIASES: dict[str, str] = {"python-bridge": "onnx", "torch": "sentence-transformers"}

KINDS: tuple[str, ...] = tuple(_REGISTRY) + tuple(ALIASES)


def canonical_kind(kind: str) -> str:
    """Resolve an alias (``python-bridge`` -> ``onnx``); raises KeyError for unknown kinds."""
    kind = ALIASES.get(kind, kind)
    if kind not in _REGISTRY:
        raise KeyError(kind)
    return kind


def create_backend(kind: str, model: str, options: Mapping[str, Any]) -> Backend:
    module_name, _, class_name = _REGISTRY[canonical_kind(kind)].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(model, options)


__all__ = ["ALIASES", "KINDS", "Backend", "EmbedOutput", "ModelInfo", "canonical_kind", "create_backend"]
