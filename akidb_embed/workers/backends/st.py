"""sentence-transformers (PyTorch) backend: the reference implementation the others are compared to.

Any architecture sentence-transformers loads (BERT-style encoders, Qwen3-Embedding, EmbeddingGemma...),
with the model's own padding side. Prompts are prefixed by the worker, exactly as ``encode(prompt=...)`` does.

Options (all optional): ``device`` ("cpu"), ``threads`` (torch.set_num_threads), ``cache_dir``,
``allow_download`` (True), ``max_seq_length`` (default: the model's own, from sentence_bert_config.json);
prompts and dimensions: see :mod:`akidb_embed.workers.request_options`.
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


class SentenceTransformersBackend(Backend):
    kind = "sentence-transformers"

    def __init__(self, model: str, options: Mapping[str, Any]) -> None:
        super().__init__(model, options)
        self._model: Any = None

    def load(self) -> ModelInfo:
        model_dir = self.resolve_model_dir()
        # The model is a local directory now: nothing may reach for the hub from here on.
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise BackendUnavailable(
                f"sentence-transformers is not installed: pip install sentence-transformers torch ({exc})") from exc
        if self.options.get("threads"):
            torch.set_num_threads(int(self.options["threads"]))
        device = str(self.options.get("device", "cpu"))
        try:
            self._model = SentenceTransformer(str(model_dir), device=device)
        except Exception as exc:  # torch/transformers raise many types for a bad model dir or device
            raise BackendUnavailable(f"sentence-transformers cannot load {model_dir} on {device}: {exc}") from exc
        if self.options.get("max_seq_length"):
            self._model.max_seq_length = int(self.options["max_seq_length"])
        self.max_tokens = int(self._model.max_seq_length)
        self.enforce_cache_limit()
        dim = int(self.embed(["warm-up"]).vectors.shape[1])
        described = self._describe(model_dir)
        return ModelInfo(model=self.model, dim=dim, max_tokens=self.max_tokens, extra={
            "path": str(model_dir), "device": device, "threads": torch.get_num_threads(),
            "torch": torch.__version__, **described, "quantization": None,
            "revision": models.weights_revision(model_dir, self.options.get("cache_dir"))},
            prompts=described["prompts"], default_prompt_name=described["default_prompt_name"],
            matryoshka_dims=tuple(described["matryoshka_dims"]))

    def _describe(self, model_dir: Any) -> dict[str, Any]:
        """Pooling, prompts, dims... as the other backends read them; the model's own view if they can't."""
        try:
            described = models.describe(models.read_sentence_config(model_dir))
        except (OSError, ValueError, KeyError):  # modules only sentence-transformers runs (weighted mean...)
            default = self._model.default_prompt_name
            described = {"prompts": dict(self._model.prompts), "default_prompt_name": default,
                         "matryoshka_dims": []}
        described["padding_side"] = str(getattr(self._model.tokenizer, "padding_side", "right"))
        return described

    def _raw_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts with special tokens and without truncation."""
        encoded = self._model.tokenizer(list(texts), add_special_tokens=True, truncation=False,
                                        verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        if self._model is None:
            return super().token_counts(texts)
        return self._raw_lengths(texts)

    def embed(self, texts: Sequence[str], truncate: str = "end") -> EmbedOutput:
        if not texts:
            return EmbedOutput(np.zeros((0, 0), dtype=np.float32), 0)
        tokenizer = self._model.tokenizer
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "left" if truncate == "start" else "right"
        try:
            vectors = self._model.encode(list(texts), prompt="", convert_to_numpy=True, normalize_embeddings=False,
                                         batch_size=len(texts), show_progress_bar=False)
        finally:
            tokenizer.truncation_side = side
        cut = [n > self.max_tokens for n in self._raw_lengths(texts)]
        return EmbedOutput(np.ascontiguousarray(vectors, dtype=np.float32), sum(cut), cut)

    def close(self) -> None:
        self._model = None
        super().close()
