"""akidb-embed: text embeddings for host applications through a supervised bridge of worker processes."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from akidb_embed.protocol.errors import (  # noqa: E402
    BackendUnavailable, BadRequest, EmbedError, ErrorCode, InputTooLong, InternalError, Overloaded, PoisonInput,
    PayloadTooLarge, ServerUnavailable, ShuttingDown, Timeout, UnknownBackend, Unauthorized, WorkerDied,
)

_CLIENT_NAMES = ("AsyncClient", "Client", "EmbedResult")


def __getattr__(name: str) -> Any:
    # The clients (and numpy) load on first use, so the supervisor process never imports numpy.
    if name in _CLIENT_NAMES:
        from akidb_embed import client
        return getattr(client, name)
    raise AttributeError(f"module 'akidb_embed' has no attribute {name!r}")


__all__ = [
    "AsyncClient", "BackendUnavailable", "BadRequest", "Client", "EmbedError", "EmbedResult", "ErrorCode",
    "InputTooLong", "InternalError", "Overloaded", "PayloadTooLarge", "PoisonInput", "ServerUnavailable",
    "ShuttingDown", "Timeout", "Unauthorized", "UnknownBackend", "WorkerDied", "__version__",
]
