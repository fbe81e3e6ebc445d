"""akidb-embed: text embeddings for host applications through a supervised bridge of worker processes."""
__version__ = "0.1.0"

from akidb_embed.client import AsyncClient, Client, EmbedResult  # noqa: E402
from akidb_embed.protocol.errors import (  # noqa: E402
    BackendUnavailable, BadRequest, EmbedError, ErrorCode, InternalError, Overloaded, PoisonInput,
    ShuttingDown, Timeout, UnknownBackend, WorkerDied,
)

__all__ = [
    "AsyncClient", "BackendUnavailable", "BadRequest", "Client", "EmbedError", "EmbedResult", "ErrorCode",
    "InternalError", "Overloaded", "PoisonInput", "ShuttingDown", "Timeout", "UnknownBackend", "WorkerDied",
    "__version__",
]
