"""The steps around the transformer that every numpy-pooling backend (onnx, mlx) shares, so that they
give sentence-transformers' vectors: tokenizing with untruncated counts and a truncation side
(:class:`TextEncoder`), and pooling -> Dense layers -> Normalize (:class:`Pipeline`).

``numpy``, ``tokenizers`` and ``safetensors`` are imported only inside (never torch).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from akidb_embed.models.sentence import SentenceConfig, load_tokenizer, pool

TRUNCATE_SIDES = ("end", "start")
_PENDING_LIMIT = 4096  # untruncated encodings kept from counts() for the next encode()


class TextEncoder:
    """Tokenizer.json encodings: untruncated token counts, and encodings truncated at either end."""

    def __init__(self, model_dir: Path, max_tokens: int, do_lower_case: bool) -> None:
        self.max_tokens = max_tokens
        self._lower = do_lower_case
        self._raw = load_tokenizer(model_dir, None)
        self._cut = {"end": load_tokenizer(model_dir, max_tokens, "right"),
                     "start": load_tokenizer(model_dir, max_tokens, "left")}
        self._pending: dict[str, Any] = {}

    @property
    def tokenizer(self) -> Any:
        return self._cut["end"]

    def _prepare(self, texts: Sequence[str]) -> list[str]:
        return [t.lower() for t in texts] if self._lower else list(texts)

    def counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text with special tokens, before truncation; keeps the encodings for encode()."""
        if len(self._pending) > _PENDING_LIMIT:
            self._pending.clear()
        encodings = self._raw.encode_batch(self._prepare(texts))
        self._pending.update(zip(texts, encodings))
        return [len(e.ids) for e in encodings]

    def encode(self, texts: Sequence[str], truncate: str = "end") -> list[Any]:
        """Encodings cut at ``max_tokens`` from ``truncate`` ("end" or "start"); ``overflowing`` marks a cut."""
        found = [self._pending.pop(t, None) for t in texts]
        redo = [i for i, e in enumerate(found) if e is None or len(e.ids) > self.max_tokens]
        if redo:
            fresh = self._cut[truncate].encode_batch(self._prepare([texts[i] for i in redo]))
            for i, enc in zip(redo, fresh):
                found[i] = enc
        return found


class Pipeline:
    """Pooling, then the Dense layers (numpy, weights from their module folders), then Normalize.

    ``dense`` replaces the folder's Dense weights with a callable (the mlx backend passes the model's
    own, possibly quantized, Dense layers when a converted folder has no Dense module weights).
    """

    def __init__(self, model_dir: Path, config: SentenceConfig,
                 dense: Callable[[Any], Any] | None = None) -> None:
        self.config = config
        self._dense_fn = dense
        self._layers = [] if dense is not None else [_load_dense(model_dir, spec) for spec in config.dense]

    def __call__(self, hidden: Any, mask: Any) -> Any:
        import numpy as np

        out = pool(hidden, mask, self.config.pooling, False)
        if self._dense_fn is not None and self.config.dense:
            out = np.asarray(self._dense_fn(out), dtype=np.float32)
        for weight, bias, act in self._layers:
            out = out @ weight.T
            if bias is not None:
                out = out + bias
            out = act(out)
        if self.config.normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(out, dtype=np.float32)


def dense_weights_present(model_dir: Path, config: SentenceConfig) -> bool:
    """Every Dense module has its own weights file (path "" means the model's own Dense layers)."""
    return all(spec.path and _weights_file(model_dir / spec.path) is not None for spec in config.dense)


def _weights_file(folder: Path) -> Path | None:
    path = folder / "model.safetensors"
    return path if path.is_file() else None


def _activation(name: str) -> Callable[[Any], Any]:
    import numpy as np

    if name == "Tanh":
        return np.tanh
    if name == "ReLU":
        return lambda x: np.maximum(x, 0)
    if name == "Sigmoid":
        return lambda x: 1 / (1 + np.exp(-x))
    return lambda x: x


def _load_dense(model_dir: Path, spec: Any) -> tuple[Any, Any, Callable[[Any], Any]]:
    import numpy as np
    from safetensors.numpy import load_file

    if not spec.path:
        raise ValueError(f"{model_dir} has no modules.json: its Dense layers are inside the model's weights, "
                         "which only the mlx backend reads; serve the sentence-transformers folder instead")
    path = _weights_file(model_dir / spec.path)
    if path is None:
        raise FileNotFoundError(f"Dense module {model_dir / spec.path} has no model.safetensors "
                                "(pytorch_model.bin Dense weights are not read without torch)")
    tensors = load_file(str(path))
    weight = np.asarray(tensors["linear.weight"], dtype=np.float32)
    if weight.shape != (spec.out_features, spec.in_features):
        raise ValueError(f"Dense {path}: weight shape {weight.shape}, config says "
                         f"({spec.out_features}, {spec.in_features})")
    bias = np.asarray(tensors["linear.bias"], dtype=np.float32) if spec.bias else None
    return weight, bias, _activation(spec.activation)
