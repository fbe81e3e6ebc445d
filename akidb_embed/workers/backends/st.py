"""sentence-transformers (PyTorch) backend: the reference implementation the others are compared to.

Options (all optional): ``device`` ("cpu"), ``threads`` (torch.set_num_threads), ``cache_dir``,
``allow_download`` (True), ``max_seq_length`` (default: the model's own, from sentence_bert_config.json).
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
        try:
            model_dir = models.resolve_model(self.model, cache_dir=self.options.get("cache_dir"),
                                             allow_download=bool(self.options.get("allow_download", True)))
        except models.ModelNotFound as exc:
            raise BackendUnavailable(str(exc)) from exc
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
        dim = int(self.embed(["warm-up"]).vectors.shape[1])
        return ModelInfo(model=self.model, dim=dim, max_tokens=self.max_tokens, extra={
            "path": str(model_dir), "device": device, "threads": torch.get_num_threads(),
            "torch": torch.__version__})

    def _raw_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts with special tokens and without truncation."""
        encoded = self._model.tokenizer(list(texts), add_special_tokens=True, truncation=False,
                                        verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        if self._model is None:
            return super().token_lengths(texts)
        return [min(n, self.max_tokens) for n in self._raw_lengths(texts)]

    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        if not texts:
            return EmbedOutput(np.zeros((0, 0), dtype=np.float32), 0)
        vectors = self._model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=False,
                                     batch_size=len(texts), show_progress_bar=False)
        cut = [n > self.max_tokens for n in self._raw_lengths(texts)]
        return EmbedOutput(np.ascontiguousarray(vectors, dtype=np.float32), sum(cut), cut)

    def close(self) -> None:
        self._model = None
