"""MLX backend (Apple silicon; also runs, slowly, on Linux CPU with ``mlx[cpu]``).

The model comes from ``mlx_embeddings.utils.load``; tokenization uses the model's tokenizer.json
(truncation at max_seq_length, padding to the longest text) and pooling follows ``modules.json``,
applied in numpy to the model's ``last_hidden_state``, exactly as the onnx backend does.

Options (all optional): ``max_seq_length`` (default from sentence_bert_config.json), ``cache_dir``,
``allow_download`` (True).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from akidb_embed import models
from akidb_embed.protocol.errors import BackendUnavailable
from akidb_embed.workers.backends.base import Backend, EmbedOutput, ModelInfo

log = logging.getLogger(__name__)

INSTALL_HINT = ("mlx is not installed: pip install 'mlx[cpu]' mlx-embeddings on Linux, "
                "or 'mlx mlx-embeddings' on Apple silicon")


class MlxBackend(Backend):
    kind = "mlx"

    def __init__(self, model: str, options: Mapping[str, Any]) -> None:
        super().__init__(model, options)
        self._model: Any = None
        self._tokenizer: Any = None

    def load(self) -> ModelInfo:
        try:
            import mlx.core as mx
            from mlx_embeddings.utils import load as mlx_load
        except ImportError as exc:
            raise BackendUnavailable(f"{INSTALL_HINT} ({exc})") from exc
        self._mx = mx
        try:
            model_dir = models.resolve_model(self.model, cache_dir=self.options.get("cache_dir"),
                                             allow_download=bool(self.options.get("allow_download", True)))
        except models.ModelNotFound as exc:
            raise BackendUnavailable(str(exc)) from exc
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory from here on
        try:
            self._config = models.read_sentence_config(model_dir)
            self.max_tokens = int(self.options.get("max_seq_length") or self._config.max_seq_length)
            self._tokenizer = models.load_tokenizer(model_dir, self.max_tokens)
            self._pad_id = models.pad_id(self._tokenizer, model_dir)
            self._model, _ = mlx_load(str(model_dir))
        except Exception as exc:  # mlx_embeddings raises ValueError/FileNotFoundError/KeyError...
            raise BackendUnavailable(f"mlx-embeddings cannot load {model_dir}: {exc}") from exc
        dim = int(self.embed(["warm-up"]).vectors.shape[1])
        return ModelInfo(model=self.model, dim=dim, max_tokens=self.max_tokens, extra={
            "path": str(model_dir), "device": str(mx.default_device()),
            "pooling": "+".join(self._config.pooling), "normalize": self._config.normalize})

    def _encode(self, texts: Sequence[str]) -> list[Any]:
        prepared = [t.lower() for t in texts] if self._config.do_lower_case else list(texts)
        return self._tokenizer.encode_batch(prepared)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        if self._tokenizer is None:
            return super().token_lengths(texts)
        return [len(e.ids) for e in self._encode(texts)]

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        n = len(texts)
        if n == 0:
            return EmbedOutput(np.zeros((0, 0), dtype=np.float32), 0)
        ids, mask, types, cut = models.pad_batch(self._encode(texts), self._pad_id, "int32")
        mx = self._mx
        out = self._model(mx.array(ids), token_type_ids=mx.array(types), attention_mask=mx.array(mask))
        hidden = np.asarray(out.last_hidden_state.astype(mx.float32))
        vectors = models.pool(hidden, mask, self._config.pooling, self._config.normalize)
        return EmbedOutput(vectors, sum(cut), cut)

    def close(self) -> None:
        self._model = None
