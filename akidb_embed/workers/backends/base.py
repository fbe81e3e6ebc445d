"""The contract every backend implements: load a model, describe it, embed a batch, close."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded backend reports in the ready handshake and in ``info``."""

    model: str            # the model name or path as configured
    dim: int              # embedding dimension
    max_tokens: int       # inputs longer than this are truncated (and counted)
    extra: Mapping[str, Any] = field(default_factory=dict)  # backend details: path, device, providers...
    # What requests may ask for (see workers/request_options.py); also shown in ``extra``.
    prompts: Mapping[str, str] = field(default_factory=dict)   # prompt name -> prefix
    default_prompt_name: str | None = None
    matryoshka_dims: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        extra = {**self.extra, "prompts": dict(self.prompts), "default_prompt_name": self.default_prompt_name,
                 "matryoshka_dims": list(self.matryoshka_dims)}   # the fields win: they are what requests get
        return {"model": self.model, "dim": self.dim, "max_tokens": self.max_tokens, "extra": extra}


@dataclass
class EmbedOutput:
    vectors: np.ndarray   # float32, shape (len(texts), dim), C-contiguous
    truncated: int = 0    # how many of the texts were cut at max_tokens
    truncated_rows: Sequence[bool] | None = None  # per text: was it cut? (lets the worker split counts by request)

    def row_truncated(self, i: int) -> bool:
        return bool(self.truncated_rows[i]) if self.truncated_rows is not None else False


class Backend(ABC):
    """One model runtime. Lives in a worker process; never imported by the supervisor.

    Errors: ``load`` raises ``protocol.errors.BackendUnavailable`` when the runtime or the
    model is missing (with a reason a person can act on); ``embed`` raises ``EmbedError``
    subclasses for input problems and anything else for internal failures.
    """

    kind: ClassVar[str]

    def __init__(self, model: str, options: Mapping[str, Any]) -> None:
        self.model = model
        self.options = dict(options)

    @abstractmethod
    def load(self) -> ModelInfo:
        """Load the model; called once before any ``embed``."""

    @abstractmethod
    def embed(self, texts: Sequence[str], truncate: str = "end") -> EmbedOutput:
        """Embed a batch, cutting texts longer than ``max_tokens`` at the ``end`` or the ``start``.

        Vectors are the model's own output (the worker applies ``dimensions`` and ``normalize``).
        """

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text as the model would read it untruncated (with special tokens).

        The worker derives the per-text ``tokens`` and ``truncated`` answers from these and
        ``max_tokens``, and groups texts of similar length. Override with a real tokenizer.
        """
        return [len(t) // 4 + 2 for t in texts]

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts after truncation at ``max_tokens``."""
        limit = getattr(self, "max_tokens", None)
        counts = self.token_counts(texts)
        return counts if limit is None else [min(n, int(limit)) for n in counts]

    def resolve_model_dir(self) -> Path:
        """The model's directory (aliases, local path, package, cache, hub), held as in use while loaded.

        Raises BackendUnavailable when the model is nowhere to be found.
        """
        from akidb_embed import models
        from akidb_embed.protocol.errors import BackendUnavailable

        models.add_aliases(dict(self.options.get("aliases") or {}))
        cache = self.options.get("cache_dir")
        try:
            model_dir = models.resolve_model(self.model, cache_dir=cache,
                                             allow_download=bool(self.options.get("allow_download", True)))
        except models.ModelNotFound as exc:
            raise BackendUnavailable(str(exc)) from exc
        self._held = models.hold(model_dir, cache_dir=cache)
        return model_dir

    def enforce_cache_limit(self) -> None:
        """Apply ``[models] cache_max_gb`` once loaded (downloads, exports, conversions done): least
        recently used entries no process holds are removed. Never fails the load."""
        from akidb_embed import models

        try:
            models.enforce_limit(self.options.get("cache_max_gb"), cache_dir=self.options.get("cache_dir"))
        except OSError as exc:
            logging.getLogger(__name__).warning("model cache limit not applied: %s", exc)

    def close(self) -> None:
        """Release resources (and the hold on the model's cache entry)."""
        held = getattr(self, "_held", None)
        if held is not None:
            held.close()
