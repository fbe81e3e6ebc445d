"""Backend registry: kinds come from akidb_embed.kinds; each class is imported lazily so a worker loads
only its own runtime."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from akidb_embed.kinds import ALIASES, KIND_NAMES, kind_of
from akidb_embed.workers.backends.base import Backend, EmbedOutput, ModelInfo

KINDS: tuple[str, ...] = KIND_NAMES


def canonical_kind(kind: str) -> str:
    """Resolve an alias (``python-bridge`` -> ``onnx``); raises KeyError for unknown kinds."""
    return kind_of(kind).name


def create_backend(kind: str, model: str, options: Mapping[str, Any]) -> Backend:
    module_name, _, class_name = kind_of(kind).target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(model, options)  # type: ignore[no-any-return]


__all__ = ["ALIASES", "KINDS", "Backend", "EmbedOutput", "ModelInfo", "canonical_kind", "create_backend"]
