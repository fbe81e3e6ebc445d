"""MLX backend (Apple silicon; also runs, slowly, on Linux CPU with ``mlx[cpu]``).

The model comes from ``mlx_embeddings.utils.load`` (BERT-style encoders, ``qwen3``, ``gemma3_text``;
already-quantized mlx-community folders load as they are); tokenization uses the model's
tokenizer.json, and pooling, Dense layers and normalization follow ``modules.json``, applied in numpy
to the model's last hidden state, exactly as the onnx backend does.

Texts are padded on the right (mlx-embeddings' qwen3 gives NaN for left-padded rows); last-token
pooling takes each row's last real token. Gemma3 runs its layers here with one mask per attention
type (bidirectional sliding window or full), as transformers does, instead of mlx-embeddings' single
full mask, so inputs longer than the sliding window match too.

Options (all optional): ``quantize`` (None | "4bit" | "8bit": converted once into the cache with
``mlx.nn.quantize``, group size 64), ``max_seq_length`` (default from sentence_bert_config.json),
``cache_dir``, ``allow_download`` (True); prompts and dimensions: see
:mod:`akidb_embed.workers.request_options`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from akidb_embed import models
from akidb_embed.protocol.errors import BackendUnavailable
from akidb_embed.workers.backends.base import Backend, EmbedOutput, ModelInfo

log = logging.getLogger(__name__)

INSTALL_HINT = ("mlx is not installed: pip install 'mlx[cpu]' mlx-embeddings mlx-lm on Linux, "
                "or 'mlx mlx-embeddings mlx-lm' on Apple silicon")


class MlxBackend(Backend):
    kind = "mlx"

    def __init__(self, model: str, options: Mapping[str, Any]) -> None:
        super().__init__(model, options)
        self._model: Any = None
        self._encoder: models.TextEncoder | None = None

    def load(self) -> ModelInfo:
        try:
            import mlx.core as mx
            from mlx_embeddings.utils import load as mlx_load
        except ImportError as exc:
            raise BackendUnavailable(f"{INSTALL_HINT} ({exc})") from exc
        self._mx = mx
        source_dir = self.resolve_model_dir()
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local directory from here on
        try:
            model_dir = self._weights_dir(source_dir)
            self._config = models.read_sentence_config(model_dir)
            self.max_tokens = int(self.options.get("max_seq_length") or self._config.max_seq_length)
            self._encoder = models.TextEncoder(model_dir, self.max_tokens, self._config.do_lower_case)
            self._pad_id = models.pad_id(self._encoder.tokenizer, model_dir)
            self._model, _ = mlx_load(str(model_dir))
            self._hf_config = json.loads((model_dir / "config.json").read_text())
            self._pipeline = self._make_pipeline(model_dir)
        except Exception as exc:  # mlx_embeddings raises ValueError/FileNotFoundError/KeyError/ImportError...
            raise BackendUnavailable(f"mlx-embeddings cannot load {source_dir}: {type(exc).__name__}: {exc}") from exc
        self.enforce_cache_limit()
        dim = int(self.embed(["warm-up"]).vectors.shape[1])
        quant = self._hf_config.get("quantization") or {}
        return ModelInfo(model=self.model, dim=dim, max_tokens=self.max_tokens, extra={
            "path": str(model_dir), "device": str(mx.default_device()), **models.describe(self._config),
            "padding_side": "right", "architecture": self._hf_config.get("model_type"),
            "quantization": f"{quant['bits']}bit" if quant.get("bits") else None,
            "revision": models.weights_revision(model_dir, self.options.get("cache_dir"))},
            prompts=self._config.prompts, default_prompt_name=self._config.default_prompt_name,
            matryoshka_dims=self._config.matryoshka_dims)

    def _weights_dir(self, model_dir: Path) -> Path:
        quantize = self.options.get("quantize")
        if not quantize:
            return model_dir
        from akidb_embed.models.mlx_quantize import quantized_dir

        return quantized_dir(model_dir, str(quantize), cache_dir=self.options.get("cache_dir"))

    def _make_pipeline(self, model_dir: Path) -> models.Pipeline:
        """Dense weights from the module folders when present, else the model's own (a converted folder)."""
        if not self._config.dense or models.pipeline.dense_weights_present(model_dir, self._config):
            return models.Pipeline(model_dir, self._config)
        layers = getattr(self._model, "dense", None)
        if not layers or any(d.activation != "Identity" for d in self._config.dense):
            raise ValueError(f"{model_dir} declares Dense modules without weights, and the mlx model has no "
                             "matching dense layers")
        mx = self._mx

        def dense(x: np.ndarray) -> np.ndarray:
            y = mx.array(x)
            for layer in layers:
                y = layer(y)
            return np.asarray(y.astype(mx.float32))
        return models.Pipeline(model_dir, self._config, dense=dense)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        if self._encoder is None:
            return super().token_counts(texts)
        return self._encoder.counts(texts)

    def embed(self, texts: Sequence[str], truncate: str = "end") -> EmbedOutput:
        n = len(texts)
        if n == 0:
            return EmbedOutput(np.zeros((0, 0), dtype=np.float32), 0)
        if self._encoder is None:
            raise RuntimeError("embed() before load()")
        ids, mask, types, cut = models.pad_batch(self._encoder.encode(texts, truncate), self._pad_id, "int32")
        hidden = np.asarray(self._hidden(ids, mask, types).astype(self._mx.float32))
        return EmbedOutput(self._pipeline(hidden, mask), sum(cut), cut)

    def _hidden(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> Any:
        mx = self._mx
        arch = self._hf_config.get("model_type")
        if arch == "gemma3_text":
            return self._gemma3_hidden(mx.array(ids), mask)
        if arch in ("qwen3",):
            return self._model(mx.array(ids), attention_mask=mx.array(mask)).last_hidden_state
        return self._model(mx.array(ids), token_type_ids=mx.array(types),
                           attention_mask=mx.array(mask)).last_hidden_state

    def _gemma3_hidden(self, ids: Any, mask: np.ndarray) -> Any:
        """Gemma3's layers with a full or a bidirectional sliding-window mask each, as transformers runs them."""
        mx = self._mx
        inner = self._model.model
        h = inner.embed_tokens(ids)
        h = h * mx.array(inner.config.hidden_size ** 0.5, dtype=h.dtype)
        length = mask.shape[1]
        keys = mask[:, None, None, :] > 0                                   # (n, 1, 1, L)
        pos = np.arange(length)
        window = np.abs(pos[:, None] - pos[None, :]) < self._sliding_window(length)
        lowest = float(np.finfo(np.float32).min)   # finite: a padded row with no visible key gives no NaN
        full = mx.array(np.where(keys, 0.0, lowest).astype(np.float32)).astype(h.dtype)
        sliding = mx.array(np.where(keys & window[None, None], 0.0, lowest).astype(np.float32)).astype(h.dtype)
        for i, layer in enumerate(inner.layers):
            h = layer(h, full if self._is_global(i) else sliding, None)
        return inner.norm(h)

    def _sliding_window(self, length: int) -> int:
        """Keys a sliding layer sees on each side; transformers halves a bidirectional window (w // 2 + 1)."""
        window = int(self._hf_config.get("sliding_window") or length)
        return window // 2 + 1 if self._hf_config.get("use_bidirectional_attention") else window

    def _is_global(self, i: int) -> bool:
        types = self._hf_config.get("layer_types")
        if isinstance(types, list) and i < len(types):
            return types[i] == "full_attention"
        pattern = int(self._model.model.config.sliding_window_pattern)
        return i % pattern == pattern - 1

    def close(self) -> None:
        self._model = None
        super().close()
