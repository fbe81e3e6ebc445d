"""The contract every backend implements: load a model, describe it, embed a batch, close."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded backend reports in the ready handshake and in ``info``."""

    model: str            # the model name or path as configured
    dim: int              # embedding dimension
    max_tokens: int       # inputs longer than this are truncated (and counted)
    extra: Mapping[str, Any] = field(default_factory=dict)  # backend details: path, device, providers...

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "dim": self.dim, "max_tokens": self.max_tokens, "extra": dict(self.extra)}


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
    def embed(self, texts: Sequence[str]) -> EmbedOutput:
        """Embed a batch. Vectors are the model's own output (the worker applies ``normalize``)."""

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts (after truncation) used to group texts of similar length. Override with a real tokenizer."""
        return [len(t) // 4 + 2 for t in texts]

    def close(self) -> None:
        """Release resources. Default: nothing."""
